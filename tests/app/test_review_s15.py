"""Review s15: the command line's end under torchrun, the layer-weight read check of fold / auto / prune."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from actsparse_deploy.bake.squash import squash
from actsparse_deploy.base.errors import SquashError, Terminated
from actsparse_deploy.calibration.masks import LayerMask, Masks

from ..helpers import LinearPair

# --- cli.main(): every way out is one line and its exit code, under torchrun with os._exit --------------


class _Ended(BaseException):
    pass


def _main(monkeypatch: pytest.MonkeyPatch, world: str, argv: list[str], app: Any = None) -> tuple[int, str, str, list[int]]:
    """cli.main() with os._exit replaced: (exit code, stdout, stderr, os._exit calls)."""
    import io

    from actsparse_deploy.app import cli

    ended: list[int] = []

    def fake_exit(status: int) -> None:
        ended.append(status)
        raise _Ended

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(sys, "argv", ["actsparse", *argv])
    if app is not None:
        monkeypatch.setattr(cli, "app", app)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cli.main()
        code: Any = None
    except _Ended:
        code = ended[-1]
    except SystemExit as e:
        code = e.code
    finally:  # main() installs its handlers (and ignores signals before os._exit): not this process's
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code, out.getvalue(), err.getvalue(), ended


def _raising(error: BaseException) -> Any:
    def app() -> None:
        raise error

    return app


@pytest.mark.parametrize("world", ["2", "1"])
@pytest.mark.parametrize(("error", "code", "start"), [
    (RuntimeError("boom\nsecond line"), 1, "internal error: RuntimeError: boom second line"),
    (KeyboardInterrupt(), 130, "interrupted (SIGINT)"),
    (Terminated(), 143, "terminated (SIGTERM)"),
    (SystemExit("a message for the user"), 1, "a message for the user"),
])
def test_what_escapes_the_commands_handlers_is_one_line_and_its_code(monkeypatch: pytest.MonkeyPatch, world: str,
                                                                     error: BaseException, code: int, start: str) -> None:
    """A bug outside a command's handler (a parameter callback), a signal while the
    command line is parsed (before handle_errors): before, under torchrun the
    exception left main() past os._exit (a traceback, exit 1, and the interpreter
    teardown os._exit is there to avoid; SIGINT / SIGTERM gave 1, not 130 / 143),
    and sys.exit("text") ended with os._exit(1) and the text lost. (The faults
    are raised by a stand-in for the app: they cannot be caused on demand.)"""
    got, out, err, ended = _main(monkeypatch, world, [], app=_raising(error))
    assert got == code
    assert ended == ([code] if world == "2" else [])
    assert err.startswith(start) and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(("world", "argv", "code"), [
    ("2", ["--help"], 0), ("2", ["--version"], 0), ("abc", ["--version"], 0), ("2", ["models", "--json"], 0),
])
def test_light_commands_under_torchrun_end_with_their_output(monkeypatch: pytest.MonkeyPatch, world: str, argv: list[str],
                                                              code: int) -> None:
    got, out, err, ended = _main(monkeypatch, world, argv)
    assert (got, ended) == (code, [code]) and out.strip() != "" and err == "", err


@pytest.mark.parametrize("world", ["abc", "0", "\u00b2"])
def test_a_malformed_world_size_is_a_usage_error_with_os_exit(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, world: str) -> None:
    got, out, err, ended = _main(monkeypatch, world, ["calibrate", "digits-mlp", "-o", str(tmp_path / "m.safetensors")])
    assert (got, ended) == (2, [2]), err
    assert err.startswith("error: WORLD_SIZE=") and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("world", ["2", "1"])
def test_a_dynamic_axis_too_long_for_int_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, world: str) -> None:
    """`--dynamic-axis x:<5000 digits>:y`: int() refuses over 4300 digits with a
    ValueError, which the callback let through: a traceback and exit 1 (and, under
    torchrun, no os._exit). Now exit 2, one line, before any work."""
    axis = "x:" + "1" * 5000 + ":y"
    got, out, err, ended = _main(monkeypatch, world, ["convert", "digits-mlp", "--dynamic-axis", axis, "-o", str(tmp_path / "o")])
    assert got == 2, err
    assert ended == ([2] if world == "2" else [])
    assert err.startswith("error: ") and "--dynamic-axis" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


# --- whose read of a layer's weight is "elsewhere" ------------------------------------------------------


def _hooked(model: nn.Module, name: str, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the sparsifier's semantics compute: the mask on the layer's call input only."""
    layer = model.get_submodule(name)
    handle = layer.register_forward_pre_hook(lambda _m, args: (args[0] * mask, *args[1:]))
    try:
        return model(x)
    finally:
        handle.remove()


class _TiedHead(nn.Module):
    """An embedding and an output layer sharing one weight (GPT-2's wte / lm_head)."""

    def __init__(self, head_first: bool, read_head: bool = False) -> None:
        super().__init__()
        if head_first:
            self.head = nn.Linear(6, 10, bias=False)
            self.emb = nn.Embedding(10, 6)
        else:
            self.emb = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 10, bias=False)
        self.emb.weight = self.head.weight
        self.read_head = read_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.emb(ids))
        out = self.head(h)
        return out + F.linear(h, self.head.weight) if self.read_head else out


def _mask(n: int) -> torch.Tensor:
    mask = torch.ones(n)
    mask[::2] = 0
    return mask


