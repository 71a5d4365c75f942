"""The merge-method registry: declarations only, below the recipe that reads them (the kernel plan that runs them
is :mod:`optimizer.merge.plan`).

Every merge method mergekit 0.1.5 knows is declared here once: its parameters (name, type, default or required,
range, scope) and how mergeopt runs it (``engine``: ``fused`` in the numba/torch kernels, else ``mergekit``, handed
to mergekit's own Python API). Recipe validation (:func:`check_parameters`), the CLI help and the README's method
table all read :data:`METHODS`; adding a method touches this table only.

The fused methods compute ``out = base_coef * base + lambda * mix(deltas)``; they differ only in how each delta is
sparsified (none / DARE random drop / TIES magnitude trim), whether a sign consensus is elected (TIES), and
whether the mix is divided by the weight sum. Defaults follow mergekit 0.1.5 so a recipe means the same thing to
both tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optimizer.errors import MergeoptError, did_you_mean

REQUIRED = object()  # a parameter default meaning "the recipe must give it"

# Scopes, in mergekit's words: shared (one value, from the recipe's global parameters), per_model (each model but
# the base), per_input (each model, the base included).
SHARED, PER_MODEL, PER_INPUT = "shared", "per_model", "per_input"

# Default bounds of the genes every sparsifying delta method has: a model's weight, and its drop rate (1 - density).
WEIGHT_GENE = (0.0, 1.0)
DROP_RATE_GENE = (0.0, 0.9)


@dataclass(frozen=True)
class Parameter:
    """One parameter a method reads: its type, default (or REQUIRED), closed range and scope."""

    name: str
    kind: type  # float | bool | int
    scope: str
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    help: str = ""
    # the default [low, high] of this parameter as a gene of a search space; None: a search space cannot vary it
    gene: tuple[float, float] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, where: str) -> Any:
        """The value as this parameter's type, or one line naming the bad value (``weight: abc``)."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
                return _BOOL_WORDS[value.strip().lower()]
            raise MergeoptError(f"{where}: {value!r} is not true or false")
        if isinstance(value, bool):
            raise MergeoptError(f"{where}: {value!r} is not a number")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise MergeoptError(f"{where}: {value!r} is not a number") from None
        if not isinstance(value, (int, float)):
            raise MergeoptError(f"{where}: {value!r} is not a number")
        if self.kind is int:
            if float(value) != int(value):
                raise MergeoptError(f"{where}: {value!r} is not a whole number")
            value = int(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise MergeoptError(f"{where}: {value} is outside [{_fmt(self.low)}, {_fmt(self.high)}]")
        return value

    def describe(self) -> str:
        default = "required" if self.required else f"default {self.default}"
        bounds = "" if self.low is None and self.high is None else f", in [{_fmt(self.low)}, {_fmt(self.high)}]"
        return f"{self.name} ({self.kind.__name__}, {self.scope}, {default}{bounds})"


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _fmt(bound: float | None) -> str:
    return "-inf" if bound is None else f"{bound:g}"


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its parameters and inputs as mergekit declares them, and how mergeopt runs it."""

    name: str
    parameters: tuple[Parameter, ...]
    base: str  # "required" | "optional" | "ignored": does the method read base_model
    engine: str  # "fused": mergeopt's numba/torch kernels (searchable); "torch": mergeopt's engine through
    # optimizer/merge/torch_methods.py (one torch function per tensor); "mergekit": handed to mergekit's Python API
    min_models: int = 1  # models besides the base (every input when the method ignores the base), as mergekit counts
    max_models: int | None = None
    # None | "random" (DARE) | "magnitude" (TIES trim) | "outliers" (breadcrumbs) | "della": a search space gives the
    # sparsifying methods a drop-rate gene; the fused kernel runs "random" and "magnitude"
    sparsification: str | None = None
    consensus: bool = False  # fused only: TIES sign election
    whole_weights: bool = False  # linear: merges full weights, not deltas against a base
    # a search space chooses which of its models take part (a gene per model: in when >= 0.5), for a method with no
    # numeric parameter to vary (model_stock computes its interpolation factor from the models themselves)
    selects_models: bool = False
    summary: str = ""

    @property
    def default_normalize(self) -> bool:
        return bool(self.parameter("normalize").default) if self.has("normalize") else False

    def has(self, name: str) -> bool:
        return any(p.name == name for p in self.parameters)

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def fused(self) -> bool:
        return self.engine == "fused"

    @property
    def in_engine(self) -> bool:
        """mergeopt's engine builds it (fused kernel or torch path): in memory, into a live model, no mergekit."""
        return self.engine in ("fused", "torch")


def _task_arithmetic_family(extra: tuple[Parameter, ...] = (), normalize: bool = False,
                            rescale: bool = False) -> tuple[Parameter, ...]:
    """mergekit's generalized task arithmetic parameters (task_arithmetic, ties, dare_*, breadcrumbs*, della*)."""
    return (
        Parameter("weight", float, PER_MODEL, help="scale of the model's delta (fine-tuned minus base)",
                  gene=WEIGHT_GENE),
        # a search space varies it as a drop rate (1 - density) when the method sparsifies
        Parameter("density", float, PER_MODEL, 1.0, 0.0, 1.0, "kept fraction of the delta (1 - drop rate)"),
        Parameter("normalize", bool, SHARED, normalize, help="divide the mixed delta by the sum of the weights"),
        Parameter("rescale", bool, SHARED, rescale, help="rescale a sparsified delta to the dense delta's L1 norm"),
        Parameter("lambda", float, SHARED, 1.0, help="scale of the mixed delta", gene=(0.5, 1.5)),
        Parameter("int8_mask", bool, SHARED, False, help="store sign masks as int8 (memory only, same result)"),
    ) + extra


_GAMMA = Parameter("gamma", float, PER_MODEL, 0.01, 0.0, 1.0, "fraction of the largest-magnitude elements dropped",
                   gene=(0.0, 0.1))
_EPSILON = Parameter("epsilon", float, PER_MODEL, 0.15, 0.0, 1.0, "spread of DELLA's keep probabilities",
                     gene=(0.0, 0.3))
_T = Parameter("t", float, SHARED, help="interpolation factor from the base (0) to the other model (1)",
               gene=(0.0, 1.0))
_WEIGHT_ALL = Parameter("weight", float, PER_INPUT, help="weight of each model in the average")

METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    # fused: mergeopt's kernels; searchable
    MethodSpec("linear", (_WEIGHT_ALL, Parameter("normalize", bool, SHARED, True)), "ignored", "fused",
               whole_weights=True, summary="weighted average of whole weights"),
    MethodSpec("task_arithmetic", _task_arithmetic_family(), "required", "fused",
               summary="base + lambda * sum of weighted deltas"),
    MethodSpec("ties", _task_arithmetic_family(normalize=True), "required", "fused", sparsification="magnitude",
               consensus=True, summary="magnitude trim, sign election, disjoint mean"),
    MethodSpec("dare_linear", _task_arithmetic_family(rescale=True), "required", "fused", sparsification="random",
               summary="random drop (DARE) of each delta, weighted sum"),
    MethodSpec("dare_ties", _task_arithmetic_family(rescale=True), "required", "fused", sparsification="random",
               consensus=True, summary="random drop (DARE), sign election"),
    # mergeopt's engine, torch path (optimizer/merge/torch_methods.py)
    MethodSpec("breadcrumbs", _task_arithmetic_family((_GAMMA,)), "required", "torch", sparsification="outliers",
               summary="drops the smallest and the largest-magnitude elements of each delta"),
    MethodSpec("breadcrumbs_ties", _task_arithmetic_family((_GAMMA,)), "required", "torch", sparsification="outliers",
               summary="breadcrumbs with sign election"),
    MethodSpec("della", _task_arithmetic_family((_EPSILON,), normalize=True, rescale=True), "required", "torch",
               sparsification="della",
               summary="magnitude-ranked random drop (DELLA), sign election"),
    MethodSpec("della_linear", _task_arithmetic_family((_EPSILON,), rescale=True), "required", "torch",
               sparsification="della",
               summary="magnitude-ranked random drop (DELLA), weighted sum"),
    MethodSpec("slerp", (_T,), "required", "torch", min_models=1, max_models=1,
               summary="spherical interpolation between the base and one model"),
    MethodSpec("nuslerp", (Parameter("weight", float, PER_MODEL, gene=WEIGHT_GENE),
                           Parameter("nuslerp_row_wise", bool, SHARED, False),
                           Parameter("nuslerp_flatten", bool, SHARED, True)), "optional", "torch",
               min_models=2, max_models=2,
               summary="spherical interpolation of two models (or two deltas against a base)"),
    # through mergekit
    MethodSpec("multislerp", (Parameter("weight", float, PER_MODEL),
                              Parameter("normalize_weights", bool, SHARED, True),
                              Parameter("eps", float, SHARED, 1e-8, 0.0)), "optional", "mergekit",
               summary="spherical barycentre of several models"),
    MethodSpec("karcher", (Parameter("max_iter", int, SHARED, 10, 1), Parameter("tol", float, SHARED, 1e-5, 0.0)),
               "ignored", "mergekit", summary="Riemannian (Karcher) mean"),
    MethodSpec("model_stock", (Parameter("filter_wise", bool, SHARED, False),), "required", "torch",
               min_models=2, selects_models=True, summary="interpolation towards the base by the angle between deltas"),
    MethodSpec("nearswap", (Parameter("t", float, SHARED, low=0.0),), "required", "mergekit", min_models=1,
               max_models=1, summary="takes the other model's elements where they are near the base's"),
    MethodSpec("arcee_fusion", (), "required", "mergekit", min_models=1, max_models=1,
               summary="dynamic thresholded fusion of two models"),
    MethodSpec("sce", (Parameter("select_topk", float, SHARED, 1.0, 0.0, 1.0),
                       Parameter("int8_mask", bool, SHARED, False)), "required", "mergekit",
               summary="select, calculate, erase (variance-selected deltas)"),
    MethodSpec("ram", (Parameter("epsilon", float, SHARED, 1e-5, 0.0),), "required", "mergekit",
               summary="reinforced agent merging"),
    MethodSpec("ramplus_tl", (Parameter("r", float, SHARED, 0.1), Parameter("alpha", float, SHARED, 0.2),
                              Parameter("epsilon", float, SHARED, 1e-5, 0.0)), "required", "mergekit",
               summary="reinforced agent merging plus"),
    MethodSpec("passthrough", (Parameter("scale", float, PER_INPUT, None),), "ignored", "mergekit", max_models=1,
               summary="copies one model's tensors (layer stacking with slices:)"),
)}

