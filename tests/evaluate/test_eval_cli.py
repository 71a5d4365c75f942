"""`mergeopt eval` reproduces the zoo's table: each specialist beats the base on its own skill; --json is clean."""

import json

import pytest

from optimizer.cli import main
from optimizer.zoo import SPECIALIST_TASK


def eval_json(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one object and nothing else on stdout
    return json.loads(out)




def test_each_specialist_beats_the_base_on_its_own_task(capsys):
    scores = {name: eval_json(capsys, f"zoo:{name}", "--tasks", "zoo", "--limit", "100")
              for name in ["base", *SPECIALIST_TASK]}
    for result in scores.values():
        assert set(result) == {"add", "reverse", "sort"}
        for s in result.values():
            assert s["metric"] == "exact_match" and s["n"] == 100 and 0 <= s["stderr"] < 0.06
    for name, task in SPECIALIST_TASK.items():
        # clear margins on the zoo (table in benchmarks/RESULTS.md): at least two standard errors
        gap = scores[name][task]["value"] - scores["base"][task]["value"]
        assert gap > 2 * scores["base"][task]["stderr"], (name, task, gap)


def test_a_recipe_is_merged_in_memory_and_scored_on_held_out_items(capsys, tmp_path):
    recipe = tmp_path / "ta.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: zoo:base\nmodels:\n"
                      + "".join(f"  - model: zoo:{m}\n    parameters: {{weight: 0.5}}\n" for m in SPECIALIST_TASK))
    searched = eval_json(capsys, str(recipe), "--tasks", "zoo", "--limit", "300")
    held = eval_json(capsys, str(recipe), "--tasks", "zoo", "--limit", "300", "--holdout")
    # 400 items per task: 300 searched, 50 validation, the 50 left are the test range
    assert {s["n"] for s in searched.values()} == {300} and {s["n"] for s in held.values()} == {50}
    assert list(tmp_path.iterdir()) == [recipe]  # no model folder was written
    # the merge combines skills: above the base's mean on the held-out items
    base = eval_json(capsys, "zoo:base", "--tasks", "zoo", "--limit", "300", "--holdout")
    mean = lambda r: sum(s["value"] for s in r.values()) / 3  # noqa: E731
    assert mean(held) > mean(base)


@pytest.mark.slow  # 5-10 s of subprocesses: the slow tier (CI runs it) keeps the fast tier under 3 minutes
def test_eval_of_a_bf16_runs_recipe_reproduces_its_recorded_scores(capsys, tmp_path):
    """A recipe records the dtype its search scored in; `eval` scores in it (it used to score in float32 and
    give other numbers for bit-identical weights)."""
    import yaml

    from optimizer.export import export_run
    from optimizer.recipe import Recipe
    from optimizer.search.loop import run_search
    from optimizer.space import load_space

    space = tmp_path / "bf16.yaml"
    space.write_text(yaml.safe_dump({
        "name": "bf16", "base_model": "zoo:base", "models": [f"zoo:{m}" for m in SPECIALIST_TASK],
        "merge_method": "dare_linear", "objectives": ["add", "reverse", "sort"], "optimizer": "random",
        "budget": {"trials": 2}, "tasks": "zoo", "limit": 60, "seed": 0, "dtype": "bfloat16"}))
    run_search(load_space(space), tmp_path / "run", progress=False)
    best = export_run(tmp_path / "run").best.path
    assert Recipe.load(best).dtype == "bfloat16"
    recorded = {task: s["value"] for task, s in Recipe.load(best).info["scores"].items()}
    rescored = eval_json(capsys, str(best), "--tasks", "zoo", "--limit", "60", "--seed", "0")
    assert {task: s["value"] for task, s in rescored.items()} == recorded
    # a run folder stands for its best recipe, scored the same way
    from_run = eval_json(capsys, str(tmp_path / "run"), "--tasks", "zoo", "--limit", "60", "--seed", "0")
    assert {task: s["value"] for task, s in from_run.items()} == recorded
    # the dtype matters on the zoo (else this test could not fail): float32 scores the same weights differently
    in_fp32 = eval_json(capsys, str(best), "--tasks", "zoo", "--limit", "60", "--seed", "0", "--dtype", "float32")
    assert {task: s["value"] for task, s in in_fp32.items()} != recorded


def test_eval_refuses_pickled_weights_like_merge_and_search(capsys, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from optimizer.recipe import zoo_path

    folder = tmp_path / "pickled"
    shutil.copytree(zoo_path("zoo:base"), folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert main(["eval", str(folder), "--tasks", "zoo", "--limit", "5"]) == 1
    err = capsys.readouterr().err
    assert "pickled weights" in err and "--allow-pickle" in err and err.count("\n") == 1
