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

from optimizer.errors import MergeoptError, unknown_key
from optimizer.methods import METHODS, check_parameters, method_spec

RESCALE_RULES = ("dare", "l1", "none")
# Arithmetic and written dtypes a recipe may name; None (no `dtype:`) keeps the checkpoint's dtype, as mergekit does.
DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a merge or a scoring model may use (the one table)
# tokenizer_source words that are not model references (mergekit's meaning).
TOKENIZER_WORDS = ("base", "union")
# Keys of the mergekit top level the fused engine understands; anything else is refused, not ignored.
# `name` is read by mergekit-multi and ignored by mergekit-yaml, so it is accepted and ignored here too.
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "mergeopt",
             "out_dtype", "chat_template", "name"}
# mergekit forms the fused engine does not run; `mergeopt merge` hands them to mergekit.
MERGEKIT_ONLY_KEYS = ("slices", "modules", "tokenizer")
_MODEL_KEYS = {"model", "parameters"}  # an entry of models:
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
    # mergekit's meanings: dtype is the arithmetic dtype (None: the checkpoint's), out_dtype the written one
    # (None: dtype, else the checkpoint's).
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base" | "union" | a model reference | None (the base's files)
    chat_template: str | None = None  # a Jinja template, a template name mergekit ships, or "auto"
    seed: int = 0
    rescale: str = "dare"
    # Provenance written by the search (trial number, scores, ...). Never read by the merge.
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = method_spec(self.merge_method)
        if not spec.in_engine:
            raise MergeoptError(f"merge_method {self.merge_method} runs through mergekit, not the fused engine; "
                                "'mergeopt merge' does that (pip install mergekit)")
        if self.rescale not in RESCALE_RULES:
            raise MergeoptError(f"mergeopt.rescale {self.rescale!r} is not valid; use one of {', '.join(RESCALE_RULES)}")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise MergeoptError(f"{key} {value!r} is not supported; use one of {', '.join(DTYPES)}")
        if not self.models:
            raise MergeoptError("the recipe lists no models; add at least one entry under 'models:'")
        if spec.base == "required" and self.base_model is None:
            raise MergeoptError(f"merge_method {self.merge_method} needs a base_model")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise MergeoptError(f"mergeopt.seed must be an integer, got {self.seed!r}")
        # Every value checked now, before any model is read: unknown names, types, ranges, missing weights.
        self.parameters = check_parameters(spec, self.parameters, "parameters")
        for i, m in enumerate(self.models):
            m.parameters = check_parameters(spec, m.parameters, f"models[{i}].parameters")
        for i, m in self.delta_models():
            if "weight" in {p.name for p in spec.parameters} and "weight" not in m.parameters \
                    and "weight" not in self.parameters:
                raise MergeoptError(f"models[{i}] ({m.model}) has no weight; give it parameters.weight "
                                    "or set a global parameters.weight")
        others = len(self.delta_models())
        if others < spec.min_models or (spec.max_models is not None and others > spec.max_models):
            want = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                    else f"at least {spec.min_models}" if spec.max_models is None else f"at most {spec.max_models}")
            raise MergeoptError(f"merge_method {self.merge_method} takes {want} model{'s' * (want[-1] != '1')} "
                                f"besides the base, got {others}")
        if self.linear_base_is_input and "weight" not in self.parameters:
            raise MergeoptError(f"linear: base_model {self.base_model} is not under models, so it is averaged in "
                                "(as mergekit does) and needs a weight: set parameters.weight, list it under "
                                "models, or drop base_model")
        if spec.whole_weights:
            _refuse_zero_weight_sums(self)
        if spec.sparsification == "della":
            _refuse_della_bounds(self, spec)
        from optimizer.side_files import check_chat_template

        check_chat_template(self.chat_template)

    # ---- which models carry a delta -------------------------------------------------------------
    @property
    def uses_base(self) -> bool:
        """Task-arithmetic methods merge deltas against the base; linear merges whole weights (and nuslerp does
        without a base_model)."""
        return not METHODS[self.merge_method].whole_weights and self.base_model is not None

    @property
    def linear_base_is_input(self) -> bool:
        """linear with a base_model not under ``models``: mergekit adds the base as one more averaged input."""
        return (METHODS[self.merge_method].whole_weights and self.base_model is not None
                and not any(_same_path(m.model, self.base_model) for m in self.models))

    def delta_models(self) -> list[tuple[int, ModelSpec]]:
        """(position, spec) of the models whose parameters take part in the merge.

        The position in ``models`` is also the model's identity in DARE mask seeds, so masks do not
        change when a folder is moved, only when the recipe's model order does.
        """
        if not self.uses_base:
            return list(enumerate(self.models))
        return [(i, m) for i, m in enumerate(self.models) if not _same_path(m.model, self.base_model)]

    @property
    def written_dtype(self) -> str | None:
        """The dtype of the written weights (mergekit: out_dtype, else dtype); None keeps the checkpoint's."""
        return self.out_dtype or self.dtype

    def tokenizer_folder(self) -> str | None:
        """The folder whose tokenizer files go next to the merged weights (None: the engine's base).

        ``base`` is the base model (the first model without one). ``union`` of identical tokenizers is that same
        tokenizer (mergekit builds the union vocabulary, which for homologous models is the base's); a union of
        different tokenizers permutes embedding rows, which only mergekit does.
        """
        source = self.tokenizer_source
        if source is None:
            return None
        base = self.base_model or reference_model(self.models[0].model)
        if source == "base":
            return base
        if source == "union":
            differing = first_differing_tokenizer(base, [reference_model(m.model) for m in self.models])
            if differing is not None:
                raise MergeoptError(f"tokenizer_source: union of different tokenizers ({differing} differs from "
                                    f"{base}); 'mergeopt merge' runs such a recipe through mergekit")
            return base
        return source

    # ---- YAML -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        out["models"] = [{"model": m.model, **({"parameters": copy.deepcopy(m.parameters)} if m.parameters else {})}
                         for m in self.models]
        params = copy.deepcopy(self.parameters)
        if METHODS[self.merge_method].sparsification == "random":
            # mergekit's own switch; its rule is always L1, ours is in the mergeopt block.
            params["rescale"] = self.rescale != "none"
        if params:
            out["parameters"] = params
        for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
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
        reason = mergekit_only_reason(data)
        if reason is not None:
            raise MergeoptError(f"{source}: {reason} runs through mergekit, not the fused engine; "
                                "'mergeopt merge' does that (pip install mergekit)")
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise unknown_key(source, str(unknown[0]), sorted(_TOP_KEYS))
        for key in ("merge_method", "models"):
            if key not in data:
                raise MergeoptError(f"{source}: missing key {key!r}")
        if not isinstance(data["models"], list):
            raise MergeoptError(f"{source}: 'models' must be a list of {{model: PATH, parameters: {{...}}}}")
        models = []
        for i, entry in enumerate(data["models"]):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict):
                raise MergeoptError(f"{source}: models[{i}] needs a 'model' key")
            if set(entry) - _MODEL_KEYS:  # e.g. 'paramters:' would silently merge with no parameters
                raise unknown_key(source, str(sorted(set(entry) - _MODEL_KEYS)[0]), sorted(_MODEL_KEYS),
                                  where=f"models[{i}]")
            if "model" not in entry:
                raise MergeoptError(f"{source}: models[{i}] needs a 'model' key")
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                raise MergeoptError(f"{source}: models[{i}].parameters must be a mapping")
            models.append(ModelSpec(model=str(entry["model"]), parameters=dict(params)))
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergeoptError(f"{source}: parameters must be a mapping")
        params = dict(params)
        block = data.get("mergeopt") or {}
        if not isinstance(block, dict):
            raise MergeoptError(f"{source}: 'mergeopt' must be a mapping")
        bad = set(block) - _MERGEOPT_KEYS
        if bad:
            raise unknown_key(source, str(sorted(bad)[0]), sorted(_MERGEOPT_KEYS), where="mergeopt")
        method = data["merge_method"]
        spec = method_spec(method)
        if spec.sparsification == "random":
            # DARE: mergekit's `rescale` switch becomes the mergeopt rule (its L1 rule for a plain mergekit file).
            mergekit_rescale = check_parameters(spec, {"rescale": params.pop("rescale", True)}, "parameters")["rescale"]
            rescale = block.get("rescale", "l1" if mergekit_rescale else "none")
        else:
            rescale = block.get("rescale", "dare")
        info = {k: v for k, v in block.items() if k not in ("seed", "rescale")}
        chat_template = data.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            raise MergeoptError(f"{source}: chat_template must be a string (a Jinja template, a name, or auto)")
        try:
            return cls(
                merge_method=method,
                models=models,
                base_model=None if data.get("base_model") is None else str(data["base_model"]),
                parameters=params,
                dtype=data.get("dtype"),
                out_dtype=data.get("out_dtype"),
                tokenizer_source=None if data.get("tokenizer_source") is None else str(data["tokenizer_source"]),
                chat_template=chat_template,
                seed=block.get("seed", 0),
                rescale=rescale,
                info=info,
            )
        except MergeoptError as exc:
            raise MergeoptError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        data = read_yaml_file(path, "recipe file")
        if isinstance(data, dict):
            data = plain_references(data)
        if isinstance(data, dict) and data.get("slices") is not None:
            data = fold_full_range_slices(data, path.parent)
        recipe = cls.from_dict(data, source=str(path))
        recipe.resolve_paths(path.parent)
        return recipe

    def resolve_paths(self, root: Path) -> None:
        """Resolve ``zoo:NAME`` and hub ids (``org/name[@revision]``, from the local Hugging Face cache), and
        relative paths against the recipe's folder when they exist there."""
        if self.base_model is not None:
            self.base_model = resolve_reference(self.base_model, root)
        if self.tokenizer_source is not None and self.tokenizer_source not in TOKENIZER_WORDS:
            self.tokenizer_source = resolve_reference(self.tokenizer_source, root)
        for m in self.models:
            m.model = resolve_reference(m.model, root)


