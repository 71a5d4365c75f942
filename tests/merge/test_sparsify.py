"""DARE statistics and kernel equivalence on real tensors."""

import numpy as np
import pytest
import torch

from optimizer.merge import sparsify


def merge_cpu(out, base, deltas, plan):
    """The fused kernel over fine-tunes stored as base + delta (float32), into ``out``."""
    sparsify.merge_range_cpu(out, 0, base, [base + d for d in deltas], plan)


def dare_plan(n_models, drop_rates, seed=0, name="t", weights=None, consensus=False, normalize=False, rescale=True):
    thresholds = np.array([sparsify.drop_threshold(p) for p in drop_rates], dtype=np.int64)
    return sparsify.TensorPlan(
        weights=np.asarray(weights if weights is not None else [1.0] * n_models, dtype=np.float32),
        scales=np.array([sparsify.dare_scale(int(t)) if rescale else 1.0 for t in thresholds], dtype=np.float32),
        keep_mode=np.full(n_models, sparsify.KEEP_RANDOM, dtype=np.int32),
        thresholds=thresholds,
        magnitudes=np.zeros(n_models, dtype=np.float32),
        keys=np.array([sparsify.mask_key(seed, m, name) for m in range(n_models)], dtype=np.uint64),
        consensus=consensus, normalize=normalize)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_matches_one_minus_p(p):
    n = 1_000_003  # not a multiple of 4: the tail block is handled
    kept = sparsify.keep_mask(n, sparsify.mask_key(7, 0, "layer.weight"), sparsify.drop_threshold(p))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.002  # 4+ standard errors


def test_cpu_kernel_keeps_the_same_elements_as_the_mask():
    n = 100_001
    delta = torch.randn(1, n)
    base = torch.zeros(n)
    plan = dare_plan(1, [0.6], seed=3, rescale=False)
    out = torch.empty(n)
    merge_cpu(out, base, delta, plan)
    kept = sparsify.keep_mask(n, int(plan.keys[0]), int(plan.thresholds[0]))
    assert torch.equal(out != 0, kept)
    assert torch.equal(out[kept], delta[0][kept])


def test_dare_is_unbiased_over_masks():
    n, draws = 4096, 400
    torch.manual_seed(0)
    delta = torch.randn(1, n)
    base = torch.randn(n)
    p = 0.7
    total = torch.zeros(n, dtype=torch.float64)
    out = torch.empty(n)
    for seed in range(draws):
        merge_cpu(out, base, delta, dare_plan(1, [p], seed=seed))
        total += out.double() - base.double()
    mean = total / draws
    # each element's estimate has sd |d| sqrt(p / (1 - p) / draws)
    sd = delta[0].abs().double() * np.sqrt(p / (1 - p) / draws)
    z = (mean - delta[0].double()) / sd
    assert z.abs().max() < 5.0
    assert abs(z.mean()) < 0.1  # no systematic bias
    # a biased rule (no rescale) would fail the same check
    biased = delta[0].double() * (1 - p)
    assert ((biased - delta[0].double()) / sd).abs().mean() > 5


def test_p_zero_is_identity_and_p_one_drops_everything():
    n = 70_000
    delta = torch.randn(2, n)
    base = torch.randn(n)
    out = torch.empty(n)
    merge_cpu(out, base, delta, dare_plan(2, [0.0, 0.0], weights=[0.3, 0.5]))
    stored = [(base + d) - base for d in delta]  # the deltas as the kernel forms them from the stored models
    assert torch.equal(out, base + (np.float32(0.3) * stored[0] + np.float32(0.5) * stored[1]))
    plan = dare_plan(2, [1.0, 1.0])
    assert plan.scales.tolist() == [0.0, 0.0]
    merge_cpu(out, base, delta, plan)
    assert torch.equal(out, base)


def test_masks_are_deterministic_nested_and_independent():
    n = 50_000
    key = sparsify.mask_key(11, 2, "model.layers.0.mlp.up_proj.weight")
    assert key == sparsify.mask_key(11, 2, "model.layers.0.mlp.up_proj.weight")
    a = sparsify.keep_mask(n, key, sparsify.drop_threshold(0.3))
    b = sparsify.keep_mask(n, key, sparsify.drop_threshold(0.6))
    assert torch.equal(a, sparsify.keep_mask(n, key, sparsify.drop_threshold(0.3)))
    assert bool((b & ~a).sum() == 0), "an element kept at p=.6 must be kept at p=.3"
    # another seed, model or tensor gives an unrelated mask (agreement ~ .7^2 + .3^2 = .58)
    for other in (sparsify.mask_key(12, 2, "model.layers.0.mlp.up_proj.weight"),
                  sparsify.mask_key(11, 1, "model.layers.0.mlp.up_proj.weight"),
                  sparsify.mask_key(11, 2, "model.layers.1.mlp.up_proj.weight")):
        agree = (sparsify.keep_mask(n, other, sparsify.drop_threshold(0.3)) == a).float().mean().item()
        assert abs(agree - 0.58) < 0.02


def test_mask_key_is_stable_across_processes():
    # a fixed value: if this changes, every exported recipe re-merges to a different model
    assert sparsify.mask_key(0, 0, "model.embed_tokens.weight") == 5126377207551488245  # pinned (was x == x)
    import subprocess
    import sys
    code = "from optimizer.merge import sparsify; print(sparsify.mask_key(5, 1, 'x.weight'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert int(other) == sparsify.mask_key(5, 1, "x.weight")


