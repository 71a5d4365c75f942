"""Model folders on disk: safetensors reading and sharded writing, configs, homology checks, layer indices.

Weights are read from safetensors only. Pickled ``.bin`` checkpoints run arbitrary code when loaded, so they
are refused unless the caller opts in (``allow_pickle=True``), and then loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import mmap
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
try:
    from safetensors import SafetensorError as SafetensorsError
except ImportError:  # older releases
    SafetensorsError = Exception  # type: ignore[misc,assignment]
from safetensors.torch import save_file

from optimizer.errors import MergeoptError
from optimizer.recipe import DTYPES

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
    indices = [i for i in (layer_index(n) for n in tensor_names or []) if i is not None]
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
        shapes.update({name: entry.shape for name, entry in read_safetensors_header(f).items()})
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


# safetensors dtype names -> torch dtypes (the ones checkpoints of language models hold)
def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of :data:`optimizer.recipe.DTYPES` ("float32", "bfloat16", "float16")."""
    if name not in DTYPES:
        raise MergeoptError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 * 1024**2


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    stop: int

    @property
    def numel(self) -> int:
        return _numel(self.shape)


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensor table of one safetensors file, checked against the file's size (one line when it is damaged)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                raise ValueError("header length out of range")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise MergeoptError(f"{path} is not a readable safetensors file ({exc}); it is corrupt or truncated") from None
    if not isinstance(header, dict):
        raise MergeoptError(f"{path} is not a readable safetensors file; it is corrupt or truncated")
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = (int(v) for v in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise MergeoptError(f"{path}: tensor {name} has an unreadable header entry; the file is corrupt") from None
        entry = TensorEntry(path, dtype, shape, data_start + begin, data_start + end)
        if end < begin or entry.stop > size or entry.stop - entry.start != entry.numel * dtype.itemsize:
            raise MergeoptError(f"{path}: tensor {name} lies past the end of the file ({size} bytes); it is "
                                "corrupt or truncated: re-download or re-export it")
        entries[name] = entry
    return entries


class StoredWeights:
    """One model's tensors in their checkpoint dtype, each as a flat tensor: nothing is converted or copied.

    On CPU the safetensors files are memory-mapped (private, copy-on-write: the engine never writes them), so the
    OS page cache holds the weights and several processes share them; :meth:`release` gives a tensor's pages back
    once a streamed merge is done with it. On another device every tensor is resident there in its own dtype.
    Tensors of dtypes the kernels do not read (float64, integers) are converted to float32 once, at load.
    """

    def __init__(self, folder: str | Path, allow_pickle: bool = False, device: str | torch.device = "cpu"):
        self.folder = Path(folder)
        self.device = torch.device(device)
        self._maps: dict[Path, mmap.mmap] = {}
        self._entries: dict[str, TensorEntry] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        kind, files = weight_files(folder, allow_pickle)
        if kind == "pickle":
            for name, tensor in load_state_dict(folder, allow_pickle=True).items():
                self._tensors[name] = _storable(tensor.reshape(-1)).to(self.device)
            return
        for path in files:
            self._entries.update(read_safetensors_header(path))
        for path in files:
            if path.stat().st_size == 0:
                continue
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, entry in self._entries.items():
            tensor = self._mapped(entry)
            self._tensors[name] = tensor if self.device.type == "cpu" else tensor.to(self.device)
        if self.device.type != "cpu":  # resident on the device: the mapping is no longer needed
            self._entries.clear()
            self.close_maps()

    def _mapped(self, entry: TensorEntry) -> torch.Tensor:
        count = entry.stop - entry.start
        if count == 0:
            return torch.empty(0, dtype=entry.dtype)
        raw = torch.frombuffer(self._maps[entry.file], dtype=torch.uint8, count=count, offset=entry.start)
        if entry.start % entry.dtype.itemsize:
            raw = raw.clone()  # a misaligned tensor (no writer of the last years makes one): copy it once
        return _storable(raw.view(entry.dtype))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def release(self, name: str) -> None:
        """Give back the pages of a mapped tensor (they are read again from the page cache if needed later)."""
        entry = self._entries.get(name)
        if entry is None or entry.stop == entry.start or self._tensors[name].dtype != entry.dtype:
            return
        start = entry.start - entry.start % mmap.PAGESIZE
        try:
            self._maps[entry.file].madvise(mmap.MADV_DONTNEED, start, entry.stop - start)
        except (AttributeError, OSError, ValueError):  # no madvise here: the kernel reclaims pages itself
            pass

    def close_maps(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it; it closes when the last view goes
                pass
        self._maps.clear()


def _storable(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as the engine keeps it: flat, in float32/bfloat16/float16 (others become float32 once)."""
    flat = tensor.reshape(-1)
    if flat.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return flat
    return flat.to(torch.float32)


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


_TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def plan_shards(layout: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards in order, each shard at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in layout:
        nbytes = _numel(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return [s for s in shards if s]


def stream_model_folder(out_dir: str | Path, layout: list[tuple[str, tuple[int, ...]]], fill, source_folder: str | Path,
                        dtype: torch.dtype, max_shard_bytes: int = 5 * 1024**3,
                        tokenizer_folder: str | Path | None = None, progress: bool = False) -> Path:
    """Write a (sharded) safetensors model folder tensor by tensor, plus config and tokenizer files.

    ``layout`` lists ``(name, shape)`` in order; ``fill(name, out)`` writes one tensor's values into ``out`` (an
    empty tensor of that shape and ``dtype``), which goes straight to its place in its shard file. The shard
    headers are planned from the shapes first, so no shard is ever held in memory. On any error the partial
    shards are removed and an existing folder's weights are left as they were.
    """
    from tqdm import tqdm

    out_dir = _make_folder(out_dir)
    shards = plan_shards(layout, dtype, max_shard_bytes)
    temp_names = [out_dir / f"shard-{i:05d}.tmp" for i in range(len(shards))]
    bar = tqdm(total=len(layout), desc="merging", unit="tensor", disable=not progress)
    try:
        for temp, shard in zip(temp_names, shards):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape in shard:
                nbytes = _numel(shape) * dtype.itemsize
                header[name] = {"dtype": _TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
            with open(temp, "wb") as f:
                f.write(struct.pack("<Q", len(blob)))
                f.write(blob)
                for name, shape in shard:
                    out = torch.empty(shape, dtype=dtype)
                    fill(name, out)
                    f.write(out.reshape(-1).view(torch.uint8).numpy().data)
                    del out
                    bar.update()
    except OSError as exc:
        _remove(temp_names)
        raise MergeoptError(f"cannot write {out_dir} ({exc.strerror}); free disk space or choose another --out") from None
    except BaseException:
        _remove(temp_names)
        raise
    finally:
        bar.close()
    total = sum(_numel(shape) * dtype.itemsize for _, shape in layout)
    return _finish_folder(out_dir, [(t.name, [n for n, _ in s]) for t, s in zip(temp_names, shards)], total,
                          source_folder, dtype, tokenizer_folder)


def write_model_folder(out_dir: str | Path, tensors, source_folder: str | Path, dtype: torch.dtype,
                       max_shard_bytes: int = 5 * 1024**3, tokenizer_folder: str | Path | None = None) -> Path:
    """Write ``(name, tensor)`` pairs as (sharded) safetensors plus the config and tokenizer files.

    ``tensors`` may be a generator: each shard is written as soon as it is full, so only one shard of the
    output is held in memory (:func:`stream_model_folder` holds one tensor, when the shapes are known first).
    """
    out_dir = _make_folder(out_dir)
    shards: list[tuple[str, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0
    total_bytes = 0

    def flush() -> None:
        nonlocal current, current_bytes
        if not current:
            return
        path = out_dir / f"shard-{len(shards):05d}.tmp"
        _save(current, path)
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
    return _finish_folder(out_dir, shards, total_bytes, source_folder, dtype, tokenizer_folder)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _make_folder(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MergeoptError(f"cannot create output folder {out_dir} ({exc.strerror}); choose another --out") from None
    return out_dir


def _remove(paths) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)


def _finish_folder(out_dir: Path, shards: list[tuple[str, list[str]]], total_bytes: int, source_folder: str | Path,
                   dtype: torch.dtype, tokenizer_folder: str | Path | None) -> Path:
    """Rename the written temporary shards into place, write the index, copy config and tokenizer files."""
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

    sources: tuple[tuple[Path, tuple[str, ...]], ...] = (
        (Path(source_folder), ("config.json", "generation_config.json")),
        (Path(tokenizer_folder or source_folder), SIDE_FILES[2:]))
    for side_source, files in sources:
        for fname in files:
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
