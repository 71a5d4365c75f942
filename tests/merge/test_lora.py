"""LoRA adapters as merge inputs (issue 22): an adapter means its merged checkpoint, formed tensor by tensor.

The oracle is PEFT itself: ``merge_and_unload`` of the same adapter into the same base, saved as a model folder (what
mergekit builds in its --lora-merge-cache for ``base+adapter``). Each tensor the engine forms must be that checkpoint's
up to the float32 rounding of B @ A, and a merge over adapters must be bit for bit the merge over the checkpoints the
engine forms, for every fused method, on real PEFT adapters of different ranks, targets and forms.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers import assert_one_line_error, make_adapter, make_family, merged_adapter, run_cli
from safetensors.torch import load_file

from optimizer.errors import MergeoptError
from optimizer.merge.engine import MergeEngine
from optimizer.merge.lora import LoraAdapter
from optimizer.recipe import ModelSpec, Recipe

pytest.importorskip("peft")

METHODS = {
    "task_arithmetic": lambda w: {"weight": w},
    "ties": lambda w: {"weight": w, "density": 0.4},
    "dare_ties": lambda w: {"weight": w, "density": 0.6},
    "dare_linear": lambda w: {"weight": w, "density": 0.5},
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    llama, _ = make_family(root / "llama", "llama", n_models=0)
    qwen2, _ = make_family(root / "qwen2", "qwen2", n_models=0)
    gpt2, _ = make_family(root / "gpt2", "gpt2", n_models=0)
    bf16 = root / "llama-bf16"
    transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16).save_pretrained(bf16)
    return {"llama": llama, "qwen2": qwen2, "gpt2": gpt2, "bf16": bf16}


# adapter forms: (base, make_adapter keyword arguments)
FORMS = {
    "rank4-qv": ("llama", {"r": 4, "targets": ("q_proj", "v_proj")}),
    "rank8-all-linear-rank-pattern": ("llama", {"r": 8, "targets": ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"),
                                                "rank_pattern": {"mlp.down_proj": 2},
                                                "alpha_pattern": {"layers.1.self_attn.q_proj": 3}}),
    "rslora-rank16": ("qwen2", {"r": 16, "alpha": 4, "targets": ("o_proj", "up_proj"), "use_rslora": True}),
    "modules-to-save-and-embedding": ("qwen2", {"r": 4, "targets": ("embed_tokens", "v_proj"),
                                                "modules_to_save": ["lm_head"]}),
    "tied-embedding": ("llama", {"r": 2, "targets": ("embed_tokens", "q_proj")}),
    "gpt2-conv1d-fan-in-fan-out": ("gpt2", {"r": 4, "targets": ("c_attn", "c_fc"), "fan_in_fan_out": True}),
    "bf16-base": ("bf16", {"r": 4, "targets": ("q_proj", "v_proj", "down_proj")}),
}


def adapters_and_merged(bases, form: str, root: Path, n: int = 2) -> tuple[Path, list[Path], list[Path]]:
    base_name, kwargs = FORMS[form]
    base = bases[base_name]
    dtype = torch.bfloat16 if base_name == "bf16" else None
    adapters = [make_adapter(base, root / f"adapter{i}", seed=i, **kwargs) for i in range(n)]
    merged = [merged_adapter(base, a, root / f"merged{i}", dtype=dtype) for i, a in enumerate(adapters)]
    return base, adapters, merged


def merge(base, models, method, weights=(0.7, 0.5), dtype=None, seed=0):
    recipe = Recipe(method, [ModelSpec(str(m), METHODS[method](w)) for m, w in zip(models, weights)],
                    base_model=str(base), dtype=dtype, seed=seed)
    return MergeEngine(base, models, verify=True).state_dict(recipe, dtype=torch.float32)


def ulp(values: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each value, in its own dtype."""
    scale = values.float().abs().clamp_min(torch.finfo(values.dtype).tiny)
    return torch.ldexp(torch.ones_like(scale), torch.frexp(scale)[1] - 1) * torch.finfo(values.dtype).eps


def write_formed(engine: MergeEngine, index: int, folder: Path) -> Path:
    """The engine's input ``index`` (an adapter: its formed tensors) written as a model folder."""
    from optimizer.merge import checkpoint

    store = engine.stored_weights(index)
    return checkpoint.write_model_folder(folder, ((n, store[n].view(engine.shapes[n]).clone()) for n in engine.names),
                                         engine.base_path, engine.stored_dtype())


