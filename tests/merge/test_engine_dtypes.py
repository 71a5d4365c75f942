"""Models kept in their checkpoint dtype: bf16/fp16 inputs, the torch twin, streamed saving, mapped memory."""

import ctypes
import json

import pytest
import torch
import transformers
from helpers import make_family
from safetensors.torch import load_file, save_file

from optimizer.errors import MergeoptError
from optimizer.merge import checkpoint, engine as engine_module, sparsify
from optimizer.merge.engine import MergeEngine
from optimizer.recipe import ModelSpec, Recipe

METHODS = [("dare_ties", "dare"), ("dare_linear", "l1"), ("ties", "dare"), ("task_arithmetic", "dare")]


def convert(folder, out, dtype):
    """A copy of a model folder with its weights stored in ``dtype``."""
    out.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(dtype).contiguous() for k, v in load_file(f).items()}, out / f.name,
                      metadata={"format": "pt"})
        else:
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def half_families(tmp_path_factory):
    """The same values stored three ways: bf16, fp16 (each rounded once) and their float32 widenings."""
    root = tmp_path_factory.mktemp("dtypes")
    base, models = make_family(root, "llama", n_models=3, delta_scale=0.01)
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        tag = str(dtype).removeprefix("torch.")
        half = [convert(f, root / tag / f.name, dtype) for f in [base, *models]]
        wide = [convert(f, root / f"{tag}-as-f32" / f.name, torch.float32) for f in half]
        out[dtype] = (half, wide)
    return out


def recipe(folders, method, rescale, seed=3):
    base, *models = folders
    return Recipe(method, [ModelSpec(str(m), {"weight": [0.6, 0.2][i % 2] + 0.1 * i, "density": [0.9, 0.35]})
                           for i, m in enumerate(models)], base_model=str(base), seed=seed, rescale=rescale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_checkpoints_merge_as_float32_arithmetic_on_their_values(half_families, dtype):
    half, wide = half_families[dtype]
    engine_half = MergeEngine(half[0], half[1:], device="cpu")
    engine_wide = MergeEngine(wide[0], wide[1:], device="cpu")
    name = engine_half.names[1]
    assert engine_half.stored_weights(1)[name].dtype == dtype  # kept as stored, not widened
    assert engine_half.stored_dtype() == dtype and engine_wide.stored_dtype() == torch.float32
    for method, rescale in METHODS:
        got = engine_half.state_dict(recipe(half, method, rescale))
        want = engine_wide.state_dict(recipe(wide, method, rescale))
        for key in want:
            assert torch.equal(got[key], want[key]), (method, key)


@pytest.mark.parametrize("method,rescale", METHODS)
def test_torch_twin_gives_the_numba_kernels_bits(half_families, method, rescale, monkeypatch):
    half, _ = half_families[torch.bfloat16]
    numba = MergeEngine(half[0], half[1:], device="cpu")
    monkeypatch.setattr(engine_module, "TORCH_RANGE", 8192)  # many ranges per tensor: the chunking is exercised
    twin = MergeEngine(half[0], half[1:], device="cpu", kernel="torch")
    r = recipe(half, method, rescale)
    for dtype in (torch.float32, torch.bfloat16):
        got, want = twin.state_dict(r, dtype), numba.state_dict(r, dtype)
        for key in want:
            if rescale == "l1":  # float64 norms summed in another order: the scale may move by one float32 ulp
                torch.testing.assert_close(got[key], want[key], rtol=2e-7 if dtype == torch.float32 else 1e-2,
                                           atol=1e-8)
            else:
                assert torch.equal(got[key], want[key]), (method, key, dtype)


def test_save_streams_in_the_output_dtype_and_bf16_build_matches(half_families, tmp_path, monkeypatch):
    half, _ = half_families[torch.bfloat16]
    engine = MergeEngine(half[0], half[1:], device="cpu")
    r = recipe(half, "dare_ties", "dare")
    r.dtype = "bfloat16"
    monkeypatch.setattr(engine_module, "NUMBA_RANGE", 8192)  # the cast path in several ranges
    out = engine.save(r, tmp_path / "merged", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    expected = engine.state_dict(r, torch.float32)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    live = transformers.AutoModelForCausalLM.from_pretrained(half[0], dtype=torch.bfloat16)
    engine.build_into(r, live)
    for name, tensor in expected.items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor.bfloat16()), name  # one rounding, as torch casts
        assert torch.equal(live.state_dict()[name], tensor.bfloat16()), name
    assert not list(out.glob("*.tmp"))


def test_nan_in_an_input_stops_a_streamed_merge_and_leaves_no_shard(half_families, tmp_path):
    half, _ = half_families[torch.bfloat16]
    broken = convert(half[2], tmp_path / "broken", torch.bfloat16)
    state = load_file(broken / "model.safetensors")
    name = sorted(state)[-1]
    state[name].view(-1)[1] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeoptError, match=f"tensor {name} of .*broken holds 1 NaN"):
        MergeEngine(half[0], [half[1], broken], device="cpu")  # verify=True reads everything at load
    engine = MergeEngine(half[0], [half[1], broken], device="cpu", verify=False)
    out = tmp_path / "merged"
    with pytest.raises(MergeoptError, match="NaN"):
        engine.save(recipe([half[0], half[1], broken], "task_arithmetic", "dare"), out, max_shard_bytes=30_000)
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.tmp"))