FUSED_METHODS = tuple(name for name, spec in METHODS.items() if spec.fused)


def gene_parameters(spec: MethodSpec) -> tuple[Parameter, ...]:
    """The parameters of a method that a search space may make genes (numbers with a declared gene range)."""
    return tuple(p for p in spec.parameters if p.gene is not None and p.kind is float)


# Methods a search space may vary: built by mergeopt's engine (in memory, into a live model) with at least one numeric
# parameter to search, or a choice of models (model_stock). linear is left out: a space's genes are relative to its
# base model, which linear averages in as one more input.
SEARCHABLE_METHODS = tuple(name for name, spec in METHODS.items()
                           if spec.in_engine and not spec.whole_weights and (gene_parameters(spec) or spec.selects_models))
# Every parameter name some method reads: mergekit ignores a known name the chosen method does not read (lambda on
# linear), so such a name is kept and ignored here too; a name no method knows is a typo and refused.
KNOWN_PARAMETERS = frozenset(p.name for spec in METHODS.values() for p in spec.parameters)


def method_spec(name: Any) -> MethodSpec:
    """The method's declaration, or one line listing the known methods (with the nearest one)."""
    if name in METHODS:
        return METHODS[name]
    return _refuse_name(f"merge_method {name!r}", str(name), METHODS, "is not a merge method")


