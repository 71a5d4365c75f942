"""Search spaces: validation names the key; genomes map onto recipes with the right shapes and bounds."""

import pytest
import yaml
from helpers import write_space

from optimizer.errors import MergeoptError
from optimizer.space import load_space


def test_per_model_genome_maps_bounds_and_drop_rates(search_setup):
    space = load_space(write_space(search_setup, "pm", bounds={"weight": [0.2, 1.2], "drop_rate": [0.1, 0.5]}))
    genes = space.genes()
    assert space.dimension == 6 and [g.param for g in genes].count("drop_rate") == 3
    recipe = space.recipe([0.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    assert [m.parameters["weight"] for m in recipe.models] == [0.2, 0.7, 1.2]
    assert [m.parameters["density"] for m in recipe.models] == [0.9, 0.7, 0.5]
    assert recipe.merge_method == "dare_ties" and recipe.seed == 0


def test_global_layer_groups_gradient_and_modules(search_setup):
    assert load_space(write_space(search_setup, "g", granularity="global")).dimension == 2
    assert load_space(write_space(search_setup, "t", merge_method="task_arithmetic")).dimension == 3  # no drop rate
    groups = load_space(write_space(search_setup, "lg", granularity={"layer_groups": 2}, modules=["self_attn", "mlp"]))
    assert groups.dimension == 2 * 3 * 2 * 2
    recipe = groups.recipe([i / 24 for i in range(24)])
    weight = recipe.models[0].parameters["weight"]
    assert [c.get("filter") for c in weight] == ["self_attn", "mlp", None]
    assert len(weight[0]["value"]) == groups.num_layers == 2  # one value per layer (2 layers, 2 groups)
    per_layer = load_space(write_space(search_setup, "pl", granularity="per_layer", merge_method="task_arithmetic"))
    assert per_layer.dimension == 3 * 2
    gradient = load_space(write_space(search_setup, "gr", granularity={"gradient": 3}, merge_method="task_arithmetic"))
    assert gradient.recipe([0.0, 0.5, 1.0] * 3).models[0].parameters["weight"] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("override,message", [
    ({"wieghts": 1}, "unknown key 'wieghts'"),
    ({"bounds": {"weight": [1.0, 0.5]}}, r"bounds.weight: low 1.0 is above high 0.5"),
    ({"bounds": {"drop_rate": [0.0, 1.5]}}, r"bounds.drop_rate: must lie within \[0.0, 0.99\]"),
    ({"bounds": {"density": [0.1, 0.2]}}, "bounds: unknown entry 'density'"),
    ({"models": []}, "models: must be a non-empty list"),
    ({"granularity": "per_block"}, "granularity: 'per_block' is not valid"),
    ({"granularity": {"layer_groups": 0}}, "granularity.layer_groups: must be a positive integer"),
    ({"optimizer": {"name": "pso"}}, "optimizer.name: 'pso' is not one of cma, tpe, nsga2, random"),
    ({"optimizer": {"name": "cma", "popsize": 4, "sigma": 0.1}}, "optimizer.sigma: is not a setting of cma"),
    ({"budget": {"trials": "many"}}, "budget.trials: must be a positive integer"),
    ({"seed": 1.5}, "seed: must be an integer"),
    ({"merge_method": "linear"}, "merge_method: 'linear' cannot be searched"),
    ({"objectives": [{"task": "gen", "direction": "up"}]}, r"objectives\[0\].direction: 'up'"),
    ({"scalarization": {"nope": 1}}, "scalarization.nope: names no objective"),
    ({"fidelity": {"low": 50}}, r"fidelity.low: must be a positive integer below limit \(12\)"),
    ({"base_model": "/nowhere/at/all"}, "base_model: model folder /nowhere/at/all does not exist"),
    ({"objectivs": ["gen"]}, r"unknown key 'objectivs' \(did you mean 'objectives'\?\)"),
    ({"budget": {"trails": 3}}, r"budget: unknown entry 'trails' \(did you mean 'trials'\?\)"),
    ({"optimizer": {"name": "cma", "popsiz": 3}}, r"optimizer.popsiz: is not a setting of cma \(did you mean 'popsize'"),
    ({"objectives": [{"task": "gen", "dirction": "up"}]}, r"objectives\[0\]: unknown entry 'dirction' \(did you mean"),
    ({"limit": 0}, "limit: must be a positive integer, got 0"),
    ({"dtype": "fp8"}, "dtype: 'fp8' is not float32, bfloat16 or float16"),
    ({"merge_method": "dare_tie"}, r"did you mean 'dare_ties'"),
])
def test_bad_spaces_name_the_key(search_setup, override, message):
    with pytest.raises(MergeoptError, match=message):
        load_space(write_space(search_setup, "bad", **override))


def test_missing_keys_and_bad_yaml(search_setup):
    path = search_setup / "missing.yaml"
    path.write_text(yaml.safe_dump({"base_model": "x", "models": ["y"]}))
    with pytest.raises(MergeoptError, match="objectives: is missing"):
        load_space(path)
    path.write_text("base_model: [unclosed\n")
    with pytest.raises(MergeoptError, match="not valid YAML"):
        load_space(path)


def test_every_shipped_example_parses():
    """search_spaces/ holds search spaces (those over the embedded zoo fully resolved; those over a built family or
    real models checked without opening them: a fresh machine has no family) and one recipe; all must stay valid."""
    from pathlib import Path

    from optimizer.recipe import Recipe

    folder = Path(__file__).resolve().parents[2] / "search_spaces"
    seen = set()
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "mergeopt" in data:
            assert Recipe.load(path).models
        else:
            base = str(data["base_model"])
            zoo = base.startswith("zoo:") and "/" not in base  # the embedded zoo, not a built family (zoo:smollm2/...)
            space = load_space(path, resolve_models=zoo)
            assert space.objectives and (space.dimension > 0 if zoo else True)
        seen.add(path.stem)
    assert {"demo", "example_recipe", "per_layer", "tradeoff", "lm_eval_example"} <= seen


def test_the_declared_schema_and_the_documented_keys_agree():
    from optimizer.space import _KEYS, SpaceConfig

    assert set(SpaceConfig.model_json_schema()["properties"]) == set(_KEYS)


def test_every_value_is_checked_before_any_model_folder_is_looked_at(search_setup):
    """A wrong value next to a missing model folder: the value is named (the schema runs first)."""
    with pytest.raises(MergeoptError, match="limit: must be a positive integer"):
        load_space(write_space(search_setup, "order", base_model="/nowhere/at/all", limit=-1))


def test_threads_key_is_a_machine_setting_not_part_of_the_run(search_setup):
    space = load_space(write_space(search_setup, "th", threads=1))
    assert space.threads == 1 and space.config()["threads"] == 1
    assert "threads" not in space.identity()  # a resume on another machine may use another count
    assert space.identity() == load_space(write_space(search_setup, "th", threads=3)).identity()
    with pytest.raises(MergeoptError, match="threads"):
        load_space(write_space(search_setup, "th0", threads=0))
