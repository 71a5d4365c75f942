"""Searching the torch-path methods: slerp's t, nuslerp's weights, breadcrumbs' gamma and DELLA's epsilon as genes.

A short search (three trials on the tiny char-level Llamas) per method: every trial completes, its genes are columns
of the trials table, the recipe it scored holds the gene values, and the run reads back from its record alone
(report/export need no model folder). Agreement of such recipes with mergekit is tested in
tests/merge/test_mergekit_forms.py (``SEARCHED``).
"""

import pytest
import yaml
from helpers import write_space
from optuna.trial import TrialState

from optimizer.errors import MergeoptError
from optimizer.export import export_run
from optimizer.recipe import Recipe
from optimizer.run import open_run, trials_table
from optimizer.search.loop import run_search
from optimizer.space import load_space

SEARCHES = {
    # slerp between the base and one model, t per layer group and module (mergekit's gradient lists)
    "slerp": dict(merge_method="slerp", models_used=1, granularity={"layer_groups": 2}, modules=["self_attn", "mlp"],
                  genes=["t.all.self_attn.g0", "t.all.self_attn.g1", "t.all.mlp.g0", "t.all.mlp.g1"]),
    # nuslerp of two models against the base: a weight per model, the booleans fixed
    "nuslerp": dict(merge_method="nuslerp", models_used=2, fixed={"nuslerp_flatten": False},
                    bounds={"weight": [0.1, 1.0]}, genes=["w.m1", "w.m2"]),
    # breadcrumbs with its gamma per model and lambda for all
    "breadcrumbs": dict(merge_method="breadcrumbs", models_used=2, bounds={"gamma": [0.0, 0.05], "lambda": [0.8, 1.2]},
                        genes=["w.m1", "w.m2", "d.m1", "d.m2", "l.all", "g.m1", "g.m2"]),
    # DELLA with epsilon per model, global granularity (one value for all models)
    "della": dict(merge_method="della", models_used=3, granularity="global", bounds={"epsilon": [0.05, 0.3]},
                  genes=["w.all", "d.all", "e.all"]),
    # model_stock has no numeric parameter: the genes choose which models take part (at least two)
    "model_stock": dict(merge_method="model_stock", models_used=3, fixed={"filter_wise": True},
                        genes=["u.m1", "u.m2", "u.m3"]),
}


@pytest.mark.parametrize("method", sorted(SEARCHES))
def test_a_short_search_varies_the_methods_own_parameters(method, search_setup, tmp_path):
    case = dict(SEARCHES[method])
    genes, n = case.pop("genes"), case.pop("models_used")
    models = [str(search_setup / "models" / f"m{i}") for i in range(1, n + 1)]
    path = write_space(search_setup, f"search-{method}", models=models, budget={"trials": 3}, limit=6,
                       optimizer={"name": "random"}, **case)
    space = load_space(path)
    assert [g.name for g in space.genes()] == genes
    result = run_search(space, tmp_path / "run", progress=False)
    trials = result.study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        recipe = Recipe.from_dict(yaml.safe_load(t.user_attrs["recipe"]))
        assert recipe.merge_method == method
        assert len(recipe.models) == n or (method == "model_stock" and 2 <= len(recipe.models) <= n)
    # the gene values are what the scored recipe holds (in parameter units)
    reread, study = open_run(tmp_path / "run")
    table = trials_table(study, reread)
    first = Recipe.from_dict(yaml.safe_load(trials[0].user_attrs["recipe"]))
    if method == "slerp":
        t = first.parameters["t"]
        assert [c.get("filter") for c in t] == ["self_attn", "mlp", None]
        assert t[0]["value"] == [table.loc[0, "t.all.self_attn.g0"], table.loc[0, "t.all.self_attn.g1"]]
        assert all(0.0 <= v <= 1.0 for v in t[0]["value"] + t[1]["value"])
        # the report's per-layer view shows t (not a weight slerp does not have)
        from optimizer.report import layer_values

        values = layer_values(first, reread)
        assert set(values) == {"t"} and values["t"]["m1 self_attn"] == t[0]["value"]
    elif method == "nuslerp":
        assert [m.parameters["weight"] for m in first.models] == [table.loc[0, "weight.m1"], table.loc[0, "weight.m2"]]
        assert first.parameters == {"nuslerp_flatten": False}
    elif method == "breadcrumbs":
        assert [m.parameters["gamma"] for m in first.models] == [table.loc[0, "gamma.m1"], table.loc[0, "gamma.m2"]]
        assert first.parameters["lambda"] == table.loc[0, "lambda.all"]
    elif method == "model_stock":  # the models whose gene is >= 0.5 (or the two highest)
        for i, t in enumerate(trials):
            recipe = Recipe.from_dict(yaml.safe_load(t.user_attrs["recipe"]))
            units = [table.loc[i, f"use.m{k}"] for k in (1, 2, 3)]
            chosen = [f"m{k + 1}" for k, u in enumerate(units) if u >= 0.5]
            if len(chosen) < 2:
                chosen = sorted(f"m{k + 1}" for k in sorted(range(3), key=lambda k: -units[k])[:2])
            assert [m.model.rsplit("/", 1)[-1] for m in recipe.models] == chosen
            assert recipe.parameters == {"filter_wise": True}
    else:  # DELLA: epsilon as drawn, or capped so that density +/- epsilon stays inside (0, 1)
        for t in trials:
            recipe = Recipe.from_dict(yaml.safe_load(t.user_attrs["recipe"]))
            for m in recipe.models:
                density, epsilon = m.parameters["density"], m.parameters["epsilon"]
                assert 0 < density - epsilon and density + epsilon < 1
    assert export_run(tmp_path / "run").best is not None


