"""Batched greedy generation and exact-match scoring for transformers causal LMs.

The loop is written by hand (prefill once, then one token per step through the KV cache) rather than through
``model.generate`` so that it is small, predictable and fast: prompts are bucketed by length to keep padding low,
only the last position's logits are computed, and a batch stops as soon as every row has produced EOS.

Left padding: every prompt ends at the same column, so the next token of every row is read from the last column.
Position ids are counted from each row's first real token (``cumsum(mask) - 1``), so a padded row sees exactly
the positions it would see alone; batched and unbatched generation therefore agree.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("greedy_generate needs an EOS token: neither the tokenizer nor the model defines one")
    return ids


def _forward_parameters(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _returned_cache(outputs: Any) -> Any:
    # transformers >= 5.2x calls the KV cache ``cache``; earlier versions call it ``past_key_values``.
    for name in ("cache", "past_key_values"):
        value = outputs.get(name)
        if value is not None:
            return value
    raise ValueError("the model returned no KV cache; greedy_generate needs a causal LM that supports use_cache")


@torch.inference_mode()
def _generate_batch(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_ids: set[int],
    forward_parameters: set[str],
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt, cut before the first EOS."""
    device = model.device
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # Only the last position's logits are needed (a real vocabulary times a long prompt is a lot of memory).
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}
    cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"
    eos = torch.tensor(sorted(eos_ids), device=device)

    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra
    )
    finished = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        next_token = outputs.logits[:, -1, :].argmax(dim=-1)
        next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
        steps.append(next_token)
        finished |= torch.isin(next_token, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompt_ids), 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        outputs = model(
            input_ids=next_token[:, None],
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{cache_argument: _returned_cache(outputs)},
            use_cache=True,
            **extra,
        )

    generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompt_ids]
    completions: list[list[int]] = []
    for row in generated:
        cut = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
        completions.append(row[:cut])
    return completions


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 64,
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (in their order), each cut at its first EOS, special tokens removed.

    ``model`` is a transformers causal LM (put on its device by the caller); the tokenizer's own special-token
    rule (e.g. a BOS prefix) is applied to each prompt unless ``add_special_tokens`` is False (prompts rendered
    by a chat template hold their special tokens already). The model is switched to eval mode for the call and
    restored afterwards.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1")
    if not prompts:
        return []
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    # Longest first, so similar lengths share a batch (little padding) and memory peaks on the first batch.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    forward_parameters = _forward_parameters(model)

    was_training = model.training
    model.eval()
    try:
        completions: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            token_ids = _generate_batch(
                model, [encoded[i] for i in rows], max_new_tokens, pad_id, eos_ids, forward_parameters
            )
            texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
            for row, text in zip(rows, texts):
                completions[row] = text
        return completions
    finally:
        model.train(was_training)


def exact_match_score(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, str]],
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> tuple[float, float, int]:
    """Mean exact match of greedy completions against ``item["target"]``, its standard error, and n.

    ``max_new_tokens`` defaults to the longest target in tokens plus one (room for EOS). The standard error is
    the sample one, ``sqrt(p (1 - p) / (n - 1))``, as lm-evaluation-harness reports it.
    """
    if not items:
        raise ValueError("exact_match_score needs at least one item")
    if max_new_tokens is None:
        targets = tokenizer([item["target"] for item in items], add_special_tokens=False)["input_ids"]
        max_new_tokens = max(len(ids) for ids in targets) + 1
    completions = greedy_generate(model, tokenizer, [item["prompt"] for item in items], max_new_tokens, batch_size)
    hits = [float(text == item["target"]) for text, item in zip(completions, items)]
    n = len(hits)
    mean = sum(hits) / n
    stderr = math.sqrt(mean * (1.0 - mean) / (n - 1)) if n > 1 else 0.0
    return mean, stderr, n
