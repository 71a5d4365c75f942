"""Recipe: the one value that crosses every boundary (space -> engine -> study -> export).

A recipe *is* a mergekit configuration (``merge_method``, ``base_model``, ``models`` with per-model
``parameters``, global ``parameters``, ``dtype``) plus a ``mergeopt:`` block that mergekit ignores:

```yaml
merge_method: dare_ties
base_model: /models/base
models:
  - model: /models/adder
    parameters: {weight: 0.7, density: [0.9, 0.5]}   # a gradient: interpolated over depth
  - model: /models/reverser
    parameters:
      weight: [{filter: self_attn, value: 0.4}, {value: 0.6}]   # per-module values
      density: 0.5
dtype: float32
mergeopt: {seed: 0, rescale: dare}
```

Parameter values follow mergekit's rules exactly (see :func:`resolve_setting`): a number; a list of
numbers interpolated linearly over the layer position ``t = layer / (num_layers - 1)`` (tensors outside
the layer stack use ``t = 0``); or a list of ``{filter, value}`` conditions where the first condition
whose filter is a substring of the tensor name (or that has no filter) wins.

``density`` is the kept fraction, ``1 - drop_rate``: mergekit's word, kept here so a recipe is a
mergekit file verbatim. The search space speaks in drop rates and converts.

``mergeopt.rescale`` says how DARE rescales the kept elements of a delta:
  * ``dare`` (the default for recipes mergeopt writes): multiply by ``1 / (1 - p)``, as in the paper;
    unbiased in expectation for every element.
  * ``l1``: multiply so the sparsified delta keeps the L1 norm of the dense delta, per tensor; this is
    what mergekit 0.1.5 does for ``rescale: true``, and the rule used for plain mergekit files.
  * ``none``: no rescaling.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from optimizer.errors import MergeoptError

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
RESCALE_RULES = ("dare", "l1", "none")
DTYPES = ("float32", "float16", "bfloat16")
# Keys of the mergekit top level this recipe understands; anything else is refused, not ignored.
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "mergeopt",
             "out_dtype", "chat_template"}
_MERGEOPT_KEYS = {"seed", "rescale", "trial", "scores", "objectives", "study"}


@dataclass
class ModelSpec:
    """One input model of a recipe and its parameters (``weight``, ``density``)."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    tokenizer_source: str | None = None
    seed: int = 0
    rescale: str = "dare"
    # Provenance written by the search (trial number, scores, ...). Never read by the merge.
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.merge_method not in METHODS:
            raise MergeoptError(
                f"merge_method {self.merge_method!r} is not supported; use one of {', '.join(METHODS)}")
        if self.rescale not in RESCALE_RULES:
            raise MergeoptError(f"mergeopt.rescale {self.rescale!r} is not valid; use one of {', '.join(RESCALE_RULES)}")
        if self.dtype not in DTYPES:
            raise MergeoptError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if not self.models:
            raise MergeoptError("the recipe lists no models; add at least one entry under 'models:'")
        if self.merge_method != "linear" and self.base_model is None:
            raise MergeoptError(f"merge_method {self.merge_method} needs a base_model")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise MergeoptError(f"mergeopt.seed must be an integer, got {self.seed!r}")

    # ---- which models carry a delta -------------------------------------------------------------
    @property
    def uses_base(self) -> bool:
        """Task-arithmetic methods merge deltas against the base; linear merges whole weights."""
        return self.merge_method != "linear"

    def delta_models(self) -> list[tuple[int, ModelSpec]]:
        """(position, spec) of the models whose parameters take part in the merge.

        The position in ``models`` is also the model's identity in DARE mask seeds, so masks do not
        change when a folder is moved, only when the recipe's model order does.
        """
        if not self.uses_base:
            return list(enumerate(self.models))
        return [(i, m) for i, m in enumerate(self.models) if not _same_path(m.model, self.base_model)]

    # ---- YAML -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"merge_method": self.merge_method}
        # linear merges whole weights: a base_model mergekit would treat as one more input (needing a weight),
        # so it is written only when it is one of the models.
        if self.base_model is not None and (self.uses_base or any(_same_path(m.model, self.base_model)
                                                                  for m in self.models)):
            out["base_model"] = self.base_model
        out["models"] = [{"model": m.model, **({"parameters": copy.deepcopy(m.parameters)} if m.parameters else {})}
                         for m in self.models]
        params = copy.deepcopy(self.parameters)
        if self.merge_method.startswith("dare"):
            # mergekit's own switch; its rule is always L1, ours is in the mergeopt block.
            params["rescale"] = self.rescale != "none"
        if params:
            out["parameters"] = params
        out["dtype"] = self.dtype
        if self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        block: dict[str, Any] = {"seed": self.seed, "rescale": self.rescale}
        block.update(copy.deepcopy(self.info))
        out["mergeopt"] = block
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise MergeoptError(f"{source}: expected a mapping with merge_method and models, got {type(data).__name__}")
        unknown = set(data) - _TOP_KEYS
        if "slices" in data:
            raise MergeoptError(f"{source}: 'slices' recipes are not supported; list whole models under 'models:'")
        if unknown:
            raise MergeoptError(f"{source}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(_TOP_KEYS))}")
        for key in ("merge_method", "models"):
            if key not in data:
                raise MergeoptError(f"{source}: missing key {key!r}")
        if not isinstance(data["models"], list):
            raise MergeoptError(f"{source}: 'models' must be a list of {{model: PATH, parameters: {{...}}}}")
        models = []
        for i, entry in enumerate(data["models"]):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                raise MergeoptError(f"{source}: models[{i}] needs a 'model' key")
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                raise MergeoptError(f"{source}: models[{i}].parameters must be a mapping")
            for name, value in params.items():
                _check_setting(value, f"{source}: models[{i}].parameters.{name}")
            models.append(ModelSpec(model=str(entry["model"]), parameters=dict(params)))
        params = dict(data.get("parameters") or {})
        for name, value in params.items():
            _check_setting(value, f"{source}: parameters.{name}")
        block = data.get("mergeopt") or {}
        if not isinstance(block, dict):
            raise MergeoptError(f"{source}: 'mergeopt' must be a mapping")
        bad = set(block) - _MERGEOPT_KEYS
        if bad:
            raise MergeoptError(f"{source}: unknown key mergeopt.{sorted(bad)[0]}; allowed: {', '.join(sorted(_MERGEOPT_KEYS))}")
        method = data["merge_method"]
        mergekit_rescale = params.pop("rescale", True)
        if "rescale" in block:
            rescale = block["rescale"]
        elif str(method).startswith("dare"):
            # A plain mergekit file: reproduce mergekit's rule.
            rescale = "l1" if mergekit_rescale else "none"
        else:
            rescale = "dare"
        info = {k: v for k, v in block.items() if k not in ("seed", "rescale")}
        return cls(
            merge_method=method,
            models=models,
            base_model=None if data.get("base_model") is None else str(data["base_model"]),
            parameters=params,
            dtype=data.get("dtype") or data.get("out_dtype") or "float32",
            tokenizer_source=data.get("tokenizer_source"),
            seed=block.get("seed", 0),
            rescale=rescale,
            info=info,
        )

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        recipe = cls.from_dict(read_yaml_file(path, "recipe file"), source=str(path))
        recipe.resolve_paths(path.parent)
        return recipe

    def resolve_paths(self, root: Path) -> None:
        """Resolve ``zoo:NAME`` references, and relative paths against the recipe's folder when they exist there."""

        def fix(p: str | None) -> str | None:
            if p is not None and p.startswith("zoo:"):
                return zoo_path(p)
            if p is None or Path(p).is_absolute():
                return p
            candidate = (root / p)
            return str(candidate.resolve()) if candidate.exists() else p

        self.base_model = fix(self.base_model)
        self.tokenizer_source = fix(self.tokenizer_source)
        for m in self.models:
            m.model = fix(m.model)  # type: ignore[assignment]


