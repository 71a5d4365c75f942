"""load_run, trials.csv, the terminal summary and the HTML report on a finished tiny run."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

import optimizer
from optimizer.cli import main
from optimizer.export import export_run
from optimizer.report import (MIN_IMPORTANCE_TRIALS, layer_values, load_run, param_importances, plot_front,
                              render_html, summarize)


def test_load_run_is_the_trials_csv_table_and_the_exported_front(report_run):
    run = optimizer.load_run(report_run)  # the public, lazily imported entry point
    assert isinstance(run, optimizer.Run)
    trials = run.trials
    assert list(trials["trial"]) == list(range(10)) and set(trials["state"]) == {"COMPLETE"}
    for column in ("fidelity", "on_front", "scalarized", "gen", "gen_stderr", "gen_n", "mc", "mc_error",
                   "objective_0", "objective_1", "seconds_swap", "seconds_score", "duration_s", "started"):
        assert column in trials.columns, column
    # trials.csv is this very table (one builder), written by export from the same study
    assert (report_run / "trials.csv").read_text() == trials.to_csv(index=False)
    # the front is what export wrote to pareto/
    exported = sorted(int(p.stem.split("-")[1]) for p in (report_run / "pareto").glob("trial-*.yaml"))
    assert sorted(run.front["trial"]) == exported and exported
    assert list(trials.loc[trials["on_front"], "trial"].sort_values()) == exported
    assert all((report_run / f).is_file() for f in run.front["file"])
    assert set(run.parents) == {"base", "m1", "m2", "m3"}


def test_recipe_parameters_are_flattened_in_their_own_units(report_run):
    run = load_run(report_run)
    row = run.trials.iloc[3]
    recipe = yaml.safe_load(run.study.trials[3].user_attrs["recipe"])
    m1 = next(m for m in recipe["models"] if m["model"].endswith("m1"))
    # layer_groups: 2 over the 2 layers of the tiny model: layer i takes group i
    assert m1["parameters"]["weight"] == [row["weight.m1.g0"], row["weight.m1.g1"]]
    assert [1 - d for d in m1["parameters"]["density"]] == pytest.approx(
        [row["drop_rate.m1.g0"], row["drop_rate.m1.g1"]], abs=1e-6)
    assert 0 <= row["gene.w.m1.g0"] <= 1  # the raw genome is there too
    values = layer_values(run.recipe(3), run.space)
    assert values["weight"]["m1"] == m1["parameters"]["weight"]
    assert set(values) == {"weight", "drop_rate"} and set(values["weight"]) == {"m1", "m2", "m3"}


def test_summary_lists_front_best_per_task_hypervolume_and_budget(report_run):
    text = summarize(load_run(report_run))
    assert "budget: 10/10 trials (0 failed)" in text
    assert re.search(r"hypervolume: [0-9.e-]+ \(reference", text)
    assert re.search(r"^  mc +[0-9.]+ +\d+ +[0-9.]+ \(m\d\)$", text, re.M)  # best merge, its trial, best parent
    assert "Pareto front (" in text and "pareto/trial-" in text


def test_report_command_writes_a_self_contained_html(report_run, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "report.html"
    assert main(["report", str(report_run), "--html", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and f"report: {out}" in printed
    page = out.read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [alt for alt, _ in images] == ["Pareto front", "best so far and hypervolume against evaluations",
                                          "parameter importance",
                                          "per-layer weights and drop rates of the front&#x27;s recipes"]
    assert all(len(data) > 1000 for _, data in images)
    assert not re.search(r"(src|href)=\"(https?:|//)", page) and "<script" not in page  # opens offline
    links = re.findall(r'href="([^"]+\.yaml)"', page)
    assert links and all((out.parent / link).resolve().is_file() for link in links)
    assert "fANOVA" in page or "PED-ANOVA" in page
    # the default location is the run folder
    assert main(["report", str(report_run)]) == 0 and (report_run / "report.html").is_file()


def test_report_of_a_folder_that_is_not_a_run_is_one_error_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mergeopt report: error: {tmp_path} is not a run folder (no space.yaml); "
                   "run 'mergeopt search' first"]


def test_few_trials_give_a_note_instead_of_importances(report_run):
    run = load_run(report_run)
    front = set(run.front["trial"])
    keep = (sorted(front) + [t.number for t in run.records if t.number not in front])[:MIN_IMPORTANCE_TRIALS - 1]
    few = dataclasses.replace(run, records=[t for t in run.records if t.number in keep])
    importances, note = param_importances(few)
    assert importances == {} and f"at least {MIN_IMPORTANCE_TRIALS}" in note
    page = render_html(few, report_run / "few.html")
    assert note in page and page.count("<img") == 3
    importances, note = param_importances(run)
    assert "scalarized" in importances and set(importances["scalarized"]) == {
        c for c in run.trials.columns if c.startswith(("weight.", "drop_rate."))}


def test_one_objective_and_an_empty_study_still_report(report_run, tmp_path):
    run = load_run(report_run)
    single = dataclasses.replace(run, space=dataclasses.replace(run.space, objectives=run.space.objectives[:1]))
    assert plot_front(single)[:8] == b"\x89PNG\r\n\x1a\n"
    empty = dataclasses.replace(run, records=[], trials=run.trials.iloc[0:0], front=run.front.iloc[0:0])
    assert "no completed full-fidelity trial yet" in summarize(empty)
    page = render_html(empty, tmp_path / "r.html")
    assert "<img" not in page and "no front yet" in page


def test_low_fidelity_trials_are_in_the_table_but_not_on_the_front(low_fidelity_run):
    export_run(low_fidelity_run)
    run = load_run(low_fidelity_run)
    low = run.trials[run.trials["fidelity"] == "low"]
    assert len(low) >= 1 and not low["on_front"].any() and low["low_scalarized"].notna().all()
    assert set(run.front["trial"]).isdisjoint(low["trial"])
    assert "low-fidelity only" in summarize(run)
    assert Path(run.path, "trials.csv").read_text() == run.trials.to_csv(index=False)