def test_cpu_weights_are_mapped_from_the_files_not_copied(half_families):
    half, _ = half_families[torch.bfloat16]
    stored = checkpoint.StoredWeights(half[1])
    mapping = next(iter(stored._maps.values()))
    start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    entries = checkpoint.read_safetensors_header(half[1] / "model.safetensors")
    for name, entry in entries.items():
        tensor = stored[name]
        assert tensor.dtype == torch.bfloat16
        assert tensor.data_ptr() == start + entry.start  # the tensor's memory is the file's mapping
    stored.release(name)  # pages given back, the values read again from the file
    assert torch.equal(stored[name], load_file(half[1] / "model.safetensors")[name].reshape(-1))


def test_truncated_header_and_data_are_one_line(tmp_path, half_families):
    half, _ = half_families[torch.bfloat16]
    data = (half[1] / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:-10])
    with pytest.raises(MergeoptError, match="past the end of the file .* truncated"):
        checkpoint.read_safetensors_header(bad)
    bad.write_bytes(data[:20])
    with pytest.raises(MergeoptError, match="corrupt or truncated"):
        checkpoint.read_safetensors_header(bad)


@pytest.fixture(scope="module")
def frozen_family(tmp_path_factory):
    """bf16 fine-tunes that left the embeddings and every norm as the base stores them (frozen in training), over a
    base with negative zeros in a frozen and a trained tensor (the signed-zero corner of the shortcut)."""
    root = tmp_path_factory.mktemp("frozen")
    base, models = make_family(root, "llama", n_models=3, delta_scale=0.01)
    base_weights = {k: v.to(torch.bfloat16) for k, v in load_file(base / "model.safetensors").items()}
    frozen = [k for k in base_weights if "embed" in k or "norm" in k]
    trained = next(k for k in base_weights if "q_proj" in k)
    for name in (frozen[0], trained):
        base_weights[name].view(-1)[::7] = -0.0
    out = []
    for i, folder in enumerate([base, *models]):
        target = convert(folder, root / f"bf16-{i}", torch.bfloat16)
        weights = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "model.safetensors").items()}
        weights = {k: base_weights[k] if (i == 0 or k in frozen) else v for k, v in weights.items()}
        save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
        out.append(target)
    return out, frozen


FUSED_FORMS = [  # (method, per-model weights, global parameters): every sign case of the kernels' zero
    ("dare_ties", [0.6, 0.3, 0.4], {}),
    ("dare_linear", [0.6, -0.9, 0.1], {"normalize": True}),  # a negative weight sum: -0 after normalising
    ("dare_linear", [0.5, 0.5, 0.2], {"lambda": -1.0}),
    ("ties", [0.6, 0.3, 0.4], {"lambda": 0.7}),
    ("task_arithmetic", [1.0, -0.5, 0.25], {"normalize": True, "lambda": -2.0}),
    ("linear", [0.2, 0.5, 0.3], {"weight": 0.4}),  # the base averaged in: its coefficient is not 1
]


@pytest.mark.parametrize("kernel", ["numba", "torch"])
@pytest.mark.parametrize("method,weights,params", FUSED_FORMS)
def test_tensors_every_fine_tune_left_alone_skip_the_kernel_and_keep_its_bits(frozen_family, kernel, method,
                                                                              weights, params, monkeypatch):
    folders, frozen = frozen_family
    shortcut = sparsify.merge_range_unchanged
    taken = []
    monkeypatch.setattr(sparsify, "merge_range_unchanged", lambda *a: taken.append(1) or shortcut(*a))
    fast = MergeEngine(folders[0], folders[1:], device="cpu", kernel=kernel)
    assert set(frozen) == {name for name, rows in fast._unchanged.items() if rows == {0, 1, 2}}
    slow = MergeEngine(folders[0], folders[1:], device="cpu", kernel=kernel)
    slow._unchanged = {name: frozenset() for name in slow._unchanged}  # every tensor through the kernel
    r = Recipe(method, [ModelSpec(str(m), {"weight": w, "density": 0.6}) for m, w in zip(folders[1:], weights)],
               base_model=str(folders[0]), seed=5, parameters=params)
    for dtype in (torch.float32, torch.bfloat16):
        got, want = fast.state_dict(r, dtype), slow.state_dict(r, dtype)
        for key in want:  # bits, not values: -0 and +0 must come out as the kernel writes them
            assert torch.equal(got[key].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               want[key].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), (key, dtype)
    assert len(taken) >= 2 * len(frozen)  # the frozen tensors did take the shortcut, in both dtypes
