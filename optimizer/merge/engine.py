"""The merge engine: base and deltas loaded once and kept resident; candidates built straight into place.

```python
engine = MergeEngine(base="zoo/base", models=["zoo/adder", "zoo/reverser"])   # loads and checks once
engine.build_into(recipe, live_model)      # writes the merged weights into the model's parameters, no disk
engine.save(recipe, "out/merged")          # or a sharded safetensors folder that transformers loads
```

Memory: base + one float32 delta per model and tensor (rows of one ``(n_models, numel)`` block per tensor), plus
one output tensor of scratch; building into a float32 CPU model needs no scratch at all, the kernel writes
straight into the parameter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from optimizer.errors import MergeoptError
from optimizer.merge import checkpoint, sparsify
from optimizer.merge.methods import METHODS, TensorSlot, tensor_plan
from optimizer.recipe import Recipe

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _key(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


class MergeEngine:
    """Holds base + deltas of a fixed set of homologous models on one device and builds candidates from them."""

    def __init__(self, base: str | Path, models: Sequence[str | Path], device: str | torch.device | None = None,
                 allow_pickle: bool = False, progress: bool = False):
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeoptError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        self.base_path = _key(base)
        self.model_paths = [_key(m) for m in models]
        if not self.model_paths:
            raise MergeoptError("no models to merge; list at least one fine-tuned model")
        base_info = checkpoint.inspect_model(base, allow_pickle)
        infos = [checkpoint.inspect_model(m, allow_pickle) for m in models]
        checkpoint.check_homologous(base_info, infos)
        self.config = base_info.config
        self.names = list(base_info.shapes)
        self.shapes = dict(base_info.shapes)
        self.num_layers = checkpoint.num_layers(self.config, self.names)
        from optimizer.merge.side_files import checkpoint_dtype  # the arithmetic dtype when a recipe has none

        stored = checkpoint_dtype(base)
        self.slots = [TensorSlot(name, self._depth(name), stored) for name in self.names]

        self.base: dict[str, torch.Tensor] = {
            name: _finite(t, name, base).reshape(-1).contiguous()
            for name, t in checkpoint.load_state_dict(base, allow_pickle, self.device, torch.float32).items()
        }
        self.deltas: dict[str, torch.Tensor] = {
            name: torch.empty((len(models), self.base[name].numel()), dtype=torch.float32, device=self.device)
            for name in self.names
        }
        bar = tqdm(total=len(models), desc="loading models", unit="model", disable=not progress, leave=False)
        for row, folder in enumerate(models):
            state = checkpoint.load_state_dict(folder, allow_pickle, self.device, torch.float32)
            for name in self.names:
                torch.sub(_finite(state.pop(name), name, folder).reshape(-1), self.base[name],
                          out=self.deltas[name][row])
            del state
            bar.update()
        bar.close()
        self._rows = {path: row for row, path in enumerate(self.model_paths)}
        self._l1: dict[tuple[str, int], float] = {}  # dense L1 norms of deltas, for the l1 rescale rule

    @classmethod
    def for_recipe(cls, recipe: Recipe, device: str | torch.device | None = None, allow_pickle: bool = False,
                   progress: bool = False) -> MergeEngine:
        """An engine holding exactly the models a recipe names."""
        base = recipe.base_model or recipe.models[0].model
        models = [m.model for _, m in recipe.delta_models()]
        return cls(base, models, device=device, allow_pickle=allow_pickle, progress=progress)

    def _depth(self, name: str) -> float:
        layer = checkpoint.layer_index(name)
        if layer is None:
            return 0.0
        return layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0

    # ---- recipe -> kernel plans ------------------------------------------------------------------------
    def _positions(self, recipe: Recipe) -> list[int | None]:
        """For each engine row, the recipe position of that model (None: the recipe leaves it out)."""
        if recipe.merge_method not in METHODS:
            raise MergeoptError(f"unknown merge method {recipe.merge_method}")
        if recipe.uses_base and _key(recipe.base_model) != self.base_path:
            raise MergeoptError(f"recipe base_model {recipe.base_model} is not the engine's base {self.base_path}")
        positions: list[int | None] = [None] * len(self.model_paths)
        for pos, spec in recipe.delta_models():
            row = self._rows.get(_key(spec.model))
            if row is None:
                raise MergeoptError(f"recipe model {spec.model} was not loaded into the engine; "
                                    f"it holds {', '.join(self.model_paths)}")
            positions[row] = pos
        return positions

    def plan(self, recipe: Recipe, slot: TensorSlot, positions: list[int | None] | None = None) -> sparsify.TensorPlan:
        """The kernel's arrays for one tensor; ``positions`` (from :meth:`_positions`) saves re-matching paths."""
        positions = self._positions(recipe) if positions is None else positions
        active = [row for row, pos in enumerate(positions) if pos is not None]
        sub = tensor_plan(recipe, slot, [positions[r] for r in active],
                          delta_rows=lambda i: self.deltas[slot.name][active[i]],
                          dense_l1=lambda i: self._dense_l1(slot.name, active[i]))
        if len(active) == len(positions):
            return sub
        # Models the recipe leaves out take part with weight 0 and nothing kept.
        full = sparsify.TensorPlan(
            weights=_scatter(sub.weights, active, len(positions), 0),
            scales=_scatter(sub.scales, active, len(positions), 1),
            keep_mode=_scatter(sub.keep_mode, active, len(positions), sparsify.KEEP_NONE),
            thresholds=_scatter(sub.thresholds, active, len(positions), 0),
            magnitudes=_scatter(sub.magnitudes, active, len(positions), 0),
            keys=_scatter(sub.keys, active, len(positions), 0),
            consensus=sub.consensus, normalize=sub.normalize, lam=sub.lam, base_coef=sub.base_coef)
        return full

    def _dense_l1(self, name: str, row: int) -> float:
        key = (name, row)
        if key not in self._l1:
            self._l1[key] = float(self.deltas[name][row].abs().sum())
        return self._l1[key]

    # ---- building ---------------------------------------------------------------------------------------
    def _merge_into(self, slot: TensorSlot, plan: sparsify.TensorPlan, out: torch.Tensor | None) -> torch.Tensor:
        base, deltas = self.base[slot.name], self.deltas[slot.name]
        if self.device.type == "cpu":
            if out is None or out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
                scratch = torch.empty_like(base)
                sparsify.merge_flat_cpu(scratch, base, deltas, plan)
                if out is None:
                    return scratch
                out.copy_(scratch.view(out.shape))
                return out
            sparsify.merge_flat_cpu(out.view(-1), base, deltas, plan)
            return out
        merged = sparsify.merge_flat_torch(base, deltas, plan)
        if out is None:
            return merged
        out.copy_(merged.view(out.shape))
        return out

    def tensors(self, recipe: Recipe, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, merged float32 tensor)`` one at a time, in checkpoint order."""
        positions = self._positions(recipe)  # fails before any work
        for slot in tqdm(self.slots, desc="merging", unit="tensor", disable=not progress):
            merged = self._merge_into(slot, self.plan(recipe, slot, positions), None)
            yield slot.name, merged.view(self.shapes[slot.name])

    def state_dict(self, recipe: Recipe) -> dict[str, torch.Tensor]:
        return dict(self.tensors(recipe))

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
            self._merge_into(slot, self.plan(recipe, slot, positions), data)

    def save(self, recipe: Recipe, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3,
             progress: bool = False) -> Path:
        """Merge into a (sharded) safetensors folder with config and tokenizer that transformers loads."""
        from optimizer.merge import side_files  # recipe's written dtype, tokenizer and chat template (issue 14)

        dtype = DTYPES[side_files.written_dtype(recipe, self.base_path)]
        tokenizer = recipe.tokenizer_folder() or self.base_path
        out = checkpoint.write_model_folder(out_dir, self.tensors(recipe, progress=progress), self.base_path, dtype,
                                            max_shard_bytes=max_shard_bytes, tokenizer_folder=tokenizer)
        side_files.write_chat_template(recipe, out)
        return out


def _finite(tensor: torch.Tensor, name: str, folder) -> torch.Tensor:
    """The tensor itself; a NaN or inf in a checkpoint is damage no merge can use, refused before any search."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MergeoptError(f"tensor {name} of {folder} holds {bad} NaN or infinite value{'s' * (bad > 1)}; the "
                            "checkpoint is damaged: re-export or re-download that model")
    return tensor


def _scatter(values, rows: list[int], n: int, fill):
    import numpy as np

    out = np.full(n, fill, dtype=values.dtype)
    out[rows] = values
    return out
