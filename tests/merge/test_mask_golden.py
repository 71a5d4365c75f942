"""Golden values of the DARE masks, computed once and pinned: if one changes, every exported recipe re-merges to a
different model than the one that was scored (a recipe's masks depend only on seed, model position, tensor name
and drop rate). Change them only with a format version and a note in the README."""

from optimizer.merge import sparsify

DOWN_PROJ = "model.layers.0.mlp.down_proj.weight"


def test_mask_keys_are_pinned():
    assert sparsify.mask_key(0, 0, DOWN_PROJ) == 3074604032938177020
    assert sparsify.mask_key(7, 2, "lm_head.weight") == 2423178530970393154
    assert sparsify.mask_key(123456789, 1, "model.embed_tokens.weight") == 13561349658975415617


def test_ranks_are_pinned():
    assert sparsify.dare_ranks(10, 3074604032938177020).tolist() == [
        2350, 65441, 58808, 1781, 6088, 43548, 1768, 61390, 65065, 35428]
    assert sparsify.dare_ranks(9, 2423178530970393154).tolist() == [
        14526, 8116, 18244, 41068, 2577, 18369, 35736, 45862, 25466]


def test_thresholds_and_a_large_mask_are_pinned():
    assert sparsify.drop_threshold(0.3) == 19661 and sparsify.drop_threshold(0.5) == 32768
    ranks = sparsify.dare_ranks(100_000, 3074604032938177020)
    assert int((ranks >= 19661).sum()) == 70011 and int(ranks.sum()) == 3278261675
    assert sparsify.keep_mask(12, 3074604032938177020, 32768).tolist() == [
        False, True, True, False, False, True, False, True, True, True, True, True]
