"""Recipes: mergekit YAML round trips, mergekit's parameter semantics, clear errors."""

import shutil
from pathlib import Path

import pytest
import torch
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
    ({"merge_method": "karcher", "base_model": "b", "models": ["a"]}, "merge_method karcher runs through mergekit"),
    ({"merge_method": "slerp", "base_model": "b", "models": ["a", "c"], "parameters": {"t": 0.5}},
     "slerp takes exactly 1 model besides the base, got 2"),
    ({"merge_method": "sleep", "base_model": "b", "models": ["a"]}, r"not a merge method \(did you mean 'slerp'\?\)"),
    ({"merge_method": "ties", "models": ["a"]}, "needs a base_model"),
    ({"merge_method": "ties", "base_model": "b", "models": []}, "lists no models"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "wieght": 1}, "unknown key 'wieght'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": "x y"}}],
      "mergeopt": {"sed": 1}}, r"mergeopt: unknown key 'sed' \(did you mean 'seed'\?\)"),
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


# ---- parse-time checks, mergekit's dtype / tokenizer / template keys --------------------------------------------
def test_every_value_is_checked_when_the_recipe_is_read():
    base = {"merge_method": "ties", "base_model": "b"}
    with pytest.raises(MergeoptError, match=r"models\[0\]\.parameters\.densty: unknown parameter \(did you mean 'dens"):
        Recipe.from_dict({**base, "models": [{"model": "a", "parameters": {"weight": 1, "densty": 0.5}}]})
    with pytest.raises(MergeoptError, match=r"density: 1.5 is outside \[0, 1\]"):
        Recipe.from_dict({**base, "models": [{"model": "a", "parameters": {"weight": 1, "density": 1.5}}]})
    with pytest.raises(MergeoptError, match="weight: 'abc' is not a number"):
        Recipe.from_dict({**base, "models": [{"model": "a", "parameters": {"weight": "abc"}}]})
    with pytest.raises(MergeoptError, match=r"models\[0\] \(a\) has no weight"):
        Recipe.from_dict({**base, "models": ["a"]})
    with pytest.raises(MergeoptError, match=r"unknown key 'dtpye' \(did you mean 'dtype'\?\)"):
        Recipe.from_dict({**base, "models": ["a"], "dtpye": "float32"})
    with pytest.raises(MergeoptError, match="out_dtype 'float8' is not supported"):
        Recipe.from_dict({**base, "models": [{"model": "a", "parameters": {"weight": 1}}], "out_dtype": "float8"})
    with pytest.raises(MergeoptError, match="chat_template 'chatmlx' is neither a Jinja template nor a known name"):
        Recipe.from_dict({**base, "models": [{"model": "a", "parameters": {"weight": 1}}], "chat_template": "chatmlx"})


def test_values_are_coerced_and_kept_in_the_round_trip(tmp_path):
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": "/m/b", "name": "my-merge",
                               "models": [{"model": "/m/a", "parameters": {"weight": "0.5", "density": "5e-1"}}],
                               "parameters": {"rescale": True, "lambda": 2}, "out_dtype": "bfloat16",
                               "tokenizer_source": "union", "chat_template": "chatml"})
    assert recipe.models[0].parameters == {"weight": 0.5, "density": 0.5}
    assert recipe.dtype is None and recipe.out_dtype == "bfloat16" and recipe.written_dtype == "bfloat16"
    data = recipe.to_dict()
    assert "dtype" not in data and data["out_dtype"] == "bfloat16"
    assert data["parameters"] == {"rescale": True, "lambda": 2.0}  # ties: mergekit's own switch, kept
    assert data["tokenizer_source"] == "union" and data["chat_template"] == "chatml"
    assert Recipe.load(recipe.save(tmp_path / "r.yaml")).to_dict() == data


def test_dtype_none_means_the_checkpoints_and_dtype_alone_is_written():
    def make(**kw):
        return Recipe("task_arithmetic", [ModelSpec("/m/a", {"weight": 1})], base_model="/m/b", **kw)

    assert make().written_dtype is None
    assert make(dtype="bfloat16").written_dtype == "bfloat16"
    assert make(dtype="float32", out_dtype="float16").written_dtype == "float16"


