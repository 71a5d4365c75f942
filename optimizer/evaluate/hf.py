"""transformers backend (the CPU default): one model object for the whole run, candidates merged into it in place.

The merge engine writes each candidate straight into the model's parameters (``engine.build_into``): no file,
no state dict, no reload. Generation is batched greedy decoding with a KV cache
(:mod:`optimizer.evaluate.generation`); log-likelihoods are batched right-padded forward passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from optimizer.errors import CandidateOutOfMemory, MergeoptError, NonFiniteOutput
from optimizer.evaluate.generation import greedy_generate
from optimizer.evaluate.tasks import GenerationRequest, LoglikelihoodRequest, cut_at_stop, render_prompt
from optimizer.merge.checkpoint import torch_dtype



class HFBackend:
    name = "hf"

    def __init__(self, model_path: str | Path, device: str | None = None, dtype: str = "float32",
                 batch_size: int = 64, trust_remote_code: bool = False):
        import transformers

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # none: this backend's engine is this process; a CUDA error that poisons it is raised (scoring turns it into
        # an EngineFault that needs a new process: optimizer/search/restart.py)
        self.engine_events: list = []
        self.batch_size = batch_size
        self.model_path = str(model_path)
        if not trust_remote_code:
            from optimizer.merge.checkpoint import read_config

            read_config(model_path)  # a missing config or one that needs custom code: one clear line
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
            model: Any = transformers.AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
            self.model: Any = model.to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise MergeoptError(f"cannot load {model_path} with transformers ({str(exc).splitlines()[0]})") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def close(self) -> None:
        """Let go of the model (the memory returns when the last reference does)."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- weights ------------------------------------------------------------------------------------
    def swap(self, engine, recipe) -> None:
        """Build the candidate straight into the live model's parameters."""
        engine.build_into(recipe, self.model)

    def load_parent(self, engine, index: int) -> None:
        """Load one of the engine's input models as it is (0: the base), from the engine's own mapped weights."""
        stored = engine.stored_weights(index)
        self.load_state((name, stored[name].view(engine.shapes[name])) for name in engine.names)

    @torch.no_grad()
    def load_state(self, tensors) -> None:
        """Copy ``(name, tensor)`` pairs into the live model (e.g. a parent model's own weights)."""
        params = self.model.state_dict(keep_vars=True)
        for name, tensor in tensors:
            params[name].data.copy_(tensor)

    # ---- requests -----------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        out = [""] * len(requests)
        prompts = [render_prompt(self.tokenizer, r.prompt, r.chat) for r in requests]
        groups: dict[tuple[int, bool], list[int]] = {}  # one call per (length budget, special-token rule)
        for i, r in enumerate(requests):
            groups.setdefault((r.max_new_tokens, prompts[i][1]), []).append(i)
        for (max_new, special), rows in groups.items():
            texts = self._guarded(lambda: greedy_generate(self.model, self.tokenizer, [prompts[i][0] for i in rows],
                                                          max_new, self.batch_size, add_special_tokens=special))
            for i, text in zip(rows, texts):
                out[i] = cut_at_stop(text, requests[i].stop)
        return out

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        return self._guarded(lambda: self._loglikelihood(requests))

    @torch.inference_mode()
    def _loglikelihood(self, requests):
        tok = self.tokenizer
        contexts = []
        for r in requests:
            text, special = render_prompt(tok, r.context, r.chat)
            contexts.append(tok(text, add_special_tokens=special)["input_ids"])
        continuations = tok([r.continuation for r in requests], add_special_tokens=False)["input_ids"]
        order = sorted(range(len(requests)), key=lambda i: -(len(contexts[i]) + len(continuations[i])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        pad = tok.pad_token_id
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            seqs = [contexts[i] + continuations[i] for i in rows]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            if not torch.isfinite(logits).all():
                raise NonFiniteOutput("the model produced NaN or infinite logits")
            logprobs = torch.log_softmax(logits, dim=-1)
            for j, i in enumerate(rows):
                n_ctx, cont = len(contexts[i]), continuations[i]
                positions = torch.arange(n_ctx - 1, n_ctx - 1 + len(cont), device=logprobs.device)
                target = torch.tensor(cont, device=logprobs.device)
                picked = logprobs[j, positions, target]
                greedy = bool((logprobs[j, positions].argmax(-1) == target).all())
                results[i] = (float(picked.sum()), greedy)
        return results

    def _guarded(self, fn):
        try:
            return fn()
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise CandidateOutOfMemory("out of memory while scoring") from None