# the fast tier runs three forms that between them cover every code path; the slow tier all of them
FAST_FORMS = ("rank8-all-linear-rank-pattern", "modules-to-save-and-embedding", "bf16-base")


@pytest.mark.parametrize("form", [f if f in FAST_FORMS else pytest.param(f, marks=pytest.mark.slow) for f in FORMS])
def test_an_adapter_is_its_merged_checkpoint_and_merges_as_that_checkpoint(bases, form, tmp_path):
    """Each adapted tensor the engine forms is PEFT's merge_and_unload of it, up to the float32 rounding of B @ A
    (PEFT's BLAS sums the rank's products in another order: at most one unit in the last place, on a few elements),
    and a merge over adapters is bit for bit the merge over the checkpoints the engine forms, for every fused method."""
    base, adapters, merged = adapters_and_merged(bases, form, tmp_path)
    engine = MergeEngine(base, adapters)
    differing = total = 0
    for i, folder in enumerate(merged):
        theirs = load_file(str(folder / "model.safetensors"))
        store = engine.stored_weights(1 + i)
        for name in engine.names:
            ours = store[name].view(engine.shapes[name])
            assert ours.dtype == theirs[name].dtype
            diff = (ours.float() - theirs[name].float()).abs()
            if ours.dtype == torch.float32:  # the README's float32 tolerance: 4e-7 of the tensor's largest value
                assert float(diff.max()) <= 4e-7 * float(theirs[name].abs().max()), f"{form}: {name}"
            else:  # rounded once to bf16 from float32 sums a few ulps of float32 apart: at most one bf16 ulp
                base_values = engine.stored_weights(0)[name].view(engine.shapes[name]).float().abs()
                bound = ulp(torch.maximum(theirs[name].float().abs(), base_values).to(ours.dtype))
                assert bool((diff <= bound).all()), f"{form}: {name} differs from PEFT's merge by > 1 ulp"
                differing += int((diff > 0).sum())
                total += diff.numel()
    assert differing <= 0.001 * total, f"{form}: {differing} of {total} bf16 elements differ from PEFT's merge"
    formed = [write_formed(engine, 1 + i, tmp_path / f"formed{i}") for i in range(len(adapters))]
    touched = set()
    for adapter in adapters:
        touched |= set(LoraAdapter(adapter).tensors)
    for method in METHODS:
        ours = merge(base, adapters, method)
        oracle = merge(base, formed, method)
        assert ours.keys() == oracle.keys()
        for name in ours:
            assert torch.equal(ours[name], oracle[name]), f"{form} {method}: {name} differs"
    # the adapters took part: the tensors they adapt differ from the base, the others are the base's, bit for bit
    plain = load_file(str(next(Path(base).glob("*.safetensors"))))
    changed = {n for n in ours if not torch.equal(ours[n], plain[n].float())}
    assert changed and changed <= touched


def test_base_plus_adapter_and_the_adapter_folder_are_one_model(bases, tmp_path):
    base = bases["llama"]
    adapter = make_adapter(base, tmp_path / "a", seed=3)
    engine = MergeEngine(base, [adapter])
    assert engine.model_paths == [f"{Path(base).resolve()}+{adapter.resolve()}"]
    by_folder = engine.state_dict(Recipe("task_arithmetic", [ModelSpec(str(adapter), {"weight": 0.5})],
                                         base_model=str(base)))
    by_reference = engine.state_dict(Recipe("task_arithmetic", [ModelSpec(f"{base}+{adapter}", {"weight": 0.5})],
                                            base_model=str(base)))
    assert all(torch.equal(by_folder[n], by_reference[n]) for n in by_folder)


def test_adapters_are_held_at_their_own_size_and_untouched_tensors_are_the_base(bases, tmp_path):
    base = bases["llama"]
    adapter = make_adapter(base, tmp_path / "a", r=2)
    engine = MergeEngine(base, [adapter])
    stored, own = engine.stored_weights(0), engine.stored_weights(1)
    assert own.nbytes == (adapter / "adapter_model.safetensors").stat().st_size - _header_bytes(adapter)
    assert own.nbytes < stored.nbytes / 10
    mlp = "model.layers.0.mlp.up_proj.weight"
    assert own[mlp] is stored[mlp]  # nothing formed for a tensor the adapter does not touch
    q = "model.layers.0.self_attn.q_proj.weight"
    assert own[q] is own[q] and not torch.equal(own[q], stored[q])  # formed once, kept while that tensor is merged
    own[mlp]
    formed = own[q]
    own.release(q)
    assert own[q] is not formed and torch.equal(own[q], formed)


