"""Batched greedy generation (left padding) agrees with unbatched generation and with model.generate."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimizer.evaluate.generation import exact_match_score, greedy_generate
from optimizer.zoo import zoo_models, zoo_tasks


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(zoo_models()["base"], local_files_only=True)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(zoo_models()["base"], local_files_only=True).eval()


@pytest.fixture(scope="module")
def prompts():
    # Mixed tasks and lengths, so every batch has rows padded by different amounts.
    mixed = []
    for path in zoo_tasks().values():
        mixed += [json.loads(line)["prompt"] for line in path.read_text().splitlines()[:12]]
    return mixed + ["copy:ab=", "add:1+2=", "rev:abcdefghij="]


def test_batched_equals_unbatched(model, tokenizer, prompts):
    one_by_one = [greedy_generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert greedy_generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=7) == one_by_one
    assert greedy_generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=64) == one_by_one
    assert any(one_by_one)


def test_matches_transformers_generate(model, tokenizer, prompts):
    ours = greedy_generate(model, tokenizer, prompts[::5], max_new_tokens=12)
    for prompt, text in zip(prompts[::5], ours):
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == text


def test_stops_at_eos_and_respects_max_new_tokens(model, tokenizer):
    short = greedy_generate(model, tokenizer, ["copy:abcdef="], max_new_tokens=3)[0]
    full = greedy_generate(model, tokenizer, ["copy:abcdef="], max_new_tokens=20)[0]
    assert len(short) == 3 and full.startswith(short)
    assert full == "abcdef"  # copying is pretrained; EOS ends it, nothing after it is returned


def test_exact_match_score(model, tokenizer):
    items = [{"prompt": "copy:abc=", "target": "abc"}, {"prompt": "copy:xyz=", "target": "wrong"}]
    mean, stderr, n = exact_match_score(model, tokenizer, items)
    assert (mean, n) == (0.5, 2)
    assert stderr == pytest.approx(0.5)
    assert greedy_generate(model, tokenizer, [], max_new_tokens=4) == []
