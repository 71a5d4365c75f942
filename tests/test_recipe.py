"""Recipes: mergekit YAML round trips, mergekit's parameter semantics, clear errors."""

import pytest
import yaml

from optimizer.errors import MergeoptError
from optimizer.recipe import ModelSpec, Recipe, resolve_parameter, resolve_setting

MERGEKIT_FILE = """
merge_method: dare_ties
base_model: /m/base
models:
  - model: /m/a
    parameters:
      weight: 0.7
      density: [0.9, 0.5, 0.1]
  - model: /m/b
    parameters:
      weight:
        - filter: self_attn
          value: 0.2
        - value: 0.4
      density: 0.5
parameters:
  int8_mask: true
dtype: bfloat16
"""


def test_plain_mergekit_file_reads_with_mergekit_rescale():
    recipe = Recipe.from_dict(yaml.safe_load(MERGEKIT_FILE))
    assert recipe.merge_method == "dare_ties"
    assert recipe.rescale == "l1"  # what mergekit does for rescale: true (its default)
    assert recipe.seed == 0
    assert [m.model for m in recipe.models] == ["/m/a", "/m/b"]
    assert recipe.models[1].parameters["weight"][0] == {"filter": "self_attn", "value": 0.2}
    assert recipe.parameters == {"int8_mask": True}
    off = yaml.safe_load(MERGEKIT_FILE)
    off["parameters"]["rescale"] = False
    assert Recipe.from_dict(off).rescale == "none"


def test_round_trip_keeps_everything(tmp_path):
    recipe = Recipe.from_dict(yaml.safe_load(MERGEKIT_FILE))
    recipe.rescale, recipe.seed = "dare", 42
    recipe.info = {"trial": 7, "scores": {"add": 0.61}}
    path = recipe.save(tmp_path / "r.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["mergeopt"] == {"seed": 42, "rescale": "dare", "trial": 7, "scores": {"add": 0.61}}
    assert data["parameters"]["rescale"] is True  # mergekit's own switch stays on
    again = Recipe.load(path)
    assert again == recipe


def test_gradient_interpolates_like_mergekit():
    assert resolve_setting([0.9, 0.5, 0.1], "x", 0.0) == 0.9
    assert resolve_setting([0.9, 0.5, 0.1], "x", 1.0) == 0.1
    assert resolve_setting([0.9, 0.5, 0.1], "x", 0.25) == pytest.approx(0.7)
    assert resolve_setting([0.0, 1.0], "x", 1 / 3) == pytest.approx(1 / 3)
    assert resolve_setting(0.3, "x", 0.5) == 0.3


def test_filters_pick_the_first_match_and_scopes_fall_back():
    setting = [{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "self_attn", "value": 0.2}]
    assert resolve_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.2
    assert resolve_setting(setting, "model.norm.weight", 0.5) is None
    scopes = [{"weight": setting}, {"weight": 0.9}]
    assert resolve_parameter("weight", scopes, "model.norm.weight", 0.0) == 0.9
    assert resolve_parameter("density", scopes, "model.norm.weight", 0.0, default=1.0) == 1.0


@pytest.mark.parametrize("data,message", [
    ({"merge_method": "slerp", "base_model": "b", "models": ["a"]}, "merge_method slerp runs through mergekit"),
    ({"merge_method": "sleep", "base_model": "b", "models": ["a"]}, "not a merge method; did you mean slerp"),
    ({"merge_method": "ties", "models": ["a"]}, "needs a base_model"),
    ({"merge_method": "ties", "base_model": "b", "models": []}, "lists no models"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "wieght": 1}, "unknown key 'wieght'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": "x y"}}],
      "mergeopt": {"sed": 1}}, "unknown key mergeopt.sed"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": [{"v": 1}]}}]},
     r"models\[0\]\.parameters\.weight: expected a number"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"parameters": {}}]}, r"models\[0\] needs a 'model' key"),
    ({"merge_method": "dare_ties", "base_model": "b", "models": ["a"], "mergeopt": {"rescale": "l3"}},
     "mergeopt.rescale 'l3' is not valid"),
])
def test_bad_recipes_name_the_problem(data, message):
    with pytest.raises(MergeoptError, match=message):
        Recipe.from_dict(data)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(MergeoptError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nmodels: [a\n")
    with pytest.raises(MergeoptError, match=r"not valid YAML \(line"):
        Recipe.load(bad)


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "models" / "base").mkdir()
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: task_arithmetic\nbase_model: models/base\nmodels:\n"
                    "  - model: models/a\n    parameters: {weight: 1.0}\n")
    recipe = Recipe.load(path)
    assert recipe.base_model == str((tmp_path / "models" / "base").resolve())
    assert recipe.models[0].model == str((tmp_path / "models" / "a").resolve())


def test_delta_models_skip_the_base_except_for_linear():
    models = [ModelSpec("/m/base", {"weight": 0.5}), ModelSpec("/m/a", {"weight": 0.5})]
    assert [i for i, _ in Recipe("task_arithmetic", models, base_model="/m/base").delta_models()] == [1]
    assert [i for i, _ in Recipe("linear", models, base_model="/m/base").delta_models()] == [0, 1]