@pytest.mark.parametrize("consensus,normalize", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("n", [1_000, 200_003])  # serial and parallel kernels
def test_cpu_kernel_equals_torch_implementation(consensus, normalize, n):
    torch.manual_seed(1)
    base = torch.randn(n)
    models = [base + torch.randn(n) for _ in range(3)]
    plan = dare_plan(3, [0.2, 0.5, 0.0], seed=9, weights=[0.7, -0.4, 0.5], consensus=consensus, normalize=normalize)
    plan.keep_mode[2] = sparsify.KEEP_MAGNITUDE
    plan.magnitudes[2] = 0.8
    out = torch.empty(n)
    sparsify.merge_range_cpu(out, 0, base, models, plan)
    ref = sparsify.merge_range_torch(base, models, plan, 0, n)
    assert torch.equal(out, ref)  # the same float32 operations in the same order: bit for bit
    # a range in the middle (both start on a kernel chunk) is the same slice of the whole
    if n > 8192:
        part = torch.empty(n - 8192)
        sparsify.merge_range_cpu(part, 8192, base, models, plan)
        assert torch.equal(part, out[8192:])
        assert torch.equal(sparsify.merge_range_torch(base, models, plan, 8192, n), out[8192:])


def test_l1_norms_match_torch():
    torch.manual_seed(2)
    base = torch.randn(123_457)
    tuned = base + torch.randn(123_457)
    key = sparsify.mask_key(0, 0, "w")
    thr = sparsify.drop_threshold(0.4)
    dense, kept = sparsify.delta_l1_cpu(base, tuned, thr, key)
    ref_dense, ref_kept = sparsify.delta_l1_torch(base, tuned, thr, key, chunk=10_000)
    assert dense == pytest.approx(ref_dense, rel=1e-12) and kept == pytest.approx(ref_kept, rel=1e-12)
    assert kept == pytest.approx(0.6 * dense, rel=0.01)
    delta = (tuned - base).double()
    assert dense == pytest.approx(float(delta.abs().sum()), rel=1e-12)


def test_magnitude_threshold_keeps_top_k():
    delta = torch.tensor([0.1, -3.0, 2.0, -0.5, 0.05, 1.0])
    cut = sparsify.magnitude_threshold(delta, 0.5)  # k = 3
    assert (delta.abs() >= cut).sum() == 3
    assert set(torch.nonzero(delta.abs() >= cut).flatten().tolist()) == {1, 2, 5}
    assert sparsify.magnitude_threshold(delta, 0.01) == 3.0  # at least one element survives
    assert sparsify.magnitude_threshold(delta, 1.0) == -1.0


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_ties_trim_keeps_exactly_k_among_massive_ties(kernel):
    # a bf16-like delta: few distinct magnitudes, so thousands of elements tie at the cut
    n = 100_003
    gen = torch.Generator().manual_seed(4)
    base = torch.zeros(n)
    tuned = (torch.randint(1, 6, (n,), generator=gen) * torch.sign(torch.randn(n, generator=gen))).float()
    density = 0.37
    cut, last_tie = sparsify.magnitude_cut(tuned.abs(), density)
    plan = dare_plan(1, [0.0])
    plan.keep_mode[0] = sparsify.KEEP_MAGNITUDE
    plan.magnitudes[0], plan.tie_limits[0] = cut, last_tie
    if kernel == "numba":
        out = torch.empty(n)
        sparsify.merge_range_cpu(out, 0, base, [tuned], plan)
    else:
        out = torch.cat([sparsify.merge_range_torch(base, [tuned], plan, s, min(n, s + 16384))
                         for s in range(0, n, 16384)])
    kept = out != 0
    assert int(kept.sum()) == int(density * n)  # exactly k, not every element tied at the cut
    assert bool((tuned.abs()[kept] >= cut).all()) and bool((tuned.abs()[~kept] <= cut).all())
    tied_kept = torch.nonzero(kept & (tuned.abs() == cut)).flatten()
    assert int(tied_kept.max()) == last_tie and len(tied_kept) == int(tied_kept.max() + 1 - 0) - int(
        ((tuned.abs() != cut)[: last_tie + 1]).sum())  # the lowest-index ties, with no gap


def test_all_half_bit_patterns_widen_exactly():
    """Every finite bf16 and fp16 value reaches the float32 arithmetic exactly as torch widens it."""
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        values = bits.view(dtype)
        finite = torch.isfinite(values)
        values = values[finite].contiguous()
        plan = dare_plan(1, [0.0])
        out = torch.empty(values.numel())
        sparsify.merge_range_cpu(out, 0, torch.zeros(values.numel(), dtype=dtype), [values], plan)
        # equal as values, subnormals included; only -0 comes out as +0 (base + 0 * ... is +0), no widening matter
        assert torch.equal(out, values.float()), dtype
        differ = out.view(torch.int32) != values.float().view(torch.int32)
        assert values[differ].tolist() == [0.0] and values[differ].view(torch.int16).tolist() == [-(1 << 15)]
        assert sparsify.count_nonfinite(bits.view(dtype)) == int((~finite).sum())


def test_kind_codes_agree_with_the_kernels():
    from optimizer.merge import kernels

    assert sparsify._HALF_KINDS == {torch.float32: kernels.F32_HALVES, torch.bfloat16: kernels.BF16,
                                    torch.float16: kernels.F16}
    assert sparsify.F32_NATIVE == kernels.F32