def read_yaml_file(path: Path, kind: str) -> Any:
    """A YAML file's content, or one clear line: the file is missing, or which line breaks the syntax."""
    if not path.is_file():
        raise MergeoptError(f"{kind} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise MergeoptError(f"{path}: not valid YAML{where}; fix the syntax and retry") from None


def zoo_path(reference: str) -> str:
    """``zoo:NAME`` names a model of the embedded zoo (``mergeopt zoo`` lists them)."""
    from optimizer.zoo import zoo_models

    models = zoo_models()
    name = reference.removeprefix("zoo:")
    if "/" in name:  # a built family in the cache, e.g. zoo:smollm2/adder
        from optimizer.zoo.smollm2 import resolve

        return str(resolve(name).resolve())
    if name not in models:
        raise MergeoptError(f"{reference} is not a zoo model; use one of {', '.join('zoo:' + n for n in models)}")
    return str(Path(models[name]).resolve())


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or Path(a).resolve() == Path(b).resolve()


def _check_setting(value: Any, where: str) -> None:
    if _is_number(value) or isinstance(value, (bool, str)):
        return
    if isinstance(value, list) and value:
        if all(_is_number(v) for v in value):
            return
        if all(isinstance(v, dict) and "value" in v and set(v) <= {"filter", "value"} for v in value):
            for cond in value:
                _check_setting(cond["value"], where)
            return
    raise MergeoptError(
        f"{where}: expected a number, a list of numbers (a gradient over depth) or a list of "
        f"{{filter, value}} conditions, got {value!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def resolve_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Value of one parameter setting for one tensor, with mergekit's semantics.

    ``t`` is the tensor's relative depth: ``layer / (num_layers - 1)`` inside the layer stack, 0 outside.
    Returns ``None`` when no condition matches (the caller falls back to the next scope).
    """
    if isinstance(setting, dict):
        setting = [setting]
    if _is_number(setting) or isinstance(setting, (bool, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(_is_number(v) for v in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return resolve_setting(cond["value"], tensor_name, t)
        return None
    raise MergeoptError(f"unexpected parameter setting {setting!r}")


def resolve_parameter(name: str, scopes: list[dict[str, Any]], tensor_name: str, t: float, default: Any = None) -> Any:
    """First scope (per-model parameters, then the recipe's global parameters) that defines ``name`` wins."""
    for scope in scopes:
        if name in scope:
            value = resolve_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return default
