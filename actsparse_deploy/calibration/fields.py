"""What a masks or statistics file may hold: names on one line, feature indices,
counts and sizes in range. One set of checks for both files, each failure one
:class:`~actsparse_deploy.base.errors.MaskError` line naming the layer.

    >>> feature_indices([0, [2, 3]], "fc1")
    [0, 2, 3]
"""

from __future__ import annotations

import unicodedata
from collections.abc import Container
from typing import Any, TypeGuard

from ..base.errors import MaskError

#: The most values a dense per-feature mask may hold (4 GiB of float32): a masks
#: file declaring a larger layer input is corrupted or hostile, and refused
#: before anything of that size is made.
MAX_DENSE_VALUES = 2**30


#: the longest layer or model name a masks or statistics file may hold
MAX_NAME = 4096


#: the longest reason a file may give for a layer calibration skipped (it names the layer's parent and its class)
MAX_REASON = 2 * MAX_NAME


#: Unicode categories no name in a file may hold: control characters, line and
#: paragraph separators, lone surrogates (any other character can name a module)
_NOT_IN_NAMES = frozenset(("Cc", "Zl", "Zp", "Cs"))


def plain_text(text: str) -> bool:
    """True where ``text`` holds no control character, line or paragraph separator
    or lone surrogate: what a name from a file must be to be shown on one line.

    >>> plain_text("blocks.a\xa0b"), plain_text("a\x1b[31m"), plain_text("a\u2028b")
    (True, False, False)
    """
    return not any(unicodedata.category(c) in _NOT_IN_NAMES for c in text)


def layer_name_in_file(name: Any) -> str:
    """A layer's name as a file gives it, refused (:class:`MaskError`) unless it
    is what ``named_modules`` can give: non-empty parts joined by dots, plain text
    (:func:`plain_text`), at most ``MAX_NAME`` characters."""
    if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME and plain_text(name) and all(name.split("."))):
        raise MaskError(
            f"layer {str(name)[:80]!r} is not a layer name (non-empty parts joined by dots, no control characters, "
            f"at most {MAX_NAME} characters): the file is corrupted"
        )
    return name


def skipped_in_file(skipped: Any, layers: Container[str] = ()) -> dict[str, str]:
    """The selected layers a file says calibration left out, each -> why (a masks file's ``extra["skipped"]``, a
    statistics file's ``skipped``), refused (:class:`MaskError`) unless a table of layer names
    (:func:`layer_name_in_file`), none of ``layers`` (those the file holds), to plain text (no control characters) of at most
    :data:`MAX_REASON` characters."""
    if not isinstance(skipped, dict):
        raise MaskError(f"skipped layers {str(skipped)[:80]} must be a table of layer names to reasons: the file is corrupted")
    for name, why in skipped.items():
        try:
            layer_name_in_file(name)
        except MaskError as e:
            raise MaskError(f"skipped {e}") from e
        if name in layers:
            raise MaskError(f"layer {name!r} is listed both as skipped and with its own entry: the file is corrupted")
        if not (isinstance(why, str) and 0 < len(why) <= MAX_REASON and plain_text(why)):
            raise MaskError(f"skipped layer {name!r}: its reason {str(why)[:80]!r} is not plain text (no control characters) of at most "
                            f"{MAX_REASON} characters: the file is corrupted")
    return dict(skipped)


def model_name_in_file(model: Any) -> str | None:
    """The model a file names (None: none), refused (:class:`MaskError`) unless it
    is plain text (:func:`plain_text`) of at most ``MAX_NAME`` characters. Only ever
    shown or compared: a file's contents never choose a model to load."""
    if model is not None and not (isinstance(model, str) and len(model) <= MAX_NAME and plain_text(model)):
        raise MaskError(f"model {str(model)[:80]!r} is not a model's name (no control characters, at most {MAX_NAME} characters)")
    return model


def is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def feature_indices(features: Any, name: str) -> list[int]:
    """The flat feature indices (a feature is an index or a list of them, as
    upstream allows); refuse anything else, negatives and repeats."""
    if not isinstance(features, (tuple, list)) or not features:
        raise MaskError(f"features of layer {name!r} must be a non-empty list of feature indices, got {features!r}")
    flat: list[int] = []
    for feature in features:
        group = list(feature) if isinstance(feature, (tuple, list)) else [feature]
        if not group or not all(is_int(i) for i in group):
            raise MaskError(f"features of layer {name!r} must be integer indices (or lists of them), got {feature!r}")
        flat += group
    seen: set[int] = set()
    for index in flat:
        if index < 0:
            raise MaskError(f"feature {index} of layer {name!r} is negative: features are indices from 0")
        if index in seen:
            raise MaskError(f"feature {index} of layer {name!r} is given twice")
        seen.add(index)
    return flat
