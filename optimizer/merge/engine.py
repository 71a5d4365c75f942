"""The merge engine: the models held once, in their checkpoint dtype; candidates built straight into place.

```python
engine = MergeEngine(base="zoo/base", models=["zoo/adder", "zoo/reverser"])   # maps and checks once
engine.build_into(recipe, live_model)      # writes the merged weights into the model's parameters, no disk
engine.save(recipe, "out/merged")          # or streams a sharded safetensors folder that transformers loads
```

Memory: base and fine-tunes stay as their checkpoints store them (bf16 stays bf16): memory-mapped on CPU, where
the OS page cache holds them and nothing is copied, resident on a GPU. No delta is stored: the fused kernel
forms ``fine-tune - base`` in float32 as it goes and casts once to the target. Per tensor being built, the only
scratch is a bounded float32 range (none when the target is a float32 CPU tensor: the kernel writes into it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from optimizer.errors import MergeoptError
from optimizer.merge import checkpoint, lora, sparsify, torch_methods
from optimizer.merge.plan import TensorSlot, tensor_plan
from optimizer.methods import METHODS
from optimizer.recipe import Recipe, reference_model, relative_depth, split_lora

KERNELS = ("numba", "torch")
# Elements merged per call when the result needs a cast or runs on torch: bounds the float32 scratch (64 MiB)
# and the torch twin's int64 hash temporaries (a 152k x 3584 embedding at once would need > 4 GB of them).
NUMBA_RANGE = 1 << 24
TORCH_RANGE = 1 << 22


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _key(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


class MergeEngine:
    """Holds base + fine-tunes of a fixed set of homologous models on one device and builds candidates from them.

    ``kernel`` is ``numba`` (the fused CPU kernel, default on CPU) or ``torch`` (default on other devices; on CPU
    it runs the same arithmetic with torch ops, which the tests use to check the GPU path bit for bit).
    ``verify`` reads every input once at load and refuses NaN or infinite weights there; without it each tensor
    is checked the first time it is merged (a streamed merge reads each tensor once).
    """

    def __init__(self, base: str | Path, models: Sequence[str | Path], device: str | torch.device | None = None,
                 allow_pickle: bool = False, progress: bool = False, kernel: str | None = None, verify: bool = True):
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeoptError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        self.kernel = kernel or ("numba" if self.device.type == "cpu" else "torch")
        if self.kernel not in KERNELS or (self.kernel == "numba" and self.device.type != "cpu"):
            raise MergeoptError(f"kernel {self.kernel!r} cannot run on {self.device}; use one of {', '.join(KERNELS)} "
                                "(numba runs on the CPU only)")
        self.base_path = _key(base)
        # a fine-tune is a model folder, an adapter folder or mergekit's ``base+adapter`` (applied to this base)
        adapters = [adapter_of(m, self.base_path) for m in models]
        self.model_paths = [_key(m) if a is None else f"{self.base_path}+{_key(a)}" for m, a in zip(models, adapters)]
        if not self.model_paths:
            raise MergeoptError("no models to merge; list at least one fine-tuned model")
        base_info = checkpoint.inspect_model(base, allow_pickle)
        infos = [checkpoint.inspect_model(m, allow_pickle) for m, a in zip(models, adapters) if a is None]
        checkpoint.check_homologous(base_info, infos)
        read = {a: lora.LoraAdapter(a, allow_pickle) for a in adapters if a is not None}  # headers only
        for found in read.values():
            found.check_base(base, base_info.shapes)
        self.config = base_info.config
        self.names = list(base_info.shapes)
        self.shapes = dict(base_info.shapes)
        self.num_layers = checkpoint.num_layers(self.config, self.names)
        self.slots = [TensorSlot(name, self._depth(name)) for name in self.names]
        self._slot_by_name = {slot.name: slot for slot in self.slots}

        bar = tqdm(total=1 + len(models), desc="loading models", unit="model", disable=not progress, leave=False)
        self._stored: list[checkpoint.StoredWeights | lora.AdapterWeights] = []
        base_store = checkpoint.StoredWeights(base, allow_pickle, self.device)
        self._stored.append(base_store)
        bar.update()
        widened = lora.WidenedBase(base_store)  # one float32 copy of the tensor being merged, for every adapter
        for folder, adapter_folder in zip(models, adapters):
            if adapter_folder is None:
                self._stored.append(checkpoint.StoredWeights(folder, allow_pickle, self.device))
            else:  # the adapter's own tensors; its adapted tensors are formed one at a time while merging
                self._stored.append(lora.AdapterWeights(read[adapter_folder], base_store, self.shapes, self.device,
                                                        widened))
            bar.update()
        bar.close()
        self._rows = {path: row for row, path in enumerate(self.model_paths)}
        self._l1: dict[tuple[str, int], float] = {}  # dense L1 norms of deltas, for the l1 rescale rule
        self._checked: set[str] = set()
        self._unchanged: dict[str, frozenset[int]] = {}  # per tensor: the fine-tunes storing the base's own bytes
        if verify:
            for name in tqdm(self.names, desc="checking weights", unit="tensor", disable=not progress, leave=False):
                self._check_inputs(name)

    @classmethod
    def for_recipe(cls, recipe: Recipe, device: str | torch.device | None = None, allow_pickle: bool = False,
                   progress: bool = False, kernel: str | None = None, verify: bool = True) -> MergeEngine:
        """An engine holding exactly the models a recipe names."""
        base = recipe.base_model or reference_model(recipe.models[0].model)
        models = [m.model for _, m in recipe.delta_models()]
        return cls(base, models, device=device, allow_pickle=allow_pickle, progress=progress, kernel=kernel,
                   verify=verify)

    def _depth(self, name: str) -> float:
        return relative_depth(checkpoint.layer_index(name), self.num_layers)

    # ---- the stored inputs --------------------------------------------------------------------------------
    def stored_weights(self, index: int) -> checkpoint.StoredWeights | lora.AdapterWeights:
        """The stored tensors of the base (index 0) or of fine-tune ``index - 1`` (an adapter's: formed on demand)."""
        return self._stored[index]

    def inputs(self, name: str, rows: Sequence[int] | None = None,
               round_to: torch.dtype | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The flat stored base tensor ``name`` and those of the fine-tunes ``rows`` (all by default); ``round_to``:
        float32 inputs rounded to that half-precision dtype first (copies, for this tensor only)."""
        rows = range(len(self.model_paths)) if rows is None else rows
        return (_rounded(self._stored[0][name], round_to),
                [_rounded(self._stored[1 + r][name], round_to) for r in rows])

    def delta(self, name: str, row: int, round_to: torch.dtype | None = None) -> torch.Tensor:
        """Fine-tune ``row`` minus the base for one tensor, in float32 (made on demand, never kept)."""
        base, (tuned,) = self.inputs(name, [row], round_to)
        return tuned.float() - base.float()

    @staticmethod
    def input_rounding(recipe: Recipe) -> torch.dtype | None:
        """The dtype float32 inputs are rounded to before a recipe merges them: TIES with a half-precision ``dtype``
        trims and elects signs on the rounded deltas, as mergekit does (it casts every input to ``dtype`` first).
        None for every other recipe (the fused kernel reads the stored values, computes in float32, rounds once)."""
        if METHODS[recipe.merge_method].sparsification == "magnitude" and recipe.dtype in ("bfloat16", "float16"):
            return checkpoint.torch_dtype(recipe.dtype)
        return None

    def stored_dtype(self) -> torch.dtype:
        """The dtype most of the base checkpoint's weights are stored in."""
        sizes: dict[torch.dtype, int] = {}
        for name in self.names:
            t = self._stored[0][name]
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        return max(sizes, key=sizes.__getitem__)

    def _check_inputs(self, name: str) -> None:
        """Refuse non-finite inputs of one tensor, and note which fine-tunes left it as the base stores it."""
        if name in self._checked:
            return
        for store in self._stored:
            if isinstance(store, lora.AdapterWeights):  # its own tensors were checked as it loaded
                continue
            bad = sparsify.count_nonfinite(store[name])
            if bad:
                raise MergeoptError(f"tensor {name} of {store.folder} holds {bad} NaN or infinite value{'s' * (bad > 1)}; "
                                    "the checkpoint is damaged: re-export or re-download that model")
        base = self._stored[0][name]
        self._unchanged[name] = frozenset(
            row for row, store in enumerate(self._stored[1:])
            if (name not in store.touched if isinstance(store, lora.AdapterWeights) else _same_bytes(store[name], base)))
        self._checked.add(name)

    def release(self, name: str) -> None:
        """Give back the memory-mapped pages of one tensor of every model (a streamed merge is done with it)."""
        for store in self._stored:
            store.release(name)

    # ---- recipe -> kernel plans ------------------------------------------------------------------------
    def _positions(self, recipe: Recipe) -> list[int | None]:
        """For each engine row, the recipe position of that model (None: the recipe leaves it out)."""
        if recipe.merge_method not in METHODS:
            raise MergeoptError(f"unknown merge method {recipe.merge_method}")
        if recipe.uses_base and recipe.base_model is not None and _key(recipe.base_model) != self.base_path:
            raise MergeoptError(f"recipe base_model {recipe.base_model} is not the engine's base {self.base_path}")
        positions: list[int | None] = [None] * len(self.model_paths)
        for pos, spec in recipe.delta_models():
            adapter = adapter_of(spec.model, self.base_path)
            row = self._rows.get(_key(spec.model) if adapter is None else f"{self.base_path}+{_key(adapter)}")
            if row is None:
                raise MergeoptError(f"recipe model {spec.model} was not loaded into the engine; "
                                    f"it holds {', '.join(self.model_paths)}")
            positions[row] = pos
        return positions

    def plan(self, recipe: Recipe, slot: TensorSlot,
             positions: list[int | None] | None = None) -> sparsify.TensorPlan | torch_methods.TorchPlan:
        """The kernel's arrays for one tensor; ``positions`` (from :meth:`_positions`) saves re-matching paths."""
        positions = self._positions(recipe) if positions is None else positions
        if METHODS[recipe.merge_method].engine == "torch":  # a torch function per tensor (issue 14)
            return torch_methods.TorchPlan(recipe, slot.name, slot.t, tuple(self.shapes[slot.name]), positions)
        active = [row for row, pos in enumerate(positions) if pos is not None]
        round_to = self.input_rounding(recipe)
        sub = tensor_plan(recipe, slot, [p for p in positions if p is not None],
                          delta_rows=lambda i: self.delta(slot.name, active[i], round_to),
                          l1_norms=lambda i, threshold, key: self._l1_norms(slot.name, active[i], threshold, key))
        sub.round_inputs = round_to
        if len(active) == len(positions):
            return sub
        # Models the recipe leaves out take part with weight 0 and nothing kept.
        n = len(positions)
        return sparsify.TensorPlan(round_inputs=round_to,
            weights=_scatter(sub.weights, active, n, 0),
            scales=_scatter(sub.scales, active, n, 1),
            keep_mode=_scatter(sub.keep_mode, active, n, sparsify.KEEP_NONE),
            thresholds=_scatter(sub.thresholds, active, n, 0),
            magnitudes=_scatter(sub.magnitudes, active, n, 0),
            keys=_scatter(sub.keys, active, n, 0),
            tie_limits=_scatter(sub.tie_limits, active, n, 0),
            consensus=sub.consensus, normalize=sub.normalize, lam=sub.lam, base_coef=sub.base_coef)

    def _l1_norms(self, name: str, row: int, threshold: int, key: int) -> tuple[float, float]:
        """(dense, kept) L1 norms of one delta under one DARE mask; the dense norm is cached (recipe-independent)."""
        base, (tuned,) = self.inputs(name, [row])
        if self.kernel == "numba":
            dense, kept = sparsify.delta_l1_cpu(base, tuned, threshold, key)
        else:
            dense, kept = sparsify.delta_l1_torch(base, tuned, threshold, key)
        return self._l1.setdefault((name, row), dense), kept

    # ---- building ---------------------------------------------------------------------------------------
    def _merge_into(self, slot: TensorSlot, plan: sparsify.TensorPlan | torch_methods.TorchPlan,
                    target: torch.Tensor) -> torch.Tensor:
        """Merge one tensor into ``target`` (any dtype and device, viewed flat); returns ``target``."""
        self._check_inputs(slot.name)
        if isinstance(plan, torch_methods.TorchPlan):
            base, models = self.inputs(slot.name)
            target.view(-1).copy_(plan.merge(base, models))
            return target
        base, models = self.inputs(slot.name, round_to=plan.round_inputs)
        flat = target.view(-1)
        n = flat.numel()
        unchanged = self._unchanged[slot.name]
        if unchanged and all(row in unchanged for row in np.flatnonzero(plan.keep_mode != sparsify.KEEP_NONE)):
            tail = sparsify.unchanged_tail(plan)  # every kept delta is zero: the base, as the kernels write it
            if tail is not None:
                for start in range(0, n, TORCH_RANGE):
                    stop = min(n, start + TORCH_RANGE)
                    sparsify.merge_range_unchanged(flat[start:stop], base, plan, tail, start, stop)
                return target
        if self.kernel == "numba":
            if flat.dtype == torch.float32 and flat.device.type == "cpu":
                sparsify.merge_range_cpu(flat, 0, base, models, plan)  # straight into the target
                return target
            scratch = torch.empty(min(n, NUMBA_RANGE), dtype=torch.float32)
            for start in range(0, n, NUMBA_RANGE):
                stop = min(n, start + NUMBA_RANGE)
                part = scratch[: stop - start]
                sparsify.merge_range_cpu(part, start, base, models, plan)
                flat[start:stop].copy_(part)
            return target
        for start in range(0, n, TORCH_RANGE):
            stop = min(n, start + TORCH_RANGE)
            flat[start:stop].copy_(sparsify.merge_range_torch(base, models, plan, start, stop))
        return target

    def tensors(self, recipe: Recipe, dtype: torch.dtype = torch.float32,
                progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, merged tensor)`` one at a time, in checkpoint order, in ``dtype`` on the engine's device."""
        positions = self._positions(recipe)  # fails before any work
        for slot in tqdm(self.slots, desc="merging", unit="tensor", disable=not progress):
            out = torch.empty(self.shapes[slot.name], dtype=dtype, device=self.device)
            self._merge_into(slot, self.plan(recipe, slot, positions), out)
            yield slot.name, out

    def state_dict(self, recipe: Recipe, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return dict(self.tensors(recipe, dtype))

    @torch.no_grad()
    def build_into(self, recipe: Recipe, model: torch.nn.Module) -> None:
        """Write the candidate's weights straight into a live model's parameters (no disk, no state dict)."""
        targets = dict(model.state_dict(keep_vars=True))
        missing = [n for n in self.names if n not in targets]
        if missing:
            raise MergeoptError(f"the live model has no tensor {missing[0]}; it is not the architecture the engine loaded")
        positions = self._positions(recipe)
        for slot in self.slots:
            target = targets[slot.name]
            data = target.data if isinstance(target, torch.nn.Parameter) else target
            if not data.is_contiguous():
                raise MergeoptError(f"the live model's tensor {slot.name} is not contiguous; it cannot be built in place")
            self._merge_into(slot, self.plan(recipe, slot, positions), data)

    def output_dtype(self, recipe: Recipe) -> torch.dtype:
        """The dtype a recipe's merged model is written in: its out_dtype, else its dtype, else the checkpoints'."""
        name = getattr(recipe, "out_dtype", None) or recipe.dtype
        return checkpoint.torch_dtype(name) if name else self.stored_dtype()

    def save(self, recipe: Recipe, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3,
             progress: bool = False) -> Path:
        """Stream the merge into a (sharded) safetensors folder with config and tokenizer that transformers loads.

        Each tensor is merged, written into its place in its shard file, and its input pages given back: the
        peak memory is about one tensor, whatever the model's size."""
        dtype = self.output_dtype(recipe)
        positions = self._positions(recipe)  # fails before the folder is touched
        tokenizer = recipe.tokenizer_folder() or self.base_path  # base / union / a model (issue 14)
        layout = [(name, self.shapes[name]) for name in self.names]

        def merged(name: str, out: torch.Tensor) -> None:
            slot = self._slot_by_name[name]
            self._merge_into(slot, self.plan(recipe, slot, positions), out)
            self.release(name)

        out = checkpoint.stream_model_folder(out_dir, layout, merged, self.base_path, dtype,
                                             max_shard_bytes=max_shard_bytes, tokenizer_folder=tokenizer,
                                             progress=progress)
        from optimizer.side_files import write_chat_template  # the recipe's chat_template (issue 14)

        write_chat_template(recipe, out)
        return out


def adapter_of(reference: str | Path, base_path: str) -> Path | None:
    """The adapter folder a fine-tune reference names (an adapter folder, or ``base+adapter`` on this base), or None
    for a model folder. ``model+adapter`` on a model other than the engine's base is refused in one line."""
    parts = split_lora(str(reference))
    if parts is not None:
        if _key(parts[0]) != base_path:
            raise MergeoptError(f"{reference} applies the adapter to {parts[0]}, not to the base {base_path}; the "
                                "engine applies adapters to the base only ('mergeopt merge' hands this to mergekit)")
        return Path(parts[1])
    return Path(reference) if lora.is_adapter(reference) else None


def _rounded(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A stored float32 tensor rounded to a half-precision dtype (a copy); any other tensor as it is."""
    if dtype is None or tensor.dtype != torch.float32:
        return tensor
    return tensor.to(dtype)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two stored flat tensors hold the same bytes (a fine-tune that left this tensor as the base)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _scatter(values, rows: list[int], n: int, fill):
    import numpy as np

    out = np.full(n, fill, dtype=values.dtype)
    out[rows] = values
    return out
