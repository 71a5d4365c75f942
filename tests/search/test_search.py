"""The search loop on tiny real models: trials in the study, export, bit-exact re-merge, resume."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import optuna
import pytest
import torch
import yaml
from helpers import write_space
from optuna.trial import TrialState
from safetensors.torch import load_file

from optimizer.evaluate.scoring import evaluate_candidate, make_backend
from optimizer.evaluate.tasks import load_task_set
from optimizer.export import export_run
from optimizer.merge.engine import MergeEngine
from optimizer.recipe import Recipe
from optimizer.search.loop import run_search
from optimizer.space import load_space


def run(space_path, run_dir, **overrides):
    space = load_space(space_path, overrides)
    return space, run_search(space, run_dir, progress=False)


def test_search_records_every_trial_and_exports_the_front(search_setup, tmp_path):
    space, result = run(write_space(search_setup, "basic", optimizer={"name": "tpe"}), tmp_path / "run")
    trials = result.study.get_trials()
    assert len(trials) == 4 and result.new_trials == 4
    for t in trials:
        assert t.state == TrialState.COMPLETE
        assert set(t.user_attrs["scores"]) == {"gen", "mc"} and t.user_attrs["scores"]["mc"]["n"] == 12
        assert t.user_attrs["fidelity"] == "full" and "swap" in t.user_attrs["seconds"]
        Recipe.from_dict(yaml.safe_load(t.user_attrs["recipe"]))
    assert set(result.parents) == {"base", "m1", "m2", "m3"}
    exported = export_run(tmp_path / "run")
    assert exported.front and (tmp_path / "run" / "best.yaml").is_file()
    assert (tmp_path / "run" / "pareto" / "front.csv").read_text().startswith("trial,gen,mc,scalarized,file")
    assert len((tmp_path / "run" / "trials.csv").read_text().splitlines()) == 5


def test_exported_recipe_remerges_bit_for_bit_and_rescores_the_same(search_setup, tmp_path):
    space, result = run(write_space(search_setup, "exact"), tmp_path / "run")
    exported = export_run(tmp_path / "run")
    best = Recipe.load(exported.best.path)
    recorded = best.info["scores"]
    # the CLI merge of the exported YAML ...
    out = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "optimizer.cli", "merge", str(exported.best.path), "--out", str(out)],
                   check=True, capture_output=True)
    merged = load_file(out / "model.safetensors")
    # ... equals the weights the search scored (rebuilt from the study's own recipe text)
    trial = result.study.get_trials()[best.info["trial"]]
    engine = MergeEngine(space.base_model, space.models, device="cpu")
    scored = engine.state_dict(Recipe.from_dict(yaml.safe_load(trial.user_attrs["recipe"])))
    for name, tensor in scored.items():
        assert torch.equal(merged[name], tensor), name
    # and scoring the merged folder gives the recorded scores
    task_set = load_task_set(space.tasks, limit=space.limit, seed=space.seed)
    rescored = evaluate_candidate(make_backend("hf", out, device="cpu"), task_set)
    for task, s in rescored.scores.items():
        assert s.value == recorded[task]["value"]


def test_rerunning_continues_the_study_without_duplicates(search_setup, tmp_path):
    path = write_space(search_setup, "resume", optimizer={"name": "nsga2", "population_size": 4})
    run(path, tmp_path / "run", trials=3)
    _, result = run(path, tmp_path / "run", trials=6)
    assert result.new_trials == 3
    trials = result.study.get_trials()
    assert [t.number for t in trials] == list(range(6))
    genomes = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(genomes)) == 6


@pytest.mark.slow  # resumes are also killed and continued in tests/reliability (slow): the slow tier (CI runs it) keeps the fast tier under 3 minutes
def test_cma_resumes_the_same_run(search_setup, tmp_path):
    """Two invocations of 4 + 4 trials ask CMA for exactly the candidates one run of 8 asks for."""
    path = write_space(search_setup, "cma", optimizer={"name": "cma", "popsize": 4}, objectives=["mc"])
    _, straight = run(path, tmp_path / "straight", trials=8)
    run(path, tmp_path / "split", trials=4)
    _, split = run(path, tmp_path / "split", trials=8)
    a = [t.params for t in straight.study.get_trials()]
    b = [t.params for t in split.study.get_trials()]
    assert a == b
    assert split.study.user_attrs["cma:told"] == 1  # both generations were told to CMA


def test_changed_space_is_refused(search_setup, tmp_path):
    from optimizer.errors import MergeoptError

    run(write_space(search_setup, "changed"), tmp_path / "run", trials=1)
    with pytest.raises(MergeoptError, match="different search space"):
        run(write_space(search_setup, "changed", limit=10), tmp_path / "run", trials=2)


def test_objective_naming_a_missing_task_is_refused_before_work(search_setup, tmp_path):
    from optimizer.errors import MergeoptError

    with pytest.raises(MergeoptError, match="objective task 'nope' is not in the task set"):
        run(write_space(search_setup, "missing", objectives=["gen", "nope"]), tmp_path / "run")


def test_multi_fidelity_records_the_subset_each_trial_was_scored_on(search_setup, tmp_path):
    _, result = run(write_space(search_setup, "mf", fidelity={"low": 4, "promote": 0.3}, objectives=["mc"],
                                budget={"trials": 6}), tmp_path / "run")
    for t in result.study.get_trials():
        assert t.user_attrs["low_scores"]["mc"]["n"] == 4
        n = t.user_attrs["scores"]["mc"]["n"]
        assert n == (12 if t.user_attrs["fidelity"] == "full" else 4)


def test_promotion_rule_keeps_the_top_fraction():
    from optimizer.search.loop import _promote
    from optimizer.space import SearchSpace

    study = optuna.create_study(direction="maximize")
    for v in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]:
        study.add_trial(optuna.trial.create_trial(value=v, user_attrs={"low_value": v}))
    space = SearchSpace(name="x", base_model="b", models=["m"], fidelity_low=4, fidelity_promote=0.3)
    assert _promote(study, space, 0.85) and _promote(study, space, 0.8)
    assert not _promote(study, space, 0.75) and not _promote(study, space, 0.1)
    assert _promote(optuna.create_study(), space, 0.0)  # too little history: always promote


@pytest.mark.slow  # a kill suite: `pytest -m slow`
def test_kill_minus_9_loses_at_most_the_candidate_in_flight(search_setup, tmp_path):
    path = write_space(search_setup, "killed", optimizer={"name": "cma", "popsize": 4}, objectives=["mc"],
                       budget={"trials": 8})
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "optimizer.cli", "search", str(path), "--run-dir", str(run_dir), "--quiet"]
    log = tmp_path / "stderr.txt"
    # each candidate 0.5 s slower (a testing fault): the kill lands mid-run however fast the machine is
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                env=dict(os.environ, MERGEOPT_FAULT="slow=0.5@trial:0-99"))
    db, study = run_dir / "study.db", None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if db.exists():
            try:
                study = optuna.load_study(study_name="killed", storage=f"sqlite:///{db}")
                if len(study.get_trials(states=(TrialState.COMPLETE,))) >= 2:
                    break
            except Exception:
                pass
    proc.kill()  # (a no-op when it has ended: the assertion below then shows why)
    proc.wait()
    assert study is not None and proc.returncode == -signal.SIGKILL, (proc.returncode, log.read_text())
    completed_before = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert 2 <= len(completed_before) < 8  # killed mid-run
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert completed_before <= {t.number for t in complete}  # nothing completed was lost
    assert len(complete) == 8  # the budget is met: the lost candidate did not spend it
    assert len(trials) - len(complete) <= 1  # at most the candidate in flight failed
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert study.user_attrs["cma:told"] >= 1


def test_a_new_study_database_appears_with_all_its_tables(search_setup, tmp_path):
    """A reader polling the run (report, dashboard, a script) must never find a half-made database: if it did, its
    own Optuna would create the missing tables and the search's table creation would collide with it (seen in CI:
    1 start in 30 failed with a reader polling). A read-only observer watches the file while the study is made."""
    from optimizer.search.loop import open_study

    space = load_space(write_space(search_setup, "schema"))
    runs, seen = [tmp_path / f"run{i}" for i in range(5)], []
    for run in runs:
        run.mkdir()
    done = threading.Event()

    def observe():
        while not done.is_set():
            for run in runs:
                db = run / "study.db"
                if db.exists():
                    try:
                        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                            seen.append(frozenset(r[0] for r in con.execute("SELECT name FROM sqlite_master "
                                                                            "WHERE type = 'table'")))
                    except sqlite3.OperationalError:  # locked while the study row is written: look again
                        pass

    watcher = threading.Thread(target=observe)
    watcher.start()
    try:
        for run in runs:
            open_study(space, run)
    finally:
        done.set()
        watcher.join()
    full = {"studies", "trials", "trial_values", "trial_params", "alembic_version"}
    assert seen and all(full <= tables for tables in seen), sorted(map(sorted, {s for s in seen if not full <= s}))


def test_log_lines_of_a_worker_on_shared_storage_carry_its_id():
    import logging

    from optimizer.search.loop import _worker_prefix, log

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log.addHandler(handler)
    level, log.level = log.level, logging.INFO
    try:
        with _worker_prefix("node1:123:cuda:0"):
            log.info("trial %d was failed as stale by another worker; moving on", 7)
        log.info("after the run")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert lines == ["[node1:123:cuda:0] trial 7 was failed as stale by another worker; moving on", "after the run"]
