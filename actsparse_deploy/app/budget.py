"""Per-layer sparsity to a cost budget: the highest overall sparsity whose cost stays within it.

A :class:`Budget` is what the cost may be (``Budget.parse("cosine=0.98")``):

- ``cosine=V``: mean per-sample cosine similarity of the model's last output
  (a sentence encoder's sentence embedding) to the dense model's, at least V;
- ``accuracy-drop=V``: at most V. On held-out data with labels: dense accuracy
  minus sparse accuracy; without labels (the tuning split has none): the fraction
  of samples whose predicted class (arg-max of the first output) changes, which
  bounds the accuracy drop from above;
- ``perplexity-ratio=V``: a language model's perplexity (first output: logits
  ``(batch, tokens, vocabulary)``, next-token targets from the first input,
  ``attention_mask`` respected) over the dense model's, at most V;
- ``package.module:function=V``: ``function(dense, sparse, batches) -> float``,
  a cost of yours (lower is better), at most V.

:func:`search_budget` carves a tuning split off the calibration data (20 % of
its samples, every fifth: :func:`~actsparse_deploy.data.batches.split_tuning`; never the held-out data), collects the statistics once on
the rest, then allocates a level per layer on a grid of 1/32 of its features:
first the highest uniform level within the budget on the tuning split (levels
tried upward), then, greedily, one more step for the layer whose step costs the
least per feature removed (the others re-measured lazily), while the budget
holds: layers the cost is sensitive to keep more features. Each candidate's
masks (and the compensation edits of a recipe with ``method`` / ``compensate``)
are selected from the same statistics and measured with the masks applied in
``mul`` mode.

Where every layer selects with ``obs`` the search is another, on a grid of 1/64:
each layer's removal order is computed once (the masks of all its levels are
prefixes of it: only the compensation is refit per level), the layers' cost
curves come from ``obs``'s own objective scaled by one measurement each, and
one threshold on the marginal cost per feature, bisected on the tuning cost,
sets every layer's level, sensitive layers below the uniform level and robust
ones above it (see ``_search_by_threshold``). Layers of attention heads
(``heads = true``, ``--heads``) step by whole heads, and where there are any, every
step is priced per multiply-add it saves rather than per feature
(:func:`~actsparse_deploy.bake.savings.work_per_feature`): a head's feature takes its
query, key and value rows and its share of the attention with it. Token batches (dicts with a
right-padded ``attention_mask``) are regrouped by length without padding first
(:func:`actsparse_deploy.data.batches.unpadded`).

The tuning split is a sample of the user's data, and the search stops where a candidate just keeps
the budget there: on other samples such a candidate misses about half the time (MiniLM's held-out
cosine landed 0.0013-0.002 under its tuning figure). So a ``cosine`` or ``perplexity-ratio``
candidate keeps the budget only with its tuning figure moved :data:`DOUBT` standard errors (over
the tuning samples, :func:`~actsparse_deploy.data.scores.cost_error`) towards the worse side;
``accuracy-drop`` (a count: one changed prediction of a few dozen is a step of several per cent)
and a budget function of yours are held as measured.

    >>> from actsparse_deploy.app.budget import Budget, search_budget
    >>> from actsparse_deploy.calibration.recipe import Recipe
    >>> from actsparse_deploy.app.workload import load_workload
    >>> from actsparse_deploy.models.zoo import builtin_recipe_path
    >>> work = load_workload("digits-mlp")
    >>> recipe = Recipe.load(builtin_recipe_path("digits-mlp"))
    >>> result = search_budget(work.model, recipe, list(work.calibration), Budget.parse("cosine=0.95"))
    >>> result.tuning_cost >= 0.95, sorted(result.levels), result.masks.overall_sparsity() > 0.2
    (True, ['fc2', 'fc3'], True)
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..bake.savings import work_per_feature
from ..base.errors import ActsparseError, DataError, RecipeError, first_line
from ..calibration.methods import removed_count
from ..calibration.recipe import LayerRule, LayerSettings, Recipe, exact_glob
from ..data.batches import Batch, batch_size, flatten_outputs, mean_tokens, reiterable, run_batch, split_tuning, total_samples, unpadded
from ..data.scores import cost_error, cost_figure, figure_needs
from ..nn.attention import HEAD_FIELDS, Heads, find_heads, head_config_refusal
from ..nn.modules import eval_mode

if TYPE_CHECKING:
    from ..calibration.masks import Masks
    from ..data.workload import Workload

__all__ = ["DOUBT", "FORMS", "GRID", "MAX_SEARCHES", "Budget", "BudgetResult", "calibrate_to_budget",
           "check_budget", "heldout_budget", "search_budget"]

#: the accepted forms of a budget, for messages and help
FORMS = "cosine=0.98, accuracy-drop=0.01, perplexity-ratio=1.05 or package.module:function=VALUE"
#: levels are k / GRID of a layer's features
GRID = 32
#: ... k / OBS_GRID where every layer selects with ``obs`` (its masks for all levels come from one order)
OBS_GRID = 64
#: standard errors a candidate's (and a quantized model's) tuning cost must keep the budget by (:meth:`Budget.doubted`). Three, not
#: two: the per-sample error misses that neighbouring samples (sentences of one document) are alike, and MiniLM's
#: held-out cost landed 0.0013-0.002 under its tuning cost, over two errors (0.0012): `cosine=0.98` missed at 0.9792
DOUBT = 3.0
#: the most searches :func:`search_budget` runs on one set of candidates (``again``)
MAX_SEARCHES = 4
_KINDS = ("cosine", "accuracy-drop", "perplexity-ratio")
#: the kinds a search holds with :data:`DOUBT` standard errors (figures that vary smoothly from sample to sample)
DOUBTED = ("cosine", "perplexity-ratio")
_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclass(frozen=True)
class Budget:
    """The most a sparse model may cost: ``kind`` (``cosine``, ``accuracy-drop``,
    ``perplexity-ratio`` or ``user``) and its ``value``; ``function`` names a
    user metric (``package.module:function``)."""

    kind: str
    value: float
    function: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (*_KINDS, "user"):
            raise RecipeError(f"unknown budget kind {self.kind!r}: give {FORMS}")
        if (self.kind == "user") != (self.function is not None):
            raise RecipeError(f"a user budget needs its function, and only a user budget has one: give {FORMS}")
        if self.function is not None and not _FUNCTION.fullmatch(self.function):
            raise RecipeError(f"budget function {self.function!r} is not package.module:function: give {FORMS}")
        value = self.value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeError(f"budget {self.kind} needs a finite number, got {value!r}: give {FORMS}")
        ranges = {"cosine": (-1.0, 1.0), "accuracy-drop": (0.0, 1.0), "perplexity-ratio": (1.0, math.inf)}
        low, high = ranges.get(self.kind, (-math.inf, math.inf))
        if not low <= value <= high:
            raise RecipeError(f"budget {self.kind}={value} is outside [{low}, {high}]: give {FORMS}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``KIND=VALUE`` (see the module docstring); anything else is a RecipeError naming the forms."""
        if not isinstance(text, str) or text.count("=") != 1:
            raise RecipeError(f"budget {text!r} is not KIND=VALUE: give {FORMS}")
        kind, _, raw = (part.strip() for part in text.partition("="))
        try:
            value = float(raw)
        except ValueError:
            raise RecipeError(f"budget {text!r}: {raw!r} is not a number: give {FORMS}") from None
        if ":" in kind:
            return cls("user", value, kind)
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.function if self.kind == 'user' else self.kind}={self.value:.15g}"  # 2000000, not 2e+06

    def cost_function(self) -> Callable[..., Any]:
        """A user budget's function, imported and checked to take ``(dense,
        sparse, batches)``; anything else is a RecipeError naming it."""
        from ..base.imports import import_attr

        assert self.function is not None
        fn = import_attr(self.function, "budget function", RecipeError)
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # nothing to read (some builtins): it is tried when called
            return fn
        try:
            signature.bind(None, None, None)
        except TypeError:
            raise RecipeError(
                f"budget function {self.function} is not a cost function: it takes {signature}, not "
                f"(dense, sparse, batches) returning a number: give {FORMS}"
            ) from None
        return fn

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "cosine"

    def within(self, measured: float) -> bool:
        """Whether a measured cost keeps the budget (NaN never does)."""
        if not math.isfinite(measured):
            return False
        return measured >= self.value if self.higher_is_better else measured <= self.value

    def after(self, share: float) -> Budget | None:
        """What is left of this budget for the sparsity once another step's own cost ``share``
        (its figure alone, of this kind) has taken its part: the errors add (cosine: ``1 - c``;
        accuracy drops), perplexity ratios multiply. None where ``share`` leaves no room."""
        if self.kind == "cosine":
            left = self.value + (1.0 - share)
            return Budget(self.kind, left) if math.isfinite(left) and left <= 1.0 else None
        if self.kind == "perplexity-ratio":
            left = self.value / share if share > 0 else math.inf
            return Budget(self.kind, left) if math.isfinite(left) and left >= 1.0 else None
        if self.kind == "accuracy-drop":
            left = self.value - share
            return Budget(self.kind, left) if math.isfinite(left) and left >= 0.0 else None
        raise RecipeError(f"budget {self}: a budget function's cost cannot be shared with another step")

    def free(self) -> Budget:
        """The budget of this kind that allows no cost at all (cosine 1, perplexity ratio 1, accuracy drop 0):
        a search to it removes nothing that changes an output."""
        if self.kind not in ("cosine", "perplexity-ratio", "accuracy-drop"):
            raise RecipeError(f"budget {self}: a budget function's cost has no known value for \"no cost\"")
        return Budget(self.kind, 0.0 if self.kind == "accuracy-drop" else 1.0)

    def doubted(self, measured: float, error: float, times: float = DOUBT) -> float:
        """``measured`` moved ``times`` (:data:`DOUBT`) ``error`` (its standard error) towards the worse side: a
        figure that keeps the budget so keeps it on other samples of the same source too (about 999 times in 1000
        were the samples independent; they are not quite)."""
        return measured - times * error if self.higher_is_better else measured + times * error

    def past(self, figure: float) -> Budget:
        """The loosest budget of this kind that ``figure`` misses (by a hair): a search to it cannot choose what
        measured ``figure`` again (held at the edge of the kind's range)."""
        step = 1e-9 * max(1.0, abs(figure))
        if self.kind == "cosine":
            return Budget(self.kind, min(1.0, figure + step))
        if self.kind == "perplexity-ratio":
            return Budget(self.kind, max(1.0, figure - step))
        if self.kind == "accuracy-drop":
            return Budget(self.kind, max(0.0, figure - step))
        raise RecipeError(f"budget {self}: a budget function's figure has no known way past it")

    def tighter(self, other: Budget) -> Budget:
        """The tighter of this budget and ``other`` (of the same kind)."""
        return other if self.badness(other.value) < self.badness(self.value) else self

    def miss(self, measured: float) -> float:
        """How far ``measured`` is over this budget, as a cost share :meth:`after` takes (cosine:
        ``1 - shortfall``; perplexity ratio: ``measured / value``; accuracy drop: the excess)."""
        if self.kind == "cosine":
            return 1.0 - (self.value - measured)
        if self.kind == "perplexity-ratio":
            return measured / self.value
        return measured - self.value

    def badness(self, measured: float) -> float:
        """The measured cost oriented so that more is worse."""
        return -measured if self.higher_is_better else measured

    def measure(self, dense: nn.Module, sparse: nn.Module, batches: Iterable[Batch], labels: torch.Tensor | None = None,
                outputs: Sequence[list[list[torch.Tensor]]] | None = None) -> float:
        """The cost of ``sparse`` against ``dense`` on ``batches`` (``labels``: class
        indices of their samples, for ``accuracy-drop``). ``outputs``: the two
        models' outputs on ``batches`` (flattened, batch by batch) where they were
        computed already: a built-in kind is measured from them, the models not run again."""
        dense_outputs, sparse_outputs = outputs if outputs is not None else (None, None)
        return _Meter(self, dense, batches, labels, dense_outputs).cost(sparse, sparse_outputs)


