"""The validated configuration is the object the code holds (issue 19): the command line's overrides are checked
like the file's values, optimiser settings are typed, the space is frozen, and misspelt keys get the nearest name."""

import dataclasses

import pytest
import yaml
from helpers import assert_one_line_error, run_cli, write_space

from optimizer.catalogue import CATALOGUE
from optimizer.errors import MergeoptError
from optimizer.space import load_space


def test_a_bad_override_is_refused_like_a_bad_value_before_the_run_folder_exists(search_setup, tmp_path):
    """`--minutes -1` used to be written onto the space after validation: the run loaded models, scored the parents
    and recorded `minutes: -1.0`, and its export and every later report failed."""
    space = write_space(search_setup, "minus")
    run_dir = tmp_path / "run"
    proc = run_cli("search", space, "--minutes", "-1", "--run-dir", run_dir, "--quiet")
    assert_one_line_error(proc, "--minutes: must be a positive number, got -1.0")
    assert not run_dir.exists()
    proc = run_cli("search", space, "--trials", "0", "--run-dir", run_dir, "--quiet")
    assert_one_line_error(proc, "--trials: must be a positive integer, got 0")
    assert not run_dir.exists()


def test_overrides_are_part_of_the_validated_space(search_setup):
    path = write_space(search_setup, "ov", optimizer={"name": "cma", "popsize": 6})
    space = load_space(path, {"trials": 7, "minutes": 2.5, "seed": 3})
    assert (space.trials, space.minutes, space.seed) == (7, 2.5, 3)
    assert space.optimizer_settings.popsize == 6  # the file's settings stay with the file's optimizer
    other = load_space(path, {"optimizer": "tpe"})  # another optimizer: the file's cma settings do not apply to it
    assert other.optimizer == "tpe" and other.optimizer_settings == CATALOGUE["tpe"].settings()
    assert other.config()["optimizer"] == {"name": "tpe"}


@pytest.mark.parametrize("settings,message", [
    ({"name": "cma", "popsize": "eight"}, r"optimizer.popsize: must be a positive integer, got 'eight'"),
    ({"name": "cma", "sigma0": 1.5}, r"optimizer.sigma0: must be a fraction in \(0, 1\], got 1.5"),
    ({"name": "tpe", "n_startup_trials": 0}, r"optimizer.n_startup_trials: must be a positive integer, got 0"),
    ({"name": "nsga2", "population_size": 1}, r"optimizer.population_size: must be an integer of at least 2, got 1"),
    ({"name": "random", "popsize": 4}, r"optimizer.popsize: is not a setting of random; allowed: none"),
])
def test_optimizer_settings_are_typed_and_checked_with_the_space(search_setup, tmp_path, settings, message):
    """`popsize: eight` used to pass validation, create space.yaml and study.db, then fail with int()."""
    path = write_space(search_setup, "opt", optimizer=settings)
    with pytest.raises(MergeoptError, match=message):
        load_space(path)


def test_a_typo_of_a_required_key_is_answered_with_the_nearest_name(search_setup):
    path = search_setup / "typo.yaml"
    data = yaml.safe_load(write_space(search_setup, "typo").read_text())
    data["objectivs"] = data.pop("objectives")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MergeoptError, match=r"unknown key 'objectivs' \(did you mean 'objectives'\?\)"):
        load_space(path)


def test_the_validated_space_is_frozen(search_setup):
    space = load_space(write_space(search_setup, "frozen"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        space.trials = 99  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen"):
        space.optimizer_settings.popsize = 3  # pydantic: frozen instance
    assert space.num_layers == 2 and space.facts()["num_layers"] == 2  # resolved before the space was built


def test_every_key_hint_comes_from_the_schema():
    from optimizer.space import _KEYS, SpaceConfig

    assert all(field.description for field in SpaceConfig.model_fields.values())
    assert _KEYS == {name: field.description for name, field in SpaceConfig.model_fields.items()}


def test_one_layer_depth_is_mergekits_in_the_engine_and_the_report(search_setup):
    """A one-layer model's layer sits at t = 1 (mergekit's plan); the report read it at 0 while the engine built 1."""
    from optimizer.recipe import relative_depth
    from optimizer.report import layer_values

    assert relative_depth(0, 1) == 1.0 and relative_depth(None, 1) == 0.0 and relative_depth(2, 5) == 0.5
    space = dataclasses.replace(load_space(write_space(search_setup, "depth", granularity={"gradient": 2},
                                                       merge_method="task_arithmetic")), num_layers=1)
    recipe = space.recipe([0.0, 1.0] * 3)  # each model's weight goes 0 -> 1 over depth
    weights = layer_values(recipe, space)["weight"]
    assert all(series == [1.0] for series in weights.values()), weights


def test_a_run_that_spent_its_budget_says_so(search_setup, tmp_path, caplog):
    import logging

    from optimizer.search.loop import run_search

    path = write_space(search_setup, "spent", budget={"trials": 2}, limit=4, baselines="none",
                       validation={"finalists": 0})
    run_search(load_space(path), tmp_path / "run", progress=False)
    with caplog.at_level(logging.INFO, logger="mergeopt"):
        again = run_search(load_space(path, {"trials": 2}), tmp_path / "run", progress=True)
    assert again.new_trials == 0
    assert "the run has spent its budget (2 of 2 trials); raise it with --trials to search on" in caplog.text