def test_della_epsilon_is_capped_inside_density_bounds_at_every_knot(search_setup):
    path = write_space(search_setup, "della-cap", merge_method="della", granularity={"gradient": 2},
                       bounds={"drop_rate": [0.0, 0.99], "epsilon": [0.0, 0.3]})
    space = load_space(path)
    genome = {g.name: (1.0 if g.param == "epsilon" else 0.0 if g.group == 0 else 1.0) for g in space.genes()}
    recipe = space.recipe(genome)
    for m in recipe.models:
        # density 1 at the first knot (epsilon capped to 0), 0.01 at the last (epsilon 0.99 * 0.01)
        assert m.parameters["density"] == [1.0, 0.01]
        assert m.parameters["epsilon"] == [0.0, 0.0099]
    fixed = load_space(write_space(search_setup, "della-fixed", merge_method="della", fixed={"epsilon": 0.2}))
    recipe = fixed.recipe({g.name: 0.0 if g.param == "drop_rate" else 0.5 for g in fixed.genes()})  # density 1
    assert all(m.parameters["epsilon"] == 0.0 for m in recipe.models)  # the fixed 0.2 capped where it must be
    recipe = fixed.recipe({g.name: 0.5 for g in fixed.genes()})  # density 0.55: the fixed epsilon stands
    assert recipe.parameters["epsilon"] == 0.2 and all("epsilon" not in m.parameters for m in recipe.models)


@pytest.mark.parametrize("override,message", [
    ({"merge_method": "model_stock", "granularity": "per_layer"}, "granularity: model_stock searches which models "
                                                                  "take part, one gene per model"),
    ({"merge_method": "model_stock", "models": ["models/m1", "models/m2"]}, "a model_stock search chooses among the "
                                                                            "models and takes at least 2; list at "
                                                                            "least 3"),
    ({"merge_method": "linear"}, r"'linear' cannot be searched \(it averages whole weights"),
    ({"merge_method": "karcher"}, "'karcher' cannot be searched; use one of"),
    ({"merge_method": "slerp", "fixed": {"t": 0.5}}, "fixes every parameter of slerp, so there is nothing to search"),
    ({"merge_method": "slerp", "bounds": {"weight": [0, 1]}}, "bounds.weight: slerp has no weight to search; its "
                                                               "genes: t"),
    ({"merge_method": "della", "bounds": {"epsilon": [0.0, 1.5]}}, r"bounds.epsilon: must lie within \[0.0, 1.0\]"),
    ({"merge_method": "breadcrumbs", "bounds": {"gamma": [0.0, 0.1]}, "fixed": {"gamma": 0.05}},
     "bounds.gamma: gamma is also under fixed"),
    ({"merge_method": "della", "fixed": {"epsilon": [0.1, 0.2]}}, "fixed.epsilon: a della search space takes one "
                                                                  "number"),
    ({"bounds": {"lamda": [0, 1]}}, r"bounds: unknown entry 'lamda' \(did you mean 'lambda'\?\)"),
    ({"merge_method": "nuslerp", "models": ["models/m1", "models/m2"], "granularity": "global"},
     r"global gives both nuslerp models one weight, so they always interpolate half way"),
])
def test_searching_a_method_without_genes_is_one_line(override, message, search_setup):
    with pytest.raises(MergeoptError, match=message):
        load_space(write_space(search_setup, "bad", **override))


def test_a_recorded_slerp_run_reads_back_without_its_models(search_setup, tmp_path):
    """The genes of a run come from its record (config + registry), not from the model folders."""
    from optimizer.run import record_of, space_of

    space = load_space(write_space(search_setup, "slerp-record", merge_method="slerp",
                                   models=[str(search_setup / "models" / "m1")], granularity={"gradient": 3},
                                   bounds={"t": [0.2, 0.8]}))
    reread = space_of(yaml.safe_load(yaml.safe_dump(record_of(space))), "record")
    assert [g.name for g in reread.genes()] == [g.name for g in space.genes()] == ["t.all.g0", "t.all.g1", "t.all.g2"]
    assert reread.recipe([0.0, 0.5, 1.0]).parameters["t"] == [0.2, 0.5, 0.8]
