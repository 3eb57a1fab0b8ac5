"""The drop-in ``ActivationSparsifier``.

Same API and, with user-supplied callables, the same behaviour as torch's
experimental ``torch.ao.pruning._experimental.activation_sparsifier.ActivationSparsifier``:
pre-forward hooks fold each layer's input into an aggregate, ``step()`` turns it
into a mask with ``mask_fn(reduce_fn(aggregate), **sparse_config)``, and
``squash_mask()`` swaps the aggregation hooks for hooks that feed the layer
``input * mask``.

Better than upstream: functions can be named (see :mod:`actsparse_deploy.calibration.functions`);
with built-in aggregates the statistics do not depend on batch size or sequence
length and no mask has a batch axis; a layer never reached or an input holding
NaN / Inf is an error naming the layer; the state saves to ``.safetensors``.
Aggregation never builds autograd graphs (forward passes may run with autograd
on, as upstream's workflow does). ``statistics()`` gives each layer's aggregate
as a :class:`~actsparse_deploy.calibration.stats.LayerStats` and ``load_statistics()`` takes
them back; a layer's mask has the mask's shape from the first forward pass, also
where the statistic is larger (a d x d Gram matrix for a d-wide input).

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy import ActivationSparsifier
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> sp = ActivationSparsifier(model, aggregate_fn="sum_abs", reduce_fn="mean",
    ...                           mask_fn="topk", sparsity_level=0.5)
    >>> sp.register_layer(model[2])
    >>> with torch.no_grad():
    ...     _ = model(torch.randn(8, 4)); _ = model(torch.randn(3, 4))
    >>> sp.step()
    >>> sp.get_mask("2").shape, int(sp.get_mask("2").sum())
    (torch.Size([4]), 2)
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.errors import CalibrationError, ConfigError, DataError, LayerNotFoundError, MaskError, NoAggregateError
from ..nn.layers import default_sample_ndim, layer_kind
from .functions import AGGREGATE_FNS, MASK_FNS, REDUCE_FNS, Aggregate, BuiltinFn, LayerStats, check_mask_config
from .sparsifier_state import load_state, save_state
from .stats import type_names

__all__ = ["ActivationSparsifier", "module_to_fqn", "sample_ndim"]

_FN_KEYS = ("aggregate_fn", "reduce_fn", "mask_fn")


def module_to_fqn(model: nn.Module, module: nn.Module) -> str | None:
    """The fully-qualified name of ``module`` inside ``model`` ('' for the model)."""
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    return None


def sample_ndim(layer: nn.Module, input_ndim: int) -> int:
    """How many leading axes of the layer's input are separate samples: its layer
    kind says (:mod:`actsparse_deploy.layers`; a Linear: every axis but the last,
    a ConvNd: all before (channels, *spatial)); a layer with no kind is treated
    like a Linear up to 3 axes and like a conv above."""
    kind = layer_kind(layer)
    return default_sample_ndim(input_ndim) if kind is None else kind.sample_ndim(layer, input_ndim)


def _resolve_fns(aggregate_fn: Any, reduce_fn: Any, mask_fn: Any) -> dict[str, Any]:
    """Names of built-ins -> the functions; callables and None pass through."""
    return {
        "aggregate_fn": AGGREGATE_FNS.resolve(aggregate_fn),
        "reduce_fn": REDUCE_FNS.resolve(reduce_fn),
        "mask_fn": MASK_FNS.resolve(mask_fn),
    }


def _feature_index(features: list[Any], idx: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([features[idx]], dtype=torch.long, device=device).reshape(-1)


class ActivationSparsifier:
    r"""Sparsify the inputs of chosen layers with masks learned from data.

    ``mask = mask_fn(reduce_fn(aggregate_fn(activations)), **sparse_config)``,
    per layer, or per selected feature along ``feature_dim`` where ``features``
    is set. Functions are callables (upstream semantics) or names of built-ins.
    """

    def __init__(
        self,
        model: nn.Module,
        aggregate_fn: Callable[..., Any] | str | None = None,
        reduce_fn: Callable[..., Any] | str | None = None,
        mask_fn: Callable[..., Any] | str | None = None,
        features: list[Any] | None = None,
        feature_dim: int | None = None,
        **sparse_config: Any,
    ) -> None:
        self.model = model
        self.defaults: dict[str, Any] = {
            "sparse_config": sparse_config,
            **_resolve_fns(aggregate_fn, reduce_fn, mask_fn),
            "features": features,
            "feature_dim": feature_dim,
        }
        self.data_groups: dict[str, dict[str, Any]] = defaultdict(dict)
        self.state: dict[str, dict[str, Any]] = defaultdict(dict)

    # --- registration ------------------------------------------------------------

    @staticmethod
    def _safe_rail_checks(args: dict[str, Any]) -> None:
        if args["features"] is not None and args["feature_dim"] is None:
            raise ConfigError("need feature dim to select features: features were given without feature_dim")
        for key in _FN_KEYS:
            if not callable(args[key]):
                raise ConfigError(f"{key} {args[key]!r} must be callable (or the name of a built-in)")
        if isinstance(args["mask_fn"], BuiltinFn):
            check_mask_config(args["mask_fn"], args["sparse_config"])

    def register_layer(
        self,
        layer: nn.Module,
        aggregate_fn: Callable[..., Any] | str | None = None,
        reduce_fn: Callable[..., Any] | str | None = None,
        mask_fn: Callable[..., Any] | str | None = None,
        features: list[Any] | None = None,
        feature_dim: int | None = None,
        **sparse_config: Any,
    ) -> None:
        """Attach an aggregation hook to ``layer`` (a submodule of the model).

        Its config is the defaults, overridden by what is passed here
        (``sparse_config`` merged key by key). Registering a layer again warns
        and replaces its config.
        """
        name = module_to_fqn(self.model, layer)
        if name is None:
            raise LayerNotFoundError(f"layer {type(layer).__name__} is not part of the sparsifier's model")
        if name in self.data_groups:
            warnings.warn(
                f"layer {name!r} already attached to the sparsifier, deregistering the layer "
                "and registering with new config",
                stacklevel=2,
            )
            self.unregister_layer(name)

        config = copy.deepcopy(self.defaults)
        update = {
            **_resolve_fns(aggregate_fn, reduce_fn, mask_fn),
            "features": features,
            "feature_dim": feature_dim,
            "layer": layer,
        }
        config.update((key, value) for key, value in update.items() if value is not None)
        config["sparse_config"].update(sparse_config)
        self._safe_rail_checks(config)

        self.data_groups[name] = config
        self.state[name]["mask"] = None  # shape known at the first forward pass
        config["hook"] = layer.register_forward_pre_hook(self._aggregate_hook(name))
        config["hook_state"] = "aggregate"

    def unregister_layer(self, name: str) -> None:
        """Detach every hook from the layer and forget it."""
        config = self._config(name)
        hook = config.get("hook")
        if hook is not None:
            hook.remove()
        self.state.pop(name, None)
        self.data_groups.pop(name)

    def _config(self, name: str) -> dict[str, Any]:
        if name not in self.data_groups:
            raise LayerNotFoundError(
                f"layer {name!r} is not registered; registered: {', '.join(self.data_groups) or 'none'}"
            )
        return self.data_groups[name]

    # --- aggregation -------------------------------------------------------------

    def _aggregate_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        config = self.data_groups[name]
        agg_fn = config["aggregate_fn"]
        if isinstance(agg_fn, Aggregate):
            return self._builtin_aggregate_hook(name, config, agg_fn)
        features, feature_dim = config["features"], config["feature_dim"]
        state = self.state[name]

        @torch.no_grad()
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = _detached(inputs[0])
            _check_finite(name, x)
            data = config.get("data")
            if data is None:
                state["input_shape"] = tuple(x.shape)
            _count_inputs(state, x)
            if features is None:
                if data is None:
                    data = torch.zeros_like(x)
                    state["mask"] = torch.ones_like(x)
                config["data"] = agg_fn(data, x)
                return
            out = [0] * len(features) if data is None else data
            if data is None:
                state["mask"] = [0] * len(features)
            for idx in range(len(features)):
                selected = torch.index_select(x, feature_dim, _feature_index(features, idx, x.device))
                if data is None:
                    current = torch.zeros_like(selected)
                    state["mask"][idx] = torch.ones_like(selected)
                else:
                    current = data[idx]
                out[idx] = agg_fn(current, selected)
            config["data"] = out

        return hook

    def _builtin_aggregate_hook(
        self, name: str, config: dict[str, Any], agg: Aggregate
    ) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        """Batch-size independent aggregation: the batch is reduced over its
        sample axes once; per-feature statistics are slices of that."""
        features, feature_dim = config["features"], config["feature_dim"]
        state = self.state[name]
        layer = config["layer"]

        @torch.no_grad()
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = _detached(inputs[0])
            n_sample = sample_ndim(layer, x.ndim)
            if config.get("data") is None:
                state["input_shape"] = tuple(x.shape)
            if features is None:
                dims = tuple(range(n_sample))
                batch = agg.batch_stat(x, dims)
                try:
                    stat = agg.fold(config.get("data"), batch, _count(x, dims))
                except ValueError as e:
                    raise CalibrationError(f"layer {name!r}: {e}") from None
                _check_finite(name, stat.value)
                if state.get("mask") is None:
                    state["mask"] = _placeholder_mask(x.shape, dims, None, None, x.dtype, x.device)
                config["data"] = stat
                _count_inputs(state, x)
                return
            fdim = _normalize_dim(feature_dim, x.ndim, name)
            if state.get("mask") is None:
                if fdim == 0:
                    raise ConfigError(
                        f"feature_dim {feature_dim} of layer {name!r} is the batch axis of its input "
                        f"{list(x.shape)}: a mask per sample cannot be baked into a model; give the feature axis"
                    )
                _check_features(name, features, x.shape[fdim])
            dims = tuple(d for d in range(n_sample) if d != fdim)
            batch = agg.batch_stat(x, dims)
            axis = fdim - sum(1 for d in dims if d < fdim)
            _check_finite(name, batch)
            data, count = config.get("data"), _count(x, dims)
            out = []
            for idx in range(len(features)):
                selected = batch.index_select(axis, _feature_index(features, idx, x.device))
                try:
                    out.append(agg.fold(None if data is None else data[idx], selected, count))
                except ValueError as e:
                    raise CalibrationError(f"layer {name!r}: {e}") from None
            if state.get("mask") is None:
                state["mask"] = _placeholder_mask(x.shape, dims, fdim, features, x.dtype, x.device)
            config["data"] = out
            _count_inputs(state, x)

        return hook

    # --- masks -------------------------------------------------------------------

    def input_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of the first input the layer saw (None before any forward pass)."""
        return self.state.get(name, {}).get("input_shape")

    def get_mask(self, name: str | None = None, layer: nn.Module | None = None) -> Any:
        """The layer's mask: a tensor, or a list of tensors (one per selected feature).

        ``ValueError`` for an unknown layer and before the first forward pass.
        """
        if name is None and layer is None:
            raise ConfigError("Need at least name or layer obj to retrieve mask")
        if name is None:
            name = module_to_fqn(self.model, layer)  # type: ignore[arg-type]
            if name is None:
                raise LayerNotFoundError("layer not found in the specified model")
        if name not in self.state:
            raise LayerNotFoundError(
                f"layer {name!r} not found; registered: {', '.join(self.data_groups) or 'none'}"
            )
        mask = self.state[name].get("mask")
        if mask is None:
            raise MaskError(
                f"the mask of layer {name!r} has no shape yet: run the model forward at least once"
            )
        return mask

    def _check_reached(self) -> None:
        unreached = [name for name, config in self.data_groups.items() if config.get("data") is None]
        if unreached:
            raise NoAggregateError(
                f"layer(s) {', '.join(unreached)} have no aggregated data: registered but never reached by a forward "
                "pass since registration or the last step(); check that the calibration data runs through them"
            )

    def step(self) -> None:
        """Turn every layer's aggregate into its mask and drop the aggregate."""
        self._check_reached()
        with torch.no_grad():
            for name, config in self.data_groups.items():
                self.update_mask(name, config["data"], config)
                config.pop("data")
                for key in ("num_samples", "num_batches"):
                    self.state[name].pop(key, None)

    # --- statistics --------------------------------------------------------------

    def layer_statistics(self, name: str) -> LayerStats:
        """The layer's aggregate so far as a :class:`LayerStats` (shares its tensors)."""
        config = self._config(name)
        data = config.get("data")
        if data is None:
            raise NoAggregateError(f"layer {name!r} has no aggregated data: run the model forward first (and before step())")
        state = self.state[name]
        placeholder = state["mask"] if isinstance(state["mask"], torch.Tensor) else state["mask"][0]
        agg = config["aggregate_fn"]
        return LayerStats(
            stat=tuple(data) if isinstance(data, list) else data,
            input_shape=tuple(state["input_shape"][1:]),
            input_dtype=placeholder.dtype,
            aggregate=agg.spec if isinstance(agg, BuiltinFn) else None,
            features=tuple(config["features"]) if config["features"] is not None else None,
            feature_dim=config["feature_dim"],
            num_samples=state.get("num_samples", 0),
            num_batches=state.get("num_batches", 0),
            layer_types=type_names(config["layer"]),
        )

    def statistics(self) -> dict[str, LayerStats]:
        """Every registered layer's :meth:`layer_statistics`; a layer never
        reached is an error naming it (as in :meth:`step`)."""
        self._check_reached()
        return {name: self.layer_statistics(name) for name in self.data_groups}

    def load_statistics(self, stats: Mapping[str, LayerStats]) -> None:
        """Make ``stats`` the aggregates of registered layers (aggregation goes on
        from them; ``step()`` makes their masks). Each must come from the layer's
        aggregate function, features and feature_dim."""
        for name, ls in stats.items():
            config = self._config(name)
            agg = config["aggregate_fn"]
            spec = agg.spec if isinstance(agg, BuiltinFn) else None
            features = tuple(config["features"]) if config["features"] is not None else None
            if spec is None or ls.aggregate != spec or (features, config["feature_dim"]) != (ls.features, ls.feature_dim):
                raise ConfigError(
                    f"layer {name!r}: statistics of aggregate {ls.aggregate!r}, features {ls.features} do not fit its "
                    f"config (aggregate {spec!r}, features {features}); register it with the statistics' settings"
                )
            ls.check(name)
            shape = (1, *ls.input_shape)
            n_sample = sample_ndim(config["layer"], len(shape))
            state = self.state[name]
            fdim = None if features is None else _normalize_dim(ls.feature_dim, len(shape), name)  # type: ignore[arg-type]
            dims = tuple(d for d in range(n_sample) if d != fdim)
            state["mask"] = _placeholder_mask(shape, dims, fdim, features, ls.input_dtype)
            state.update(input_shape=shape, num_samples=ls.num_samples, num_batches=ls.num_batches)
            config["data"] = ls.data

    def update_mask(self, name: str, data: Any, configs: dict[str, Any]) -> None:
        """Set one layer's mask to ``mask_fn(reduce_fn(data), **sparse_config)``
        (per selected feature where ``features`` is set)."""
        mask = self.get_mask(name)
        reduce_fn, mask_fn = configs["reduce_fn"], configs["mask_fn"]
        sparse_config = configs["sparse_config"]
        try:
            if configs["features"] is None:
                mask.data = self._new_mask(mask, mask_fn(reduce_fn(data), **sparse_config))
            else:
                for idx in range(len(configs["features"])):
                    mask[idx].data = self._new_mask(mask[idx], mask_fn(reduce_fn(data[idx]), **sparse_config))
        except ConfigError as e:  # a built-in's config that does not fit this layer's data
            raise ConfigError(f"layer {name!r}: {e}") from e

    @staticmethod
    def _new_mask(old: torch.Tensor, new: Any) -> torch.Tensor:
        if isinstance(new, torch.Tensor) and new.is_floating_point() and old.is_floating_point():
            return new.to(old.dtype)
        return new

    # --- squash ------------------------------------------------------------------

    def _sparsify_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], Any]:
        mask = self.get_mask(name)
        config = self.data_groups[name]
        features, feature_dim = config["features"], config["feature_dim"]

        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> Any:
            x = inputs[0]
            if features is None:
                return x * mask
            out = x.clone()  # upstream writes into the input; a residual would see it
            for idx in range(len(features)):
                index = _feature_index(features, idx, x.device)
                out.index_copy_(feature_dim, index, torch.index_select(out, feature_dim, index) * mask[idx])
            return out

        return hook

    def squash_mask(self, attach_sparsify_hook: bool = True, **kwargs: Any) -> None:
        """Remove the aggregation hooks; if asked, attach hooks that feed each
        layer ``input * mask``."""
        for name, config in self.data_groups.items():
            hook = config.pop("hook", None)
            if hook is not None:
                hook.remove()
            if attach_sparsify_hook:
                config["hook"] = config["layer"].register_forward_pre_hook(self._sparsify_hook(name))
            # "sparsify" also without the hook: upstream records it so, and
            # load_state_dict then attaches the sparsify hook, as upstream's does
            config["hook_state"] = "sparsify"

    # --- state -------------------------------------------------------------------

    def _get_serializable_data_groups(self) -> dict[str, dict[str, Any]]:
        return {
            name: {key: value for key, value in config.items() if key not in ("hook", "layer")}
            for name, config in self.data_groups.items()
        }

    @staticmethod
    def _convert_mask(states: dict[str, Any], sparse_coo: bool = True) -> dict[str, Any]:
        states = copy.deepcopy(states)
        convert = (lambda t: t.to_sparse_coo()) if sparse_coo else (lambda t: t.to_dense())
        for state in states.values():
            mask = state.get("mask")
            if isinstance(mask, list):
                state["mask"] = [convert(m) for m in mask]
            elif mask is not None:
                state["mask"] = convert(mask)
        return states

    def state_dict(self) -> dict[str, Any]:
        """``{'state', 'data_groups', 'defaults'}``: masks as sparse COO tensors,
        configs without hooks or layers."""
        return {
            "state": self._convert_mask(self.state),
            "data_groups": self._get_serializable_data_groups(),
            "defaults": self.defaults,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore defaults, configs and dense masks, and re-attach the hook each
        layer had (aggregate or sparsify)."""
        self.__set_state__(
            {"state": state_dict["state"], "data_groups": state_dict["data_groups"], "defaults": state_dict["defaults"]}
        )

    def __get_state__(self) -> dict[str, Any]:
        """Upstream's name for :meth:`state_dict`'s content."""
        return {
            "defaults": self.defaults,
            "state": self._convert_mask(self.state),
            "data_groups": self._get_serializable_data_groups(),
        }

    def __set_state__(self, state: dict[str, Any]) -> None:
        """Upstream's name for :meth:`load_state_dict`'s work (``state`` is not changed)."""
        for config in self.data_groups.values():
            if config.get("hook") is not None:
                config["hook"].remove()
        self.state = defaultdict(dict, self._convert_mask(state["state"], sparse_coo=False))
        self.defaults = copy.deepcopy(state["defaults"])
        self.data_groups = defaultdict(dict, copy.deepcopy(state["data_groups"]))
        for name, config in self.data_groups.items():
            try:
                layer = self.model.get_submodule(name)
            except AttributeError:
                raise LayerNotFoundError(f"layer {name!r} of the saved state is not in the model") from None
            config["layer"] = layer
            hook_state = config.get("hook_state")
            if hook_state == "aggregate":
                config["hook"] = layer.register_forward_pre_hook(self._aggregate_hook(name))
            elif hook_state == "sparsify":
                config["hook"] = layer.register_forward_pre_hook(self._sparsify_hook(name))

    def save(self, path: str | Path) -> None:
        """Write the whole state to a ``.safetensors`` file: masks and statistics
        as tensors, configs as JSON metadata; built-in functions only."""
        save_state(self.state_dict(), Path(path))

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote (the model must have the same layers)."""
        self.load_state_dict(load_state(Path(path)))

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for name, config in self.data_groups.items():
            lines += ["\tData Group", f"\t    name: {name}"]
            for key in sorted(config):
                if key in ("data", "hook", "layer"):
                    continue
                value = config[key]
                if isinstance(value, BuiltinFn):
                    value = value.spec
                elif callable(value):
                    value = getattr(value, "__name__", value)
                lines.append(f"\t    {key}: {value}")
        return "\n".join(lines) + "\n)"


def _check_features(name: str, features: list[Any], size: int) -> None:
    """Indices from 0 to ``size - 1``, each once (a negative index would fail
    later, inside the model; a repeated one costs time and means nothing)."""
    seen: set[int] = set()
    for index in torch.tensor(features).reshape(-1).tolist():
        if index < 0:
            raise ConfigError(f"feature {index} of layer {name!r} is negative: features are indices from 0 along feature_dim")
        if index >= size:
            raise ConfigError(f"feature {index} of layer {name!r} is out of range: its input has {size} along feature_dim")
        if index in seen:
            raise ConfigError(f"feature {index} of layer {name!r} is given twice")
        seen.add(index)


def _normalize_dim(dim: int, ndim: int, name: str) -> int:
    if not -ndim <= dim < ndim:
        raise ConfigError(f"feature_dim {dim} of layer {name!r} is out of range for an input with {ndim} axes")
    return dim % ndim


def _detached(x: Any) -> Any:
    """The input without its autograd history: aggregates never build graphs."""
    return x.detach() if isinstance(x, torch.Tensor) else x


def _count(x: torch.Tensor, dims: tuple[int, ...]) -> int:
    """Samples in a batch: the product of its sample axes."""
    return math.prod(x.shape[d] for d in dims)


def _count_inputs(state: dict[str, Any], x: Any) -> None:
    """Inputs along the first axis and forward calls since the last step()."""
    rows = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim else 1
    state["num_samples"] = state.get("num_samples", 0) + rows
    state["num_batches"] = state.get("num_batches", 0) + 1


def _placeholder_mask(
    shape: Any, dims: tuple[int, ...], fdim: int | None, features: Any, dtype: torch.dtype, device: Any = None
) -> torch.Tensor | list[torch.Tensor]:
    """The all-ones mask a layer has before ``step()``: one tensor, or one per
    selected feature, shaped by the input (never by the statistic)."""
    if features is None:
        return torch.ones(_mask_shape(shape, dims), dtype=dtype, device=device)
    return [
        torch.ones(_mask_shape(shape, dims, fdim, _feature_width(list(features), i)), dtype=dtype, device=device)
        for i in range(len(features))
    ]


def _mask_shape(shape: Any, dims: tuple[int, ...], fdim: int | None = None, width: int = 1) -> list[int]:
    """A mask's shape for an input of ``shape`` whose ``dims`` are samples: the
    other axes, the feature axis ``fdim`` (if any) ``width`` wide. It depends on
    the input alone, never on the statistic (which may be larger)."""
    return [width if d == fdim else n for d, n in enumerate(shape) if d not in dims]


def _feature_width(features: list[Any], idx: int) -> int:
    """How many indices feature ``idx`` selects (a feature may be a list of them)."""
    return len(torch.tensor([features[idx]]).reshape(-1))


def _check_finite(name: str, t: torch.Tensor) -> None:
    # a float64 statistic: its sum is finite exactly when every value is (float32 data
    # cannot overflow a float64 sum), and one reduction is much cheaper than isfinite
    # over a d x d Gram matrix every batch
    if not t.is_floating_point():
        return
    finite = torch.isfinite(t.sum()) if t.dtype == torch.float64 else torch.isfinite(t).all()
    if not bool(finite):
        raise DataError(
            f"layer {name!r} received NaN or Inf in its input (or its statistic overflowed): "
            "check the calibration data and the layers before it"
        )