@pytest.mark.parametrize("head_first", [True, False])
def test_a_tied_weight_read_by_the_other_layer_is_not_elsewhere(head_first: bool) -> None:
    """Fold gives the layer a new weight: the embedding that shares it keeps its
    values (and the mask is on the head's input only). Before, with the embedding
    declared first, fold refused ("head.weight is also read by aten.embedding in
    emb") and auto kept a multiply, depending on declaration order only."""
    torch.manual_seed(0)
    model = _TiedHead(head_first).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    masks = Masks({"head": LayerMask(_mask(6))})
    want = _hooked(model, "head", _mask(6), ids)
    for mode in ("fold", "auto"):
        result = squash(model, masks, mode, example=ids)
        assert result.modes == {"head": "fold"}, result.reasons
        assert_close(result.model(ids), want)


@pytest.mark.parametrize("head_first", [True, False])
def test_model_code_reading_a_tied_layer_weight_is_elsewhere(head_first: bool) -> None:
    """The same tied model whose code also reads self.head.weight: refused by fold,
    a multiply under auto, whichever placeholder name torch.export gave the tensor."""
    torch.manual_seed(0)
    model = _TiedHead(head_first, read_head=True).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    masks = Masks({"head": LayerMask(_mask(6))})
    with pytest.raises(SquashError, match=r"layer 'head' cannot be folded: head.weight is also read by aten.linear"):
        squash(model, masks, "fold", example=ids)
    auto = squash(model, masks, "auto", example=ids)
    assert auto.modes == {"head": "mul"}
    assert_close(auto.model(ids), _hooked(model, "head", _mask(6), ids))


class _Aliased(LinearPair):
    """One layer under two names, called through each (its hook fires on both calls)."""

    def __init__(self) -> None:
        super().__init__(d_out=8)
        self.again = self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(torch.relu(self.fc(torch.relu(self.a(x)))))


class _Twice(LinearPair):
    def __init__(self) -> None:
        super().__init__(d_out=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(torch.relu(self.a(x)))))


class _ShapeOnly(LinearPair):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.a(x))) * self.fc.weight.shape[0] + self.fc.weight.size(1) + self.fc.bias


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.a(x)))


class _GPT2Conv1D(nn.Module):
    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.a = Conv1D(8, 4)
        self.fc = Conv1D(3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.a(x)))


class _Uncapturable(LinearPair):
    """Data-dependent control flow: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            return self.fc(h)
        return self.fc(h) * 2


@pytest.mark.parametrize(("factory", "shape", "n"), [
    (_Aliased, (2, 4), 8), (_Twice, (2, 4), 8), (_ShapeOnly, (2, 4), 8), (_Conv, (1, 3, 5, 5), 8), (_GPT2Conv1D, (2, 5, 4), 8),
    (_Uncapturable, (2, 4), 8),
])
def test_fold_with_an_example_refuses_only_reads_outside_the_layer(factory: Any, shape: tuple[int, ...], n: int) -> None:
    """A layer called twice (under one name or two), a weight read for its shape
    only, a bias read elsewhere (fold leaves the bias), convolutions, GPT-2's
    Conv1D, and a model torch.export cannot capture (fold goes on unchecked): all
    fold, and compute what the sparsifier's hooks do. Before, the layer under two
    names was refused ("fc.weight is also read by aten.linear in again")."""
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    mask = _mask(n).reshape(n, 1, 1) if factory is _Conv else _mask(n)
    masks = Masks({"fc": LayerMask(mask)})
    want = _hooked(model, "fc", mask, x)
    result = squash(model, masks, "fold", example=x)
    assert result.modes == {"fc": "fold"}
    assert_close(result.model(x), want)


def test_the_wrappers_hand_the_layer_attributes_through_and_keep_their_own() -> None:
    """MaskedInput / PrunedInput: the layer's weight, bias, in_features; their own
    mask / index / module first; a name neither has is still an AttributeError."""
    from actsparse_deploy.bake.squash import MaskedInput, PrunedInput

    layer = nn.Linear(4, 2)
    masked = MaskedInput(layer, torch.ones(4))
    pruned = PrunedInput(layer, torch.tensor([0, 2]), -1)
    for wrapper in (masked, pruned):
        assert wrapper.weight is layer.weight and wrapper.bias is layer.bias and wrapper.in_features == 4
        assert wrapper.module is layer
        with pytest.raises(AttributeError):
            _ = wrapper.no_such_attribute
    assert torch.equal(masked.mask, torch.ones(4)) and torch.equal(pruned.index, torch.tensor([0, 2]))
    assert [name for name, _ in masked.named_parameters()] == ["module.weight", "module.bias"]


def test_python_convert_refuses_a_bad_axis_or_device_before_the_model_loads(tmp_path):
    """From Python too: an axis of 5000 digits is the NAME:AXIS:LABEL error (it was
    int()'s ValueError), and a device that is not cpu / cuda / cuda:N, or CUDA where
    there is none, is refused before the model loads (it was after)."""
    from actsparse_deploy.app.pipeline import convert
    from actsparse_deploy.base.errors import ExportError, UsageError

    with pytest.raises(ExportError, match="NAME:AXIS:LABEL"):
        convert("no-such-model", tmp_path / "a", dynamic_axes=("x:" + "9" * 5000 + ":y",))
    for device in ("gpu", "cuda:x"):
        with pytest.raises(UsageError, match="device"):
            convert("no-such-model", tmp_path / "b", device=device)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            convert("no-such-model", tmp_path / "c", device="cuda")
    assert list(tmp_path.iterdir()) == []
