"""PEFT LoRA adapters as merge inputs: read at their own size, the adapted tensors formed one at a time.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) stands wherever a fine-tuned model
stands. It means what its merged checkpoint means (PEFT's ``merge_and_unload`` of the adapter into the base, in
the base's dtype, which is what mergekit's ``base+adapter`` builds in its ``--lora-merge-cache``): for each tensor
the adapter touches, the engine forms

    adapted = round_to_base_dtype(base + scale * B @ A)        (in float32 on the merge device)

when that tensor is merged, hands it to the kernels as it would a fine-tune's stored tensor, and drops it with the
next tensor. ``scale`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with ``alpha_pattern``
honoured and ``r`` read from the tensors' own shapes (so ``rank_pattern`` is too); ``fan_in_fan_out`` (GPT-2's
Conv1D) transposes ``B @ A``; embedding adapters (``lora_embedding_A/B``) give ``(B @ A)^T``; full tensors the
adapter stores (``modules_to_save``) replace the base's. On a CPU a float32 or bfloat16 tensor is formed by a fused
numba loop (:func:`optimizer.merge.kernels.form_lora_bf16`), which sums the rank's products in order where PEFT's
BLAS sums them otherwise: the formed tensor is PEFT's merged checkpoint up to the float32 rounding of ``B @ A``.
A merge of adapters is bit for bit the merge of the checkpoints the engine forms, no adapted model is ever written
or held in full, and a tensor no adapter touches is the base's (the engine skips it). Forms that are not ``W + scale * B @ A`` (DoRA, LoRA biases, trainable tokens, other PEFT
types) are refused in one line before anything loads.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from optimizer.errors import MergeoptError
from optimizer.merge import checkpoint

log = logging.getLogger("mergeopt")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
_PREFIX = "base_model.model."
# config switches that make an adapter something other than W + scale * B @ A
_REFUSED_SWITCHES = {
    "use_dora": "DoRA (use_dora) rescales each column of the adapted weight by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "trainable_token_indices": "trainable_token_indices trains single embedding rows (trainable tokens)",
    "layer_replication": "layer_replication duplicates layers of the base",
    "target_parameters": "target_parameters adapts raw parameters (MoE experts), not modules",
    "use_qalora": "QA-LoRA pools the inputs of quantised layers",
}


def is_adapter(folder: str | Path) -> bool:
    """Whether a folder holds a PEFT adapter (``adapter_config.json``) rather than a model."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdaptedTensor:
    """How one base tensor is adapted: ``lora`` (scale * B @ A), ``embedding`` (scale * (B @ A)^T), ``full``."""

    target: str  # the base tensor's name
    kind: str
    a: str | None  # the adapter file's tensor names
    b: str | None
    scale: float
    transpose: bool = False  # fan_in_fan_out: B @ A is stored transposed (Conv1D)
    # a whole tensor the adapter stores in place of the base's (modules_to_save; the base layer of an adapted
    # embedding, which PEFT saves beside it): the adaptation starts from it
    whole: str | None = None


