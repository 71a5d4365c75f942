"""The memory plan: what a search or a merge will hold where, said before anything loads.

```text
memory plan:
  engine      4 models x 1.6 GiB bfloat16 on cpu (memory-mapped: the page cache holds them)   6.4 GiB
  scoring     live model 1.6 GiB bfloat16 on cuda:0 (hf)                                      1.6 GiB
  scratch     largest tensor 250.0 MiB in float32 ranges                                       64.0 MiB
  cuda:0      1.7 GiB of 139.7 GiB
```

Sizes come from the safetensors headers; a folder holding only ``config.json`` (a template, no weights) is
sized by building the model on the meta device, so the plan of an 8B family runs without its 64 GB of files.
What cannot fit is refused in one line that names the way out.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from optimizer.errors import MergeoptError
from optimizer.merge import checkpoint

GiB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# float32 elements of the scratch range the engine uses when the target needs a cast (engine.NUMBA_RANGE)
SCRATCH_ELEMENTS = 1 << 24
TORCH_RANGE_ELEMENTS = 1 << 22  # engine.TORCH_RANGE


@dataclass
class ModelSize:
    folder: Path
    parameters: int
    nbytes: int
    dtype: str  # the dtype most of its bytes are in
    largest: int  # elements of its largest tensor
    from_config: bool = False  # sized on the meta device (no weights in the folder)


def model_size(folder: str | Path, allow_pickle: bool = False) -> ModelSize:
    """Parameters and stored bytes of a model folder, from its headers (or from its config alone)."""
    folder = Path(folder)
    config = checkpoint.read_config(folder)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return _size_from_config(folder, config)
    kind, files = checkpoint.weight_files(folder, allow_pickle)
    if kind == "pickle":
        state = checkpoint.load_state_dict(folder, allow_pickle=True)
        entries = [(t.numel(), t.element_size(), str(t.dtype).removeprefix("torch.")) for t in state.values()]
    else:
        entries = []
        for f in files:
            for entry in checkpoint.read_safetensors_header(f).values():
                entries.append((entry.numel, entry.dtype.itemsize, str(entry.dtype).removeprefix("torch.")))
    by_dtype: dict[str, int] = {}
    for numel, size, dtype in entries:
        by_dtype[dtype] = by_dtype.get(dtype, 0) + numel * size
    return ModelSize(folder, sum(e[0] for e in entries), sum(e[0] * e[1] for e in entries),
                     max(by_dtype, key=by_dtype.__getitem__) if by_dtype else "float32",
                     max((e[0] for e in entries), default=0))


def _meta_model(folder: Path, config: dict) -> torch.nn.Module:
    """The model a config describes, built on the meta device (no memory)."""
    import transformers

    try:
        hf_config = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError) as exc:
        raise MergeoptError(f"{folder} holds no weights and its config.json cannot be sized ({exc}); "
                            "point at a folder with safetensors weights") from None


def _size_from_config(folder: Path, config: dict) -> ModelSize:
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    if dtype not in _DTYPE_BYTES:
        dtype = "float32"
    model = _meta_model(folder, config)
    numels = [p.numel() for p in model.parameters()]  # a tied embedding is one parameter, stored once
    return ModelSize(folder, sum(numels), sum(numels) * _DTYPE_BYTES[dtype], dtype, max(numels, default=0),
                     from_config=True)


def adapter_folder(reference: str | Path) -> Path | None:
    """The adapter folder of a fine-tune reference (``base+adapter`` or an adapter folder), None for a model."""
    from optimizer.merge import lora
    from optimizer.recipe import split_lora

    parts = split_lora(str(reference))
    if parts is not None:
        return Path(parts[1])
    return Path(reference) if lora.is_adapter(reference) else None


def adapter_size(folder: str | Path, base: str | Path, allow_pickle: bool = False) -> ModelSize:
    """A LoRA adapter's own size, and (``largest``) the elements of the largest base tensor it adapts: from its
    safetensors header, or, for a folder holding only ``adapter_config.json`` (a template), from the configuration
    applied to the base's modules built on the meta device."""
    from optimizer.merge import lora

    folder = Path(folder)
    if (folder / lora.ADAPTER_WEIGHTS).is_file() or (folder / lora.ADAPTER_PICKLE).is_file():
        adapter = lora.LoraAdapter(folder, allow_pickle)
        numels = [_numel(e.shape) for e in adapter.entries.values()]
        dtypes = {str(e.dtype).removeprefix("torch.") for e in adapter.entries.values()}
        largest = max((_numel(adapter.expected_shape(t)) for t in adapter.tensors.values()), default=0)
        return ModelSize(folder, sum(numels), adapter.nbytes, "/".join(sorted(dtypes)) or "float32", largest)
    try:
        config = json.loads((folder / lora.ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        raise MergeoptError(f"{folder} is not a PEFT adapter folder (no readable {lora.ADAPTER_CONFIG})") from None
    model = _meta_model(Path(base), checkpoint.read_config(base))
    rank, ranks = int(config.get("r", 8)), dict(config.get("rank_pattern") or {})
    targets, saved = config.get("target_modules") or [], list(config.get("modules_to_save") or [])
    parameters, largest = 0, 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        if any(name == m or name.endswith("." + m) for m in saved):
            parameters += weight.numel()
            largest = max(largest, weight.numel())
        elif _targeted(name, module, targets):
            r = next((int(v) for k, v in ranks.items() if re.match(rf"(.*\.)?({k})$", name)), rank)
            parameters += r * sum(weight.shape)
            largest = max(largest, weight.numel())
    return ModelSize(folder, parameters, parameters * 4, "float32", largest, from_config=True)


def _targeted(name: str, module: torch.nn.Module, targets) -> bool:
    """PEFT's target_modules rule: a regex matching the whole name, a list of name suffixes, or all-linear."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@dataclass
class MemoryPlan:
    rows: list[tuple[str, str, int]] = field(default_factory=list)  # (part, what, bytes)
    device: str = "cpu"
    device_needed: int = 0
    device_total: int | None = None
    host_needed: int = 0
    host_total: int | None = None
    remedies: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = ["memory plan:"]
        for part, what, nbytes in self.rows:
            lines.append(f"  {part:<10}  {what:<78} {_fmt(nbytes):>10}")
        if self.device != "cpu":
            total = "unknown" if self.device_total is None else _fmt(self.device_total)
            lines.append(f"  {self.device:<10}  {_fmt(self.device_needed)} of {total}")
        host_total = "unknown" if self.host_total is None else _fmt(self.host_total)
        lines.append(f"  {'host':<10}  {_fmt(self.host_needed)} of {host_total} memory (mapped weights included)")
        return "\n".join(lines)

    @property
    def fits(self) -> bool:
        return self.device_total is None or self.device_needed <= self.device_total

    def check(self) -> None:
        """One line naming what does not fit and the ways out; nothing when it fits."""
        if self.fits:
            return
        raise MergeoptError(f"{_fmt(self.device_needed)} needed of {_fmt(self.device_total)} on {self.device} "
                            f"({'; '.join(f'{p}: {_fmt(b)}' for p, _, b in self.rows if b)}): "
                            + ", ".join(self.remedies))


def plan_memory(base: str | Path, models: list[str | Path], *, engine_device: str = "cpu",
                scoring_device: str | None = None, backend: str | None = "hf", live_dtype: str | None = None,
                device_memory: int | None = None, vllm_utilization: float = 0.5,
                allow_pickle: bool = False, magnitude_trim: bool = False) -> MemoryPlan:
    """What a search (``backend`` set) or a merge (``backend=None``) will hold on the engine's and the scorer's
    devices. ``device_memory`` is the card's size in bytes (default: asked from torch when a card is used)."""
    adapter_folders = [adapter_folder(m) for m in models]
    sizes = [model_size(f, allow_pickle) for f in [base, *(m for m, a in zip(models, adapter_folders) if a is None)]]
    adapters = [adapter_size(a, base, allow_pickle) for a in adapter_folders if a is not None]
    largest = max(s.largest for s in sizes)
    stored = sizes[0]
    engine_device = str(engine_device)
    scoring_device = str(scoring_device or engine_device)
    plan = MemoryPlan(host_total=_host_memory())
    engine_bytes = sum(s.nbytes for s in sizes)
    where = "cpu (memory-mapped: the page cache holds them)" if engine_device == "cpu" else engine_device
    dtypes = sorted({s.dtype for s in sizes})
    count = f"{len(sizes)} models x" if len(sizes) > 1 else "base"
    plan.rows.append(("engine", f"{count} {_fmt(stored.nbytes)} {'/'.join(dtypes)} on {where}", engine_bytes))
    if adapters:  # held at their own size, on the merge device
        adapter_bytes = sum(a.nbytes for a in adapters)
        plan.rows.append(("adapters", f"{len(adapters)} LoRA adapters ({_fmt(adapter_bytes)} in all, "
                                      f"{'/'.join(sorted({a.dtype for a in adapters}))}) on {engine_device}",
                          adapter_bytes))
        engine_bytes += adapter_bytes
    gpu = next((d for d in (engine_device, scoring_device) if d != "cpu"), None)
    plan.device = gpu or "cpu"
    if gpu is not None:
        plan.device_total = device_memory if device_memory is not None else _device_memory(gpu)
    on_device = engine_bytes if engine_device != "cpu" else 0
    on_host = engine_bytes if engine_device == "cpu" else 0
    live = 0
    if backend is not None:
        dtype = live_dtype or stored.dtype
        live = stored.parameters * _DTYPE_BYTES.get(dtype, 4)
        if backend == "vllm" and scoring_device != "cpu":
            share = int(vllm_utilization * (plan.device_total or 0))
            plan.rows.append(("scoring", f"vLLM gpu_memory_utilization {vllm_utilization} of the card on "
                                         f"{scoring_device} (live model {_fmt(live)} {dtype} + KV cache)", share))
            on_device += share
        else:
            plan.rows.append(("scoring", f"live model {_fmt(live)} {dtype} on {scoring_device} ({backend})", live))
            if scoring_device != "cpu":
                on_device += live
            else:
                on_host += live
    # one bounded range of the largest tensor: float32 on CPU; on a device the torch twin's temporaries (float32
    # rows and int64 hashes, ~64 bytes an element); a magnitude trim (TIES) also widens one whole delta
    if engine_device == "cpu":
        scratch, what = min(largest, SCRATCH_ELEMENTS) * 4, "float32 range"
    else:
        scratch, what = min(largest, TORCH_RANGE_ELEMENTS) * 64, "torch range temporaries"
    if magnitude_trim:
        scratch += largest * 8
        what += " + one widened delta (magnitude trim)"
    if adapters:  # each adapter's tensor being merged, in the base's dtype, and the float32 temporaries forming one
        adapted = max(a.largest for a in adapters)
        scratch += len(adapters) * adapted * _DTYPE_BYTES.get(stored.dtype, 4) + 12 * adapted
        what += f" + {len(adapters)} adapted tensors of {adapted:,} elements"
    plan.rows.append(("scratch", f"largest tensor {largest:,} elements: {what}", scratch))
    if engine_device != "cpu":
        on_device += scratch
    else:
        on_host += scratch
    plan.device_needed, plan.host_needed = on_device, on_host
    if backend == "vllm":
        plan.remedies.append("lower vLLM's gpu_memory_utilization")
    if engine_device != "cpu":
        plan.remedies.append("keep the models on the CPU (--engine-device cpu: memory-mapped, built there)")
    plan.remedies += ["merge fewer models", "or use a larger card"]
    return plan


def _fmt(nbytes: int | None) -> str:
    if nbytes is None:
        return "unknown"
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def parse_size(text: str) -> int:
    """'80GB', '139GiB', '500MB', or bytes -> bytes (powers of 1024)."""
    value = text.strip().upper().replace("IB", "B")
    for unit, factor in (("TB", 1024**4), ("GB", GiB), ("MB", 1024**2), ("KB", 1024), ("B", 1)):
        if value.endswith(unit):
            value = value[: -len(unit)]
            break
    else:
        factor = 1
    try:
        return int(float(value) * factor)
    except ValueError:
        raise MergeoptError(f"size {text!r} is not understood; write e.g. 80GB or 500MB") from None


def _device_memory(device: str) -> int | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