def resolve_reference(reference: str, root: Path | None = None) -> str:
    """A model reference as a local folder: ``zoo:NAME``; a path (relative: the recipe's folder first, then the
    current one); or a Hugging Face id ``org/name[@revision]`` found in the local cache."""
    if reference.startswith("zoo:"):
        return zoo_path(reference)
    lora = split_lora(reference, root)
    if lora is not None:  # model+adapter: each part resolved
        return f"{resolve_reference(lora[0], root)}+{resolve_reference(lora[1], root)}"
    path = Path(reference).expanduser()
    folder, at, revision = reference.partition("@")
    whole = Path(reference).expanduser()
    if at and "+" not in revision and not (whole.exists() or (root is not None and (root / whole).exists())):
        local = Path(folder).expanduser()
        local = local if local.is_absolute() or root is None or not (root / local).is_dir() else root / local
        if local.is_dir():
            raise MergeoptError(f"{reference}: a revision (@{revision}) is read for Hugging Face ids only, and "
                                f"{folder} is a local folder; drop '@{revision}', or check that revision out "
                                "into a folder of its own")
    if path.is_absolute():
        return str(path)
    if root is not None and (root / path).exists():
        return str((root / path).resolve())
    if path.exists():
        return reference
    from optimizer import hub

    if hub.looks_like_hub_id(reference):
        return hub.resolve(reference)
    return reference