def _refuse_name(what: str, name: str, known, verb: str):
    hint = did_you_mean(name, known) or f"; use one of {', '.join(sorted(known))}"
    raise MergeoptError(f"{what} {verb}{hint}")


def check_parameters(spec: MethodSpec, params: dict[str, Any], where: str) -> dict[str, Any]:
    """Parameters with every scalar coerced to its declared type and range-checked, at parse time.

    A name no method knows is refused with the nearest known name (``densty (did you mean 'density'?)``); a name
    another method reads is kept and ignored, as mergekit does. Returns a copy of ``params``.
    """
    if not isinstance(params, dict):
        raise MergeoptError(f"{where} must be a mapping of parameter names to values")
    out = {}
    for name, setting in params.items():
        name = str(name)
        if not spec.has(name):
            if name not in KNOWN_PARAMETERS:
                own = [p.name for p in spec.parameters] or list(KNOWN_PARAMETERS)
                hint = (did_you_mean(name, own) or did_you_mean(name, sorted(KNOWN_PARAMETERS))
                        or f"; {spec.name} reads {', '.join(p.name for p in spec.parameters) or 'no parameters'}")
                raise MergeoptError(f"{where}.{name}: unknown parameter{hint}")
            out[name] = setting
            continue
        out[name] = _coerce_setting(spec.parameter(name), setting, f"{where}.{name}")
    return out