def check_budget(text: str) -> Budget:
    """:meth:`Budget.parse`, and a user budget's function imported and checked
    (:meth:`Budget.cost_function`): what the commands do before any work."""
    budget = Budget.parse(text)
    if budget.kind == "user":
        budget.cost_function()
    return budget


class _Meter:
    """A budget's cost on fixed batches, the dense model's outputs computed once
    (or given: ``reference``, flattened, batch by batch); a built-in kind's
    arithmetic is :func:`~actsparse_deploy.data.scores.cost_figure`. ``doubt``: the
    standard errors :meth:`doubted` moves a figure by (None: :data:`DOUBT` for the
    kinds of :data:`DOUBTED`, else 0)."""

    def __init__(self, budget: Budget, dense: nn.Module, batches: Iterable[Batch], labels: torch.Tensor | None = None,
                 reference: list[list[torch.Tensor]] | None = None, doubt: float | None = None) -> None:
        if not batches:
            raise DataError("the budget's cost needs at least one batch")
        self.budget, self.dense, self.batches, self.labels = budget, dense, batches, labels
        self.doubt = (DOUBT if budget.kind in DOUBTED else 0.0) if doubt is None else doubt
        self.user: Callable[..., Any] | None = None
        if budget.kind == "user":
            self.user = budget.cost_function()
            return
        self.reference = reference if reference is not None else _outputs(dense, batches)
        needs = figure_needs(self.reference, batches)  # a kind the model's outputs do not allow: those they allow named
        need = needs.get(budget.kind, "")
        if need:
            has = ", ".join(f"{kind}=..." for kind, missing in needs.items() if not missing) or "no built-in cost"
            raise RecipeError(f"budget {budget} needs {need}: this model allows {has} or package.module:function=VALUE")

    def cost(self, sparse: nn.Module, outputs: list[list[torch.Tensor]] | None = None) -> float:
        """The cost of ``sparse``: its outputs on the batches computed (or given: ``outputs``), then
        the budget's figure; a user's function is called on the models."""
        if self.user is not None:
            return self._user_cost(sparse)
        outputs = outputs if outputs is not None else _outputs(sparse, self.batches)
        return cost_figure(self.budget.kind, self.reference, outputs, self.batches, self.labels)

    def doubted(self, sparse: nn.Module) -> tuple[float, float, float]:
        """``(figure, standard error, figure moved by doubt errors towards the worse side)`` of ``sparse``
        (a budget function's figure as it is, no error)."""
        if self.user is not None:
            value = self.cost(sparse)
            return value, 0.0, value
        outputs = _outputs(sparse, self.batches)
        value = cost_figure(self.budget.kind, self.reference, outputs, self.batches, self.labels)
        error = cost_error(self.budget.kind, self.reference, outputs, self.batches, self.labels)
        return value, error, self.budget.doubted(value, error, self.doubt)

    def _user_cost(self, sparse: nn.Module) -> float:
        assert self.user is not None
        try:
            with eval_mode(self.dense, sparse):
                value = self.user(self.dense, sparse, self.batches)
        except ActsparseError:
            raise
        except Exception as e:  # the user's code may fail in any way: their budget cannot be measured
            raise RecipeError(f"budget function {self.budget.function} failed: {type(e).__name__}: {first_line(e)}") from e
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"budget function {self.budget.function} returned {type(value).__name__}, not a number")
        return float(value)