def mergekit_only_reason(data: dict, root: Path | None = None) -> str | None:
    """Why a mergekit configuration needs mergekit itself (None: the fused engine runs it)."""
    method = data.get("merge_method")
    if method in METHODS and not METHODS[method].in_engine:
        return f"merge_method {method}"
    for key in MERGEKIT_ONLY_KEYS:
        if data.get(key) is not None:
            return {"slices": "a 'slices:' recipe (not one full-range slice per model)",
                    "modules": "a 'modules:' recipe", "tokenizer": "a 'tokenizer:' block"}[key]
    for entry in [data.get("base_model")] + [m.get("model") for m in data.get("models") or [] if isinstance(m, dict)]:
        if isinstance(entry, dict):
            return "a model reference with override_architecture"
    engine_base = data.get("base_model") or next(
        (m.get("model") for m in data.get("models") or [] if isinstance(m, dict)), None)
    engine_base = reference_model(engine_base, root) if isinstance(engine_base, str) else None
    for reference in model_references(data):
        lora = split_lora(reference, root)
        # an adapter on the base is built by the engine (issue 22); on another model, mergekit applies it to a copy
        if lora is not None and not _same_reference(lora[0], engine_base, root):
            return f"the LoRA reference {reference} (mergekit applies the adapter to a temporary copy of the model)"
    return None


