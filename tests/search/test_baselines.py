"""Baselines before the search, finalists validated after it, and the run's verdict line (tiny real models)."""

import math
import re

import pytest
import yaml
from helpers import write_space
from optuna.trial import TrialState

from optimizer.cli import main
from optimizer.errors import MergeoptError
from optimizer.evaluate import stats
from optimizer.evaluate.tasks import load_task_set
from optimizer.export import export_run
from optimizer.recipe import Recipe
from optimizer.run import load_run
from optimizer.search.loop import run_search
from optimizer.space import load_space, parse_space

LINE = re.compile(r"^best \(validated\) (\d\.\d{3}) \+- (\d\.\d{3}) vs best baseline (.+) (\d\.\d{3}): "
                  r"(better by [\d.]+ s\.e\.|worse by [\d.]+ s\.e\.|within noise) \(paired, (\d+) validation items\)$")


@pytest.fixture(scope="module")
def searched(search_setup, tmp_path_factory):
    """One short CMA-ES run with the default baselines and two finalists."""
    run_dir = tmp_path_factory.mktemp("baselines") / "run"
    space = load_space(write_space(search_setup, "verdict", optimizer={"name": "cma", "popsize": 4},
                                   baselines="default", validation={"finalists": 2}))
    result = run_search(space, run_dir, progress=False)
    return space, run_dir, result


def _by_hand(a: dict, b: dict, tasks: list[str]) -> tuple[float, float]:
    """The paired difference of the task means (weights 1/T) and its standard error, written out."""
    diff, var = 0.0, 0.0
    for task in tasks:
        d = [x - y for x, y in zip(a[task], b[task], strict=True)]
        n = len(d)
        mean = sum(d) / n
        diff += mean / len(tasks)
        var += (sum((x - mean) ** 2 for x in d) / (n - 1) / n) / len(tasks) ** 2
    return diff, math.sqrt(var)


def test_baselines_are_recorded_apart_from_the_optimisers_trials(searched):
    space, run_dir, result = searched
    study = result.study
    assert len(study.get_trials()) == 4  # the budget: baselines are no trials
    baselines = study.user_attrs["baselines"]
    assert list(baselines) == ["parent base", "parent m1", "parent m2", "parent m3", "task_arithmetic w=0.2",
                               "task_arithmetic w=0.4",
                               "task_arithmetic w=0.6", "task_arithmetic w=0.8", "task_arithmetic w=1",
                               "dare_ties w=1 density=0.5 (defaults)"]
    recipes = {t.user_attrs["recipe"] for t in study.get_trials()}
    for label, record in baselines.items():
        assert record["scores"]["gen"]["n"] == 12 and len(record["items"]["mc"]) == 12  # the candidates' items
        assert record["seconds"] >= 0 and record.get("recipe") not in recipes
        values = [record["scores"][t]["value"] for t in ("gen", "mc")]
        assert record["scalarized"] == pytest.approx(sum(values) / 2)
        assert stats.mean_se(stats.unpack(record["items"]["mc"]))[0] == pytest.approx(values[1])
    ta = Recipe.from_dict(yaml.safe_load(baselines["task_arithmetic w=0.8"]["recipe"]))
    assert ta.merge_method == "task_arithmetic" and {m.parameters["weight"] for m in ta.models} == {0.8}
    # the parents' baseline records are the parents' own scores
    assert baselines["parent m1"]["scores"] == result.parents["m1"]["scores"]


