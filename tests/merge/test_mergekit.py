"""Cross-check against the real consumer of our YAML: mergekit-yaml on the same recipe and models."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from optimizer.merge.engine import MergeEngine
from optimizer.recipe import ModelSpec, Recipe

MERGEKIT = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
pytestmark = pytest.mark.skipif(not Path(MERGEKIT).exists(), reason="mergekit is not installed (pip install -e '.[dev]')")


def run_mergekit(recipe: Recipe, tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    config = recipe.save(tmp_path / f"{name}.yaml")  # our file, mergeopt block included
    out = tmp_path / f"{name}-mergekit"
    proc = subprocess.run([MERGEKIT, str(config), str(out), "--no-copy-tokenizer", "--quiet", "--random-seed", "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module")
def family(llama_family):
    base, models = llama_family
    return base, models, MergeEngine(base, models, device="cpu")


def make(method, base, models, weights, densities=None, **kw):
    specs = [ModelSpec(str(m), {"weight": w, **({"density": densities[i]} if densities else {})})
             for i, (m, w) in enumerate(zip(models, weights))]
    return Recipe(method, specs, base_model=None if method == "linear" else str(base), **kw)


CASES = {
    "linear": dict(weights=[0.2, 0.5, 0.3]),
    "task_arithmetic": dict(weights=[0.7, 0.5, 0.5], parameters={"lambda": 0.8}),
    "ties": dict(weights=[0.6, 0.4, 0.8], densities=[0.5, 0.3, 0.9]),
    "ties_gradient": dict(weights=[[0.2, 1.0], 0.4, 0.8], densities=[[0.9, 0.2], 0.3, 0.9]),
}


# each case runs mergekit-yaml in a process of its own (about 5 s): two stay in the fast tier, the rest run in the slow
# tier (CI runs both); tests/merge/test_mergekit_forms.py covers every form through mergekit's Python API as well
SLOW_CASES = {"linear", "ties_gradient"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c
                                  for c in sorted(CASES)])
def test_deterministic_methods_agree_with_mergekit(case, family, tmp_path):
    base, models, engine = family
    kwargs = dict(CASES[case])
    recipe = make(case.split("_gradient")[0], base, models, **kwargs)
    theirs = run_mergekit(recipe, tmp_path, case)
    ours = engine.state_dict(recipe)
    assert set(theirs) <= set(ours) and len(theirs) >= len(ours) - 1  # mergekit may drop a tied lm_head
    for name, tensor in theirs.items():
        rel = (ours[name] - tensor).norm() / tensor.norm()
        assert rel < 1e-5, f"{case}: {name} differs by {rel:.2e} relative"


@pytest.mark.parametrize("method", [pytest.param("dare_linear", marks=pytest.mark.slow), "dare_ties"])
def test_dare_methods_keep_the_same_fraction_and_norm(method, family, tmp_path):
    """Masks differ (mergekit draws torch.bernoulli masks), but kept fractions agree within 1%, and with
    rescale: l1 both tools give every sparsified delta exactly the dense delta's L1 norm."""
    base, models, engine = family
    base_state = load_file(Path(base) / "model.safetensors")
    dense = load_file(Path(models[0]) / "model.safetensors")
    recipe = make(method, base, models[:1], weights=[1.0], densities=[0.3], rescale="l1", seed=5)
    theirs = run_mergekit(recipe, tmp_path, method)
    ours = engine.state_dict(recipe)
    kept_theirs = sum(int((theirs[n] != base_state[n]).sum()) for n in theirs)
    kept_ours = sum(int((ours[n] != base_state[n]).sum()) for n in theirs)
    total = sum(theirs[n].numel() for n in theirs)
    assert abs(kept_ours / total - 0.3) < 0.01
    assert abs(kept_theirs / total - kept_ours / total) < 0.01
    for name in theirs:
        l1_dense = (dense[name] - base_state[name]).abs().sum()
        assert (ours[name] - base_state[name]).abs().sum() == pytest.approx(float(l1_dense), rel=1e-4)
        assert (theirs[name] - base_state[name]).abs().sum() == pytest.approx(float(l1_dense), rel=1e-4)


@pytest.mark.slow  # 5-10 s of subprocesses: the slow tier (CI runs it) keeps the fast tier under 3 minutes
def test_mergekit_accepts_a_full_dare_recipe(family, tmp_path):
    base, models, engine = family
    recipe = make("dare_ties", base, models, weights=[0.7, [0.3, 0.6], 0.5], densities=[0.4, 0.6, [0.9, 0.5]], seed=3)
    recipe.info = {"trial": 12, "scores": {"add": 0.5}}
    theirs = run_mergekit(recipe, tmp_path, "full")
    ours = engine.state_dict(recipe)
    base_state = load_file(Path(base) / "model.safetensors")
    changed = 0
    for name, tensor in theirs.items():
        assert tensor.shape == ours[name].shape and torch.isfinite(tensor).all()
        changed += int((tensor != base_state[name]).sum())
    # masks differ between the tools, but both merged a similar share of elements away from the base
    ours_changed = sum(int((ours[n] != base_state[n]).sum()) for n in theirs)
    total = sum(t.numel() for t in theirs.values())
    assert 0.5 < changed / total < 0.99
    assert abs(changed - ours_changed) / total < 0.02