def reference_model(reference: str, root: Path | None = None) -> str:
    """The model a reference names: ``model+adapter`` -> model; any other reference as it is."""
    lora = split_lora(reference, root)
    return reference if lora is None else lora[0]


def _same_reference(a: str, b: str | None, root: Path | None) -> bool:
    """Whether two model references name one folder (resolved where they can be, else as written)."""
    if b is None:
        return False

    def resolved(ref: str) -> str:
        try:
            return str(Path(resolve_reference(ref, root)).expanduser().resolve())
        except MergeoptError:
            return ref

    return a == b or resolved(a) == resolved(b)


def plain_references(data: dict) -> dict:
    """The configuration with every model reference written as a mapping (mergekit's ``{model: {path, revision},
    lora}`` form) turned into the equivalent string (``path@revision+lora``); a mapping with
    ``override_architecture`` has no string form and stays (mergekit runs it)."""

    def plain(ref: Any, where: str) -> Any:
        if not isinstance(ref, dict):
            return ref
        unknown = set(ref) - {"model", "lora", "override_architecture"}
        if unknown or "model" not in ref:
            raise MergeoptError(f"{where}: a model reference mapping takes model, lora and override_architecture, "
                                f"got {sorted(ref)}")
        if ref.get("override_architecture") is not None:
            return {**ref, "model": path_of(ref["model"], where), **(
                {"lora": path_of(ref["lora"], where)} if ref.get("lora") is not None else {})}
        model = path_of(ref["model"], where)
        return model if ref.get("lora") is None else f"{model}+{path_of(ref['lora'], where)}"

    def path_of(value: Any, where: str) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("path"), str) and set(value) <= {"path", "revision"}:
            return value["path"] + (f"@{value['revision']}" if value.get("revision") else "")
        raise MergeoptError(f"{where}: expected a path or {{path, revision}}, got {value!r}")

    out = copy.deepcopy(data)
    if "base_model" in out:
        out["base_model"] = plain(out["base_model"], "base_model")
    for i, entry in enumerate(out.get("models") or []):
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = plain(entry["model"], f"models[{i}].model")
    for i, out_slice in enumerate(out.get("slices") or []):
        if not isinstance(out_slice, dict):
            continue
        if "base_model" in out_slice:
            out_slice["base_model"] = plain(out_slice["base_model"], f"slices[{i}].base_model")
        for j, src in enumerate(out_slice.get("sources") or []):
            if isinstance(src, dict) and "model" in src:
                src["model"] = plain(src["model"], f"slices[{i}].sources[{j}].model")
    return out


