"""Recipes the fused engine does not run, merged through mergekit's own Python API.

`mergeopt merge` accepts every configuration `mergekit-yaml` accepts: what its own engine does (the methods
marked ``fused`` or ``torch`` in :data:`optimizer.methods.METHODS`, ``models:`` or one full-range slice per
model, a tokenizer identical across the models) it merges itself; anything else (karcher, multislerp, sce,
passthrough, partial ``slices:``, ``modules:``, a ``tokenizer:`` block, a union of different tokenizers...) goes to
``mergekit.merge.run_merge`` here, with one line saying so. mergekit is an optional extra
(``pip install 'mergeopt[mergekit]'``); without it such a recipe is refused in one line.

Before mergekit sees the file every model reference is resolved to a local folder (``zoo:``, relative paths, hub
ids from the local cache), every parameter name and value is checked against the method registry, and pickled
weights are refused unless allowed: all before an output folder exists.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from optimizer.errors import MergeoptError
from optimizer.methods import check_parameters, method_spec
from optimizer.recipe import (
    TOKENIZER_WORDS,
    first_differing_tokenizer,
    fold_full_range_slices,
    mergekit_only_reason,
    model_references,
    plain_references,
    resolve_reference,
    split_lora,
)

INSTALL_HINT = "pip install mergekit (or pip install 'mergeopt[mergekit]')"


def available() -> bool:
    try:
        import mergekit.merge  # noqa: F401
    except ImportError:
        return False
    return True


def route(data: Any, root: Path) -> tuple[dict, str | None]:
    """(the configuration to merge, why it needs mergekit or None when the fused engine runs it).

    Full-range slices are folded into ``models:`` first; a tokenizer_source the fused engine would not reproduce
    (different tokenizers, or a vocabulary whose size differs from the model's, which mergekit resizes the
    embeddings to) is a reason too.
    """
    if not isinstance(data, dict):
        raise MergeoptError(f"expected a mapping with merge_method and models, got {type(data).__name__}")
    if "merge_method" not in data:
        raise MergeoptError("missing key 'merge_method'")
    method_spec(data["merge_method"])  # an unknown method is one line, whichever engine would run it
    data = plain_references(data)
    if data.get("slices") is not None:
        data = fold_full_range_slices(data, root)
    reason = mergekit_only_reason(data, root)
    if reason is None and data.get("tokenizer_source") is not None:
        reason = _tokenizer_reason(data, root)
    return data, reason


def _tokenizer_reason(data: dict, root: Path) -> str | None:
    source = str(data["tokenizer_source"])
    refs = [resolve_reference(str(m["model"] if isinstance(m, dict) else m), root) for m in data.get("models") or []]
    base = resolve_reference(str(data["base_model"]), root) if data.get("base_model") else None
    folders = ([base] if base else []) + refs
    if not folders:
        return None
    donor = folders[0] if source in TOKENIZER_WORDS else resolve_reference(source, root)
    if first_differing_tokenizer(donor, folders) is not None:
        return f"tokenizer_source: {source} over different tokenizers"
    try:
        from transformers import AutoTokenizer

        tokens = len(AutoTokenizer.from_pretrained(donor, trust_remote_code=False).get_vocab())
        vocab_size = json.loads((Path(donor) / "config.json").read_text()).get("vocab_size")
    except Exception:  # no tokenizer there: the fused engine copies what it finds, mergekit would fail alike
        return None
    if isinstance(vocab_size, int) and tokens != vocab_size:
        return f"tokenizer_source: {source} with {tokens} tokens for vocab_size {vocab_size} (embeddings resized)"
    return None


def prepare(data: dict, root: Path, allow_pickle: bool = False) -> dict:
    """The configuration with local folders for every model and checked parameters, ready for mergekit."""
    from optimizer.merge import checkpoint

    spec = method_spec(data["merge_method"])
    config = {k: copy.deepcopy(v) for k, v in data.items() if k != "mergeopt"}
    folders: list[str] = []

    def local(ref: Any, where: str) -> Any:
        if isinstance(ref, dict) and isinstance(ref.get("model"), str):  # with override_architecture
            return {**ref, "model": local(ref["model"], where), **(
                {"lora": _adapter_folder(ref["lora"], root, where, allow_pickle)} if ref.get("lora") else {})}
        if not isinstance(ref, str):
            raise MergeoptError(f"{where}: expected a model reference, got {ref!r}")
        lora = split_lora(ref, root)
        if lora is not None:
            return f"{local(lora[0], where)}+{_adapter_folder(lora[1], root, where, allow_pickle)}"
        folder = resolve_reference(ref, root)
        checkpoint.read_config(folder)  # exists, has a config, needs no custom code
        checkpoint.weight_files(folder, allow_pickle)  # safetensors, or pickles only when allowed
        folders.append(folder)
        return folder

    def params(block: Any, where: str) -> Any:
        if block is None:
            return None
        return check_parameters(spec, block, where)

    def models(entries: Any, where: str) -> list:
        if not isinstance(entries, list) or not entries:
            raise MergeoptError(f"{where} must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
        out = []
        for i, entry in enumerate(entries):
            entry = {"model": entry} if isinstance(entry, str) else dict(entry)
            if "model" not in entry:
                raise MergeoptError(f"{where}[{i}] needs a 'model' key")
            entry["model"] = local(entry["model"], f"{where}[{i}].model")
            if entry.get("parameters") is not None:
                entry["parameters"] = params(entry["parameters"], f"{where}[{i}].parameters")
            out.append(entry)
        return out

    def slices(entries: Any, where: str) -> list:
        if not isinstance(entries, list) or not entries:
            raise MergeoptError(f"{where} must be a non-empty list of {{sources: [...]}}")
        out = []
        for i, out_slice in enumerate(entries):
            if not isinstance(out_slice, dict) or not isinstance(out_slice.get("sources"), list):
                raise MergeoptError(f"{where}[{i}] needs a 'sources' list")
            out_slice = dict(out_slice)
            out_slice["sources"] = models(out_slice["sources"], f"{where}[{i}].sources")
            if out_slice.get("base_model") is not None:
                out_slice["base_model"] = local(out_slice["base_model"], f"{where}[{i}].base_model")
            if out_slice.get("parameters") is not None:
                out_slice["parameters"] = params(out_slice["parameters"], f"{where}[{i}].parameters")
            out.append(out_slice)
        return out

    if config.get("base_model") is not None:
        config["base_model"] = local(config["base_model"], "base_model")
    if config.get("parameters") is not None:
        config["parameters"] = params(config["parameters"], "parameters")
    if config.get("models") is not None:
        config["models"] = models(config["models"], "models")
    if config.get("slices") is not None:
        config["slices"] = slices(config["slices"], "slices")
    if config.get("modules") is not None:
        if not isinstance(config["modules"], dict):
            raise MergeoptError("modules must map module names to {models: ...} or {slices: ...}")
        for name, module in config["modules"].items():
            module = dict(module or {})
            if module.get("models") is not None:
                module["models"] = models(module["models"], f"modules.{name}.models")
            if module.get("slices") is not None:
                module["slices"] = slices(module["slices"], f"modules.{name}.slices")
            if module.get("parameters") is not None:
                module["parameters"] = params(module["parameters"], f"modules.{name}.parameters")
            config["modules"][name] = module
    source = config.get("tokenizer_source")
    if source is not None and source not in TOKENIZER_WORDS:
        config["tokenizer_source"] = local(source, "tokenizer_source")
    tokenizer = config.get("tokenizer")
    if isinstance(tokenizer, dict) and tokenizer.get("source") not in (None, *TOKENIZER_WORDS) \
            and isinstance(tokenizer.get("source"), str):
        tokenizer = dict(tokenizer)
        tokenizer["source"] = local(tokenizer["source"], "tokenizer.source")
        config["tokenizer"] = tokenizer
    if not folders:
        raise MergeoptError("the recipe names no models; list them under 'models:' or 'slices:'")
    _check_input_count(spec, config)
    return config


def _adapter_folder(reference: str, root: Path, where: str, allow_pickle: bool) -> str:
    """A LoRA adapter as a local folder (a path or a cached hub id) holding a PEFT adapter in safetensors (pickled
    adapter weights only when allowed), checked before mergekit loads anything."""
    folder = Path(resolve_reference(reference, root))
    if not (folder / "adapter_config.json").is_file():
        raise MergeoptError(f"{where}: LoRA adapter {reference} is not a PEFT adapter folder (no adapter_config.json)")
    if not (folder / "adapter_model.safetensors").is_file():
        if not (folder / "adapter_model.bin").is_file():
            raise MergeoptError(f"{where}: LoRA adapter {reference} has no adapter_model.safetensors")
        if not allow_pickle:
            raise MergeoptError(f"{where}: LoRA adapter {reference} is pickled (adapter_model.bin); convert it to "
                                "safetensors, or pass --allow-pickle if you trust it")
    return str(folder)


def _check_input_count(spec, config: dict) -> None:
    """mergekit's input contract for the common ``models:`` form, checked before anything loads."""
    entries = config.get("models")
    if entries is None:
        return
    def key(ref: Any) -> str:  # a mapping reference (override_architecture) by its content
        return ref if isinstance(ref, str) else json.dumps(ref, sort_keys=True)

    names = {key(e["model"]) for e in entries} | ({key(config["base_model"])} if config.get("base_model") else set())
    if spec.base != "ignored" and config.get("base_model"):  # counted besides the base, as mergekit's contracts do
        names.discard(key(config["base_model"]))
    if len(names) < spec.min_models or (spec.max_models is not None and len(names) > spec.max_models):
        want = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                else f"at least {spec.min_models}" if spec.max_models is None else f"at most {spec.max_models}")
        besides = " besides the base" if spec.base != "ignored" else ""
        raise MergeoptError(f"merge_method {spec.name} takes {want} model{'s' * (want[-1] != '1')}{besides}, "
                            f"got {len(names)}")
    if spec.base == "required" and not config.get("base_model"):
        raise MergeoptError(f"merge_method {spec.name} needs a base_model")