def _header_bytes(adapter: Path) -> int:
    import struct

    with open(adapter / "adapter_model.safetensors", "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


# ---- bad adapters: one line, before anything loads -----------------------------------------------------------
def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, fragment", [
    ({"use_dora": True}, "DoRA (use_dora)"),
    ({"peft_type": "IA3"}, "is a PEFT IA3 adapter; mergeopt merges LoRA adapters only"),
    ({"lora_bias": True}, "lora_bias adds a trained bias"),
])
def test_forms_that_are_not_a_low_rank_delta_are_refused_in_one_line(bases, tmp_path, change, fragment):
    base = bases["llama"]
    adapter = make_adapter(base, tmp_path / "a")
    _edit_config(adapter, **change)
    with pytest.raises(MergeoptError) as err:
        MergeEngine(base, [adapter])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_real_dora_adapter_is_refused(bases, tmp_path):
    base = bases["llama"]
    adapter = make_adapter(base, tmp_path / "dora", use_dora=True)
    with pytest.raises(MergeoptError, match="DoRA"):
        MergeEngine(base, [adapter])


def test_an_adapter_of_another_shape_is_refused_in_one_line(bases, tmp_path):
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    narrow = tmp_path / "narrow"
    transformers.LlamaForCausalLM(config).save_pretrained(narrow)
    adapter = make_adapter(narrow, tmp_path / "a")
    with pytest.raises(MergeoptError) as err:
        MergeEngine(bases["llama"], [adapter])
    line = str(err.value)
    assert "adapts model.layers.0.self_attn.q_proj.weight as [32, 32]" in line and "stores it as [64, 64]" in line
    assert "trained on another base" in line and "\n" not in line
    gpt2_adapter = make_adapter(bases["gpt2"], tmp_path / "g", targets=("c_attn",), fan_in_fan_out=True)
    with pytest.raises(MergeoptError, match=r"adapts transformer.h.0.attn.c_attn.weight, which base .* does not store"):
        MergeEngine(bases["llama"], [gpt2_adapter])


def test_a_base_the_adapter_does_not_name_is_a_note_not_a_refusal(bases, tmp_path, caplog):
    base = bases["llama"]
    adapter = make_adapter(base, tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="mergeopt"):
        MergeEngine(base, [adapter])
    assert not caplog.records  # PEFT wrote this base's path
    copy = tmp_path / "moved-base"
    shutil.copytree(base, copy)
    with caplog.at_level(logging.WARNING, logger="mergeopt"):
        MergeEngine(copy, [adapter])
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and f"was trained on {base}; applying it to {copy}" in notes[0]
    _edit_config(adapter, base_model_name_or_path="HuggingFaceTB/moved-base")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergeopt"):
        MergeEngine(copy, [adapter])
    assert not caplog.records  # a hub id whose name is the folder's


def test_an_adapter_on_another_model_is_not_the_engines(bases, tmp_path):
    base = bases["llama"]
    adapter = make_adapter(base, tmp_path / "a")
    with pytest.raises(MergeoptError, match="applies the adapter to .*, not to the base"):
        MergeEngine(base, [f"{bases['qwen2']}+{adapter}"])