def _outputs(model: nn.Module, batches: Iterable[Batch]) -> list[list[torch.Tensor]]:
    with eval_mode(model):
        return [list(flatten_outputs(run_batch(model, b))) for b in batches]


# --- the search ---------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetResult:
    """What :func:`search_budget` chose: the level per layer, its masks (selected
    from the calibration part's statistics, with the recipe at those levels), the
    cost on the tuning split, the uniform level it started from and how many
    candidate allocations it measured."""

    budget: Budget
    levels: dict[str, float]
    masks: Masks
    tuning_cost: float
    uniform_level: float
    evaluations: int
    tuning_samples: int
    heldout: dict[str, Any] = field(default_factory=dict)
    #: ``--quantize`` with the budget: what int8 alone costs on the tuning split and the budget the sparsity was searched to
    quantization: dict[str, Any] | None = None
    #: ``--max-cost-other``: the other text's samples, its cost at the levels chosen, and (after the cost stage) its held-out-like cost
    other_text: dict[str, Any] | None = None
    #: the standard error of :attr:`tuning_cost` over the tuning samples (0 where the search held it as measured)
    tuning_error: float = 0.0
    #: the standard errors the candidates kept the budget by (:data:`DOUBT`; 0: as measured)
    doubt: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": str(self.budget),
            "levels": dict(self.levels),
            "overall_sparsity": self.masks.overall_sparsity(),
            "uniform_level": self.uniform_level,
            "tuning_cost": self.tuning_cost,
            "tuning_error": self.tuning_error,
            "doubt": self.doubt,
            "tuning_samples": self.tuning_samples,
            "evaluations": self.evaluations,
            **self.heldout,
            **({"quantization": self.quantization} if self.quantization is not None else {}),
            **({"other_text": self.other_text} if self.other_text is not None else {}),
        }