def model_references(data: dict) -> list[str]:
    """Every model reference of a configuration's base_model, models and slices (strings as written)."""
    refs = [data.get("base_model")]
    entries = list(data.get("models") or [])
    for out_slice in data.get("slices") or []:
        if isinstance(out_slice, dict):
            entries += list(out_slice.get("sources") or [])
            refs.append(out_slice.get("base_model"))
    refs += [e.get("model") if isinstance(e, dict) else e for e in entries]
    # a mapping reference (override_architecture) counts as its model, plus its adapter when it has one
    refs = [f"{r['model']}+{r['lora']}" if isinstance(r, dict) and r.get("lora") else
            r.get("model") if isinstance(r, dict) else r for r in refs]
    return [r for r in refs if isinstance(r, str)]


def split_lora(reference: str, root: Path | None = None) -> tuple[str, str] | None:
    """(model, adapter) of mergekit's ``MODEL+ADAPTER`` reference (a LoRA applied to the model); None for a plain
    reference (a folder whose name holds a '+' is that folder)."""
    if "+" not in reference:
        return None
    path = Path(reference).expanduser()
    if path.exists() or (root is not None and not path.is_absolute() and (root / path).exists()):
        return None
    model, _, adapter = reference.partition("+")
    if not model or not adapter or "+" in adapter:
        raise MergeoptError(f"model reference {reference!r}: expected MODEL+ADAPTER (one '+'), as mergekit reads it")
    return model, adapter


def fold_full_range_slices(data: dict, root: Path | None = None) -> dict:
    """One output slice whose sources each cover all their layers means the same as ``models:``; returned in that
    form. Anything else (several slices, partial ranges, slice-level base or residual weight, parameters that both
    the slice and the top level set) is returned unchanged, for mergekit."""
    slices = data.get("slices")
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        return data
    out_slice = slices[0]
    sources = out_slice.get("sources")
    if set(out_slice) - {"sources", "parameters"} or not isinstance(sources, list) or not sources:
        return data
    slice_params = out_slice.get("parameters") or {}
    top_params = data.get("parameters") or {}
    if not isinstance(slice_params, dict) or not isinstance(top_params, dict) or set(slice_params) & set(top_params):
        return data
    models = []
    for src in sources:
        if not isinstance(src, dict) or set(src) - {"model", "layer_range", "parameters"} or "model" not in src:
            return data
        layer_range = src.get("layer_range")
        layers = _layer_count(str(src["model"]), root)
        if layers is None or not isinstance(layer_range, list) or list(layer_range) != [0, layers]:
            return data
        models.append({"model": src["model"], **({"parameters": src["parameters"]} if src.get("parameters") else {})})
    folded = {k: v for k, v in data.items() if k != "slices"}
    folded["models"] = models
    if slice_params:
        folded["parameters"] = {**top_params, **slice_params}
    return folded


def _layer_count(reference: str, root: Path | None) -> int | None:
    import json

    try:
        folder = resolve_reference(reference, root)
        config = json.loads((Path(folder) / "config.json").read_text())
    except (MergeoptError, OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def first_differing_tokenizer(reference: str, others: list[str]) -> str | None:
    """The first folder whose tokenizer files differ from the reference's (None: all identical)."""
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
             "special_tokens_map.json")

    def files(folder: str) -> dict[str, bytes]:
        return {n: (Path(folder) / n).read_bytes() for n in names if (Path(folder) / n).is_file()}

    ref = files(reference)
    for other in others:
        if files(other) != ref:
            return other
    return None


def _refuse_della_bounds(recipe: Recipe, spec) -> None:
    """DELLA keeps elements with probabilities density +/- epsilon, which must stay within (0, 1) (mergekit stops
    mid-merge otherwise); checked now for numbers (gradients and filters are checked per tensor as they merge)."""
    for i, m in recipe.delta_models():
        density = m.parameters.get("density", recipe.parameters.get("density", 1.0))
        epsilon = m.parameters.get("epsilon", recipe.parameters.get("epsilon", spec.parameter("epsilon").default))
        if _is_number(density) and _is_number(epsilon) and 0 < density < 1 \
                and (density + epsilon >= 1 or density - epsilon <= 0):
            raise MergeoptError(f"models[{i}]: density {density:g} +/- epsilon {epsilon:g} must stay within (0, 1) "
                                f"for {recipe.merge_method}; lower epsilon")


