"""The engine on several real architectures: live models, model folders, homology and unsafe input."""

import json

import pytest
import torch
import transformers
from helpers import ARCHS, make_family
from safetensors.torch import load_file, save_file

from optimizer.errors import MergeoptError
from optimizer.merge import checkpoint
from optimizer.merge.engine import MergeEngine
from optimizer.recipe import ModelSpec, Recipe


def dare_recipe(base, models, seed=0):
    return Recipe("dare_ties", [ModelSpec(str(m), {"weight": 0.6, "density": [0.8, 0.4]}) for m in models],
                  base_model=str(base), seed=seed)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_build_live_and_on_disk_identically(tmp_path, arch):
    base, models = make_family(tmp_path, arch, n_models=2)
    engine = MergeEngine(base, models, device="cpu")
    recipe = dare_recipe(base, models)
    expected = engine.state_dict(recipe)

    # every transformer block is found, and depth runs 0..1 across them
    depths = {s.t for s in engine.slots if checkpoint.layer_index(s.name) is not None}
    assert depths == {0.0, 0.5, 1.0}

    out = engine.save(recipe, tmp_path / "merged")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    state = loaded.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name

    live = transformers.AutoModelForCausalLM.from_pretrained(base)
    engine.build_into(recipe, live)
    state = live.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    # the merge changed the model and the model still runs
    assert not torch.equal(state[engine.names[-2]], load_file(base / "model.safetensors")[engine.names[-2]])
    logits = live(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_tied_embeddings_follow_the_merge(llama_family):
    base, models = llama_family
    engine = MergeEngine(base, models, device="cpu")
    live = transformers.AutoModelForCausalLM.from_pretrained(base)
    assert live.lm_head.weight.data_ptr() == live.model.embed_tokens.weight.data_ptr()
    engine.build_into(dare_recipe(base, models), live)
    assert torch.equal(live.lm_head.weight, live.model.embed_tokens.weight)
    assert live.lm_head.weight.data_ptr() == live.model.embed_tokens.weight.data_ptr()


def test_build_into_reuses_parameter_memory(llama_family):
    base, models = llama_family
    engine = MergeEngine(base, models, device="cpu")
    live = transformers.AutoModelForCausalLM.from_pretrained(base)
    pointers = {n: p.data_ptr() for n, p in live.named_parameters()}
    engine.build_into(dare_recipe(base, models, seed=1), live)
    first = {n: p.clone() for n, p in live.named_parameters()}
    engine.build_into(dare_recipe(base, models, seed=2), live)
    assert pointers == {n: p.data_ptr() for n, p in live.named_parameters()}
    assert any(not torch.equal(first[n], p) for n, p in live.named_parameters())


def test_bfloat16_live_model_and_output_dtype(tmp_path, llama_family):
    base, models = llama_family
    engine = MergeEngine(base, models, device="cpu")
    recipe = dare_recipe(base, models)
    expected = engine.state_dict(recipe)
    live = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    engine.build_into(recipe, live)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(live.state_dict()[name], expected[name].bfloat16())
    recipe.dtype = "bfloat16"
    out = engine.save(recipe, tmp_path / "bf16")
    assert load_file(out / "model.safetensors")[name].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_sharded_output_loads(tmp_path, llama_family):
    base, models = llama_family
    engine = MergeEngine(base, models, device="cpu")
    recipe = dare_recipe(base, models)
    out = engine.save(recipe, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = engine.state_dict(recipe)
    for name, tensor in expected.items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    # the engine reads sharded folders too
    again = MergeEngine(out, models, device="cpu")
    assert torch.equal(again.stored_weights(0)[engine.names[0]], expected[engine.names[0]].reshape(-1))


# ---- homology ------------------------------------------------------------------------------------------
def _variant(tmp_path, name, **overrides):
    config = ARCHS["llama"]()
    for k, v in overrides.items():
        setattr(config, k, v)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_shape_mismatch_names_the_tensor_and_shapes(tmp_path, llama_family):
    base, _ = llama_family
    other = _variant(tmp_path, "wide", intermediate_size=128)
    with pytest.raises(MergeoptError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight has shape \[64, 96\] .* \[64, 128\]"):
        MergeEngine(base, [other], device="cpu")


def test_missing_tensor_is_named(tmp_path, llama_family):
    base, models = llama_family
    broken = tmp_path / "missing"
    broken.mkdir()
    (broken / "config.json").write_text((models[0] / "config.json").read_text())
    state = load_file(models[0] / "model.safetensors")
    del state["model.layers.2.self_attn.v_proj.weight"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(MergeoptError, match=r"tensor model\.layers\.2\.self_attn\.v_proj\.weight .* is missing"):
        MergeEngine(base, [broken], device="cpu")


def test_vocabulary_and_architecture_mismatch(tmp_path, llama_family):
    base, _ = llama_family
    with pytest.raises(MergeoptError, match="vocab_size 50 .* 48"):
        MergeEngine(base, [_variant(tmp_path, "vocab", vocab_size=50)], device="cpu")
    gpt2_base, _ = make_family(tmp_path, "gpt2", n_models=0)
    with pytest.raises(MergeoptError, match="GPT2LMHeadModel"):
        MergeEngine(base, [gpt2_base], device="cpu")


def test_pickled_weights_are_refused_unless_opted_in(tmp_path, llama_family):
    base, models = llama_family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((models[0] / "config.json").read_text())
    torch.save(load_file(models[0] / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(MergeoptError, match="pickled weights .* --allow-pickle"):
        MergeEngine(base, [pickled], device="cpu")
    engine = MergeEngine(base, [pickled], device="cpu", allow_pickle=True)
    direct = MergeEngine(base, [models[0]], device="cpu")
    name = engine.names[3]
    assert torch.equal(engine.delta(name, 0), direct.delta(name, 0))


def test_corrupt_and_truncated_files(tmp_path, llama_family):
    base, models = llama_family
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "config.json").write_text((models[0] / "config.json").read_text())
    data = (models[0] / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MergeoptError, match="truncated"):
        MergeEngine(base, [bad], device="cpu")
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(MergeoptError, match="corrupt"):
        MergeEngine(base, [bad], device="cpu")
    noconfig = tmp_path / "noconfig"
    noconfig.mkdir()
    (noconfig / "model.safetensors").write_bytes(data)
    with pytest.raises(MergeoptError, match="no config.json"):
        MergeEngine(base, [noconfig], device="cpu")


def test_recipe_model_not_in_engine(llama_family, tmp_path):
    base, models = llama_family
    engine = MergeEngine(base, models[:1], device="cpu")
    with pytest.raises(MergeoptError, match="was not loaded into the engine"):
        engine.state_dict(dare_recipe(base, models))


def test_layer_index_per_architecture():
    assert checkpoint.layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert checkpoint.layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert checkpoint.layer_index("gpt_neox.layers.7.mlp.dense_h_to_4h.bias") == 7
    assert checkpoint.layer_index("model.embed_tokens.weight") is None
    assert checkpoint.layer_index("lm_head.weight") is None
    assert checkpoint.layer_index("transformer.wte.weight") is None