def recipe_at_levels(recipe: Recipe, levels: Mapping[str, float]) -> Recipe:
    """``recipe`` with one more rule per layer that sets its ``sparsity_level``
    (later rules win): method, compensation and functions stay the recipe's."""
    rules = tuple(
        LayerRule(name=(exact_glob(name),), settings=LayerSettings(sparse_config=(("sparsity_level", float(level)),)))
        for name, level in levels.items()
    )
    return replace(recipe, layers=recipe.layers + rules)


def search_budget(
    model: nn.Module,
    recipe: Recipe,
    batches: Iterable[Batch],
    budget: Budget | str,
    *,
    model_name: str | None = None,
    on_batch: Callable[[int], None] | None = None,
    max_evaluations: int = 400,
    again: Callable[[BudgetResult], Budget | None] | None = None,
    other: Iterable[Batch] | None = None,
    doubt: float | None = None,
    one_head_count: bool = False,
) -> BudgetResult:
    """The per-layer levels of ``recipe``'s layers with the highest overall
    sparsity whose cost on the tuning split keeps ``budget`` (see the module
    docstring). ``batches``: the calibration data (the tuning split is carved
    from it); the model is not changed. ``other``: text from another source that
    each candidate is measured on too, the worse of the two held to the budget
    (``--max-cost-other``). ``again(result)``: another budget to search
    the same candidates to (their costs measured once), or None to stop there (at
    most :data:`MAX_SEARCHES` searches: ``convert --quantize`` searches again where
    the quantized model misses the budget). ``doubt``: the standard errors a candidate's tuning
    figure must keep the budget by (None: :data:`DOUBT` for ``cosine`` and ``perplexity-ratio``, 0
    for the other kinds; see the module docstring). ``one_head_count``: the layers of attention heads keep
    one level, stepped together (a decoder exported with a cache, whose config says one number of heads)."""
    from ..calibration.calibrate import collect

    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    recipe = Recipe.coerce(recipe)
    calibration, tuning = split_tuning(batches)
    stats = collect(model, recipe, unpadded(calibration), model_name=model_name, on_batch=on_batch)
    meter = _Meter(budget, model, unpadded(tuning), doubt=doubt)
    names = list(stats.layers)
    configs = {name: stats.resolve(_one_layer_recipe(recipe, stats, name, 0.0))[name] for name in names}  # each layer's settings
    heads = {name: find_heads(model, name) for name, config in configs.items() if config.heads}
    orders = _obs_orders(model, stats, configs, OBS_GRID, heads)
    grid = OBS_GRID if orders and len(orders) == len(names) else GRID
    elsewhere = _Meter(budget, model, list(unpadded(other)), doubt=doubt) if other is not None else None
    search = _Candidates(model, recipe, stats, meter, orders, grid, model_name, max_evaluations, elsewhere, heads,
                         tied=tuple(heads) if one_head_count and len(heads) > 1 else ())
    run = _search_by_threshold if grid == OBS_GRID else _search_upward
    result = run(search, budget, tuning)
    for searches in range(1, MAX_SEARCHES + 1):
        searched = again(result) if again is not None else None  # told of every result, the last one too
        if searched is None or searches == MAX_SEARCHES:
            break
        result = run(search, searched, tuning)
    return result


