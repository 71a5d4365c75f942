"""`mergeopt eval` reproduces the zoo's table: each specialist beats the base on its own skill; --json is clean."""

import json

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
    assert {s["n"] for s in searched.values()} == {300} and {s["n"] for s in held.values()} == {100}
    assert list(tmp_path.iterdir()) == [recipe]  # no model folder was written
    # the merge combines skills: above the base's mean on the held-out items
    base = eval_json(capsys, "zoo:base", "--tasks", "zoo", "--limit", "300", "--holdout")
    mean = lambda r: sum(s["value"] for s in r.values()) / 3  # noqa: E731
    assert mean(held) > mean(base)