def _refuse_zero_weight_sums(recipe: Recipe) -> None:
    """linear with normalize divides by the weight sum: a zero sum has no defined result (mergekit writes inf/NaN).

    Checked now on the values the settings can take: every gradient knot, and each filter as a tensor name.
    """
    settings = [m.parameters.get("weight", recipe.parameters.get("weight")) for _, m in recipe.delta_models()]
    if recipe.linear_base_is_input:
        settings.append(recipe.parameters["weight"])
    probes_t, probes_name = {0.0, 1.0}, {""}
    for s in settings + [recipe.parameters.get("normalize")]:
        for cond in (s if isinstance(s, list) and s and isinstance(s[0], dict) else [{"value": s}]):
            if cond.get("filter"):
                probes_name.add(str(cond["filter"]))
            value = cond["value"]
            if isinstance(value, list) and len(value) > 1:
                probes_t.update(i / (len(value) - 1) for i in range(len(value)))
    for name in sorted(probes_name):
        for t in sorted(probes_t):
            if not resolve_parameter("normalize", [recipe.parameters], name, t, default=True):
                continue
            values = [resolve_setting(s, name, t) for s in settings if s is not None]
            if None in values or len(values) != len(settings):
                continue
            total = sum(values)
            if abs(total) < 1e-8:
                where = f" for tensors matching {name!r}" if name else ""
                raise MergeoptError(f"linear weights sum to {total:g}{where}; a normalized average needs a non-zero "
                                    "sum (set normalize: false or change the weights)")


def read_yaml_file(path: Path, kind: str) -> Any:
    """A YAML file's content, or one clear line: the file is missing, or which line breaks the syntax."""
    if not path.is_file():
        raise MergeoptError(f"{kind} {path} does not exist")
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise MergeoptError(f"{path}: not valid YAML{where}; fix the syntax and retry") from None
    if len(documents) > 1:
        raise MergeoptError(f"{path}: holds {len(documents)} YAML documents (separated by '---'); a {kind} is one "
                            "document: keep one per file")
    return documents[0] if documents else None


def zoo_path(reference: str) -> str:
    """``zoo:NAME`` names a model of the embedded zoo (``mergeopt zoo`` lists them)."""
    from optimizer.zoo import zoo_models

    models = zoo_models()
    name = reference.removeprefix("zoo:")
    if "/" in name:  # a built family in the cache, e.g. zoo:smollm2/adder
        if name.split("/")[0] in ("mix", "mix-reduced"):
            from optimizer.zoo.mix import resolve as resolve_mix

            return str(resolve_mix(name).resolve())
        from optimizer.zoo.smollm2 import resolve

        return str(resolve(name).resolve())
    if name not in models:
        raise MergeoptError(f"{reference} is not a zoo model; use one of {', '.join('zoo:' + n for n in models)}")
    return str(Path(models[name]).resolve())


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or Path(a).resolve() == Path(b).resolve()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def relative_depth(layer: int | None, num_layers: int) -> float:
    """A tensor's ``t`` for gradients, as mergekit computes it: ``layer / (num_layers - 1)`` inside the layer stack,
    1 for the one layer of a one-layer model, 0 outside the stack (embeddings, final norm, head). The engine and
    the report both read it here."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


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
        if all(_is_number(v) or isinstance(v, (bool, str)) for v in setting) and \
                not all(_is_number(v) for v in setting):
            return setting[int(t * (len(setting) - 1))]  # booleans and words are picked, not interpolated
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
