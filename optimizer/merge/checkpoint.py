"""Model folders on disk: safetensors reading and sharded writing, configs, homology checks, layer indices.

Weights are read from safetensors only. Pickled ``.bin`` checkpoints run arbitrary code when loaded, so they
are refused unless the caller opts in (``allow_pickle=True``), and then loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
try:
    from safetensors import SafetensorError as SafetensorsError
except ImportError:  # older releases
    SafetensorsError = Exception
from safetensors.torch import save_file

from optimizer.errors import MergeoptError

# Files copied next to merged weights so transformers (and vLLM) load the folder as it is.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "chat_template.jinja")

# Where the layer number sits in tensor names, per architecture family:
# Llama / Mistral / Qwen2 / Gemma: model.layers.N. ; GPT-2: transformer.h.N. ; GPT-NeoX: gpt_neox.layers.N. ;
# Falcon/Bloom: transformer.h.N. ; MPT: transformer.blocks.N.
_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to, or None for embeddings, final norm and head."""
    match = _LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeoptError(f"model folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise MergeoptError(f"{folder} has no config.json; point at a transformers model folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MergeoptError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); repair or re-export it") from None
    if not isinstance(config, dict):
        raise MergeoptError(f"{path} must hold a JSON object")
    _refuse_remote_code(folder, config)
    return config


def _refuse_remote_code(folder: Path, config: dict) -> None:
    """A config whose architecture exists only as Python files in the folder (``auto_map``) would need
    ``trust_remote_code``, which mergeopt never turns on: such a folder is refused up front."""
    if not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING  # only for folders that ship code

    if config.get("model_type") in CONFIG_MAPPING:
        return  # transformers has the architecture built in and ignores the folder's code
    raise MergeoptError(f"{folder} needs custom model code (config.json model_type {config.get('model_type')!r} with "
                        "auto_map); mergeopt never runs code from a model folder (trust_remote_code stays off): "
                        "use a model whose architecture transformers ships")


def num_layers(config: dict, tensor_names: list[str] | None = None) -> int:
    for key in _NUM_LAYER_KEYS:
        value = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    indices = [layer_index(n) for n in tensor_names or []]
    indices = [i for i in indices if i is not None]
    return max(indices) + 1 if indices else 1


