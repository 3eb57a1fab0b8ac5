"""Models, weights and data from users' files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from actsparse_deploy.base.errors import DataError, ModelLoadError, WeightsError
from actsparse_deploy.data.readers import load_data
from actsparse_deploy.models.loading import load_model

USER_MODULE = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

def build():
    torch.manual_seed(0)
    return Net()

def not_a_module():
    return 42

def broken():
    raise RuntimeError("boom")

def batches():
    return [torch.ones(2, 4), torch.zeros(3, 4)]

def build_lazy():
    """The same model on the meta device: no memory until the weights fill it."""
    with torch.device("meta"):
        return Net()

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight
    def forward(self, ids):
        return self.head(self.embed(ids))

def build_tied():
    torch.manual_seed(0)
    return Tied()

def build_tied_lazy():
    with torch.device("meta"):
        return Tied()

VALUE = 3
'''


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    (tmp_path / "userpkg_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userpkg_models"


def test_builtin_and_factory(user_pkg, tmp_path):
    builtin = load_model("digits-mlp")
    assert builtin.builtin and not builtin.module.training
    loaded = load_model(f"{user_pkg}:build")
    assert not loaded.builtin and loaded.name == f"{user_pkg}:build"
    # weights as safetensors and as a .pt state dict
    torch.manual_seed(1)
    source = load_model(f"{user_pkg}:build").module
    for p in source.parameters():
        p.data.normal_()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        model = load_model(f"{user_pkg}:build", tmp_path / weights).module
        x = torch.randn(3, 4)
        assert_close(model(x), source(x))


def test_weights_fill_a_model_built_on_the_meta_device(user_pkg, tmp_path):
    """A factory may build its model on the meta device (no memory for weights it does not have yet):
    the weights file fills it, a tensor at a time, in the dtypes the model declares."""
    torch.manual_seed(1)
    source = load_model(f"{user_pkg}:build").module
    for p in source.parameters():
        p.data.normal_()
    x = torch.randn(3, 4)
    for name, state in (("w.safetensors", None), ("w.pt", None), ("half.safetensors", torch.float16)):
        tensors = {k: v.to(state) if state else v for k, v in source.state_dict().items()}
        if name.endswith(".pt"):
            torch.save(tensors, tmp_path / name)
        else:
            save_file(tensors, str(tmp_path / name))
        model = load_model(f"{user_pkg}:build_lazy", tmp_path / name).module
        assert not any(p.is_meta for p in model.parameters()), name
        assert {p.dtype for p in model.parameters()} == {torch.float32}, name  # the model's dtype, as load_state_dict keeps it
        assert_close(model(x), source(x), atol=1e-2 if state else 1e-6, rtol=1e-2 if state else 1e-6)


def test_tied_weights_stay_tied(user_pkg, tmp_path):
    torch.manual_seed(2)
    source = load_model(f"{user_pkg}:build_tied").module
    torch.save(source.state_dict(), tmp_path / "tied.pt")  # both names, one storage
    for factory in ("build_tied", "build_tied_lazy"):
        model = load_model(f"{user_pkg}:{factory}", tmp_path / "tied.pt").module
        assert model.head.weight is model.embed.weight, factory
        assert_close(model.embed.weight, source.embed.weight)


def test_weights_left_on_the_meta_device_are_named(user_pkg, tmp_path):
    """A meta-device model whose weights file lacks a tensor is refused by name (strict, as always)."""
    good = load_model(f"{user_pkg}:build").module.state_dict()
    save_file({k: v for k, v in good.items() if k != "fc2.bias"}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match="missing keys fc2.bias"):
        load_model(f"{user_pkg}:build_lazy", tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-model", "unknown built-in model 'no-such-model'; known models: digits-cnn, digits-mlp, minilm"),
        ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
        ("{pkg}:missing", "has no attribute 'missing'"),
        ("{pkg}:VALUE", "is a int, not a callable"),
        ("{pkg}:not_a_module", "returned a int, not a torch.nn.Module"),
        ("{pkg}:broken", "failed: RuntimeError: boom"),
        (":build", "must look like package.module:name"),
    ],
)
def test_model_errors(user_pkg, spec, message):
    with pytest.raises(ModelLoadError) as info:
        load_model(spec.format(pkg=user_pkg))
    assert message in str(info.value)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_errors(user_pkg, tmp_path, capsys):
    good = load_model(f"{user_pkg}:build").module.state_dict()
    cases = {}
    torch.save({"fc1.weight": Evil()}, tmp_path / "pickle.pt")
    cases["pickle.pt"] = "refused"
    save_file({**good, "extra": torch.ones(1)}, str(tmp_path / "extra.safetensors"))
    cases["extra.safetensors"] = "unexpected keys extra"
    save_file({k: v for k, v in good.items() if k != "fc2.bias"}, str(tmp_path / "missing.safetensors"))
    cases["missing.safetensors"] = "missing keys fc2.bias"
    save_file({**good, "fc1.weight": torch.ones(6, 5)}, str(tmp_path / "shape.safetensors"))
    cases["shape.safetensors"] = "fc1.weight: file (6, 5) vs model (6, 4)"
    save_file(good, str(tmp_path / "full.safetensors"))
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:60])
    cases["truncated.safetensors"] = "not a readable .safetensors"
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file")
    cases["garbage.pt"] = "corrupted or not a torch file"
    cases["absent.pt"] = "does not exist"
    for name, message in cases.items():
        with pytest.raises(WeightsError) as info:
            load_model(f"{user_pkg}:build", tmp_path / name)
        assert message in str(info.value), name
        assert str(tmp_path / name) in str(info.value)
    assert "this must never run" not in capsys.readouterr().out


def test_data_files(tmp_path, user_pkg):
    x = np.arange(40, dtype=np.float64).reshape(10, 4)
    np.save(tmp_path / "x.npy", x)
    batches = load_data(tmp_path / "x.npy", batch_size=4)
    assert [b.shape[0] for b in batches] == [4, 4, 2] and batches[0].dtype == torch.float32
    assert_close(torch.cat(list(batches)), torch.from_numpy(x).float())
    np.savez(tmp_path / "two.npz", input_ids=np.ones((5, 3), dtype=np.int64), attention_mask=np.ones((5, 3), dtype=np.int64))
    dict_batches = load_data(tmp_path / "two.npz", batch_size=2)
    assert [set(b) for b in dict_batches] == [{"input_ids", "attention_mask"}] * 3
    save_file({"x": torch.ones(3, 2)}, str(tmp_path / "x.safetensors"))
    assert load_data(tmp_path / "x.safetensors", 8)[0].shape == (3, 2)
    torch.save([torch.ones(3, 2), torch.zeros(3, 1)], tmp_path / "x.pt")
    positional = load_data(tmp_path / "x.pt", 2)[0]
    assert isinstance(positional, tuple) and [tuple(t.shape) for t in positional] == [(2, 2), (2, 1)]
    assert [b.shape[0] for b in load_data(f"{user_pkg}:batches")] == [2, 3]


def test_data_errors(tmp_path):
    cases = {}
    cases["absent.npy"] = "does not exist"
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 broken zip")
    cases["bad.npz"] = "corrupted or unreadable"
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]]))
    cases["nan.npy"] = "NaN or Inf"
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), dtype=np.float32))
    cases["empty.npy"] = "empty (0 samples)"
    np.save(tmp_path / "scalar.npy", np.float32(3))
    cases["scalar.npy"] = "scalar"
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    cases["text.npy"] = "cannot take"
    np.savez(tmp_path / "uneven.npz", a=np.ones((3, 1)), b=np.ones((4, 1)))
    cases["uneven.npz"] = "differ in their number of samples"
    (tmp_path / "x.csv").write_text("1,2")
    cases["x.csv"] = "unsupported type .csv"
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases["obj.npy"] = "corrupted or unreadable"
    for name, message in cases.items():
        with pytest.raises(DataError) as info:
            load_data(tmp_path / name)
        assert message in str(info.value), name


def test_a_safetensors_tensor_is_read_a_slice_at_a_time(user_pkg, tmp_path, monkeypatch):
    """Large tensors are copied a slice at a time (here: slices of 2 rows of fc1's weight), into an allocated
    model and into one built on the meta device alike: the same weights as one read."""
    from actsparse_deploy.models import loading

    torch.manual_seed(3)
    source = load_model(f"{user_pkg}:build").module
    for p in source.parameters():
        p.data.normal_()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    monkeypatch.setattr(loading, "READ_BYTES", 2 * 4 * 4)  # two rows of fc1.weight (6 x 4 float32)
    reads: list[int] = []
    opened = loading.safe_open

    def counting(*args, **kwargs):
        reads.append(1)
        return opened(*args, **kwargs)

    monkeypatch.setattr(loading, "safe_open", counting)
    for factory in ("build", "build_lazy"):
        model = load_model(f"{user_pkg}:{factory}", tmp_path / "w.safetensors").module
        for name, p in source.state_dict().items():
            assert torch.equal(model.state_dict()[name], p), (factory, name)
    assert len(reads) > 2 * 4  # more opens than tensors: fc1.weight (6 rows) and fc2.weight (2 rows of 6 = 1 slice each) in slices
