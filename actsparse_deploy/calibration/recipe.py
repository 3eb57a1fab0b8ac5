"""Recipes: which layers get a mask, and how it is computed.

A recipe is a TOML file or the same thing as Python objects. ``[defaults]`` holds
the settings every selected layer starts from; each ``[[layers]]`` rule selects
layers by a glob over module names (``name``) and / or by module type (``type``)
and may override any setting. A layer matched by several rules gets their
overrides in order; ``sparse_config`` merges key by key.

    >>> from actsparse_deploy.calibration.recipe import Recipe
    >>> recipe = Recipe.from_toml('''
    ... [defaults]
    ... aggregate_fn = "sum_abs"
    ... reduce_fn = { name = "feature_mean", axis = 0 }
    ... mask_fn = "topk"
    ... sparse_config = { sparsity_level = 0.5 }
    ...
    ... [[layers]]
    ... name = "fc*"
    ... type = "Linear"
    ... ''')
    >>> from torch import nn
    >>> model = nn.Sequential()
    >>> model.add_module("fc1", nn.Linear(4, 4)); model.add_module("fc2", nn.Linear(4, 2))
    >>> sorted(recipe.select(model))
    ['fc1', 'fc2']

A selection method that sees the layer's weight (:mod:`actsparse_deploy.calibration.methods`)
replaces the three functions: ``method = "obs"`` (or ``"wanda"``,
``"fluctuation"``), with ``compensate = "none" | "bias" | "lstsq"`` (the layer's
weight and bias refit to make up for the removed features:
:mod:`actsparse_deploy.calibration.compensate`) and ``damping`` (the ridge of ``obs`` and
``lstsq``, relative to the Gram matrix's mean diagonal; unset, ``obs`` takes 0.001
and ``lstsq`` chooses one per layer by cross-validation). ``heads = true`` on an
attention output projection (with a method) removes whole attention heads
(:mod:`actsparse_deploy.nn.attention`); ``--heads`` adds such a rule. The statistic collected
is then what they need (``gram`` for ``obs`` or ``lstsq``, else ``moments``):

    >>> with_method = recipe.with_method("obs", "lstsq")
    >>> layer = with_method.select(model)["fc1"]
    >>> layer.method.name, layer.compensate, layer.aggregate_fn.name
    ('obs', 'lstsq', 'gram')
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w
from torch import nn

from ..base.errors import CalibrationError, ConfigError, RecipeError
from .compensate import COMPENSATIONS, DEFAULT_DAMPING
from .fields import is_int
from .functions import AGGREGATE_FNS, MASK_FNS, REDUCE_FNS, BuiltinFn, Registry, check_mask_config
from .methods import METHODS, Method

__all__ = ["exact_glob", "FnSpec", "LayerRule", "LayerSettings", "Recipe", "ResolvedLayer", "resolve_recipe"]

RECIPE_VERSION = 1
_REGISTRIES: dict[str, Registry[Any]] = {"aggregate_fn": AGGREGATE_FNS, "reduce_fn": REDUCE_FNS, "mask_fn": MASK_FNS}
#: What a layer gets when neither the defaults nor a rule says otherwise.
TOOL_DEFAULTS = {"aggregate_fn": "sum_abs", "reduce_fn": "mean", "mask_fn": "topk"}


@dataclass(frozen=True)
class FnSpec:
    """A built-in function by name, with parameters (``feature_mean``'s axis)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, value: Any, key: str) -> FnSpec:
        if isinstance(value, FnSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping) and isinstance(value.get("name"), str):
            params = {k: _freeze(v) for k, v in value.items() if k != "name"}
            return cls(value["name"], tuple(sorted(params.items())))
        raise RecipeError(f"{key} must be a function name or a table with a 'name', got {value!r}")

    def to_value(self) -> str | dict[str, Any]:
        return self.name if not self.params else {"name": self.name, **{k: _thaw(v) for k, v in self.params}}

    def resolve(self, key: str) -> BuiltinFn:
        return _REGISTRIES[key].get(self.name, **{k: _thaw(v) for k, v in self.params})


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class LayerSettings:
    """Overridable settings; ``None`` means "not set here"."""

    aggregate_fn: FnSpec | None = None
    reduce_fn: FnSpec | None = None
    mask_fn: FnSpec | None = None
    sparse_config: tuple[tuple[str, Any], ...] | None = None
    features: tuple[int, ...] | None = None
    feature_dim: int | None = None
    method: str | None = None  # a selection method (actsparse_deploy.calibration.methods): replaces the three functions
    compensate: str | None = None  # "none" | "bias" | "lstsq" (actsparse_deploy.calibration.compensate)
    damping: float | None = None  # ridge of obs / lstsq, relative to the Gram block's mean diagonal
    heads: bool | None = None  # the input is attention heads: the method removes whole heads (actsparse_deploy.nn.attention)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> LayerSettings:
        _check_keys(data, {f.name for f in fields(cls)}, where)
        kwargs: dict[str, Any] = {}
        for key in _REGISTRIES:
            if data.get(key) is not None:
                kwargs[key] = FnSpec.parse(data[key], f"{where}.{key}")
        if data.get("sparse_config") is not None:
            config = data["sparse_config"]
            if not isinstance(config, Mapping):
                raise RecipeError(f"{where}.sparse_config must be a table, got {config!r}")
            kwargs["sparse_config"] = tuple(sorted((k, _freeze(v)) for k, v in config.items()))
        if data.get("features") is not None:
            kwargs["features"] = _features(data["features"], f"{where}.features")
        if data.get("feature_dim") is not None:
            if not is_int(data["feature_dim"]):
                raise RecipeError(f"{where}.feature_dim must be an integer, got {data['feature_dim']!r}")
            if data["feature_dim"] == 0:
                raise RecipeError(
                    f"{where}.feature_dim 0 is the batch axis: give the axis the features lie on "
                    "(-1 for a Linear's input, 1 for a ConvNd's channels)"
                )
            kwargs["feature_dim"] = data["feature_dim"]
        for key in ("method", "compensate", "damping"):
            if data.get(key) is not None:
                kwargs[key] = _check_method_setting(key, data[key], f"{where}.{key}")
        if data.get("heads") is not None:
            kwargs["heads"] = _check_heads(data["heads"], f"{where}.heads")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in _REGISTRIES:
            spec = getattr(self, key)
            if spec is not None:
                out[key] = spec.to_value()
        if self.sparse_config is not None:
            out["sparse_config"] = {k: _thaw(v) for k, v in self.sparse_config}
        if self.features is not None:
            out["features"] = list(self.features)
        if self.feature_dim is not None:
            out["feature_dim"] = self.feature_dim
        for key in ("method", "compensate", "damping", "heads"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def merged(self, other: LayerSettings) -> LayerSettings:
        """These settings overridden by ``other``'s (sparse_config key by key)."""
        changes = {f.name: getattr(other, f.name) for f in fields(self) if getattr(other, f.name) is not None}
        if self.sparse_config is not None and other.sparse_config is not None:
            changes["sparse_config"] = tuple(sorted({**dict(self.sparse_config), **dict(other.sparse_config)}.items()))
        return replace(self, **changes)

    def resolve(self, where: str) -> ResolvedLayer:
        """Check and resolve into what ``register_layer`` takes. With a ``method``
        the aggregate is what the method and the compensation need (``gram`` for
        ``obs`` or ``lstsq``, else ``moments``) and the recipe's aggregate / reduce
        / mask functions are not used."""
        method: Method | None = None
        compensate = self.compensate or "none"
        damping = DEFAULT_DAMPING if self.damping is None else self.damping
        try:
            for key in ("method", "compensate", "damping"):  # settings made in Python, not read by from_dict
                if getattr(self, key) is not None:
                    _check_method_setting(key, getattr(self, key), key)
            config = {k: _thaw(v) for k, v in (self.sparse_config or ())}
            _check_sparse_config(config)
            if self.heads is not None:
                _check_heads(self.heads, "heads", without_method=self.method is None)
            if self.method is not None:
                method = METHODS.get(self.method)
                if self.features is not None:
                    raise RecipeError(
                        f"method {self.method!r} selects whole input features of the layer: it does not take "
                        "per-feature masks (features / feature_dim); remove them or the method"
                    )
                if "sparsity_level" not in config:
                    raise RecipeError(f"method {self.method!r} needs sparse_config.sparsity_level")
                aggregate = "gram" if method.needs == "gram" or compensate == "lstsq" else "moments"
                fns = {"aggregate_fn": AGGREGATE_FNS.get(aggregate), "reduce_fn": REDUCE_FNS.get("mean"), "mask_fn": MASK_FNS.get("topk")}
            else:
                if compensate != "none":
                    raise RecipeError(
                        f"compensate = {compensate!r} needs a method (one of {', '.join(METHODS.names())}): "
                        "compensation reads the statistics a method collects; set method"
                    )
                fns = {key: (getattr(self, key) or FnSpec(TOOL_DEFAULTS[key])).resolve(key) for key in _REGISTRIES}
                check_mask_config(fns["mask_fn"], config)
                if self.features is not None and fns["aggregate_fn"].name in ("moments", "gram"):
                    raise RecipeError(
                        f"aggregate_fn {fns['aggregate_fn'].name!r} is a statistic of all input features: it does not "
                        "take per-feature masks (features / feature_dim)"
                    )
            if self.features is not None:  # settings made in Python, not read by from_dict
                _features(self.features, "features", self.feature_dim)
            if self.feature_dim == 0:
                raise RecipeError("feature_dim 0 is the batch axis: give the axis the features lie on")
        except (ConfigError, RecipeError) as e:
            raise RecipeError(f"{where}: {e}") from e
        return ResolvedLayer(
            aggregate_fn=fns["aggregate_fn"],
            reduce_fn=fns["reduce_fn"],
            mask_fn=fns["mask_fn"],
            sparse_config=config,
            features=list(self.features) if self.features is not None else None,
            feature_dim=self.feature_dim,
            method=method,
            compensate=compensate,
            damping=damping,
            refit_damping=self.damping,
            heads=bool(self.heads),
        )


def _check_method_setting(key: str, value: Any, where: str) -> Any:
    """``method`` a registered method's name, ``compensate`` one of
    :data:`COMPENSATIONS`, ``damping`` a finite number >= 0."""
    if key == "method":
        if not isinstance(value, str) or value not in METHODS:
            raise RecipeError(f"{where}: unknown method {_short(value)}; known: {', '.join(METHODS.names())}")
    elif key == "compensate":
        if not isinstance(value, str) or value not in COMPENSATIONS:
            raise RecipeError(f"{where} must be one of {', '.join(COMPENSATIONS)}, got {_short(value)}")
    elif not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise RecipeError(f"{where} must be a finite number >= 0 (relative to the Gram matrix's mean diagonal), got {_short(value)}")
    return value


def exact_glob(name: str) -> str:
    """``name`` as a glob that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _check_heads(value: Any, where: str, without_method: bool = False) -> bool:
    """``heads`` true or false; true needs a method (``without_method``: the layer's settings have none)."""
    if not isinstance(value, bool):
        raise RecipeError(f"{where} must be true or false, got {_short(value)}")
    if value and without_method:
        raise RecipeError(f"heads = true selects whole attention heads with a method: set method (one of {', '.join(METHODS.names())})")
    return value


def _features(feats: Any, where: str, feature_dim: int | None | bool = False) -> tuple[int, ...]:
    """A non-empty list of distinct, non-negative feature indices (checked once
    here, so that a wrong list fails before any data is read); ``feature_dim`` given (None or
    an axis): the axis they are on, which must be given."""
    if feature_dim is None:
        raise ConfigError("features were given without feature_dim")
    if not isinstance(feats, (list, tuple)) or not feats:
        raise RecipeError(f"{where} must be a non-empty list of integer indices, got {_short(feats)}")
    seen: set[int] = set()
    for f in feats:
        if not is_int(f):
            raise RecipeError(f"{where} must be a list of integer indices, got {f!r} in it")
        if f < 0:
            raise RecipeError(f"{where} must not be negative, got {f}: features are indices from 0 along feature_dim")
        if f in seen:
            raise RecipeError(f"{where}: feature {f} is given twice")
        seen.add(f)
    return tuple(feats)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_sparse_config(config: dict[str, Any]) -> None:
    level = config.get("sparsity_level")
    if level is not None and not (_is_number(level) and 0.0 <= level <= 1.0):
        raise RecipeError(f"sparsity_level must be a number in [0, 1], got {level!r}")
    threshold = config.get("threshold")
    if threshold is not None and not (_is_number(threshold) and math.isfinite(threshold)):
        raise RecipeError(f"threshold must be a finite number, got {threshold!r}")
    block = config.get("sparse_block_shape")
    if block is not None:
        sizes = block if isinstance(block, (list, tuple)) else [block]
        if not sizes or not all(is_int(b) and b >= 1 for b in sizes):
            raise RecipeError(f"sparse_block_shape must be positive integers, got {_short(block)}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)




@dataclass(frozen=True)
class ResolvedLayer:
    """One layer's final config: the keyword arguments of ``register_layer``."""

    aggregate_fn: BuiltinFn
    reduce_fn: BuiltinFn
    mask_fn: BuiltinFn
    sparse_config: dict[str, Any]
    features: list[int] | None
    feature_dim: int | None
    method: Method | None = None
    compensate: str = "none"
    damping: float = DEFAULT_DAMPING
    #: the ``lstsq`` refit's damping where the recipe sets one; None: chosen per layer by cross-validation
    refit_damping: float | None = None
    #: the layer's input is attention heads: its method removes whole heads (:mod:`actsparse_deploy.nn.attention`)
    heads: bool = False

    def register_kwargs(self) -> dict[str, Any]:
        return {
            "aggregate_fn": self.aggregate_fn,
            "reduce_fn": self.reduce_fn,
            "mask_fn": self.mask_fn,
            "features": self.features,
            "feature_dim": self.feature_dim,
            **self.sparse_config,
        }


@dataclass(frozen=True)
class LayerRule:
    """Select layers by name glob(s) and / or type name(s); both must match where both are set."""

    name: tuple[str, ...] = ()
    type: tuple[str, ...] = ()
    settings: LayerSettings = field(default_factory=LayerSettings)

    def __post_init__(self) -> None:
        if not self.name and not self.type:
            raise RecipeError("a [[layers]] rule needs 'name' (glob over module names) or 'type' (module class)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> LayerRule:
        _check_keys(data, {"name", "type"} | {f.name for f in fields(LayerSettings)}, where)
        settings = LayerSettings.from_dict({k: v for k, v in data.items() if k not in ("name", "type")}, where)
        try:
            return cls(name=_strings(data.get("name"), f"{where}.name"), type=_strings(data.get("type"), f"{where}.type"), settings=settings)
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name[0] if len(self.name) == 1 else list(self.name)
        if self.type:
            out["type"] = self.type[0] if len(self.type) == 1 else list(self.type)
        return {**out, **self.settings.to_dict()}

    def matches(self, module: nn.Module, fqn: str) -> bool:
        """The ``filter_fn(module, fqn)`` convention."""
        if self.name and not any(fnmatch.fnmatchcase(fqn, pattern) for pattern in self.name):
            return False
        if self.type:
            names = {c.__name__ for c in type(module).__mro__} | {
                f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__
            }
            return any(t in names for t in self.type)
        return True

    def describe(self) -> str:
        parts = [f"name={'|'.join(self.name)}"] if self.name else []
        parts += [f"type={'|'.join(self.type)}"] if self.type else []
        return " ".join(parts)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v for v in values):
        raise RecipeError(f"{where} must be a non-empty string or a list of them, got {value!r}")
    return tuple(values)


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a table, got {data!r}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}"
        )


@dataclass(frozen=True)
class Recipe:
    """Defaults plus layer rules; checked on construction."""

    layers: tuple[LayerRule, ...]
    defaults: LayerSettings = field(default_factory=LayerSettings)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {self.version} is not supported (this tool reads version {RECIPE_VERSION})")
        if not self.layers:
            raise RecipeError("the recipe selects no layers: add at least one [[layers]] rule")
        for i, rule in enumerate(self.layers):
            self.defaults.merged(rule.settings).resolve(f"layers[{i}] ({rule.describe()})")

    # --- construction ------------------------------------------------------------

    @classmethod
    def simple(
        cls,
        layers: list[str] | None = None,
        layer_types: list[str] | None = None,
        sparsity: float | None = None,
        threshold: float | None = None,
        aggregate_fn: str = "sum_abs",
        structured: bool = False,
    ) -> Recipe:
        """The one-rule recipe the CLI flags describe: ``topk`` at ``sparsity``,
        or ``threshold``; structured (one value per input feature / channel) if asked."""
        if (sparsity is None) == (threshold is None):
            raise RecipeError("give exactly one of sparsity or threshold")
        if not layers and not layer_types:
            raise RecipeError("name the layers to mask (a glob over module names) or their type")
        mask_fn, config = ("topk", {"sparsity_level": sparsity}) if sparsity is not None else ("threshold", {"threshold": threshold})
        defaults = LayerSettings.from_dict(
            {
                "aggregate_fn": aggregate_fn,
                "reduce_fn": "feature_mean" if structured else "mean",
                "mask_fn": mask_fn,
                "sparse_config": config,
            },
            "defaults",
        )
        rules = [LayerRule(name=(pattern,)) for pattern in layers or []]
        rules += [LayerRule(type=(t,)) for t in layer_types or []]
        return cls(layers=tuple(rules), defaults=defaults)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> Recipe:
        _check_keys(data, {"version", "defaults", "layers"}, source)
        version = data.get("version", RECIPE_VERSION)
        if not is_int(version):
            raise RecipeError(f"{source}: version must be an integer, got {version!r}")
        defaults = LayerSettings.from_dict(data.get("defaults", {}), f"{source}: defaults")
        raw_layers = data.get("layers", [])
        if not isinstance(raw_layers, list):
            raise RecipeError(f"{source}: 'layers' must be an array of tables ([[layers]])")
        rules = tuple(LayerRule.from_dict(rule, f"{source}: layers[{i}]") for i, rule in enumerate(raw_layers))
        try:
            return cls(layers=rules, defaults=defaults, version=version)
        except RecipeError as e:
            raise RecipeError(f"{source}: {e}") from e

    @classmethod
    def from_toml(cls, text: str, source: str = "recipe") -> Recipe:
        try:
            data = tomllib.loads(text)
            return cls.from_dict(data, source)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{source} is not valid TOML: {e}") from e
        except RecursionError as e:  # tomllib and our own checks recurse into nested arrays / tables
            raise RecipeError(f"{source} is nested too deeply (arrays or tables inside each other): it cannot be a recipe") from e

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"recipe file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"recipe file {path} cannot be read: {e}") from e
        return cls.from_toml(text, str(path))

    @classmethod
    def coerce(cls, recipe: Recipe | str | Path | Mapping[str, Any]) -> Recipe:
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, Mapping):
            return cls.from_dict(recipe)
        return cls.load(recipe)

    def with_method(self, method: str | None = None, compensate: str | None = None, damping: float | None = None) -> Recipe:
        """The same recipe with ``method`` / ``compensate`` / ``damping`` (those
        given) set on the defaults and on every rule, overriding the file's: what
        the command line's ``--method`` and ``--compensate`` do."""
        changes: dict[str, Any] = {k: v for k, v in (("method", method), ("compensate", compensate), ("damping", damping)) if v is not None}
        for key, value in changes.items():
            _check_method_setting(key, value, key)
        override = LayerSettings(**changes)
        rules = tuple(replace(rule, settings=rule.settings.merged(override)) for rule in self.layers)
        return replace(self, defaults=self.defaults.merged(override), layers=rules)

    def with_heads(self, layers: Iterable[str]) -> Recipe:
        """The same recipe with one more rule: ``layers`` (attention output projections, by name) take
        ``heads = true`` (whole heads removed; see :mod:`actsparse_deploy.nn.attention`), selected by the
        recipe's method (``obs`` with ``lstsq`` where the defaults set none): what ``--heads`` does."""
        names = tuple(exact_glob(name) for name in layers)
        if not names:
            raise RecipeError("--heads: the model has no attention heads this tool can prune (an output projection named "
                              "*.o_proj, *attention.output.dense, ... with query, key and value nn.Linear beside it; a fused "
                              "projection such as GPT-2's c_attn is not)")
        own = self.defaults.method is not None  # else obs with lstsq, the tool's default method
        settings = LayerSettings(heads=True) if own else LayerSettings(method="obs", compensate="lstsq", heads=True)
        return replace(self, layers=(*self.layers, LayerRule(name=names, settings=settings)))

    def with_sparsity(self, level: float) -> Recipe:
        """The same recipe with ``sparsity_level`` set to ``level`` everywhere."""
        override = LayerSettings(sparse_config=(("sparsity_level", level),))
        rules = tuple(
            replace(rule, settings=rule.settings.merged(override)) if rule.settings.sparse_config else rule
            for rule in self.layers
        )
        return replace(self, defaults=self.defaults.merged(override), layers=rules)

    # --- output ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        defaults = self.defaults.to_dict()
        if defaults:
            out["defaults"] = defaults
        out["layers"] = [rule.to_dict() for rule in self.layers]
        return out

    def dumps(self) -> str:
        return tomli_w.dumps(self.to_dict())

    # --- selection ---------------------------------------------------------------

    def select(self, model: nn.Module) -> dict[str, ResolvedLayer]:
        """Module name -> resolved config for every layer the rules select, in
        model order. A rule that matches nothing is an error."""
        modules = [(fqn, m) for fqn, m in model.named_modules() if fqn]
        selected: dict[str, LayerSettings] = {}
        for i, rule in enumerate(self.layers):
            hits = [(fqn, m) for fqn, m in modules if rule.matches(m, fqn)]
            if not hits:
                raise RecipeError(
                    f"layers[{i}] ({rule.describe()}) matches no module of the model; "
                    f"modules: {_preview([f'{fqn} ({type(m).__name__})' for fqn, m in modules])}"
                )
            for fqn, _ in hits:
                selected[fqn] = selected.get(fqn, self.defaults).merged(rule.settings)
        order = {fqn: i for i, (fqn, _) in enumerate(modules)}
        return {fqn: selected[fqn].resolve(f"layer {fqn!r}") for fqn in sorted(selected, key=order.__getitem__)}


def _preview(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def resolve_recipe(
    model_name: str,
    builtin: Recipe | str | Path | Mapping[str, Any] | None,
    recipe: Recipe | str | Path | Mapping[str, Any] | None = None,
    *,
    layers: list[str] | None = None,
    layer_types: list[str] | None = None,
    sparsity: float | None = None,
    threshold: float | None = None,
    aggregate: str | None = None,
    structured: bool = False,
    method: str | None = None,
    compensate: str | None = None,
    damping: float | None = None,
) -> Recipe:
    """The one recipe loader: ``recipe`` (a file, a mapping or a Recipe), else a
    one-rule recipe from ``layers`` / ``layer_types`` with ``sparsity`` or
    ``threshold`` (see :meth:`Recipe.simple`), else the built-in model's own
    (``builtin``: the built-in's recipe, handed down by the caller; None for any
    other model). ``sparsity`` alone overrides the
    sparsity level of a file's or the built-in's recipe; ``method``,
    ``compensate`` and ``damping`` override those of every layer of any of them
    (:meth:`Recipe.with_method`).

    >>> own = Recipe.simple(layers=["fc1"], sparsity=0.5)
    >>> resolve_recipe("digits-mlp", own, sparsity=0.25).defaults.sparse_config
    (('sparsity_level', 0.25),)
    >>> len(resolve_recipe("mine:build", None, layers=["fc*"], sparsity=0.5).layers)
    1
    """
    if layers or layer_types:
        if recipe is not None:
            raise RecipeError("`recipe` cannot be combined with `layers` or `layer_types`")
        if sparsity is None and threshold is None:
            raise RecipeError("`layers` / `layer_types` need `sparsity` or `threshold`")
        simple = Recipe.simple(layers, layer_types, sparsity, threshold, aggregate or "sum_abs", structured)
        return simple.with_method(method, compensate, damping)
    if threshold is not None or structured or aggregate is not None:
        raise RecipeError("`threshold`, `structured` and `aggregate` describe a recipe from `layers`: give `layers` too")
    if recipe is None:
        if builtin is None:
            raise RecipeError(
                f"{model_name!r} has no built-in recipe: pass `recipe` (a recipe file), or `layers` with `sparsity`"
            )
        recipe = builtin
    loaded = Recipe.coerce(recipe)
    loaded = loaded.with_sparsity(sparsity) if sparsity is not None else loaded
    return loaded.with_method(method, compensate, damping)


def uncalled_layers(model: nn.Module, recipe: Recipe, unreached: Iterable[str]) -> dict[str, str]:
    """The selected layers the forward pass never called (``unreached``: a
    module whose parent reads its weight directly, as ``nn.MultiheadAttention``
    does with ``out_proj``; ``actsparse inspect`` does not list them either),
    each -> why it is left unmasked. A rule of ``recipe`` that selects only such
    layers selects nothing the model runs: a :class:`CalibrationError`."""
    missing = list(unreached)
    modules = [(fqn, m) for fqn, m in model.named_modules() if fqn]
    for i, rule in enumerate(recipe.layers):
        hits = [fqn for fqn, m in modules if rule.matches(m, fqn)]
        if hits and set(missing).issuperset(hits):
            shown = ", ".join(hits[:8]) + (f", ... ({len(hits) - 8} more)" if len(hits) > 8 else "")
            raise CalibrationError(
                f"layers[{i}] ({rule.describe()}) selects only layers the forward pass never calls on the calibration data: "
                f"{shown} ({_never_called(model, hits[0])}); select layers it calls (`actsparse inspect` lists them)"
            )
    return {name: f"never called by the forward pass on the calibration data ({_never_called(model, name)}): not masked"
            for name in missing}


def _never_called(model: nn.Module, name: str) -> str:
    parent = name.rpartition(".")[0]
    if not parent:
        return "the model does not call it"
    return f"its parent {parent} ({type(model.get_submodule(parent)).__name__}) may use its weight without calling it"