class _Candidates:
    """The allocations (a level ``k / grid`` per layer) one search measures: the
    masks of each (each layer's mask at each level made once, from its ``obs``
    removal order where it has one) and their cost on the tuning split (each
    allocation measured once, with the masks applied in ``mul`` mode; at most
    ``max_evaluations`` of them, then :class:`_Exhausted`); with an ``other`` meter, each
    allocation's cost is the worse of the tuning split's and the other text's. :meth:`cost`
    is what the budget holds (moved by the meters' doubt), :meth:`figure` what was measured."""

    def __init__(self, model: nn.Module, recipe: Recipe, stats: Any, meter: _Meter, orders: Mapping[str, _ObsOrder], grid: int,
                 model_name: str | None, max_evaluations: int, other: _Meter | None = None,
                 heads: Mapping[str, Heads] | None = None, tied: tuple[str, ...] = ()) -> None:
        self.model, self.recipe, self.stats, self.meter, self.orders = model, recipe, stats, meter, orders
        self.grid, self.model_name, self.max_evaluations, self.other = grid, model_name, max_evaluations, other
        #: with an other meter: each allocation's (tuning, other text) costs
        self.parts: dict[tuple[int, ...], tuple[float, float]] = {}
        #: each allocation's figure as measured (the worse side's with an other meter), and the tuning split's standard error
        self.figures: dict[tuple[int, ...], tuple[float, float]] = {}
        #: the layers of attention heads (``heads = true``): their levels are whole heads
        self.heads = dict(heads or {})
        self.names = list(stats.layers)
        #: layers that keep one level, stepped together (the first stands for all: :meth:`tie`)
        self.tied = tied
        #: what a search steps: each layer, the tied ones as one (named by the first)
        self.units = [name for name in self.names if name not in tied[1:]]
        #: per step of the tied layers: whether the model's config takes the heads they keep (:meth:`tie`)
        self.sayable: dict[int, bool] = {}
        self.one_layer: dict[tuple[str, int], Any] = {}
        self.measured: dict[tuple[int, ...], float] = {}
        zero = self.masks_for(dict.fromkeys(self.names, 0))
        # with heads among the layers, a step is priced per multiply-add it saves, not per feature
        work = work_per_feature(model, self.names, self.heads, next(iter(meter.batches)), mean_tokens(meter.batches)) if self.heads else {}
        #: each layer's mask size (features; times the work a feature saves, with heads), the unit its steps are priced in
        self.sizes = {name: max(1, sum(t.numel() for t in zero[name].tensors)) * work.get(name, 1.0) for name in self.names}
        #: each unit's: the tied layers' together
        self.unit_sizes = {unit: sum(self.sizes[name] for name in self.members(unit)) for unit in self.units}

    def members(self, unit: str) -> tuple[str, ...]:
        """The layers a unit of the search stands for."""
        return self.tied if self.tied and unit == self.tied[0] else (unit,)

    def tie(self, ks: Mapping[str, int]) -> dict[str, int]:
        """``ks`` with every tied layer at the first one's level, lowered to the nearest whose number of heads
        the model's config takes (:func:`~actsparse_deploy.nn.attention.head_config_refusal`: a decoder's
        runtime lays out its cache by it)."""
        if not self.tied:
            return dict(ks)
        k = ks[self.tied[0]]
        while k > 0 and not self._sayable(k):
            k -= 1
        return {**ks, **dict.fromkeys(self.tied, k)}

    def _sayable(self, k: int) -> bool:
        """Whether the config takes the number of heads the tied layers keep at step ``k`` (asked once per step)."""
        if k not in self.sayable:
            heads = self.heads[self.tied[0]]
            kept = round((1 - self.level(self.tied[0], k)) * heads.width) // heads.head_dim
            fields = dict(zip(HEAD_FIELDS, (kept, kept // heads.group, heads.head_dim)))
            self.sayable[k] = head_config_refusal(self.model, fields) is None
        return self.sayable[k]

    def key(self, ks: Mapping[str, int]) -> tuple[int, ...]:
        """An allocation's key in :attr:`measured`."""
        tied = self.tie(ks)
        return tuple(tied[name] for name in self.names)

    def masks_for(self, ks: Mapping[str, int]) -> Masks:
        from ..calibration.calibrate import select
        from ..calibration.masks import Masks

        stats, grid, layers, ks = self.stats, self.grid, {}, self.tie(ks)
        for name in self.names:
            key = (name, ks[name])
            if key not in self.one_layer:
                one_recipe = _one_layer_recipe(self.recipe, stats, name, ks[name] / grid)
                if name in self.orders:  # the mask from the layer's obs removal order, computed once
                    self.one_layer[key] = self.orders[name].layer_mask(name, stats, one_recipe, self.model, ks[name])
                else:
                    self.one_layer[key] = select(stats, one_recipe, model=self.model)[name]
            layers[name] = self.one_layer[key]
        levels = {name: self.level(name, ks[name]) for name in self.names}
        return Masks(layers=layers, recipe=recipe_at_levels(self.recipe, levels), num_samples=stats.num_samples,
                     num_batches=stats.num_batches, model=self.model_name, extra={"skipped": dict(stats.skipped)} if stats.skipped else {})

    def level(self, name: str, k: int, grid: int | None = None) -> float:
        """Layer ``name``'s sparsity at step ``k`` of ``grid`` (default the search's): ``k / grid``, or for a
        layer of heads the share of whole heads its removal order takes there."""
        order, heads = self.orders.get(name), self.heads.get(name)
        if order is not None and heads is not None:
            return order.removed(k) / order.d
        if heads is not None:
            return removed_count(heads.width, k / (grid or self.grid), heads.block) / heads.width
        return k / (grid or self.grid)

    def cost(self, ks: Mapping[str, int]) -> float:
        """The allocation's cost as the budget holds it: its tuning figure moved by the meter's doubt (with an
        other meter, the worse of the two so moved)."""
        from ..bake.squash import squash

        key = self.key(ks)
        if key not in self.measured:
            if len(self.measured) >= self.max_evaluations:
                raise _Exhausted()
            sparse = squash(self.model, self.masks_for(ks), "mul").model
            value, error, self.measured[key] = self.meter.doubted(sparse)
            self.figures[key] = (value, error)
            if self.other is not None:  # the worse of the two is what the budget holds
                there, _, doubted = self.other.doubted(sparse)
                self.parts[key] = (value, there)
                badness = self.meter.budget.badness
                if badness(doubted) > badness(self.measured[key]):
                    self.measured[key], self.figures[key] = doubted, (there, error)
        return self.measured[key]

    def figure(self, ks: Mapping[str, int]) -> float:
        """The allocation's figure as measured (:meth:`cost` without the doubt)."""
        self.cost(ks)
        return self.figures[self.key(ks)][0]

    def result(self, budget: Budget, ks: Mapping[str, int], cost: float, uniform: int, tuning: Iterable[Batch],
               grid: int | None = None) -> BudgetResult:
        """The search's result: levels ``ks`` (reported on ``grid``, default the search's), their masks and tuning ``cost``."""
        grid, key, ks = grid or self.grid, self.key(ks), self.tie(ks)
        figure, error = self.figures.get(key, (cost, 0.0))
        tuned, elsewhere = self.parts.get(key, (figure, None))
        other = {"samples": _samples(self.other.batches), "tuning_cost": elsewhere} if self.other is not None else None
        return BudgetResult(
            budget=budget, levels={name: self.level(name, ks[name], grid) for name in self.names}, masks=self.masks_for(ks), tuning_cost=tuned,
            uniform_level=uniform / grid, evaluations=len(self.measured), tuning_samples=_samples(tuning), other_text=other,
            tuning_error=error, doubt=self.meter.doubt,
        )


def _search_upward(search: _Candidates, budget: Budget, tuning: Iterable[Batch]) -> BudgetResult:
    """The highest uniform level within the budget (levels tried upward: the first
    over it stops), then :func:`_greedy` steps one layer at a time from there."""
    names, units, cost, top = search.names, search.units, search.cost, search.grid - 1
    uniform = 0
    current = budget.badness(1.0) if budget.higher_is_better else 0.0
    try:
        for k in range(1, top + 1):  # upward: the first level over the budget stops it
            value = cost(dict.fromkeys(names, k))
            if not budget.within(value):
                break
            uniform, current = k, value
        ks = dict.fromkeys(names, uniform)
        if uniform == 0:
            current = cost(ks)
        current = _greedy(units, ks, search.unit_sizes, current, cost, budget, top)
    except _Exhausted:
        ks = ks if "ks" in locals() else dict.fromkeys(names, uniform)
        current = search.measured.get(search.key(ks), current)
    return search.result(budget, ks, current, uniform, tuning, GRID)


def _samples(batches: Iterable[Batch]) -> int:
    """How many samples: a list's or a stream's count where known, else counted by reading."""
    known = total_samples(batches)
    return known if known is not None else sum(batch_size(b) for b in batches)


class _Exhausted(Exception):
    """The search measured as many candidates as it may."""


def _one_layer_recipe(recipe: Recipe, stats: Any, name: str, level: float) -> Recipe:
    """A recipe for layer ``name`` alone: the settings every rule of ``recipe``
    that selects it gives it (later rules win), then ``level``."""
    from ..calibration.stats import matches_type

    types = stats[name].layer_types
    settings = LayerSettings()
    for rule in recipe.layers:
        if (not rule.name or any(fnmatch.fnmatchcase(name, p) for p in rule.name)) and (
            not rule.type or matches_type(rule.type, types)
        ):
            settings = settings.merged(rule.settings)
    settings = settings.merged(LayerSettings(sparse_config=(("sparsity_level", float(level)),)))
    return replace(recipe, layers=(LayerRule(name=(exact_glob(name),), settings=settings),))


def _greedy(
    names: list[str], ks: dict[str, int], sizes: Mapping[str, int], current: float,
    cost: Callable[[Mapping[str, int]], float], budget: Budget, top: int,
) -> float:
    """Raise one layer a step at a time, the cheapest per feature first (lazy: an
    estimate made before the last step is measured again before it is used)."""
    frozen: set[str] = set()
    estimates: dict[str, tuple[float, int, float]] = {}  # name -> (penalty, version, cost)
    version = 0
    while True:
        open_ = [n for n in names if n not in frozen and ks[n] < top]
        if not open_:
            return current
        for name in open_:
            if name not in estimates:
                estimates[name] = _estimate(name, ks, sizes, current, cost, budget, version)
        name = min(open_, key=lambda n: (estimates[n][0], names.index(n)))
        penalty, made, value = estimates[name]
        if made != version:
            estimates[name] = _estimate(name, ks, sizes, current, cost, budget, version)
            continue
        if budget.within(value):
            ks[name] += 1
            current = value
            version += 1
            del estimates[name]
        else:
            frozen.add(name)


def _estimate(
    name: str, ks: Mapping[str, int], sizes: Mapping[str, int], current: float,
    cost: Callable[[Mapping[str, int]], float], budget: Budget, version: int,
) -> tuple[float, int, float]:
    value = cost({**ks, name: ks[name] + 1})
    features = sizes[name] / GRID
    return (budget.badness(value) - budget.badness(current)) / features, version, value


# --- obs: one removal order per layer, a threshold over all layers -----------------------


@dataclass(frozen=True)
class _ObsOrder:
    """A layer's greedy ``obs`` removal order, computed once at the highest level:
    the mask at any lower level is a prefix of it (the greedy steps before are the
    same; a last, smaller group takes the smallest errors of the same step, as
    ``obs`` does), and ``error[i]`` is the reconstruction error (``obs``'s
    objective) after removing the first ``i`` features."""

    order: torch.Tensor  # feature indices, first removed first
    error: torch.Tensor  # (len(order) + 1,) float64, error[0] = 0
    d: int
    grid: int
    #: features removed together (an attention head: :mod:`actsparse_deploy.nn.attention`)
    block: int = 1

    def removed(self, k: int) -> int:
        return min(len(self.order), removed_count(self.d, k / self.grid, self.block))

    def layer_mask(self, name: str, stats: Any, recipe: Recipe, model: nn.Module, k: int) -> Any:
        """The layer's mask and compensation edits at level ``k / grid``, as
        ``select`` gives them with the ``obs`` method (its metadata included)."""
        from ..calibration.calibrate import method_mask
        from ..calibration.methods import Method

        config = stats.resolve(recipe)[name]
        keep = torch.ones(self.d, dtype=torch.float32)
        keep[self.order[: self.removed(k)]] = 0.0
        ordered = Method(config.method.name, config.method.needs, lambda *args, **kwargs: keep.clone())
        return method_mask(name, stats[name], replace(config, method=ordered), model)


def obs_order(layer: nn.Module, layer_stats: Any, count: int, damping: float, block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, error)``: the first ``count`` features the ``obs`` method removes,
    in its order, and its cumulative objective after each (``error[0] = 0``; within
    a jointly removed group, interpolated): the steps of
    :func:`actsparse_deploy.calibration.methods.obs_steps`, as the method takes them."""
    from ..calibration.functions import STAT_DTYPE
    from ..calibration.methods import obs_steps

    order = torch.zeros(count, dtype=torch.long)
    error = torch.zeros(count + 1, dtype=STAT_DTYPE)
    done, total = 0, 0.0
    with torch.no_grad():
        for chosen, added in obs_steps(layer, layer_stats, count, damping, block):
            n = len(chosen)
            order[done:done + n] = chosen
            error[done + 1:done + n + 1] = total + added * torch.arange(1, n + 1, dtype=STAT_DTYPE) / n
            total += added
            done += n
    return order, error


def _obs_orders(model: nn.Module, stats: Any, configs: Mapping[str, Any], grid: int,
                heads: Mapping[str, Heads]) -> dict[str, _ObsOrder]:
    """The ``obs`` removal order of every layer whose settings (``configs``: each layer's, resolved)
    select with ``obs`` (of ``heads`` layers, whole heads; one stays)."""
    orders: dict[str, _ObsOrder] = {}
    for name, config in configs.items():
        if config.method is None or config.method.name != "obs":
            continue
        from ..calibration.methods import METHODS

        if METHODS.get("obs") is not config.method:
            continue
        layer = model.get_submodule(name)
        d = stats[name].stat.value.shape[0] - 1
        block = heads[name].block if name in heads else 1
        count = removed_count(d, (grid - 1) / grid, block)
        if block > 1:  # a layer of heads keeps one group
            count = min(count, d - block)
        order, error = obs_order(layer, stats[name], count, config.damping, block)
        orders[name] = _ObsOrder(order, error, d, grid, block)
    return orders


def _search_by_threshold(search: _Candidates, budget: Budget, tuning: Iterable[Batch]) -> BudgetResult:
    """Levels from one threshold on every layer's marginal cost per feature.

    A layer's cost curve is its ``obs`` objective (free from its removal order)
    scaled by one measurement: the layer alone, a little above the highest
    uniform level within the budget (bisected first). Under that
    (additive) model the allocation that removes most features for a cost takes
    the steps with the least marginal cost per feature first, whichever layer
    they are in: a sensitive layer may stay below the uniform level while robust
    ones go far above it. The threshold is bisected on the measured tuning cost,
    then the greedy step-up of :func:`_greedy` uses what is left of the budget.
    The uniform level is kept if it is better."""
    names, units, cost, sizes, grid = search.names, search.units, search.cost, search.unit_sizes, search.grid
    top = grid - 1
    zero = dict.fromkeys(names, 0)
    base = cost(zero)
    uniform, uniform_cost = _highest(lambda k: dict.fromkeys(names, k), top, base, cost, budget, stop_early=True)
    slopes = _slopes(search, uniform, budget)

    def prefix(n: int) -> dict[str, int]:
        ks = dict(zero)
        for _, i, k in slopes[:n]:
            ks[units[i]] = max(ks[units[i]], k)
        return search.tie(ks)

    try:
        n, current = _highest(prefix, len(slopes), base, cost, budget)
        ks = prefix(n)
        if uniform * sum(sizes.values()) > sum(ks[unit] * sizes[unit] for unit in units):
            ks, current = dict.fromkeys(names, uniform), uniform_cost
        current = _greedy(units, ks, sizes, current, cost, budget, top)
    except _Exhausted:
        ks = ks if "ks" in locals() else dict(zero)
        current = search.measured.get(search.key(ks), base)
    return search.result(budget, ks, current, uniform, tuning)


def _highest(candidate: Callable[[int], dict[str, int]], hi: int, base: float, cost: Callable[[Mapping[str, int]], float],
             budget: Budget, stop_early: bool = False) -> tuple[int, float]:
    """The highest ``n`` in ``[0, hi]`` whose ``candidate(n)`` keeps the budget,
    bisected (its cost rises with ``n``), and that cost (``base`` at 0).
    ``stop_early``: out of evaluations, what was found so far."""
    lo, value = 0, base
    try:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            measured_mid = cost(candidate(mid))
            if budget.within(measured_mid):
                lo, value = mid, measured_mid
            else:
                hi = mid - 1
    except _Exhausted:
        if not stop_early:
            raise
    return lo, value


def _slopes(search: _Candidates, uniform: int, budget: Budget) -> list[tuple[float, int, int]]:
    """``(marginal cost per feature, unit index, step)`` of every step of every
    unit of the search (a layer, or tied layers together), least first: the unit's ``obs`` curve (tied
    layers' summed) scaled by one measurement of the unit alone a little above the ``uniform`` level (where
    the allocation will be); a step's marginal cost is at least that of the steps before it (figures as
    measured, not doubted)."""
    orders, grid = search.orders, search.grid
    top = grid - 1
    zero = dict.fromkeys(search.names, 0)
    base = budget.badness(search.figure(zero))
    probe = min(top, max(uniform + grid // 8, grid // 4))  # near where the allocation will be
    slopes: list[tuple[float, int, int]] = []
    for i, unit in enumerate(search.units):
        members = [orders[name] for name in search.members(unit)]
        removed = [sum(order.removed(k) for order in members) for k in range(top + 1)]
        curve = sum(order.error[[order.removed(k) for k in range(top + 1)]] for order in members)
        assert isinstance(curve, torch.Tensor)
        rise = budget.badness(search.figure({**zero, unit: probe})) - base
        scale = max(rise, 1e-12) / max(float(curve[probe]), 1e-300)
        per_feature = search.unit_sizes[unit] / sum(order.d for order in members)  # the work a feature saves (1: features)
        marginal, last = 0.0, 0
        for k in range(1, top + 1):
            if removed[k] == removed[last]:  # a step of a layer of heads that removes no whole head
                continue
            marginal = max(marginal, scale * float(curve[k] - curve[last]) / ((removed[k] - removed[last]) * per_feature))
            slopes.append((marginal, i, k))
            last = k
    slopes.sort()
    return slopes


# --- the pipeline's use -------------------------------------------------------------


def calibrate_to_budget(
    model: nn.Module, recipe: Recipe, batches: Iterable[Batch], budget: Budget | str, *,
    model_name: str | None = None, on_batch: Callable[[int], None] | None = None,
    again: Callable[[BudgetResult], Budget | None] | None = None, other: Iterable[Batch] | None = None, doubt: float | None = None,
    one_head_count: bool = False,
) -> BudgetResult:
    """:func:`search_budget` for ``convert`` and ``calibrate``: the masks to write and the levels to report."""
    return search_budget(model, recipe, batches, budget, model_name=model_name, on_batch=on_batch, again=again, other=other,
                         doubt=doubt, one_head_count=one_head_count)


def heldout_budget(
    result: BudgetResult, work: Workload | None, sparse: nn.Module, outputs: Sequence[list[list[torch.Tensor]]] | None = None,
    dense: nn.Module | None = None,
) -> BudgetResult:
    """``result`` with the held-out cost of ``sparse`` (``heldout_cost``, and
    ``heldout_within``: whether it keeps the budget); a note where there is no held-out data.
    ``outputs``: the dense and the sparse model's outputs on ``work.heldout``
    (flattened, batch by batch) where they were computed already: a built-in kind
    is measured from them (:func:`actsparse_deploy.app.cost.cost_stage`). ``dense``: what stands for the dense
    model (its recorded outputs; None: ``work.model``)."""
    if work is None or work.heldout is None:
        return replace(result, heldout={"heldout_cost": None, "heldout_within": None,
                                        "heldout_note": "no held-out data: the held-out cost was not measured"})
    held = work.heldout if reiterable(work.heldout) else list(work.heldout)
    dense = dense if dense is not None else work.model
    value = result.budget.measure(dense, sparse, held, labels=work.labels, outputs=outputs)
    other = result.other_text
    if other is not None and work.other is not None:  # --max-cost-other: the other text, all of it, on the final model
        elsewhere = result.budget.measure(dense, sparse, list(work.other))
        other = {**other, "cost": elsewhere, "within": result.budget.within(elsewhere)}
    return replace(result, heldout={"heldout_cost": value, "heldout_within": result.budget.within(value)}, other_text=other)