def weight_files(folder: str | Path, allow_pickle: bool = False) -> tuple[str, list[Path]]:
    """("safetensors" | "pickle", files) of a model folder."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError):
                raise MergeoptError(f"{index} is not a valid safetensors index; re-export the model") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise MergeoptError(f"{folder}: shard {missing[0]} named in the index is missing")
            files = [folder / n for n in names]
        return "safetensors", files
    pickled = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
    if pickled:
        if not allow_pickle:
            raise MergeoptError(
                f"{folder} holds only pickled weights ({pickled[0].name}), which can run code when loaded; "
                "convert them to safetensors or pass --allow-pickle to load them with weights_only=True")
        return "pickle", [p for p in pickled if "training_args" not in p.name and "optimizer" not in p.name]
    raise MergeoptError(f"{folder} holds no *.safetensors weights")


def tensor_shapes(folder: str | Path, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model's tensors, read from headers without loading the weights."""
    kind, files = weight_files(folder, allow_pickle)
    if kind == "pickle":
        return {k: tuple(v.shape) for k, v in load_state_dict(folder, allow_pickle=True).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with _open_safetensors(f) as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def load_state_dict(folder: str | Path, allow_pickle: bool = False, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    kind, files = weight_files(folder, allow_pickle)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if kind == "safetensors":
            with _open_safetensors(f) as handle:
                for name in handle.keys():
                    try:
                        t = handle.get_tensor(name)
                    except (SafetensorsError, RuntimeError, OSError) as exc:
                        raise MergeoptError(f"{f}: tensor {name} cannot be read ({exc}); the file is corrupt or truncated") from None
                    tensors[name] = t.to(device=device, dtype=dtype or t.dtype)
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for bad pickles
                raise MergeoptError(f"{f} cannot be loaded with weights_only=True ({type(exc).__name__}); convert it to safetensors") from None
            for name, t in state.items():
                tensors[name] = t.to(device=device, dtype=dtype or t.dtype)
    return tensors


class _open_safetensors:
    """safe_open with corrupt-file errors turned into one clear line."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self._ctx = safe_open(str(self.path), framework="pt")
            return self._ctx.__enter__()
        except (SafetensorsError, OSError, RuntimeError) as exc:
            raise MergeoptError(f"{self.path} is not a readable safetensors file ({exc}); it is corrupt or truncated") from None

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@dataclass
class ModelInfo:
    folder: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]


def inspect_model(folder: str | Path, allow_pickle: bool = False) -> ModelInfo:
    folder = Path(folder)
    config = read_config(folder)
    return ModelInfo(folder=folder, config=config, shapes=tensor_shapes(folder, allow_pickle))


def check_homologous(reference: ModelInfo, others: list[ModelInfo]) -> None:
    """Refuse models that cannot be merged element-wise with the reference; name the first difference."""
    ref_arch = reference.config.get("architectures"), reference.config.get("model_type")
    for other in others:
        arch = other.config.get("architectures"), other.config.get("model_type")
        if arch != ref_arch:
            raise MergeoptError(f"{other.folder} is a {arch[1]} {arch[0]} but {reference.folder} is a {ref_arch[1]} "
                                f"{ref_arch[0]}; merge only models of one architecture")
        ref_vocab, vocab = reference.config.get("vocab_size"), other.config.get("vocab_size")
        if ref_vocab != vocab:
            raise MergeoptError(f"{other.folder} has vocab_size {vocab} but {reference.folder} has {ref_vocab}; "
                                "the models must share one tokenizer")
        for name, shape in reference.shapes.items():
            if name not in other.shapes:
                raise MergeoptError(f"tensor {name} of {reference.folder} is missing from {other.folder}; the models are not homologous")
            if other.shapes[name] != shape:
                raise MergeoptError(f"tensor {name} has shape {list(shape)} in {reference.folder} but "
                                    f"{list(other.shapes[name])} in {other.folder}; the models are not homologous")
        extra = [n for n in other.shapes if n not in reference.shapes]
        if extra:
            raise MergeoptError(f"tensor {extra[0]} of {other.folder} is missing from {reference.folder}; the models are not homologous")


def write_model_folder(out_dir: str | Path, tensors, source_folder: str | Path, dtype: torch.dtype,
                       max_shard_bytes: int = 5 * 1024**3, tokenizer_folder: str | Path | None = None) -> Path:
    """Write ``(name, tensor)`` pairs as (sharded) safetensors plus the config and tokenizer files.

    ``tensors`` may be a generator: each shard is written as soon as it is full, so only one shard of the
    output is held in memory.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MergeoptError(f"cannot create output folder {out_dir} ({exc.strerror}); choose another --out") from None
    shards: list[tuple[str, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0
    total_bytes = 0
    temp_names: list[Path] = []

    def flush() -> None:
        nonlocal current, current_bytes
        if not current:
            return
        path = out_dir / f"shard-{len(shards):05d}.tmp"
        _save(current, path)
        temp_names.append(path)
        shards.append((path.name, list(current)))
        current, current_bytes = {}, 0

    for name, tensor in tensors:
        tensor = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            flush()
        current[name] = tensor
        current_bytes += size
        total_bytes += size
    flush()

    weight_map = {}
    if len(shards) == 1:
        final_names = ["model.safetensors"]
    else:
        final_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for (tmp_name, names), final in zip(shards, final_names):
        (out_dir / tmp_name).replace(out_dir / final)
        weight_map.update({n: final for n in names})
    for stale in out_dir.glob("*.safetensors"):
        if stale.name not in final_names:
            stale.unlink()
    index = out_dir / "model.safetensors.index.json"
    if len(shards) > 1:
        index.write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))
    elif index.exists():
        index.unlink()

    for side_source, names in ((Path(source_folder), ("config.json", "generation_config.json")),
                               (Path(tokenizer_folder or source_folder), SIDE_FILES[2:])):
        for fname in names:
            if (side_source / fname).is_file():
                shutil.copyfile(side_source / fname, out_dir / fname)
    config_path = out_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        dtype_name = str(dtype).removeprefix("torch.")
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise MergeoptError(f"cannot write {path} ({exc.strerror}); free disk space or choose another --out") from None