# ---- recipes and the command line ------------------------------------------------------------------------------
def _write_recipe(path: Path, base: Path, models: list, method: str = "dare_ties") -> Path:
    config = {"merge_method": method, "base_model": str(base),
              "models": [{"model": m, "parameters": {"weight": 0.6, "density": 0.7}} for m in models],
              "dtype": "float32", "mergeopt": {"seed": 3}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow  # four command-line runs
def test_mergeopt_merge_builds_base_plus_adapter_in_the_engine_in_both_mergekit_forms(bases, tmp_path):
    base = bases["llama"]
    adapters = [make_adapter(base, tmp_path / f"a{i}", seed=i) for i in range(2)]
    engine = MergeEngine(base, adapters)
    merged = [write_formed(engine, 1 + i, tmp_path / f"m{i}") for i in range(len(adapters))]
    string_form = _write_recipe(tmp_path / "string.yaml", base, [f"{base}+{a}" for a in adapters])
    mapping_form = _write_recipe(tmp_path / "mapping.yaml", base, [{"model": str(base), "lora": str(a)}
                                                                  for a in adapters])
    oracle = _write_recipe(tmp_path / "oracle.yaml", base, [str(m) for m in merged])
    outs = {}
    for name, recipe in (("string", string_form), ("mapping", mapping_form), ("oracle", oracle)):
        proc = run_cli("merge", recipe, "--out", tmp_path / f"out-{name}", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        assert "mergekit" not in proc.stderr, proc.stderr  # built by mergeopt's engine
        outs[name] = load_file(str(tmp_path / f"out-{name}" / "model.safetensors"))
    for name in outs["oracle"]:
        assert torch.equal(outs["string"][name], outs["oracle"][name])
        assert torch.equal(outs["mapping"][name], outs["oracle"][name])
    assert "adapters" in run_cli("merge", string_form, "--out", tmp_path / "plan", "--plan").stdout


def test_a_damaged_adapter_is_one_line_before_an_output_exists(bases, tmp_path):
    base = bases["llama"]
    adapter = make_adapter(base, tmp_path / "a")
    _edit_config(adapter, use_dora=True)
    recipe = _write_recipe(tmp_path / "r.yaml", base, [f"{base}+{adapter}"])
    proc = run_cli("merge", recipe, "--out", tmp_path / "out", "--device", "cpu")
    assert_one_line_error(proc, "DoRA (use_dora)")
    assert not (tmp_path / "out").exists()


# ---- search spaces ---------------------------------------------------------------------------------------------
def test_a_search_space_lists_adapter_folders_as_models_applied_to_its_base(bases, tmp_path):
    from optimizer.space import parse_space

    base = bases["llama"]
    adapters = [make_adapter(base, tmp_path / f"skill{i}", seed=i) for i in range(3)]
    space = parse_space({"base_model": str(base), "models": [str(a) for a in adapters], "merge_method": "dare_ties",
                         "objectives": ["t"], "tasks": "zoo"}, root=tmp_path)
    assert space.models == [f"{Path(base).resolve()}+{a.resolve()}" for a in adapters]
    assert [g.name for g in space.genes()][:2] == ["w.skill0", "w.skill1"]
    recipe = space.recipe([0.5] * space.dimension)
    exported = yaml.safe_load(recipe.to_yaml())
    assert exported["models"][0]["model"] == f"{Path(base).resolve()}+{adapters[0].resolve()}"  # mergekit's syntax
    engine = MergeEngine(space.base_model, space.models)
    reloaded = Recipe.from_dict(exported)
    assert engine.state_dict(reloaded).keys() == engine.state_dict(recipe).keys()


def test_a_search_over_adapter_folders_scores_parents_and_exports_recipes_that_remerge_bit_for_bit(search_setup,
                                                                                                  tmp_path):
    """The whole loop with adapters in models: the parents (each adapter's adapted model) are scored, candidates are
    built from the adapters into the live model, and the exported best.yaml (base+adapter, mergekit's syntax) merges
    with `mergeopt merge` to the weights that were scored."""
    from helpers import write_space

    from optimizer.export import export_run
    from optimizer.search.loop import run_search
    from optimizer.space import load_space

    base = search_setup / "models" / "m0"
    adapters = [make_adapter(base, tmp_path / f"skill{i}", r=2 + 2 * i, seed=i, scale=0.3,
                             targets=("q_proj", "v_proj", "up_proj")) for i in range(3)]
    path = write_space(search_setup, "adapters", models=[str(a) for a in adapters], budget={"trials": 3})
    space = load_space(path)
    result = run_search(space, tmp_path / "run", progress=False)
    assert set(result.parents) == {"base", "skill0", "skill1", "skill2"}
    assert len(set(str(s) for s in result.parents.values())) > 1  # the adapters changed what the parents score
    exported = export_run(tmp_path / "run")
    text = exported.best.path.read_text()
    assert f"{base.resolve()}+{adapters[0].resolve()}" in text
    out = tmp_path / "merged"
    proc = run_cli("merge", exported.best.path, "--out", out, "--device", "cpu")
    assert proc.returncode == 0 and "mergekit" not in proc.stderr, proc.stderr
    best = Recipe.load(exported.best.path)
    trial = result.study.get_trials()[best.info["trial"]]
    scored = MergeEngine(space.base_model, space.models).state_dict(
        Recipe.from_dict(yaml.safe_load(trial.user_attrs["recipe"])))
    merged = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(merged[n], scored[n]) for n in scored)
