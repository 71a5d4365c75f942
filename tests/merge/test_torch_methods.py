"""The torch-path methods (slerp, nuslerp, model_stock, breadcrumbs, della) against mergekit's own implementations.

Unit level: each pure function of optimizer/merge/torch_methods.py on random float32 tensors, next to mergekit 0.1.5's
merge method called through its Python API (``registry.get(name)([TensorGroup], parameters=...)``). End to end:
``mergeopt merge`` builds these recipes in its own engine (no "through mergekit" line) and agrees with
``mergekit.merge.run_merge`` on a tiny Llama family.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from optimizer.cli import main as mergeopt_main
from optimizer.errors import MergeoptError
from optimizer.merge import torch_methods as tm

registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

SHAPES = [(24, 16), (64,), (3, 5, 7)]


def theirs(method: str, tensors: list[torch.Tensor], base_index: int | None, **parameters) -> torch.Tensor:
    group = TensorGroup.from_tensors(tensors, base_index=base_index, name="model.layers.0.mlp.up_proj.weight")
    return registry.get(method)([group], parameters=parameters)[0]


def family(shape, n=3, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + scale * torch.randn(shape, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.35, 1.0])
def test_slerp(shape, t):
    base, (other, *_) = family(shape)
    want = theirs("slerp", [base, other], 0, t=t)
    got = tm.slerp(t, base.reshape(-1), other.reshape(-1)).reshape(shape)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # collinear inputs interpolate linearly, as mergekit does
    torch.testing.assert_close(tm.slerp(t, base.reshape(-1), 2 * base.reshape(-1)).reshape(shape),
                               theirs("slerp", [base, 2 * base], 0, t=t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(shape, row_wise, flatten, with_base):
    base, (a, b, _) = family(shape)
    weights = [0.3, 0.7]
    inputs, base_index = ([a, b, base], 2) if with_base else ([a, b], None)
    want = theirs("nuslerp", inputs, base_index, weight=weights, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    t = weights[1] / sum(weights)
    flat = [x.reshape(-1) for x in (base, a, b)]
    if with_base:
        got = flat[0] + tm.nuslerp(t, flat[1] - flat[0], flat[2] - flat[0], shape, row_wise, flatten)
    else:
        got = tm.nuslerp(t, flat[1], flat[2], shape, row_wise, flatten)
    torch.testing.assert_close(got.reshape(shape), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(shape, filter_wise):
    base, models = family(shape)
    want = theirs("model_stock", [base, *models], 0, filter_wise=filter_wise)
    got = tm.model_stock(base.reshape(-1), [m.reshape(-1) for m in models], shape, filter_wise)
    torch.testing.assert_close(got.reshape(shape), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0), (1.0, 0.1)])
@pytest.mark.parametrize("params", [{}, {"normalize": True, "lambda": 0.7}, {"rescale": True}])
def test_breadcrumbs(method, density, gamma, params):
    base, models = family((32, 24))
    weights = [0.6, 0.4, 0.8]
    want = theirs(method, [base, *models], 0, weight=weights, density=[density] * 3, gamma=[gamma] * 3, **params)
    flat = base.reshape(-1)
    deltas = []
    for m in models:
        delta = m.reshape(-1) - flat
        mask = tm.breadcrumbs_mask(delta, density, gamma)
        assert int(mask.sum()) == (delta.numel() if density >= 1 else int(density * delta.numel()))
        deltas.append(tm.l1_rescaled(delta, mask) if params.get("rescale") else delta * mask)
    got = tm.task_arithmetic(flat, deltas, weights, consensus=method.endswith("ties"),
                             normalize=params.get("normalize", False), lam=params.get("lambda", 1.0))
    torch.testing.assert_close(got.reshape(base.shape), want, rtol=1e-5, atol=1e-6)


def test_della_keeps_mergekits_expected_fraction_and_favours_large_magnitudes():
    """Random in both tools: the kept share (density on average), its rise with magnitude rank, and the L1 norm."""
    base, (tuned, *_) = family((256, 128), scale=1.0)
    delta = (tuned - base).reshape(-1)
    density, epsilon = 0.4, 0.2
    mask = tm.della_mask(delta, (256, 128), density, epsilon, tm.uniforms(delta.numel(), 0, 0, "w"))
    ranks = torch.argsort(torch.argsort(delta.reshape(256, 128).abs(), dim=1), dim=1).reshape(-1)
    torch.manual_seed(0)
    their_delta = theirs("della_linear", [base, tuned], 0, weight=[1.0], density=[density], epsilon=[epsilon],
                         rescale=False) - base
    their_mask = their_delta.reshape(-1) != 0
    for m in (mask, their_mask):
        assert abs(float(m.float().mean()) - density) < 0.01
        low, high = m[ranks < 32].float().mean(), m[ranks >= 96].float().mean()
        assert abs(float(low) - (density - epsilon + epsilon / 4)) < 0.02
        assert abs(float(high) - (density + epsilon - epsilon / 4)) < 0.02
    kept = tm.l1_rescaled(delta, mask)
    assert float(kept.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)
    with pytest.raises(MergeoptError, match=r"della: density 0.9 \+/- epsilon 0.15 must stay within \(0, 1\)"):
        tm.della_mask(delta, (256, 128), 0.9, 0.15, tm.uniforms(delta.numel(), 0, 0, "w"))


# ---- end to end: `mergeopt merge` runs them in its own engine ------------------------------------------------------
def test_torch_path_recipes_merge_in_mergeopts_engine_like_mergekit(llama_family, tmp_path, capsys):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, models = (str(llama_family[0]), [str(m) for m in llama_family[1]])
    recipes = {
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": models[0]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}},
        "nuslerp": {"merge_method": "nuslerp", "models": [{"model": m, "parameters": {"weight": w}}
                                                          for m, w in zip(models[:2], [0.3, 0.7], strict=True)]},
        "model_stock": {"merge_method": "model_stock", "base_model": base,
                        "models": [{"model": m} for m in models]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base,
                             "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}}
                                        for m in models], "parameters": {"normalize": True}},
    }
    for name, config in recipes.items():
        run_merge(MergeConfiguration.model_validate(config), str(tmp_path / f"{name}-mk"),
                  MergeOptions(quiet=True, random_seed=0))
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert mergeopt_main(["merge", str(path), "--out", str(tmp_path / name), "--device", "cpu"]) == 0
        assert "through mergekit" not in capsys.readouterr().err
        want = load_file(tmp_path / f"{name}-mk" / "model.safetensors")
        got = load_file(tmp_path / name / "model.safetensors")
        for key, tensor in want.items():
            torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=2e-6,
                                       msg=lambda m, k=key, n=name: f"{n} {k}: {m}")


def test_della_recipe_re_merges_to_the_same_bits(llama_family, tmp_path, capsys):
    base, models = str(llama_family[0]), [str(m) for m in llama_family[1]]
    config = {"merge_method": "della", "base_model": base, "mergeopt": {"seed": 3},
              "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}} for m in models]}
    path = tmp_path / "della.yaml"
    path.write_text(yaml.safe_dump(config))
    outs = []
    for run in range(2):
        assert mergeopt_main(["merge", str(path), "--out", str(tmp_path / f"out{run}"), "--device", "cpu"]) == 0
        outs.append(load_file(tmp_path / f"out{run}" / "model.safetensors"))
    assert "through mergekit" not in capsys.readouterr().err
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.mark.parametrize("method", ["breadcrumbs_ties", "della"])
def test_a_search_space_builds_torch_path_candidates_into_a_live_model(method, llama_family):
    """The sparsifying torch-path methods are searchable: genes map to weights and densities, and the engine
    writes each candidate straight into a live model's parameters (no file), as for the fused methods."""
    import transformers

    from optimizer.merge.engine import MergeEngine
    from optimizer.space import parse_space

    base, models = llama_family
    fixed = {"gamma": 0.05} if method.startswith("breadcrumbs") else {"epsilon": 0.1}
    space = parse_space({"name": "t", "base_model": str(base), "models": [str(m) for m in models],
                         "merge_method": method, "objectives": ["a"], "fixed": fixed})
    assert space.uses_drop_rate and space.dimension == 2 * len(models)
    recipe = space.recipe([0.5] * space.dimension, seed=1)
    engine = MergeEngine.for_recipe(recipe, device="cpu")
    live = transformers.AutoModelForCausalLM.from_pretrained(base)
    engine.build_into(recipe, live)
    built = {k: v.detach().clone() for k, v in live.state_dict().items()}
    expected = engine.state_dict(recipe)
    for name, tensor in expected.items():
        assert torch.equal(built[name], tensor), name
    stored = load_file(base / "model.safetensors")
    assert any(not torch.equal(expected[n], stored[n]) for n in stored)
