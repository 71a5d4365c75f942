"""The shipped zoo: loadable transformers folders, small, and each specialist clearly better at its own task."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimizer.evaluate.generation import exact_match_score
from optimizer.zoo import MODEL_NAMES, SPECIALIST_TASK, TASK_MAX_NEW_TOKENS, zoo_models, zoo_task_spec, zoo_tasks

SUBSET = 50
# Smallest gain of a specialist over the base on its own task, 50-item subset. Measured on the shipped zoo
# (base -> specialist): add .56 -> .78, reverse .68 -> 1.00, sort .84 -> 1.00; the narrowest gap (.16) is
# well above this, and a specialist that learned nothing (gap ~0) fails it.
MIN_GAIN = 0.10


def _items(task: str, n: int = SUBSET) -> list[dict]:
    lines = zoo_tasks()[task].read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(zoo_models()["base"], local_files_only=True)


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return {name: AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
            for name, path in zoo_models().items()}


def test_api_lists_base_first_and_existing_files():
    assert list(zoo_models()) == list(MODEL_NAMES) == ["base", "adder", "reverser", "sorter"]
    assert set(SPECIALIST_TASK.values()) == set(zoo_tasks())
    for folder in zoo_models().values():
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file()
    for path in zoo_tasks().values():
        assert len(path.read_text().splitlines()) == 400
    spec = zoo_task_spec().read_text()
    for task, max_new in TASK_MAX_NEW_TOKENS.items():
        assert f"path: {task}.jsonl" in spec and f"max_new_tokens: {max_new}" in spec


def test_shipped_weights_are_float32_and_small(models):
    total = sum((folder / "model.safetensors").stat().st_size for folder in zoo_models().values())
    assert total < 20 * 1024**2
    for model in models.values():
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model.config.head_dim >= 32  # vLLM's CPU attention needs head_dim >= 32


def test_models_are_homologous(models):
    shapes = {name: {k: v.shape for k, v in model.state_dict().items()} for name, model in models.items()}
    assert all(s == shapes["base"] for s in shapes.values())


@pytest.mark.parametrize("specialist", list(SPECIALIST_TASK))
def test_specialist_beats_base_on_its_task(models, tokenizer, specialist):
    task = SPECIALIST_TASK[specialist]
    items = _items(task)
    max_new = TASK_MAX_NEW_TOKENS[task]
    base_score, _, _ = exact_match_score(models["base"], tokenizer, items, max_new)
    specialist_score, _, n = exact_match_score(models[specialist], tokenizer, items, max_new)
    assert n == SUBSET
    assert specialist_score >= base_score + MIN_GAIN, (specialist, specialist_score, base_score)