class LoraAdapter:
    """An adapter folder's configuration and tensor table, read from its JSON and safetensors header only."""

    def __init__(self, folder: str | Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        path = self.folder / ADAPTER_CONFIG
        if not path.is_file():
            raise MergeoptError(f"{self.folder} has no {ADAPTER_CONFIG}; point at a PEFT LoRA adapter folder")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise MergeoptError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); repair or re-save it") from None
        if not isinstance(config, dict):
            raise MergeoptError(f"{path} must hold a JSON object")
        self.config = config
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise MergeoptError(f"{self.folder} is a PEFT {peft_type} adapter; mergeopt merges LoRA adapters only "
                                "(merge it into its base with PEFT's merge_and_unload and list that folder)")
        for key, why in _REFUSED_SWITCHES.items():
            if config.get(key):
                raise MergeoptError(f"{self.folder}: {why}, which is not a low-rank delta mergeopt can form; merge "
                                    "it into its base with PEFT's merge_and_unload and list that folder instead")
        self.declared_base = config.get("base_model_name_or_path")
        self.rslora = bool(config.get("use_rslora"))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        alpha = config.get("lora_alpha", 8)
        patterns = config.get("alpha_pattern") or {}
        if not isinstance(alpha, (int, float)) or not isinstance(patterns, dict):
            raise MergeoptError(f"{path}: lora_alpha must be a number and alpha_pattern a mapping")
        self.alpha, self.alpha_pattern = float(alpha), dict(patterns)
        self.entries = self._read_weights(allow_pickle)
        self.tensors = self._adapted_tensors()

    def _read_weights(self, allow_pickle: bool) -> dict[str, checkpoint.TensorEntry | torch.Tensor]:
        file = self.folder / ADAPTER_WEIGHTS
        if file.is_file():
            return dict(checkpoint.read_safetensors_header(file))
        pickled = self.folder / ADAPTER_PICKLE
        if pickled.is_file():
            if not allow_pickle:
                raise MergeoptError(f"{self.folder} holds only pickled adapter weights ({ADAPTER_PICKLE}), which can "
                                    "run code when loaded; convert them to safetensors or pass --allow-pickle")
            try:
                state = torch.load(pickled, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for bad pickles
                raise MergeoptError(f"{pickled} cannot be loaded with weights_only=True ({type(exc).__name__}); "
                                    "convert it to safetensors") from None
            return dict(state)
        raise MergeoptError(f"{self.folder} holds no {ADAPTER_WEIGHTS}; save the adapter with PEFT's save_pretrained")

    def _scale(self, module: str, rank: int) -> float:
        alpha = self.alpha
        for pattern, value in self.alpha_pattern.items():  # PEFT's rule: the pattern matches the module name's tail
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def _adapted_tensors(self) -> dict[str, AdaptedTensor]:
        pairs: dict[str, dict[str, str]] = {}
        full: dict[str, str] = {}
        for name in self.entries:
            key = name.removeprefix(_PREFIX)
            match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", key)
            if match:
                module = match.group(1) or match.group(3)
                part = (match.group(2) or match.group(4))[-1]
                pairs.setdefault(module, {})[part] = name
                continue
            if re.search(r"\.lora_[A-Za-z_]+", key) or "lora_magnitude_vector" in key:
                raise MergeoptError(f"{self.folder}: tensor {name} is not a LoRA A/B matrix (a DoRA magnitude or a LoRA "
                                    "bias); merge the adapter into its base with PEFT and list that folder instead")
            key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            full[key] = name
        out: dict[str, AdaptedTensor] = {}
        for module, parts in pairs.items():
            if set(parts) != {"A", "B"}:
                missing = "B" if "A" in parts else "A"
                raise MergeoptError(f"{self.folder}: module {module} has no lora_{missing}; the adapter file is incomplete")
            shape_a = _shape(self.entries[parts["A"]])
            if len(shape_a) != 2:
                raise MergeoptError(f"{self.folder}: {parts['A']} has shape {list(shape_a)}; a LoRA matrix is 2-d")
            embedding = "lora_embedding" in parts["A"]
            rank = shape_a[0]
            target = f"{module}.weight"
            out[target] = AdaptedTensor(target, "embedding" if embedding else "lora", parts["A"], parts["B"],
                                        self._scale(module, rank), transpose=self.fan_in_fan_out and not embedding)
        for target, name in full.items():
            if target in out:
                t = out[target]
                out[target] = AdaptedTensor(t.target, t.kind, t.a, t.b, t.scale, t.transpose, whole=name)
            else:
                out[target] = AdaptedTensor(target, "full", None, None, 1.0, whole=name)
        return out

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(e) for e in self.entries.values())

    def expected_shape(self, tensor: AdaptedTensor) -> tuple[int, ...]:
        """The base tensor shape this adapter's tensor adapts (from its matrices' shapes)."""
        if tensor.kind == "full":
            assert tensor.whole is not None
            return _shape(self.entries[tensor.whole])
        assert tensor.a is not None and tensor.b is not None
        (_, cols), (rows, _) = _shape(self.entries[tensor.a]), _shape(self.entries[tensor.b])  # A: r x in, B: out x r
        return (cols, rows) if tensor.kind == "embedding" or tensor.transpose else (rows, cols)

    def check_base(self, base_folder: str | Path, base_shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse, in one line, an adapter whose tensors do not fit the base; note a base the adapter does not name."""
        for tensor in self.tensors.values():
            rank_ok = tensor.kind == "full" or (tensor.a is not None and tensor.b is not None and
                                                _shape(self.entries[tensor.a])[0] == _shape(self.entries[tensor.b])[1])
            if tensor.kind != "full" and tensor.whole is not None \
                    and _shape(self.entries[tensor.whole]) != self.expected_shape(tensor):
                rank_ok = False
            if not rank_ok:
                raise MergeoptError(f"{self.folder}: the A and B matrices of {tensor.target} do not fit together "
                                    "(ranks or the stored base layer differ); the adapter file is damaged")
            if tensor.target not in base_shapes:
                raise MergeoptError(f"adapter {self.folder} adapts {tensor.target}, which base {base_folder} does not "
                                    "store; the adapter was trained on another architecture (or a tied head)")
            want, got = base_shapes[tensor.target], self.expected_shape(tensor)
            if tuple(want) != tuple(got):
                raise MergeoptError(f"adapter {self.folder} adapts {tensor.target} as {list(got)} but base {base_folder} "
                                    f"stores it as {list(want)}; the adapter was trained on another base")
        declared = self.declared_base
        if declared and not _same_base(str(declared), Path(base_folder)):
            log.warning(f"note: adapter {self.folder} was trained on {declared}; applying it to {base_folder} "
                        "(the shapes match)")


def _same_base(declared: str, base: Path) -> bool:
    """Whether the adapter's declared base names this base folder: the same path, or the same last path parts
    (a hub id ``org/name`` against a folder ``.../org/name`` or ``.../name``)."""
    try:
        if Path(declared).expanduser().resolve() == base.expanduser().resolve():
            return True
    except OSError:
        pass
    tail = [p for p in declared.replace("\\", "/").split("/") if p]
    parts = base.expanduser().resolve().parts
    return bool(tail) and (list(parts[-len(tail):]) == tail or parts[-1] == tail[-1])


def _shape(entry) -> tuple[int, ...]:
    return tuple(entry.shape)


def _nbytes(entry) -> int:
    if isinstance(entry, torch.Tensor):
        return entry.numel() * entry.element_size()
    return entry.stop - entry.start


class WidenedBase:
    """The base tensor being merged, widened to float32 once for all the adapters that start from it."""

    def __init__(self, base: checkpoint.StoredWeights):
        self._base = base
        self._current: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._current is None or self._current[0] != name:
            self._current = None
            stored = self._base[name]
            self._current = (name, stored if stored.dtype == torch.float32 else stored.float())
        return self._current[1]

    def release(self) -> None:
        self._current = None


class AdapterWeights:
    """An adapter as the engine holds it: its own tensors (small) on the merge device, and, like
    :class:`checkpoint.StoredWeights`, one flat tensor per base tensor name, in the base's stored dtype.

    For a tensor the adapter touches that tensor is formed when it is asked for (``base + scale * B @ A`` in float32,
    rounded once to the base's dtype) and kept until another tensor is asked for: the engine's scratch is one
    tensor per adapter. A tensor the adapter does not touch is the base's own (the same tensor object)."""

    def __init__(self, adapter: LoraAdapter, base: checkpoint.StoredWeights, shapes: dict[str, tuple[int, ...]],
                 device: torch.device, widened: WidenedBase | None = None):
        self.adapter = adapter
        self.folder = adapter.folder
        self.device = device
        self._base = base
        self._widened = widened or WidenedBase(base)  # the engine shares one among its adapters
        self._shapes = shapes
        self._tensors: dict[str, torch.Tensor] = {}
        file = adapter.folder / ADAPTER_WEIGHTS
        if file.is_file():
            try:
                loaded = load_file(str(file))
            except Exception as exc:  # safetensors raises its own error types for damaged files
                raise MergeoptError(f"{file} is not a readable safetensors file ({exc}); it is corrupt or "
                                    "truncated") from None
        else:
            loaded = dict(adapter.entries)  # type: ignore[arg-type]  # a pickled adapter, loaded already
        wanted = {n for t in adapter.tensors.values() for n in (t.a, t.b, t.whole) if n is not None}
        for name in wanted:
            tensor = loaded[name]
            bad = int((~torch.isfinite(tensor.float())).sum())
            if bad:
                raise MergeoptError(f"tensor {name} of adapter {adapter.folder} holds {bad} NaN or infinite value"
                                    f"{'s' * (bad > 1)}; the adapter is damaged: re-save or re-download it")
            self._tensors[name] = tensor.to(device)
        # On a CPU a float32 or bfloat16 tensor is formed by the fused numba loop (kernels.form_lora_*) from the
        # factors laid out as it reads them: x (r x rows) and y (r x cols), value[p, q] = sum_k x[k, p] y[k, q];
        # x = B^T is a view of B (read along the rank), so only a transposed layout's B^T is copied.
        # Elsewhere (a GPU, a float16 base, a stored base layer) one addmm: with a scale that is a power of two, A is
        # scaled once here (exactly) and base + B @ (scale A) is bit for bit base + (B @ A) * scale.
        self._factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._prescaled: dict[str, torch.Tensor] = {}
        for adapted in adapter.tensors.values():
            if adapted.a is None or adapted.b is None:
                continue
            a, b = self._tensors[adapted.a].float(), self._tensors[adapted.b].float()
            transposed = adapted.kind == "embedding" or adapted.transpose
            if device.type == "cpu" and adapted.whole is None and \
                    base[adapted.target].dtype in (torch.float32, torch.bfloat16):
                x, y = (a, b.T.contiguous()) if transposed else (b.T, a.contiguous())
                self._factors[adapted.target] = (x.numpy(), y.numpy())
            elif math.frexp(adapted.scale)[0] == 0.5:
                self._prescaled[adapted.target] = a * adapted.scale
        self._formed: tuple[str, torch.Tensor] | None = None

    @property
    def touched(self) -> frozenset[str]:
        return frozenset(self.adapter.tensors)

    @property
    def names(self) -> list[str]:
        return list(self._shapes)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def delta(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` of one adapted tensor, float32, flat (on the adapter's device)."""
        tensor = self.adapter.tensors[name]
        assert tensor.a is not None and tensor.b is not None
        a, b = self._tensors[tensor.a].float(), self._tensors[tensor.b].float()
        product = torch.mm(b, a)
        if tensor.kind == "embedding" or tensor.transpose:
            product = product.T.contiguous()
        return product.view(-1).mul_(tensor.scale)  # in place: one float32 tensor of scratch, no more

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.adapter.tensors:
            return self._base[name]
        if self._formed is not None and self._formed[0] == name:
            return self._formed[1]
        self._formed = None  # the previous tensor's scratch goes before the next is formed
        base = self._base[name]
        tensor = self.adapter.tensors[name]
        if tensor.whole is not None:  # the stored replacement, as the adapted checkpoint holds it
            start = self._tensors[tensor.whole].reshape(-1).to(base.dtype)
            if tensor.kind == "full":
                self._formed = (name, start)
                return start
            wide = start.float()
        else:
            factors = self._factors.get(name)
            if factors is not None and base.dtype in (torch.float32, torch.bfloat16):
                adapted = self._formed_on_cpu(base, factors, tensor.scale)
                self._formed = (name, adapted)
                return adapted
            wide = self._widened[name]  # the stored values widen exactly
        # as PEFT's merge_and_unload on a CPU: base + (B @ A) * scale in float32, rounded once to the weight's dtype
        a = self._prescaled.get(name)
        if a is None:
            summed = self.delta(name).add_(wide)
        else:
            b = self._tensors[tensor.b].float()  # type: ignore[index]
            shape = self._shapes[name]
            if tensor.kind == "embedding" or tensor.transpose:  # (B @ A)^T = A^T @ B^T
                summed = torch.addmm(wide.view(shape), a.T, b.T).view(-1)
            else:
                summed = torch.addmm(wide.view(shape), b, a).view(-1)
        adapted = summed if base.dtype == torch.float32 else summed.to(base.dtype)
        self._formed = (name, adapted)
        return adapted

    @staticmethod
    def _formed_on_cpu(base: torch.Tensor, factors: tuple[np.ndarray, np.ndarray], scale: float) -> torch.Tensor:
        """base + (B @ A) * scale by the fused loop: the products summed in k order, without a float32 copy of the
        tensor; equal to PEFT's merge up to the float32 rounding of B @ A (its BLAS sums in another order)."""
        from optimizer.merge import sparsify

        kernels = sparsify.numba_kernels()
        out = torch.empty_like(base)
        x, y = factors
        if base.dtype == torch.float32:
            kernels.form_lora_f32(out.numpy(), base.numpy(), x, y, np.float32(scale))
        else:
            kernels.form_lora_bf16(sparsify.bits_view(out)[0], sparsify.bits_view(base)[0], x, y, np.float32(scale))
        return out

    def release(self, name: str) -> None:
        if self._formed is not None and self._formed[0] == name:
            self._formed = None
        self._widened.release()

    def close_maps(self) -> None:
        self._formed = None