def test_linear_base_outside_models_is_an_input_and_zero_sums_are_refused():
    models = [ModelSpec("/m/a", {"weight": 0.5}), ModelSpec("/m/c", {"weight": 0.5})]
    assert Recipe("linear", models, base_model="/m/b", parameters={"weight": 0.2}).linear_base_is_input
    assert not Recipe("linear", models).linear_base_is_input
    with pytest.raises(MergeoptError, match="is not under models, so it is averaged in"):
        Recipe("linear", models, base_model="/m/b")
    with pytest.raises(MergeoptError, match="linear weights sum to 0"):
        Recipe("linear", [ModelSpec("/m/a", {"weight": 0.5}), ModelSpec("/m/c", {"weight": -0.5})])
    with pytest.raises(MergeoptError, match="linear weights sum to 0 for tensors matching 'mlp'"):
        Recipe("linear", [ModelSpec("/m/a", {"weight": [{"filter": "mlp", "value": 1}, {"value": 0.5}]}),
                          ModelSpec("/m/c", {"weight": -1})])
    with pytest.raises(MergeoptError, match="linear weights sum to 0"):  # at the middle knot of a gradient
        Recipe("linear", [ModelSpec("/m/a", {"weight": [1, 0, 1]}), ModelSpec("/m/c", {"weight": [1, 0, 1]})])
    Recipe("linear", [ModelSpec("/m/a", {"weight": 0.5}), ModelSpec("/m/c", {"weight": -0.5})],
           parameters={"normalize": False})  # no division, nothing undefined


def test_bool_gradients_pick_values_as_mergekit_does():
    assert resolve_setting([True, False], "x", 0.4) is True
    assert resolve_setting([True, False], "x", 1.0) is False


def test_full_range_slices_read_as_models(llama_family, tmp_path):
    base, models = llama_family
    data = {"merge_method": "ties", "base_model": str(base), "slices": [{"sources": [
        {"model": str(base), "layer_range": [0, 3]},
        {"model": str(models[0]), "layer_range": [0, 3], "parameters": {"weight": 1, "density": 0.5}}],
        "parameters": {"normalize": False}}]}
    path = tmp_path / "slices.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = Recipe.load(path)
    assert [m.model for m in recipe.models] == [str(base), str(models[0])]
    assert recipe.parameters == {"normalize": False}
    data["slices"][0]["sources"][1]["layer_range"] = [0, 2]  # partial: only mergekit runs it
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MergeoptError, match="'slices:' recipe .* runs through mergekit"):
        Recipe.load(path)


# ---- Hugging Face hub ids from the local cache ---------------------------------------------------------------------
def cache_model(cache: Path, repo: str, source: Path, revision: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """A model in the HF_HUB_CACHE layout: models--org--name/snapshots/<rev>/ and refs/<ref> naming it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    shutil.copytree(source, snapshot)
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(revision)
    return snapshot


def test_hub_ids_resolve_from_the_local_cache(llama_family, tmp_path):
    from optimizer import hub

    base, models = llama_family
    cache = tmp_path / "hub"
    main = cache_model(cache, "org/base", base, "a" * 40)
    tagged = cache_model(cache, "org/tuned", models[0], "b" * 40, refs=("main", "v1"))
    other = cache_model(cache, "org/tuned", models[1], "c" * 40, refs=())
    assert hub.resolve("org/base", cache_dir=cache) == str(main)
    assert hub.resolve("org/tuned@v1", cache_dir=cache) == str(tagged)
    assert hub.resolve("org/tuned@" + "c" * 40, cache_dir=cache) == str(other)
    with pytest.raises(MergeoptError, match=r"^org/missing is not a folder and not in the local Hugging Face cache; "
                                            r"download it first \(huggingface-cli download org/missing\)"):
        hub.resolve("org/missing", cache_dir=cache)
    with pytest.raises(MergeoptError, match="at revision v2; download it first .* --revision v2"):
        hub.resolve("org/tuned@v2", cache_dir=cache)
    assert hub.looks_like_hub_id("org/name@main") and not hub.looks_like_hub_id("./org/name")
    assert not hub.looks_like_hub_id("a/b/c")


def test_a_recipe_of_hub_ids_merges_like_one_of_folders(llama_family, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from safetensors.torch import load_file

    from optimizer.cli import main

    base, models = llama_family
    cache = tmp_path / "hub"
    cache_model(cache, "org/base", base, "a" * 40)
    cache_model(cache, "org/tuned", models[0], "b" * 40, refs=("main", "v1"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE sets
    merged = {}
    for name, refs in {"hub": ("org/base", "org/tuned@v1"), "folders": (str(base), str(models[0]))}.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": refs[0], "models": [
            {"model": refs[1], "parameters": {"weight": 0.7, "density": 0.5}}]}))
        assert main(["merge", str(path), "--out", str(tmp_path / name), "--device", "cpu"]) == 0
        merged[name] = load_file(tmp_path / name / "model.safetensors")
    assert merged["hub"].keys() == merged["folders"].keys()
    assert all(torch.equal(merged["hub"][n], merged["folders"][n]) for n in merged["hub"])