def _coerce_setting(param: Parameter, setting: Any, where: str) -> Any:
    """mergekit's setting forms: a scalar, a gradient (list of scalars), or {filter, value} condition(s)."""
    if param.default is None and setting is None:
        return None
    if isinstance(setting, dict):
        return _coerce_setting(param, [setting], where)[0] if _is_condition(setting) else _bad_form(where, setting)
    if isinstance(setting, list):
        if not setting:
            _bad_form(where, setting)
        if all(_is_condition(c) for c in setting):
            return [{**({"filter": c["filter"]} if "filter" in c else {}),
                     "value": _coerce_setting(param, c["value"], where)} for c in setting]
        if any(isinstance(c, (dict, list)) for c in setting):
            _bad_form(where, setting)
        return [param.coerce(v, f"{where}[{i}]") for i, v in enumerate(setting)]
    if setting is None:
        _bad_form(where, setting)
    return param.coerce(setting, where)


def _is_condition(value: Any) -> bool:
    return isinstance(value, dict) and "value" in value and set(value) <= {"filter", "value"}


def _bad_form(where: str, value: Any):
    raise MergeoptError(f"{where}: expected a number, a list of numbers (a gradient over depth) or a list of "
                        f"{{filter, value}} conditions, got {value!r}")


def methods_help() -> str:
    """One line per method for the CLI help and the docs, read from the registry."""
    lines = []
    for spec in METHODS.values():
        runner = _runner(spec, "through mergekit")
        params = ", ".join(p.name for p in spec.parameters) or "no parameters"
        genes = _gene_names(spec)
        lines.append(f"  {spec.name:<17} {runner:<23} {params}" + (f"  [genes: {genes}]" if genes else ""))
    return "\n".join(lines)


def _gene_names(spec: MethodSpec) -> str:
    """A searchable method's gene names for the CLI help: always varied, then (+ ...) those bounds may add."""
    if spec.name not in SEARCHABLE_METHODS:
        return ""
    if spec.selects_models:
        return "use (which models)"
    genes = gene_parameters(spec)
    always = [p.name for p in genes if p.required] + (["drop_rate"] if spec.sparsification is not None else [])
    optional = [p.name for p in genes if not p.required]
    return ", ".join(always) + (f" (+ {', '.join(optional)})" if optional else "")


def methods_markdown() -> str:
    """The README's method table, generated from the registry (a test keeps the README equal to it)."""
    rows = ["| method | runs | parameters (default; `*` per model) | genes in a search space (default bounds) "
            "| what it does |", "| --- | --- | --- | --- | --- |"]
    for spec in METHODS.values():
        runner = _runner(spec, "mergekit")
        params = ", ".join(f"`{p.name}`{'*' if p.scope != SHARED else ''}{_markdown_default(p)}"
                           for p in spec.parameters) or "none"
        rows.append(f"| `{spec.name}` | {runner} | {params} | {search_genes(spec) or '-'} | {spec.summary} |")
    return "\n".join(rows)


def search_genes(spec: MethodSpec) -> str:
    """A searchable method's genes, for the docs: always (required numbers, drop_rate when it sparsifies), then those
    a space's ``bounds`` may add."""
    if spec.name not in SEARCHABLE_METHODS:
        return ""
    if spec.selects_models:
        return f"`use`* [0, 1]: which models take part (>= 0.5; at least {spec.min_models})"
    star = {p.name: "*" if p.scope != SHARED else "" for p in spec.parameters}
    genes = gene_parameters(spec)
    always = [f"`{p.name}`{star[p.name]} [{_fmt(p.gene[0])}, {_fmt(p.gene[1])}]" for p in genes if p.required
              and p.gene is not None]
    if spec.sparsification is not None:
        always.append(f"`drop_rate`* [{_fmt(DROP_RATE_GENE[0])}, {_fmt(DROP_RATE_GENE[1])}]")
    optional = [f"`{p.name}`{star[p.name]} [{_fmt(p.gene[0])}, {_fmt(p.gene[1])}]" for p in genes if not p.required
                and p.gene is not None]
    return ", ".join(always) + (f"; with `bounds`: {', '.join(optional)}" if optional else "")


def _runner(spec: MethodSpec, mergekit_word: str) -> str:
    word = {"fused": "fused", "torch": "torch path"}.get(spec.engine, mergekit_word)
    return f"{word}, searchable" if spec.name in SEARCHABLE_METHODS else word


def _markdown_default(p: Parameter) -> str:
    if p.required:
        return " (required)"
    if p.default is None:
        return ""
    default = str(p.default).lower() if isinstance(p.default, bool) else f"{p.default:g}"
    bounds = f", in [{_fmt(p.low)}, {_fmt(p.high)}]" if p.low is not None and p.high is not None else ""
    return f" ({default}{bounds})"
