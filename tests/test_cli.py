"""The `mergeopt` command line, run as a user runs it (a subprocess)."""

import pytest
import torch
import transformers
from helpers import assert_one_line_error, run_cli

from optimizer.cli import COMMANDS
from optimizer.merge.engine import MergeEngine
from optimizer.recipe import ModelSpec, Recipe


def mergeopt(*args, check=False):
    proc = run_cli(*args)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(command):
    proc = mergeopt(command, "--help", check=True)
    assert "examples:" in proc.stdout and f"mergeopt {command}" in proc.stdout


def test_the_top_level_help_lists_every_command():
    proc = mergeopt("--help", check=True)
    assert all(command in proc.stdout for command in COMMANDS)


def test_an_unexpected_failure_is_one_line_without_debug(tmp_path):
    """The last-resort handler: a run whose study.db is not a database (a bug or damage no check foresaw)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "space.yaml").write_text("name: x\nbase_model: /m0\nmodels: [/m1]\nobjectives: [a]\n"
                                    "resolved: {num_layers: 2, uses_drop_rate: true}\n")
    (run / "study.db").write_bytes(b"this is not an SQLite database" * 100)
    proc = mergeopt("report", run)
    assert_one_line_error(proc, "mergeopt report: error:", "--debug")
    proc = mergeopt("--debug", "report", run)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_merge_writes_the_model_the_engine_builds(tmp_path, llama_family):
    base, models = llama_family
    recipe = Recipe("dare_ties", [ModelSpec(str(m), {"weight": 0.5, "density": 0.6}) for m in models],
                    base_model=str(base), seed=7)
    path = recipe.save(tmp_path / "recipe.yaml")
    proc = mergeopt("merge", path, "--out", tmp_path / "merged", check=True)
    assert proc.stdout.strip() == str((tmp_path / "merged").resolve())
    assert "merging" in proc.stderr  # the progress bar
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    expected = MergeEngine(base, models, device="cpu").state_dict(Recipe.load(path))
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name


@pytest.mark.slow  # a dozen subprocesses: the slow tier (CI runs it) keeps the fast tier under 3 minutes
def test_errors_are_one_line_and_nonzero(tmp_path, llama_family):
    base, models = llama_family
    proc = mergeopt("merge", tmp_path / "missing.yaml", "--out", tmp_path / "o")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "missing.yaml does not exist" in proc.stderr and "Traceback" not in proc.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {tmp_path / 'nowhere'}\n"
                   "    parameters: {weight: 1.0}\n")
    proc = mergeopt("merge", bad, "--out", tmp_path / "o")
    assert proc.returncode == 1 and "does not exist" in proc.stderr and proc.stderr.count("\n") == 1
    proc = mergeopt("--debug", "merge", bad, "--out", tmp_path / "o")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unwritable_output_is_a_clear_error(tmp_path, llama_family):
    base, models = llama_family
    recipe = Recipe("task_arithmetic", [ModelSpec(str(models[0]), {"weight": 1.0})], base_model=str(base))
    path = recipe.save(tmp_path / "r.yaml")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = mergeopt("merge", path, "--out", blocker / "sub")
    assert proc.returncode == 1 and "cannot create output folder" in proc.stderr
