"""Every merge method against a hand computation on a real tiny model family."""

import pytest
import torch
from safetensors.torch import load_file

from optimizer.merge import sparsify
from optimizer.merge.engine import MergeEngine
from optimizer.recipe import ModelSpec, Recipe


@pytest.fixture(scope="module")
def family(llama_family):
    base, models = llama_family
    return {
        "base": load_file(base / "model.safetensors"),
        "models": [load_file(m / "model.safetensors") for m in models],
        "engine": MergeEngine(base, models, device="cpu"),
        "paths": (str(base), [str(m) for m in models]),
    }


def recipe(family, method, weights, densities=None, **kw):
    base, models = family["paths"]
    specs = []
    for i, path in enumerate(models):
        params = {"weight": weights[i]}
        if densities is not None:
            params["density"] = densities[i]
        specs.append(ModelSpec(path, params))
    # linear merges whole weights: a base_model outside `models` would be averaged in (mergekit's meaning)
    return Recipe(method, specs, base_model=None if method == "linear" else base, **kw)


NAMES = ["model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_linear(family):
    r = recipe(family, "linear", [0.2, 0.3, 0.5])
    out = family["engine"].state_dict(r)
    for name in NAMES:
        ws = torch.tensor([0.2, 0.3, 0.5])
        expected = sum(w * m[name] for w, m in zip(ws, family["models"])) / ws.sum()
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)


def test_linear_without_normalize(family):
    r = recipe(family, "linear", [0.2, 0.3, 0.6], parameters={"normalize": False})
    out = family["engine"].state_dict(r)
    for name in NAMES:
        expected = sum(w * m[name] for w, m in zip([0.2, 0.3, 0.6], family["models"]))
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)


def test_task_arithmetic(family):
    r = recipe(family, "task_arithmetic", [0.7, 0.5, -0.2], parameters={"lambda": 0.9})
    out = family["engine"].state_dict(r)
    for name in NAMES:
        b = family["base"][name]
        expected = b + 0.9 * sum(w * (m[name] - b) for w, m in zip([0.7, 0.5, -0.2], family["models"]))
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)


def ties_by_hand(base, deltas, weights, normalize):
    stacked = torch.stack([w * d for w, d in zip(weights, deltas)])
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == elected
    mix = (stacked * agree).sum(0)
    if normalize:
        divisor = (torch.tensor(weights).view(-1, *[1] * base.dim()) * agree).sum(0)
        mix = mix / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + mix


def trim(delta, density):
    k = max(1, int(density * delta.numel()))
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[torch.topk(delta.abs().flatten(), k).indices] = True
    return delta * keep.view_as(delta)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties(family, normalize):
    weights, densities = [0.6, 0.4, 0.8], [0.5, 0.3, 0.9]
    r = recipe(family, "ties", weights, densities, parameters={"normalize": normalize})
    out = family["engine"].state_dict(r)
    for name in NAMES:
        b = family["base"][name]
        deltas = [trim(m[name] - b, d) for m, d in zip(family["models"], densities)]
        torch.testing.assert_close(out[name], ties_by_hand(b, deltas, weights, normalize), rtol=1e-5, atol=1e-6)


def dare_by_hand(base, models, name, weights, densities, seed):
    b = base[name]
    deltas = []
    for pos, (m, density) in enumerate(zip(models, densities)):
        threshold = sparsify.drop_threshold(1 - density)
        kept = sparsify.keep_mask(b.numel(), sparsify.mask_key(seed, pos, name), threshold).view_as(b)
        deltas.append((m[name] - b) * kept * sparsify.dare_scale(threshold))
    return b, deltas


def test_dare_linear(family):
    weights, densities = [0.5, 0.7, 0.3], [0.3, 0.6, 1.0]
    r = recipe(family, "dare_linear", weights, densities, seed=4)
    out = family["engine"].state_dict(r)
    for name in NAMES:
        b, deltas = dare_by_hand(family["base"], family["models"], name, weights, densities, seed=4)
        expected = b + sum(w * d for w, d in zip(weights, deltas))
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)


def test_dare_ties(family):
    weights, densities = [0.5, 0.7, 0.3], [0.3, 0.6, 0.8]
    r = recipe(family, "dare_ties", weights, densities, seed=2)
    out = family["engine"].state_dict(r)
    for name in NAMES:
        b, deltas = dare_by_hand(family["base"], family["models"], name, weights, densities, seed=2)
        torch.testing.assert_close(out[name], ties_by_hand(b, deltas, weights, False), rtol=1e-5, atol=1e-6)


def test_l1_rescale_keeps_the_delta_norm(family):
    r = recipe(family, "dare_linear", [1.0, 0.0, 0.0], [0.3, 1.0, 1.0], rescale="l1")
    out = family["engine"].state_dict(r)
    for name in NAMES:
        b = family["base"][name]
        dense = family["models"][0][name] - b
        sparse = out[name] - b
        assert (sparse != 0).float().mean() < 0.4
        assert sparse.abs().sum().item() == pytest.approx(dense.abs().sum().item(), rel=1e-4)


def test_per_layer_gradient_and_filters(family):
    """A 3-point gradient over 3 layers gives each layer its own weight; filters pick modules."""
    base, models = family["paths"]
    r = Recipe("task_arithmetic", [ModelSpec(models[0], {"weight": [0.0, 0.5, 1.0]}),
                                   ModelSpec(models[1], {"weight": [{"filter": "self_attn", "value": 1.0},
                                                                    {"value": 0.0}]})],
               base_model=base)
    out = family["engine"].state_dict(r)
    b, m0, m1 = family["base"], family["models"][0], family["models"][1]
    for layer, w in enumerate([0.0, 0.5, 1.0]):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        torch.testing.assert_close(out[name], b[name] + w * (m0[name] - b[name]), rtol=1e-5, atol=1e-6)
        name = f"model.layers.{layer}.self_attn.k_proj.weight"
        torch.testing.assert_close(out[name], b[name] + w * (m0[name] - b[name]) + (m1[name] - b[name]),
                                   rtol=1e-5, atol=1e-6)
    # outside the layer stack t = 0: the gradient's first value
    torch.testing.assert_close(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_models_left_out_of_the_recipe_do_not_count(family):
    base, models = family["paths"]
    r = Recipe("task_arithmetic", [ModelSpec(models[2], {"weight": 0.5})], base_model=base)
    out = family["engine"].state_dict(r)
    name = NAMES[0]
    b = family["base"][name]
    torch.testing.assert_close(out[name], b + 0.5 * (family["models"][2][name] - b), rtol=1e-5, atol=1e-6)


def test_dare_masks_depend_on_seed_model_and_tensor_only(family):
    """Re-merging gives identical bits; changing another model's p leaves this model's mask alone."""
    engine = family["engine"]
    a = engine.state_dict(recipe(family, "dare_linear", [1.0, 0.0, 0.0], [0.5, 0.5, 0.5], seed=1))
    again = engine.state_dict(recipe(family, "dare_linear", [1.0, 0.0, 0.0], [0.5, 0.5, 0.5], seed=1))
    other_p = engine.state_dict(recipe(family, "dare_linear", [1.0, 0.0, 0.0], [0.5, 0.2, 0.9], seed=1))
    other_seed = engine.state_dict(recipe(family, "dare_linear", [1.0, 0.0, 0.0], [0.5, 0.5, 0.5], seed=2))
    for name in NAMES[:2]:
        assert torch.equal(a[name], again[name])
        assert torch.equal(a[name], other_p[name])
        assert not torch.equal(a[name], other_seed[name])
