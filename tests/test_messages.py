"""Messages that misled (issue 19, found by a held-out suite of mergekit recipe forms): each is one line that says
what is wrong and what to do, and a refused merge leaves nothing behind."""

import shutil

import pytest
import yaml
from helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file


def _recipe(path, models, base):
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                    "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]}))
    return path


def test_a_revision_on_a_local_folder_is_named_as_such(search_setup, tmp_path):
    base, model = search_setup / "models" / "m0", search_setup / "models" / "m1"
    recipe = _recipe(tmp_path / "r.yaml", [f"{model}@main"], base)
    proc = run_cli("merge", recipe, "--out", tmp_path / "out")
    assert_one_line_error(proc, f"{model}@main: a revision (@main) is read for Hugging Face ids only",
                          "drop '@main'")
    assert "does not exist" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_file_with_several_yaml_documents_is_said_so(search_setup, tmp_path):
    base, model = search_setup / "models" / "m0", search_setup / "models" / "m1"
    recipe = _recipe(tmp_path / "r.yaml", [model], base)
    recipe.write_text(recipe.read_text() + "---\nmerge_method: ties\n")
    proc = run_cli("merge", recipe, "--out", tmp_path / "out")
    assert_one_line_error(proc, "holds 2 YAML documents (separated by '---')", "keep one per file")
    assert "not valid YAML" not in proc.stderr
    space = tmp_path / "space.yaml"
    space.write_text("base_model: x\n---\nmodels: [y]\n")
    assert_one_line_error(run_cli("search", space, "--run-dir", tmp_path / "run"), "holds 2 YAML documents")


@pytest.mark.slow  # two merges through the command line: the slow tier (CI runs it) keeps the fast tier under 3 minutes
def test_a_merge_refused_after_it_started_leaves_no_out_folder(search_setup, tmp_path):
    base, model = search_setup / "models" / "m0", search_setup / "models" / "m1"
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    state = load_file(broken / "model.safetensors")
    name = sorted(state)[-1]
    state[name].view(-1)[1] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = _recipe(tmp_path / "r.yaml", [model, broken], base)
    out = tmp_path / "out"
    proc = run_cli("merge", recipe, "--out", out)  # the memory plan and the progress come first, then one line
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("mergeopt merge: error: tensor ") and "NaN" in last, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    kept = tmp_path / "existing"  # a folder that was there before the merge is the user's: it stays
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert run_cli("merge", recipe, "--out", kept).returncode != 0
    assert (kept / "notes.txt").read_text() == "mine"


def test_one_formatter_answers_misspelt_keys_in_spaces_recipes_and_task_sets(search_setup, tmp_path):
    """The same words wherever a key is misspelt: unknown key 'x' (did you mean 'y'?); allowed keys: ..."""
    from optimizer.errors import MergeoptError
    from optimizer.evaluate.tasks import load_task_set
    from optimizer.recipe import Recipe

    entry = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "paramters": {"weight": 1}}]}
    with pytest.raises(MergeoptError, match=r"models\[0\]: unknown key 'paramters' \(did you mean 'parameters'\?\); "
                                            "allowed keys: model, parameters"):
        Recipe.from_dict(entry)  # was merged silently without its parameters
    block = {"merge_method": "ties", "base_model": "b", "models": ["a"], "mergeopt": {"sed": 1}}
    with pytest.raises(MergeoptError, match=r"mergeopt: unknown key 'sed' \(did you mean 'seed'\?\)"):
        Recipe.from_dict(block)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("tasks:\n  - {name: a, path: a.jsonl}\nsed: 3\n")
    with pytest.raises(MergeoptError, match=r"unknown key 'sed' \(did you mean 'seed'\?\)"):
        load_task_set(str(tasks))
