"""A run's record: the effective configuration (YAML + flags) and what it resolved to, kept in the study and in
space.yaml; a resume may grow the budget but not change the run; report/export read the run from the record alone."""

import shutil
from types import SimpleNamespace

import yaml
from helpers import assert_one_line_error, write_space

from optimizer.cli import main
from optimizer.space import load_space, model_labels


def cli(capsys, *args):
    """`mergeopt ARGS` in this process (the same code path as the console script): rc, stdout and stderr."""
    capsys.readouterr()
    returncode = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=returncode, stdout=captured.out, stderr=captured.err)


def test_flags_are_recorded_and_a_resume_that_changes_them_is_refused(search_setup, tmp_path, capsys):
    """The issue's reproduction: `search --optimizer random --seed 5 --trials 3` then `report` said cma and 3/96;
    re-running without --optimizer ended in a traceback."""
    space = write_space(search_setup, "flags", optimizer={"name": "cma"}, budget={"trials": 8})
    run = tmp_path / "run"
    proc = cli(capsys, "search", space, "--run-dir", run, "--optimizer", "random", "--seed", "5", "--trials", "3",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    recorded = yaml.safe_load((run / "space.yaml").read_text())
    assert recorded["optimizer"] == {"name": "random"} and recorded["seed"] == 5
    assert recorded["budget"]["trials"] == 3
    assert recorded["resolved"]["num_layers"] == 2 and recorded["resolved"]["model_labels"] == ["m1", "m2", "m3"]
    assert "w.m1" in recorded["resolved"]["genes"]

    report = cli(capsys, "report", run)
    assert report.returncode == 0, report.stderr
    assert "random" in report.stdout and "budget: 3/3 trials" in report.stdout and "cma" not in report.stdout

    again = cli(capsys, "search", space, "--run-dir", run, "--seed", "5", "--trials", "3", "--quiet")
    assert_one_line_error(again, "optimizer 'random'", "--optimizer random")
    other_seed = cli(capsys, "search", space, "--run-dir", run, "--optimizer", "random", "--trials", "3", "--quiet")
    assert_one_line_error(other_seed, "seed 5", "--seed 5")


def test_a_bigger_budget_grows_the_run_and_the_report_shows_it(search_setup, tmp_path, capsys):
    space = write_space(search_setup, "grow", budget={"trials": 2})
    run = tmp_path / "run"
    assert cli(capsys, "search", space, "--run-dir", run, "--quiet").returncode == 0
    proc = cli(capsys, "search", space, "--run-dir", run, "--trials", "4", "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = cli(capsys, "report", run)
    assert "budget: 4/4 trials" in report.stdout, report.stdout
    import optuna

    study = optuna.load_study(study_name="grow", storage=f"sqlite:///{run / 'study.db'}")
    assert study.user_attrs["mergeopt:run"]["config"]["budget"]["trials"] == 4
    assert len(study.trials) == 4


def test_report_and_export_need_no_model_folder(search_setup, tmp_path, capsys):
    """Move the models of a finished run away: everything report and export need is in the record."""
    models = tmp_path / "models"
    shutil.copytree(search_setup / "models", models)
    space = write_space(search_setup, "moved", base_model=str(models / "m0"),
                        models=[str(models / f"m{i}") for i in (1, 2, 3)], budget={"trials": 3})
    run = tmp_path / "run"
    assert cli(capsys, "search", space, "--run-dir", run, "--quiet").returncode == 0
    shutil.move(models, tmp_path / "elsewhere")
    report = cli(capsys, "report", run)
    assert report.returncode == 0, report.stderr
    exported = cli(capsys, "export", run)
    assert exported.returncode == 0, exported.stderr
    assert (run / "best.yaml").is_file()


def test_models_with_the_same_folder_name_get_distinct_genes(search_setup, tmp_path):
    """.../math/checkpoint-1000 and .../code/checkpoint-1000 used to share one weight and one drop rate."""
    assert model_labels(["/a/math/checkpoint-1000", "/a/code/checkpoint-1000", "/a/x/m3"]) == [
        "math/checkpoint-1000", "code/checkpoint-1000", "m3"]
    assert model_labels(["/r/a/run/ckpt", "/r/b/run/ckpt"]) == ["a/run/ckpt", "b/run/ckpt"]
    assert model_labels(["/m/adder", "/m/adder"]) == ["adder#0", "adder#1"]
    for skill in ("math", "code"):
        shutil.copytree(search_setup / "models" / "m1", tmp_path / skill / "checkpoint-1000")
    space = load_space(write_space(search_setup, "same-name", models=[
        str(tmp_path / "math" / "checkpoint-1000"), str(tmp_path / "code" / "checkpoint-1000")]))
    names = [g.name for g in space.genes()]
    assert len(set(names)) == len(names) == 4
    assert "w.math/checkpoint-1000" in names and "d.code/checkpoint-1000" in names
    recipe = space.recipe([0.1, 0.9, 0.2, 0.8])
    assert [m.parameters["weight"] for m in recipe.models] == [0.1, 0.9]
