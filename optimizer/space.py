"""Search spaces: what may vary in a merge recipe, and the genome <-> Recipe mapping.

A genome is a point of the unit cube ``[0, 1]^d``; every coordinate maps linearly onto its parameter's bounds,
so there are no plateaus (no abs/clamp folding that makes half the early samples collapse onto one value).
Optimisers see only the cube: CMA-ES handles its edges with pycma's smooth bound transform, Optuna samplers
draw inside it.

Granularity decides how many values each model gets per parameter:
  * ``global``: one weight and one drop rate shared by all models;
  * ``per_model``: one value per model;
  * ``{layer_groups: K}``: K contiguous groups of layers per model (piecewise constant over depth);
  * ``per_layer``: one value per model and layer;
  * ``{gradient: K}``: K control points per model, linearly interpolated over depth (mergekit's gradients).
Tensors outside the layer stack (embeddings, final norm, head) take the first layer's value (mergekit's t = 0).
``modules: [self_attn, mlp]`` gives each listed module its own values (matched as substrings of tensor names);
other tensors (norms, embeddings) use the last listed module's values.

Which parameters are genes comes from the merge-method registry (:func:`gene_parameters`): the per-model
``weight``, a ``drop_rate`` (``1 - density``) for the sparsifying methods, and every other numeric parameter the
method requires (slerp's ``t``) with the registry's default range; an optional one (``gamma``, ``epsilon``,
``lambda``) becomes a gene when ``bounds`` names it. Per-model parameters get one value per model (and module and
layer group); shared ones (``t``, ``lambda``) one value per module and layer group, written as the recipe's global
parameters (a mergekit gradient list over depth).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError

from optimizer.catalogue import CATALOGUE, OPTIMIZER_NAMES
from optimizer.errors import MergeoptError, did_you_mean, schema_error
from optimizer.evaluate.scoring import BACKENDS
from optimizer.methods import (
    DROP_RATE_GENE,
    METHODS,
    SEARCHABLE_METHODS,
    SHARED,
    WEIGHT_GENE,
    check_parameters,
    gene_parameters,
)
from optimizer.recipe import DTYPES, ModelSpec, Recipe, read_yaml_file, split_lora, zoo_path
from optimizer.schema import Fraction, Integer, NonNegativeNumber, PositiveInt, PositiveNumber, Strict, one_of, text

DIRECTIONS = ("maximize", "minimize")
# the parts of a run's configuration that a resume may change: the budget (it may grow a run) and the thread count
BUDGET_KEYS = ("budget", "threads", "baselines", "validation")


@dataclass(frozen=True)
class Objective:
    task: str
    direction: str = "maximize"
    metric: str | None = None


USE = "use"  # the gene of a method that searches which models take part (model_stock): in when >= 0.5


@dataclass(frozen=True)
class SearchedParameter:
    """A parameter the space varies: its name (a recipe parameter, or drop_rate = 1 - density), whether each model
    has its own value (else one for all: written into the recipe's global parameters), and its gene bounds."""

    name: str
    per_model: bool
    low: float
    high: float


@dataclass(frozen=True)
class Gene:
    """One coordinate of the genome: which parameter of which model, for which module and layer group."""

    name: str
    param: str  # "weight" | "drop_rate" | another numeric parameter of the method ("t", "gamma", "epsilon", ...)
    model: int  # index into SearchSpace.models; -1: shared by all (global granularity)
    module: int  # index into SearchSpace.modules; -1: no module split
    group: int
    low: float
    high: float

    def value(self, unit: float) -> float:
        return self.low + (self.high - self.low) * min(1.0, max(0.0, unit))

    def unit(self, value: float) -> float:
        return 0.0 if self.high == self.low else (value - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space, frozen: what parse_space built from the document (with the command line's
    overrides written in before validation) and the facts it resolved from disk (the layer count). The run's
    record is its two dumps, :meth:`config` and :meth:`facts`; :meth:`identity` is what a resume may not change."""

    name: str
    base_model: str
    models: list[str]
    merge_method: str = "dare_ties"
    granularity: str = "per_model"
    groups: int = 1  # values per model and parameter along depth
    interpolate: bool = False  # gradient control points (True) or piecewise-constant groups (False)
    modules: list[str] = field(default_factory=list)
    weight_bounds: tuple[float, float] = WEIGHT_GENE
    drop_bounds: tuple[float, float] = DROP_RATE_GENE
    # bounds of the searched parameters other than weight and drop_rate (slerp's t, gamma, epsilon, lambda), by name
    extra_bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    objectives: list[Objective] = field(default_factory=list)
    scalarization: dict[str, float] = field(default_factory=dict)
    optimizer: str = "cma"
    optimizer_settings: Any = None  # the optimiser's typed settings (optimizer/catalogue.py); None: its defaults
    trials: int = 50
    minutes: float | None = None
    seed: int = 0
    tasks: str = "zoo"
    limit: int | None = 100
    fidelity_low: int | None = None
    fidelity_promote: float = 0.5
    backend: str = "hf"
    dtype: str = "float32"
    threads: int | None = None  # CPU threads (a machine setting: a resume may change it)
    baselines: Any = "default"  # what optimizer/search/baselines.py scores before the search
    finalists: int = 3  # validation.finalists: how many of the front are re-scored on the validation items
    num_layers: int = 1
    uses_drop_rate: bool = True  # the method sparsifies at random (DARE): drop rates are genes
    source: dict[str, Any] = field(default_factory=dict)  # the YAML as written (before CLI overrides)

    # ---- the run's record -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The effective configuration: the YAML with the CLI overrides applied, in canonical form.

        It parses back into the same space (``parse_space``), so a run folder's ``space.yaml`` re-runs as it is.
        """
        granularity: Any = self.granularity
        if self.granularity == "per_layer":
            granularity = "per_layer"
        elif self.granularity in ("layer_groups", "gradient"):
            granularity = {self.granularity: self.groups}
        config: dict[str, Any] = {
            "name": self.name, "base_model": self.base_model, "models": list(self.models),
            "merge_method": self.merge_method, "granularity": granularity, "modules": list(self.modules),
            "bounds": self._bounds_config(),
            "fixed": copy.deepcopy(self.fixed),
            "objectives": [{"task": o.task, "direction": o.direction, **({"metric": o.metric} if o.metric else {})}
                           for o in self.objectives],
            "scalarization": dict(self.scalarization),
            "optimizer": self.optimizer_choice.config(),
            "budget": {"trials": self.trials, **({"minutes": self.minutes} if self.minutes else {})},
            "seed": self.seed, "tasks": self.tasks, "limit": self.limit,
            "backend": self.backend, "dtype": self.dtype,
        }
        if self.threads is not None:
            config["threads"] = self.threads
        if self.fidelity_low is not None:
            config["fidelity"] = {"low": self.fidelity_low, "promote": self.fidelity_promote}
        if self.baselines != "default":
            config["baselines"] = copy.deepcopy(self.baselines)
        if self.finalists != DEFAULT_FINALISTS:
            config["validation"] = {"finalists": self.finalists}
        return config

    @property
    def optimizer_choice(self) -> OptimizerChoice:
        settings = self.optimizer_settings
        return OptimizerChoice(self.optimizer, settings if settings is not None else CATALOGUE[self.optimizer].settings())

    def _bounds_config(self) -> dict[str, list[float]]:
        spec = METHODS[self.merge_method]
        bounds = {}
        if spec.has("weight"):
            bounds["weight"] = list(self.weight_bounds)
        if spec.has("density"):
            bounds["drop_rate"] = list(self.drop_bounds)
        bounds.update({name: list(pair) for name, pair in self.extra_bounds.items()})
        return bounds

    def facts(self) -> dict[str, Any]:
        """What the configuration resolved to on disk: needed to read the run back without its model folders."""
        return {"num_layers": self.num_layers, "uses_drop_rate": self.uses_drop_rate,
                "model_labels": model_labels(self.models), "genes": [g.name for g in self.genes()]}

    def identity(self) -> dict[str, Any]:
        """What a resume must not change: the configuration but its budget."""
        return {k: v for k, v in self.config().items() if k not in BUDGET_KEYS}

    # ---- genome -----------------------------------------------------------------------------------

    def searched(self) -> list[SearchedParameter]:
        """The parameters this space varies, in gene order: weight, drop_rate, then the method's others."""
        spec = METHODS[self.merge_method]
        out = []
        if spec.selects_models:
            return [SearchedParameter(USE, True, 0.0, 1.0)]
        if spec.has("weight"):
            out.append(SearchedParameter("weight", spec.parameter("weight").scope != SHARED, *self.weight_bounds))
        if self.uses_drop_rate:
            out.append(SearchedParameter("drop_rate", True, *self.drop_bounds))
        for p in gene_parameters(spec):
            if p.name != "weight" and p.name in self.extra_bounds:
                out.append(SearchedParameter(p.name, p.scope != SHARED, *self.extra_bounds[p.name]))
        return out

    def genes(self) -> list[Gene]:
        module_ids = list(range(len(self.modules))) or [-1]
        labels = model_labels(self.models)
        genes = []
        for searched in self.searched():
            # gene names abbreviate the parameter to its first letter (w, d, t, g, e, l): unique per method
            shared = self.granularity == "global" or not searched.per_model
            for m in [-1] if shared else list(range(len(self.models))):
                for mod in module_ids:
                    for g in range(self.groups):
                        label = "all" if m < 0 else labels[m]
                        parts = [searched.name[0], label] + ([self.modules[mod]] if mod >= 0 else []) + (
                            [f"g{g}"] if self.groups > 1 else [])
                        genes.append(Gene(".".join(parts), searched.name, m, mod, g, searched.low, searched.high))
        return genes

    @property
    def dimension(self) -> int:
        return len(self.genes())

    def recipe(self, genome: dict[str, float] | list[float], seed: int | None = None) -> Recipe:
        """The recipe a genome (unit-cube coordinates, by gene name or in order) stands for."""
        genes = self.genes()
        if not isinstance(genome, dict):
            if len(genome) != len(genes):
                raise ValueError(f"genome has {len(genome)} values, the space has {len(genes)} genes")
            genome = {g.name: float(v) for g, v in zip(genes, genome)}
        if METHODS[self.merge_method].selects_models:
            return self._selection_recipe(genome, genes, seed)
        knots: dict[tuple[str, int, int], list[float]] = {}  # (param, model, module) -> a value per layer group
        for gene in genes:
            knots.setdefault((gene.param, gene.model, gene.module), [0.0] * self.groups)[gene.group] = \
                gene.value(genome[gene.name])
        module_ids = list(range(len(self.modules))) or [-1]
        own: list[dict[str, list[list[float]]]] = [{} for _ in self.models]  # per model: name -> per module knots
        shared: dict[str, list[list[float]]] = {}
        for searched in self.searched():
            if not searched.per_model:
                shared[searched.name] = [knots[(searched.name, -1, mod)] for mod in module_ids]
                continue
            for m in range(len(self.models)):
                key_model = -1 if self.granularity == "global" else m
                series = [knots[(searched.name, key_model, mod)] for mod in module_ids]
                if searched.name == "drop_rate":
                    own[m]["density"] = [[1.0 - v for v in values] for values in series]
                else:
                    own[m][searched.name] = series
        if METHODS[self.merge_method].sparsification == "della":
            self._keep_della_valid(own)
        parameters = copy.deepcopy(self.fixed)
        parameters.update({name: self._setting(series) for name, series in shared.items()})
        specs = [ModelSpec(path, {name: self._setting(series) for name, series in params.items()})
                 for path, params in zip(self.models, own, strict=True)]
        return Recipe(self.merge_method, specs, base_model=self.base_model, parameters=parameters,
                      dtype=self.dtype, seed=self.seed if seed is None else seed)

    def _selection_recipe(self, genome: dict[str, float], genes: list[Gene], seed: int | None) -> Recipe:
        """model_stock: the models whose gene is >= 0.5, or the method's minimum count of highest genes when fewer
        are (every genome is a valid recipe); in the space's order."""
        minimum = METHODS[self.merge_method].min_models
        units = [genome[g.name] for g in genes]
        chosen = {m for m, u in enumerate(units) if u >= 0.5}
        if len(chosen) < minimum:
            chosen = set(sorted(range(len(units)), key=lambda m: (-units[m], m))[:minimum])
        specs = [ModelSpec(path) for m, path in enumerate(self.models) if m in chosen]
        return Recipe(self.merge_method, specs, base_model=self.base_model, parameters=copy.deepcopy(self.fixed),
                      dtype=self.dtype, seed=self.seed if seed is None else seed)

    def _keep_della_valid(self, own: list[dict[str, list[list[float]]]]) -> None:
        """DELLA keeps an element with a probability within density +/- epsilon, which must stay inside (0, 1)
        (mergekit stops otherwise): epsilon is capped at 0.99 * min(density, 1 - density) at every knot, so also
        between knots (both are linear in depth there). The recipe then holds the epsilon that was merged."""
        default = self.fixed.get("epsilon", METHODS[self.merge_method].parameter("epsilon").default)
        for params in own:
            density = params["density"]
            epsilon = params.get("epsilon") or [[float(default)] * len(values) for values in density]
            capped = [[min(e, 0.99 * min(recipe_value(d), 1.0 - recipe_value(d))) for d, e in zip(ds, es, strict=True)]
                      for ds, es in zip(density, epsilon, strict=True)]
            if "epsilon" in params or capped != epsilon:
                params["epsilon"] = capped

    def _setting(self, per_module: list[list[float]]) -> Any:
        """One parameter's recipe setting: a number or a gradient over depth, per module as {filter, value}."""
        values = [self._depth_setting(series) for series in per_module]
        if not self.modules:
            return values[0]
        conditions: list[dict[str, Any]] = [{"filter": f, "value": v} for f, v in zip(self.modules, values)]
        conditions.append({"value": values[-1]})
        return conditions

    def _depth_setting(self, series: list[float]):
        series = [recipe_value(v) for v in series]
        if len(series) == 1:
            return series[0]
        if self.interpolate:
            return series
        # piecewise-constant groups, expanded to one value per layer (a list as long as the layer count maps
        # layer i exactly onto entry i under mergekit's interpolation)
        n = self.num_layers
        return [series[min(self.groups - 1, (i * self.groups) // n)] for i in range(n)]

    def genome_of(self, recipe_values: dict[str, float]) -> dict[str, float]:
        """Unit coordinates of gene values given in parameter units (e.g. for enqueuing a known recipe)."""
        return {g.name: g.unit(recipe_values[g.name]) for g in self.genes()}

    # ---- objectives ---------------------------------------------------------------------------------
    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1 and CATALOGUE[self.optimizer].multi_objective

    def scalarize(self, values: dict[str, float]) -> float:
        """Weighted mean of the objectives (signs turned so that larger is better)."""
        total = weight_sum = 0.0
        for obj in self.objectives:
            w = float(self.scalarization.get(obj.task, 1.0))
            v = values[obj.task]
            total += w * (v if obj.direction == "maximize" else -v)
            weight_sum += w
        return total / weight_sum


def model_labels(paths: list[str]) -> list[str]:
    """Short unique names of models: the folder's name, or as many trailing path parts as tell them apart.

    ``.../math/checkpoint-1000`` and ``.../code/checkpoint-1000`` become ``math/checkpoint-1000`` and
    ``code/checkpoint-1000`` (genes named after them must never be shared by two models).
    """
    parts = [[p for p in Path(path).parts if p not in ("/", "")] or [path] for path in paths]
    labels = []
    for i, own in enumerate(parts):
        label = own[-1]  # also for a folder listed twice (no suffix tells the copies apart)
        for k in range(1, len(own) + 1):
            suffix = "/".join(own[-k:])
            if all("/".join(other[-k:]) != suffix for j, other in enumerate(parts) if j != i):
                label = suffix
                break
        labels.append(label)
    if len(set(labels)) < len(labels):  # the same folder listed twice: number the copies
        labels = [f"{label}#{labels[:i].count(label)}" if labels.count(label) > 1 else label
                  for i, label in enumerate(labels)]
    return labels


def recipe_value(v: float) -> float:
    """Round to 6 significant digits: readable YAML, and the recipe stays exactly what was scored."""
    return float(f"{v:.6g}")


def _fail(source: str, key: str, problem: str) -> MergeoptError:
    hint = _KEYS.get(key.split(".")[0].split("[")[0], "")
    return MergeoptError(f"{source}: {key}: {problem}" + (f" (expected {hint})" if hint else ""))


# ---- the declared schema (pydantic): structure, types and ranges; messages are the one-liners users see ---------
ModelRef = Annotated[str, text("a model folder or zoo:NAME")]


def _bound_pair(lo: float | None, hi: float | None):
    def check(value: Any) -> tuple[float, float]:
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"must be [low, high], got {value!r}")
        low, high = float(value[0]), float(value[1])
        if low > high:
            raise ValueError(f"low {low} is above high {high}")
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"must be finite, got [{low}, {high}]")
        if (lo is not None and low < lo) or (hi is not None and high > hi):
            raise ValueError(f"must lie within [{_limit(lo)}, {_limit(hi)}], got [{low}, {high}]")
        return low, high
    return BeforeValidator(check)


def _limit(bound: float | None) -> str:
    return "-inf" if bound is None else str(float(bound))


def _gene_limits(name: str) -> BeforeValidator:
    """A gene's [low, high] must lie within the parameter's range in the merge-method registry."""
    declared = {p.name: p for spec in METHODS.values() for p in gene_parameters(spec)}[name]
    return _bound_pair(declared.low, declared.high)


class BoundsConfig(Strict):
    weight: Annotated[tuple[float, float], _bound_pair(-2.0, 3.0)] = WEIGHT_GENE
    drop_rate: Annotated[tuple[float, float], _bound_pair(0.0, 0.99)] = DROP_RATE_GENE
    # the registry's other gene parameters (a test keeps this list equal to gene_parameters of SEARCHABLE_METHODS)
    t: Annotated[tuple[float, float] | None, _gene_limits("t")] = None
    gamma: Annotated[tuple[float, float] | None, _gene_limits("gamma")] = None
    epsilon: Annotated[tuple[float, float] | None, _gene_limits("epsilon")] = None
    lambda_: Annotated[tuple[float, float] | None, _gene_limits("lambda")] = Field(None, alias="lambda")

    def given(self) -> dict[str, tuple[float, float]]:
        """The bounds the space names, by parameter name (lambda, not lambda_)."""
        return {(BoundsConfig.model_fields[k].alias or k): getattr(self, k) for k in self.model_fields_set}


def _objective(value: Any) -> Any:
    return {"task": value} if isinstance(value, str) else value


class ObjectiveConfig(Strict):
    task: Annotated[str, text("a task name")]
    metric: str | None = None
    direction: Annotated[str, one_of(DIRECTIONS, "maximize or minimize")] = "maximize"


@dataclass(frozen=True)
class OptimizerChoice:
    """The ``optimizer:`` block validated: a catalogued optimiser and its typed settings (optimizer/catalogue.py)."""

    name: str
    settings: Any  # an instance of CATALOGUE[name].settings

    def config(self) -> dict[str, Any]:
        """The block in canonical form: the name and the settings the space gives (defaults left implicit)."""
        return {"name": self.name, **self.settings.model_dump(exclude_unset=True)}


def _optimizer(value: Any) -> OptimizerChoice:
    """The optimiser's name, then its settings against the optimiser's own declared schema. Errors name the
    sub-key (".popsize: ..."), which the formatter turns into ``optimizer.popsize: ...``."""
    if isinstance(value, OptimizerChoice):
        return value
    value = {"name": value} if isinstance(value, str) else value
    if not isinstance(value, dict) or value.get("name") not in CATALOGUE:
        name = value.get("name") if isinstance(value, dict) else value
        raise ValueError(f".name: {name!r} is not one of {', '.join(OPTIMIZER_NAMES)}")
    name = value["name"]
    model = CATALOGUE[name].settings
    settings = {k: v for k, v in value.items() if k != "name"}
    allowed = list(model.model_fields)
    for key in settings:
        if key not in allowed:
            raise ValueError(f".{key}: is not a setting of {name}{did_you_mean(key, allowed)}; allowed: "
                             f"{', '.join(allowed) or 'none'}")
    try:
        return OptimizerChoice(name, model.model_validate(settings))
    except ValidationError as exc:
        first = exc.errors()[0]
        problem = first["msg"].removeprefix("Value error, ")
        raise ValueError(f".{first['loc'][0]}: {problem}") from None


def _granularity(value: Any) -> Any:
    if value in ("global", "per_model", "per_layer"):
        return value
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("layer_groups", "gradient"):
        kind, k = next(iter(value.items()))
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f".{kind}: must be a positive integer, got {k!r}")
        return value
    raise ValueError(f"{value!r} is not valid")


class BudgetConfig(Strict):
    trials: PositiveInt | None = None
    minutes: PositiveNumber | None = None


class FidelityConfig(Strict):
    low: PositiveInt
    promote: Fraction = 0.5


BASELINE_GROUPS = ("parents", "task_arithmetic", "own")  # what each group is: optimizer/search/baselines.py
DEFAULT_FINALISTS = 3


class BaselineRecipe(Strict):
    """One explicit entry of ``baselines:``: a method with one shared weight (and density), or a recipe file."""

    method: str | None = None
    weight: float | None = None
    density: float | None = None
    parameters: dict[str, Any] | None = None
    recipe: str | None = None
    label: str | None = None


class ValidationConfig(Strict):
    """``validation:``: how many of the front's best are re-scored on the validation items at the end of a run."""

    finalists: Annotated[int, Field(ge=0)] = DEFAULT_FINALISTS


def check_baselines(value: Any) -> Any:
    """``baselines:`` in canonical form: ``default``, ``none`` or a list of group names and explicit entries."""
    if value is None:
        return "default"
    if value in ("default", "none"):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be default, none or a non-empty list of baselines, got {value!r}")
    out: list[Any] = []
    for i, entry in enumerate(value):
        if isinstance(entry, str):
            if entry not in BASELINE_GROUPS:
                raise ValueError(f"entry {i}: {entry!r} is not one of {', '.join(BASELINE_GROUPS)} (or a mapping with "
                                 "method or recipe)")
            out.append(entry)
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"entry {i}: {entry!r} is not a group name or a mapping")
        allowed = list(BaselineRecipe.model_fields)
        unknown = next((k for k in entry if k not in allowed), None)
        if unknown is not None:
            raise ValueError(f"entry {i}: unknown key {unknown!r}{did_you_mean(str(unknown), allowed)}; allowed: "
                             f"{', '.join(allowed)}")
        try:
            parsed = BaselineRecipe.model_validate(entry)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ValueError(f"entry {i}: {'.'.join(map(str, error['loc']))}: {error['msg']}") from None
        if (parsed.method is None) == (parsed.recipe is None):
            raise ValueError(f"entry {i}: give either 'method' (with 'weight') or 'recipe' (a recipe YAML)")
        if parsed.method is not None and parsed.method not in METHODS:
            raise ValueError(f"entry {i}: method {parsed.method!r} is not a merge method"
                             f"{did_you_mean(parsed.method, list(METHODS))}")
        out.append(parsed.model_dump(exclude_none=True))
    return out


class SpaceConfig(Strict):
    """A search-space YAML as declared: every key, its type and range, and (its description) what it expects; the
    cross-checks that need the registries or several keys follow in parse_space. Frozen once validated."""

    name: str | None = Field(None, description="a name for the run (default: the file's stem)")
    base_model: ModelRef = Field(description="the base model folder or zoo:NAME")
    models: Annotated[list[ModelRef], Field(min_length=1)] = Field(
        description="the fine-tuned models (folders or zoo:NAME)")
    merge_method: Annotated[str, text("a merge method")] = Field("dare_ties", description=" | ".join(SEARCHABLE_METHODS))
    granularity: Annotated[Any, BeforeValidator(_granularity)] = Field(
        "per_model", description="global | per_model | per_layer | {layer_groups: K} | {gradient: K}")
    modules: list[Annotated[str, text("a tensor-name substring")]] | None = Field(
        None, description="a list of tensor-name substrings that get their own values, e.g. [self_attn, mlp]")
    bounds: BoundsConfig | None = Field(None, description="{weight: [lo, hi], drop_rate: [lo, hi]} and the method's "
                                        "other genes, e.g. t, gamma, epsilon, lambda")
    fixed: dict[str, Any] | None = Field(None, description="recipe parameters held constant, e.g. {normalize: false, "
                                         "lambda: 1.0} (the method's own, checked against the merge-method registry)")
    objectives: Annotated[list[Annotated[ObjectiveConfig, BeforeValidator(_objective)]], Field(min_length=1)] = Field(
        description="a list of {task, metric, direction}")
    scalarization: dict[str, NonNegativeNumber] | None = Field(
        None, description="task weights for single-objective optimisers, e.g. {add: 1, sort: 2}")
    optimizer: Annotated[OptimizerChoice, BeforeValidator(_optimizer)] = Field(
        OptimizerChoice("cma", CATALOGUE["cma"].settings()),
        description="{name: " + "|".join(OPTIMIZER_NAMES) + ", ...settings}")
    budget: BudgetConfig | None = Field(None, description="{trials: N, minutes: M}")
    seed: Integer = Field(0, description="an integer: sampler seed and DARE mask seed")
    tasks: Annotated[str, text("zoo, a task-set YAML or lm-eval task names")] = Field(
        "zoo", description="the task set: zoo, a task-set YAML or lm-eval task names")
    limit: PositiveInt | None = Field(100, description="items per task (the scoring subset)")
    fidelity: FidelityConfig | None = Field(None, description="{low: N, promote: F}: score every candidate on N "
                                            "items first, promote the top F to the full subset")
    backend: Annotated[str, one_of(tuple(BACKENDS))] = Field("hf", description="hf | vllm")
    dtype: Annotated[str, one_of(DTYPES, "float32, bfloat16 or float16")] = Field(
        "float32", description="float32 | bfloat16 | float16")
    threads: PositiveInt | None = Field(None, description="CPU threads for torch, numba and BLAS together "
                                        "(--threads overrides; default: the free cores)")
    baselines: Annotated[Any, BeforeValidator(check_baselines)] = Field(
        "default", description="default | none | a list of parents, task_arithmetic, own, {method, weight} or "
        "{recipe: FILE}: merges scored before the search, to set its best against")
    validation: ValidationConfig | None = Field(
        None, description="{finalists: K}: the K best of the front and the best baseline re-scored on the validation "
        "items")
    resolved: dict[str, Any] | None = Field(None, description="written by mergeopt search into a run's space.yaml "
                                            "(what the space resolved to); ignored on input")


# what each key expects, from the schema's descriptions (messages end with it: "(expected ...)")
_KEYS: dict[str, str] = {name: str(f.description) for name, f in SpaceConfig.model_fields.items()}
_ALLOWED = {"": [k for k in _KEYS if k != "resolved"],
            "bounds": [f.alias or k for k, f in BoundsConfig.model_fields.items()],
            "objectives[]": list(ObjectiveConfig.model_fields),
            "budget": list(BudgetConfig.model_fields), "fidelity": list(FidelityConfig.model_fields),
            "validation": list(ValidationConfig.model_fields)}
_MESSAGES = {"too_short": "must be a non-empty list", "list_type": "must be a list", "dict_type": "must be a mapping",
             "model_type": "must be a mapping"}
# command-line overrides: the flag, and where its value goes in the document (validated with the file's values)
FLAGS = {"trials": ("--trials", "budget.trials"), "minutes": ("--minutes", "budget.minutes"),
         "optimizer": ("--optimizer", "optimizer.name"), "seed": ("--seed", "seed"), "backend": ("--backend", "backend")}


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The document with the command line's values written in (None: not given), and {location: flag} for the
    values that came from a flag. Another optimizer than the file's drops the file's settings for it."""
    data = copy.deepcopy(data)
    flags: dict[str, str] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in FLAGS:
            raise ValueError(f"no command-line override for {key!r}")  # a programming error, not the user's
        flag, where = FLAGS[key]
        flags[where] = flag
        if key in ("trials", "minutes"):
            budget = data.get("budget")
            data["budget"] = {**(budget if isinstance(budget, dict) else {}), key: value}
        elif key == "optimizer":
            current = data.get("optimizer")
            current_name = current.get("name") if isinstance(current, dict) else current
            if current_name != value:
                data["optimizer"] = {"name": value}
        else:
            data[key] = value
    return data, flags


def validate_config(data: Any, source: str, flags: dict[str, str] | None = None) -> SpaceConfig:
    """The declared schema applied, with one-line messages (unknown keys get the nearest known name; a value from
    the command line is named by its flag)."""
    if not isinstance(data, dict):
        raise MergeoptError(f"{source}: a search space is a mapping of keys: {', '.join(_KEYS)}")
    try:
        return SpaceConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] in _MESSAGES:
            where = ".".join(str(p) for p in first["loc"])
            raise _fail(source, where, f"{_MESSAGES[first['type']]}, got {first.get('input')!r}") from None
        raise schema_error(exc, source, _ALLOWED, _KEYS, flags) from None


def load_space(path: str | Path, overrides: dict[str, Any] | None = None, resolve_models: bool = True) -> SearchSpace:
    path = Path(path)
    data = read_yaml_file(path, "search space")
    return parse_space(data, source=str(path), root=path.parent, default_name=path.stem, overrides=overrides,
                       resolve_models=resolve_models)


def parse_space(data: Any, source: str = "space", root: Path = Path("."), default_name: str = "search",
                overrides: dict[str, Any] | None = None, resolve_models: bool = True,
                facts: dict[str, Any] | None = None) -> SearchSpace:
    """A validated, frozen SearchSpace: the command line's overrides written into the document, the declared schema
    applied to the whole (every value, the flags' included, checked before any model is looked at), then the
    cross-checks that need the registries or several keys, then the facts read from disk (the layer count).
    ``facts`` (a run's record, :meth:`SearchSpace.facts`) replace every look at the disk: the models are neither
    resolved nor opened (reading a run needs no model folder, and no torch)."""
    if facts is not None:
        resolve_models = False
    raw = copy.deepcopy({k: v for k, v in data.items() if k != "resolved"}) if isinstance(data, dict) else data
    document, flags = apply_overrides(data, overrides) if isinstance(data, dict) else (data, {})
    config = validate_config(document, source, flags)

    def model_ref(value: str, key: str) -> str:
        if not resolve_models:
            return value
        if value.startswith("zoo:"):
            return zoo_path(value)
        lora = split_lora(value, root)
        if lora is not None:  # mergekit's model+adapter (issue 22)
            return f"{model_ref(lora[0], key)}+{model_ref(lora[1], key)}"
        candidate = Path(value) if Path(value).is_absolute() else (root / value)
        if not candidate.exists():
            candidate = Path(value)
        if not candidate.is_dir():
            raise _fail(source, key, f"model folder {value} does not exist")
        return str(candidate.resolve())

    method = config.merge_method
    if facts is None:
        if method not in SEARCHABLE_METHODS:
            raise MergeoptError(f"{source}: merge_method: {_not_searchable(method)}")
        uses_drop_rate = METHODS[method].sparsification is not None  # DARE, TIES trim, breadcrumbs, DELLA
    else:
        uses_drop_rate = bool(facts["uses_drop_rate"])

    granularity, groups, interpolate = "per_model", 1, False
    g = config.granularity
    if g in ("global", "per_model"):
        granularity = g
    elif g == "per_layer":
        granularity, groups = "per_layer", -1
    else:
        kind, k = next(iter(g.items()))
        granularity, groups, interpolate = kind, k, kind == "gradient"

    bounds = config.bounds or BoundsConfig.model_validate({})
    fixed = dict(config.fixed or {})
    if facts is None:
        settable = [p.name for p in METHODS[method].parameters if p.name not in ("weight", "density")]
        unknown = sorted(set(fixed) - set(settable))
        if unknown:
            raise _fail(source, f"fixed.{unknown[0]}", f"is not a parameter of {method}"
                        f"{did_you_mean(unknown[0], settable)}; allowed: {', '.join(settable) or 'none'}")
        fixed = check_parameters(METHODS[method], fixed, f"{source}: fixed")  # types and ranges now
        _check_bounds(METHODS[method], bounds.given(), fixed, source)
    extra_bounds = _extra_bounds(METHODS[method], bounds.given(), fixed)
    objectives = [Objective(o.task, o.direction, o.metric) for o in config.objectives]
    scalarization = config.scalarization or {}
    for task in scalarization:
        if task not in {o.task for o in objectives}:
            raise _fail(source, f"scalarization.{task}", "names no objective")

    budget = config.budget
    trials = 50 if budget is None else (budget.trials or 10**9)
    minutes = budget.minutes if budget is not None else None
    limit = config.limit
    low, promote = None, 0.5
    if config.fidelity is not None:
        low, promote = config.fidelity.low, config.fidelity.promote
        if limit is not None and low >= limit:
            raise _fail(source, "fidelity.low", f"must be a positive integer below limit ({limit}), got {low!r}")
    tasks = config.tasks
    if tasks != "zoo" and tasks.endswith((".yaml", ".yml", ".jsonl")):
        candidate = root / tasks
        tasks = str(candidate.resolve()) if candidate.exists() else tasks
    base = model_ref(config.base_model, "base_model")
    models = [model_ref(m, f"models[{i}]") for i, m in enumerate(config.models)]
    if resolve_models:  # a LoRA adapter folder stands for the space's base with the adapter applied (issue 22)
        from optimizer.merge.lora import is_adapter

        models = [f"{base}+{m}" if is_adapter(m) else m for m in models]
    modules = config.modules or []

    if facts is not None:
        layers = int(facts["num_layers"])
    elif resolve_models:
        from optimizer.merge.checkpoint import num_layers, read_config

        layers = num_layers(read_config(base))
    else:
        layers = 1
    if groups == -1:
        groups = layers
    if groups > max(1, layers) and not interpolate:
        raise _fail(source, "granularity.layer_groups", f"{groups} groups but the model has {layers} layers")
    if facts is None and METHODS[method].selects_models:
        if granularity != "per_model" or modules:
            raise MergeoptError(f"{source}: granularity: {method} searches which models take part, one gene per model; "
                                "use granularity per_model and no modules")
        if len(models) < METHODS[method].min_models + 1:
            raise MergeoptError(f"{source}: models: a {method} search chooses among the models and takes at least "
                                f"{METHODS[method].min_models}; list at least {METHODS[method].min_models + 1}")
    if facts is None and method == "nuslerp" and granularity == "global":
        raise MergeoptError(f"{source}: granularity: global gives both nuslerp models one weight, so they always "
                            "interpolate half way (t = w2 / (w1 + w2) = 0.5); use per_model or finer")

    space = SearchSpace(
        name=config.name if config.name is not None else default_name, base_model=base, models=models,
        merge_method=method, granularity=granularity, groups=groups, interpolate=interpolate, modules=list(modules),
        weight_bounds=bounds.weight, drop_bounds=bounds.drop_rate, extra_bounds=extra_bounds, fixed=dict(fixed),
        objectives=objectives, scalarization=dict(scalarization), optimizer=config.optimizer.name,
        optimizer_settings=config.optimizer.settings, trials=trials, minutes=minutes, seed=config.seed,
        tasks=str(tasks), limit=limit, fidelity_low=low, fidelity_promote=float(promote), backend=config.backend,
        dtype=config.dtype, threads=config.threads, num_layers=layers, uses_drop_rate=uses_drop_rate, source=raw,
        baselines=config.baselines,
        finalists=config.validation.finalists if config.validation is not None else DEFAULT_FINALISTS)
    if facts is None and not space.searched():
        raise MergeoptError(f"{source}: fixed: fixes every parameter of {method}, so there is nothing to search; "
                            "merge the recipe once with 'mergeopt merge', or drop a parameter from fixed")
    return space


def _not_searchable(method: str) -> str:
    """Why a merge method cannot be searched, in one line."""
    spec = METHODS.get(method)
    choices = f"use one of {', '.join(SEARCHABLE_METHODS)}"
    if spec is not None and spec.whole_weights:
        return (f"{method!r} cannot be searched (it averages whole weights, the base included, while a space's genes "
                f"are relative to its base model); use task_arithmetic for a weighted sum of deltas, or {choices}")
    return f"{method!r} cannot be searched; {choices}{did_you_mean(method, list(SEARCHABLE_METHODS))}"


def _check_bounds(spec, given: dict[str, tuple[float, float]], fixed: dict[str, Any], source: str) -> None:
    """Bounds name only the method's gene parameters, none of them also fixed; DELLA's fixed epsilon is a number
    (a search caps it per candidate to keep density +/- epsilon inside (0, 1))."""
    genes = [p.name for p in gene_parameters(spec)] + (["drop_rate"] if spec.has("density") else [])
    for name in given:
        if name not in genes:
            raise _fail(source, f"bounds.{name}", f"{spec.name} has no {name} to search; its genes: {', '.join(genes)}")
        if name in fixed:
            raise _fail(source, f"bounds.{name}", f"{name} is also under fixed; keep it in one of the two")
    if spec.sparsification == "della" and "epsilon" in fixed and not (
            isinstance(fixed["epsilon"], (int, float)) and not isinstance(fixed["epsilon"], bool)):
        raise _fail(source, "fixed.epsilon", "a della search space takes one number (it is capped per candidate "
                    "so that density +/- epsilon stays inside (0, 1))")


def _extra_bounds(spec, given: dict[str, tuple[float, float]], fixed: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Bounds of the searched parameters besides weight and drop_rate: those the space names, and every required
    one not fixed (slerp's t) with the registry's default range."""
    out = {}
    for p in gene_parameters(spec):
        if p.name == "weight":
            continue
        if p.name in given:
            out[p.name] = given[p.name]
        elif p.required and p.name not in fixed and p.gene is not None:
            out[p.name] = p.gene
    return out