def merge(config: dict, out_dir: Path, seed: int = 0, device: str | None = None,
          shard_size: int = 5 * 1024**3, progress: bool = True) -> Path:
    """Run mergekit's ``run_merge`` on a prepared configuration; mergekit's own failures become one line."""
    if not available():
        raise MergeoptError(f"this recipe needs mergekit, which is not installed: {INSTALL_HINT}")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    try:
        merge_config = MergeConfiguration.model_validate(config)
    except Exception as exc:  # pydantic ValidationError or mergekit's RuntimeError
        raise MergeoptError(f"mergekit refuses the recipe: {_first_line(exc)}") from None
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        lora_cache = None
        if any(split_lora(ref) is not None for ref in model_references(config)):
            # mergekit writes each model with its adapter applied here (a full copy), next to the output and
            # removed afterwards; the same as mergekit-yaml --lora-merge-cache
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            lora_cache = stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.lora-",
                                                                         dir=out_dir.parent))
        options = MergeOptions(device=device or "cpu", out_shard_size=shard_size, random_seed=seed,
                               quiet=not progress, trust_remote_code=False, lazy_unpickle=False,
                               safe_serialization=True, copy_tokenizer=True, lora_merge_cache=lora_cache)
        try:
            run_merge(merge_config, str(out_dir), options)
        except MergeoptError:
            raise
        except Exception as exc:
            raise MergeoptError(f"mergekit failed: {_first_line(exc)}") from None
    return out_dir


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


