"""A tiny-scale rebuild writes complete, loadable model folders and task files."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimizer.evaluate.generation import greedy_generate
from optimizer.zoo import MODEL_NAMES, zoo_models, zoo_tasks
from optimizer.builders.tiny import rebuild


def test_smoke_rebuild(tmp_path):
    torch.set_num_threads(1)
    folders = rebuild(tmp_path, seed=3, progress=False, scale=0.002)
    assert folders == zoo_models(tmp_path)
    assert list(folders) == list(MODEL_NAMES)
    for folder in folders.values():
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert greedy_generate(model, tokenizer, ["add:1+2="], max_new_tokens=2)[0] is not None
    for task, path in zoo_tasks(tmp_path).items():
        shipped = zoo_tasks()[task].read_text()
        lines = path.read_text().splitlines()
        # the always-excluded half is the same for every training seed; the rest skips this run's own prompts
        assert len(lines) == 400 and lines[:200] == shipped.splitlines()[:200]
        assert json.loads(shipped.splitlines()[0])["id"].startswith(task)
    assert (tmp_path / "tasks" / "zoo.yaml").is_file()