def test_finalists_are_rescored_on_validation_items_disjoint_from_the_search(searched, search_setup):
    space, run_dir, result = searched
    record = result.study.user_attrs["validation"]
    search = load_task_set(space.tasks, limit=12, seed=0)
    validation = load_task_set(space.tasks, limit=12, seed=0, split="validation")
    test = load_task_set(space.tasks, limit=12, seed=0, holdout=True)
    prompts = [{r.prompt for r in ts.tasks[0].generation} for ts in (search, validation, test)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    assert sum(map(len, prompts)) == 30  # the three ranges cover the task's 30 items
    assert record["items"] == {"gen": 9, "mc": 9} and len(record["trials"]) == 2
    run = load_run(run_dir)
    ranked = sorted((t for t in run.records if t.state == TrialState.COMPLETE),
                    key=lambda t: (-t.user_attrs["scalarized"], t.number))
    assert set(record["trials"]) == {str(t.number) for t in ranked[:2]}  # the two best by search score
    for number, rec in record["trials"].items():
        assert rec["scores"]["gen"]["n"] == 9 and len(rec["items"]["gen"]) == 9
    (label,) = record["baselines"]  # the best baseline by search score, validated too
    best_label = max(result.study.user_attrs["baselines"].items(), key=lambda kv: kv[1]["scalarized"])[0]
    assert label == best_label
    # best.yaml is the finalist best on validation
    exported = export_run(run_dir)
    best = max(record["trials"].items(), key=lambda kv: (kv[1]["scalarized"], -int(kv[0])))
    assert exported.best.trial == int(best[0])
    assert yaml.safe_load((run_dir / "best.yaml").read_text())["mergeopt"]["trial"] == int(best[0])


def test_the_verdict_line_is_the_paired_comparison_of_the_recorded_items(searched, capsys):
    space, run_dir, result = searched
    line = export_run(run_dir).line
    match = LINE.match(line)
    assert match, line
    record = result.study.user_attrs["validation"]
    best = max(record["trials"].items(), key=lambda kv: (kv[1]["scalarized"], -int(kv[0])))[1]
    label = match.group(3)
    base = record["baselines"][label]
    mine = {t: stats.unpack(best["items"][t]) for t in ("gen", "mc")}
    theirs = {t: stats.unpack(base["items"][t]) for t in ("gen", "mc")}
    own = sum(sum(v) / len(v) for v in mine.values()) / 2
    own_se = math.sqrt(sum(stats.mean_se(v)[1] ** 2 for v in mine.values()) / 4)
    diff, se = _by_hand(mine, theirs, ["gen", "mc"])
    assert float(match.group(1)) == pytest.approx(own, abs=5e-4)
    assert float(match.group(2)) == pytest.approx(own_se, abs=5e-4)
    assert float(match.group(4)) == pytest.approx(own - diff, abs=5e-4)
    assert int(match.group(6)) == 18
    z = diff / se if se else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    words = match.group(5)
    if abs(z) < 2:
        assert words == "within noise"
    else:
        assert words == f"{'better' if z > 0 else 'worse'} by {abs(z):.1f} s.e."
    # the report says the same, as the summary's last line
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == line and out[-1].startswith("report: ")
    html = (run_dir / "report.html").read_text()
    assert "Search against baselines" in html and "finalists" in html


def test_paired_standard_error_by_hand():
    a = {"x": [1, 1, 0, 1, 0, 1, 1, 1], "y": [0.5, 0.25, 1.0, 0.0]}
    b = {"x": [1, 0, 0, 1, 0, 0, 1, 0], "y": [0.5, 0.0, 0.5, 0.0]}
    coefs = stats.coefficients([("x", True), ("y", True)], {"x": 1, "y": 3})
    comparison = stats.compare(a, b, coefs)
    # x: differences 0,1,0,0,0,1,0,1: mean 3/8, sample var (5*(3/8)^2 + 3*(5/8)^2)/7 = 15/56
    # y: differences 0,0.25,0.5,0: mean 3/16, sample var ((3/16)^2*2 + (1/16)^2 + (5/16)^2)/3 = 11/192
    diff = 0.25 * 3 / 8 + 0.75 * 3 / 16
    se = math.sqrt(0.25 ** 2 * (15 / 56) / 8 + 0.75 ** 2 * (11 / 192) / 4)
    assert comparison.difference.value == pytest.approx(diff)
    assert comparison.difference.se == pytest.approx(se)
    assert comparison.difference.n == 12
    assert comparison.words() == ("within noise" if diff / se < 2 else f"better by {diff / se:.1f} s.e.")
    assert stats.Estimate(0.026, 0.01, 600).words() == "better by 2.6 s.e."
    assert stats.Estimate(-0.03, 0.01, 600).words() == "worse by 3.0 s.e."
    assert stats.Estimate(0.019, 0.01, 600).words() == "within noise"
    assert stats.unpack(stats.pack([1.0, 0.0, 1.0])) == [1.0, 0.0, 1.0] and stats.pack([1.0, 0.0]) == "10"
    assert stats.unpack(stats.pack([0.5, 1.0])) == [0.5, 1.0]
    with pytest.raises(ValueError, match="not the same items"):
        stats.paired([1.0], [1.0, 0.0])


def test_baselines_none_and_a_warm_start_from_an_expressible_baseline(search_setup, tmp_path):
    space = load_space(write_space(search_setup, "nobase", baselines="none", validation={"finalists": 1},
                                   budget={"trials": 2}))
    result = run_search(space, tmp_path / "none", progress=False)
    assert "baselines" not in result.study.user_attrs
    exported = export_run(tmp_path / "none")
    assert exported.line.endswith(f"(trial {exported.best.trial}; baselines: none; 18 validation items)")
    # task arithmetic at one weight, expressible by a task_arithmetic space: its first trial starts there
    space = load_space(write_space(search_setup, "warm", merge_method="task_arithmetic", optimizer={"name": "tpe"},
                                   baselines=[{"method": "task_arithmetic", "weight": 0.6}], budget={"trials": 2}))
    result = run_search(space, tmp_path / "warm", progress=False)
    assert result.study.user_attrs["warm_start"] == "task_arithmetic w=0.6"
    first = Recipe.from_dict(yaml.safe_load(result.study.get_trials()[0].user_attrs["recipe"]))
    assert [m.parameters["weight"] for m in first.models] == [0.6, 0.6, 0.6]
    assert len(result.study.get_trials()) == 2


def test_export_validate_rescores_the_finalists_of_a_run_that_validated_none(search_setup, tmp_path, capsys):
    path = write_space(search_setup, "later", validation={"finalists": 0}, budget={"trials": 3},
                       baselines=["task_arithmetic"])
    # the command line: the search's last line is its verdict (here: nothing validated, and why)
    assert main(["search", str(path), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.match(r"^best \(search\) \d\.\d{3} \+- \d\.\d{3} vs best baseline task_arithmetic w=[\d.]+ \d\.\d{3}: "
                    r"(within noise|better by|worse by).* \(paired, 24 search items, not validated: validation: "
                    r"\{finalists: 0\}\)$", last), last
    assert main(["export", str(tmp_path / "run"), "--validate", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert LINE.match(out[-1]), out[-1]
    study = load_run(tmp_path / "run").study
    assert len(study.user_attrs["validation"]["trials"]) == 2


def test_bad_baselines_and_validation_keys_are_one_line_each():
    base = {"base_model": "b", "models": ["m"], "objectives": ["a"]}
    for extra, fragment in [({"baselines": "all"}, "must be default, none or a non-empty list"),
                            ({"baselines": [{"methd": "linear"}]}, "unknown key 'methd' (did you mean 'method'?)"),
                            ({"baselines": [{"method": "linear", "recipe": "r.yaml"}]}, "either 'method'"),
                            ({"baselines": ["parent"]}, "'parent' is not one of parents, task_arithmetic, own"),
                            ({"validation": {"finalist": 2}}, "did you mean 'finalists'"),
                            ({"validation": {"finalists": -1}}, "validation.finalists")]:
        with pytest.raises(MergeoptError, match=re.escape(fragment)) as info:
            parse_space({**base, **extra}, resolve_models=False)
        assert "\n" not in str(info.value)


def test_default_baselines_of_a_space_and_no_recipe_twice():
    from optimizer.search.baselines import baselines_of, genome_of

    base = {"base_model": "b", "models": ["m1", "m2"], "objectives": ["a"]}
    dare = parse_space({**base, "merge_method": "dare_ties"}, resolve_models=False)
    labels = [b.label for b in baselines_of(dare, ["base", "m1", "m2"])]
    assert labels == ["parent base", "parent m1", "parent m2", "task_arithmetic w=0.2", "task_arithmetic w=0.4",
                      "task_arithmetic w=0.6",
                      "task_arithmetic w=0.8", "task_arithmetic w=1", "dare_ties w=1 density=0.5 (defaults)"]
    own = baselines_of(dare, ["base", "m1", "m2"])[-1].recipe
    assert genome_of(dare, own) == {g.name: g.unit(1.0 if g.param == "weight" else 0.5) for g in dare.genes()}
    # a task_arithmetic space's own default is task arithmetic at weight 1: scored once
    ta = parse_space({**base, "merge_method": "task_arithmetic"}, resolve_models=False)
    assert [b.label for b in baselines_of(ta, ["base", "m1", "m2"])][-1] == "task_arithmetic w=1"
    assert baselines_of(parse_space({**base, "baselines": "none"}, resolve_models=False), ["base"]) == []
