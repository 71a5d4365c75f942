"""Bring your mergekit YAML: every recipe form either merges as mergekit merges it, or goes through mergekit itself
with a note, or is refused in one line -- never silently differently.

Each form is one mergekit configuration, run twice on the same tiny family: by mergekit 0.1.5 in-process
(``mergekit.merge.run_merge``) and by ``mergeopt merge`` (the CLI entry point, so the routing is tested too).
The cases follow the ideas of mergekit's own basic-merge tests (methods x parameter forms x families: Llama with
tied embeddings, Mistral, Qwen2, GPT-2, a bf16 checkpoint and a sharded one).

Tolerances (documented in the README): float32 arithmetic agrees to float32 rounding (the fused kernel sums
``base + w * delta`` in another order than mergekit: max |diff| <= 4e-7 * max|x|; most tensors are bit-identical).
With bf16 or fp16 arithmetic (``dtype: bfloat16``, or no dtype on a bf16 checkpoint) mergekit rounds the inputs and
every intermediate to that dtype while the fused kernel computes in float32 and rounds once: written values differ
by at most ``ULPS`` units in the last place of the largest input or output at that element. TIES keeps exactly k
elements in both tools, but which elements tied at the cut-off survive is unspecified in mergekit (torch's unstable
argsort): those elements are exempt; with bf16 arithmetic mergekit also trims and elects signs on rounded deltas,
so up to ``TIES_BF16_OUTLIERS`` of the elements may go either way. DARE masks are random in both tools: those forms
are compared statistically in test_mergekit.py.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers import make_family
from safetensors.torch import load_file

from optimizer.cli import main as mergeopt_main

mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit is not installed (pip install -e '.[dev]')")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

FLOAT32_REL = 4e-7  # max |ours - mergekit| / max |mergekit| for float32 arithmetic
TORCH_REL = 1e-5  # the same for the torch-path methods (slerp's trigonometry, norms summed in another order)
ULPS = 3  # bf16/fp16 arithmetic: at most this many units in the last place apart (of the largest input)
# nuslerp against a base in bf16/fp16: mergekit rounds each delta, the interpolation and the sum with the base in that
# dtype (four roundings where the fused forms have one or two); measured at most 5 ulps on these families
NUSLERP_BASE_ULPS = 6
# TIES trim: both tools keep exactly k = int(density * n) elements of each delta, but when elements tie in magnitude
# at the cut-off, which of them survive is unspecified in mergekit (torch's unstable argsort; the order of equal
# keys changes with the tensor size and threads) while mergeopt keeps the lowest-index ones. Ties are common in
# bf16 checkpoints and happen in float32; on these forms elements tied at a cut-off may differ, the rest may not.
TIES_BF16_OUTLIERS = 0.005
TIES_TIED_AT_CUTOFF = {"ties-int8-mask", "bf16-checkpoint-dtype-float32"}


def tied_at_cutoff(inputs: list[dict], name: str, densities=(0.5, 0.3, 0.9)) -> torch.Tensor:
    """Elements tied in magnitude at some model's TIES cut-off: whether they survive the trim is unspecified."""
    base, models = inputs[0], inputs[1:]
    tied = torch.zeros(base[name].shape, dtype=torch.bool)
    for model, density in zip(models, densities, strict=False):
        magnitude = (model[name].float() - base[name].float()).abs()
        k = max(1, int(density * magnitude.numel()))
        cut = magnitude.flatten().kthvalue(magnitude.numel() - k + 1).values
        if int((magnitude == cut).sum()) > 1:
            tied |= magnitude == cut
    return tied


# ---- families ----------------------------------------------------------------------------------------------------
def bpe_tokenizer(folder: Path, size: int = 48, chat_template: str | None = None) -> None:
    """A BPE tokenizer with exactly ``size`` tokens (mergekit builds tokenizers only from BPE ones)."""
    from tokenizers import Tokenizer, models

    symbols = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(" .,!?+-=*/()")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for s in symbols[: size - len(vocab)]:
        vocab[s] = len(vocab)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[],
                                                                                      unk_token="<unk>")),
                                                unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)


def _resave(folder: Path, **kwargs) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=kwargs.pop("dtype", None))
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    model.save_pretrained(folder, **kwargs)


# families mergekit's basic-merge tests use beyond tests/helpers.py's: IBM Granite, and a LLaVA (CLIP vision tower +
# Llama text model) as their picoLlaVa
LOCAL_FAMILIES = {
    "granite": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=48, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
        num_hidden_layers=2)),
    "llava": lambda: transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                                                    num_attention_heads=2, hidden_size=64, intermediate_size=128),
        text_config=transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48,
                                             num_attention_heads=16, num_hidden_layers=2),
        image_seq_length=16)),
}


def local_family(root: Path, name: str, n_models: int = 3, seed: int = 0) -> tuple[Path, list[Path]]:
    """A base and fine-tunes (base + 0.02 * noise) of a LOCAL_FAMILIES model, as make_family builds them."""
    torch.manual_seed(seed)
    base = LOCAL_FAMILIES[name]()
    folders = []
    for i in range(n_models + 1):
        model = LOCAL_FAMILIES[name]()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed * 100 + i)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02 * (i > 0))
        model.save_pretrained(root / f"{name}-{i}")
        folders.append(root / f"{name}-{i}")
    return folders[0], folders[1:]


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Tiny families, each a base and three fine-tunes, with a 48-token BPE tokenizer (= vocab_size)."""
    root = tmp_path_factory.mktemp("families")
    built = {}
    for name, arch in [("llama", "llama"), ("mistral", "mistral"), ("qwen2", "qwen2"), ("gpt2", "gpt2"),
                       ("bf16", "llama"), ("sharded", "qwen2"), ("granite", None), ("llava", None)]:
        if arch is None:
            base, models = local_family(root / name, name, seed=len(built))
        else:
            base, models = make_family(root / name, arch, seed=len(built))
        for folder in [base, *models]:
            if name == "bf16":
                _resave(folder, dtype=torch.bfloat16)
            elif name == "sharded":
                _resave(folder, max_shard_size="20KB")
            bpe_tokenizer(folder)
        built[name] = (str(base), [str(m) for m in models])
    assert len(list(Path(built["sharded"][0]).glob("*.safetensors"))) > 1
    return built


# ---- the two tools -----------------------------------------------------------------------------------------------
def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def run_mergekit(config: dict, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    merge_config = MergeConfiguration.model_validate(copy.deepcopy(config))
    mergekit_merge.run_merge(merge_config, str(out), MergeOptions(random_seed=seed, quiet=True, lazy_unpickle=False))
    return read_folder(out)


def run_mergeopt(config: dict, tmp_path: Path, capsys) -> tuple[int, dict[str, torch.Tensor], str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "mergeopt-out"
    code = mergeopt_main(["merge", str(path), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    return code, (read_folder(out) if code == 0 else {}), err


def merge_both(config: dict, tmp_path: Path, capsys) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """mergekit's and mergeopt's merge of one recipe, mergeopt's having succeeded: (theirs, ours, mergeopt's stderr)."""
    theirs = run_mergekit(config, tmp_path / "mergekit-out")
    code, ours, err = run_mergeopt(config, tmp_path, capsys)
    assert code == 0, err
    return theirs, ours, err


def assert_same(ours: dict, theirs: dict, form: str, ulps: int = 0, inputs: list[dict] | None = None,
                exempt=None, outliers: float = 0.0, rel: float = 0.0) -> None:
    """Every tensor mergekit writes, in the same dtype; float32 to rounding; bf16/fp16 within ``ulps`` units in the
    last place of the largest magnitude among the inputs and the output at that element, but for at most an
    ``outliers`` share of the model's elements; ``exempt(name)`` masks elements whose value is unspecified."""
    assert theirs and set(theirs) <= set(ours), f"{form}: tensors differ: {sorted(set(theirs) ^ set(ours))[:3]}"
    assert len(ours) - len(theirs) <= 1, f"{form}: mergeopt wrote extra tensors"  # mergekit drops a tied lm_head
    beyond = total = 0
    for name, expected in theirs.items():
        got = ours[name]
        assert got.dtype == expected.dtype, f"{form}: {name} written as {got.dtype}, mergekit wrote {expected.dtype}"
        diff = (got.float() - expected.float()).abs()
        if exempt is not None:  # elements tied at a TIES cut-off (see TIES_TIED_AT_CUTOFF)
            diff = torch.where(exempt(name), torch.zeros_like(diff), diff)
        if ulps:
            scale = torch.stack([expected.float().abs()] + [x[name].float().abs() for x in inputs]).max(0).values
            exponent = torch.frexp(scale.clamp_min(torch.finfo(expected.dtype).tiny))[1]
            ulp = torch.ldexp(torch.ones_like(scale), exponent - 1) * torch.finfo(expected.dtype).eps
            beyond += int((diff / ulp > ulps).sum())
            total += diff.numel()
        else:
            worst = float(diff.max()) / (float(expected.abs().max()) or 1.0)
            assert worst <= (rel or FLOAT32_REL), f"{form}: {name} differs by {worst:.2e} relative"
    if ulps:
        assert beyond <= outliers * total, f"{form}: {beyond} of {total} elements beyond {ulps} ulps"


# ---- recipe forms --------------------------------------------------------------------------------------------------
def models_form(base, models, method, per_model, glob=None, with_base=True, n=3, **top):
    config = {"merge_method": method}
    if with_base:
        config["base_model"] = base
    config["models"] = [{"model": m, **({"parameters": p} if p else {})}
                        for m, p in zip(models[:n], per_model, strict=False)]
    if glob:
        config["parameters"] = glob
    config.update(top)
    return config


W3 = [{"weight": 0.6}, {"weight": 0.3}, {"weight": 0.5}]
BASIC = [{"weight": 0.6}, {"weight": 0.4}]
TIES3 = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}, {"weight": 0.8, "density": 0.9}]

# form name -> (family, config builder(base, models)); the fused engine must agree with mergekit on each.
AGREE = {
    "linear": ("llama", lambda b, m: models_form(b, m, "linear", W3, with_base=False)),
    "linear-no-normalize": ("llama", lambda b, m: models_form(b, m, "linear", W3, {"normalize": False},
                                                              with_base=False)),
    "linear-base-outside-models-lambda-ignored": (
        "llama", lambda b, m: models_form(b, m, "linear", W3, {"weight": 0.2, "lambda": 0.5})),
    "linear-base-among-models": ("llama", lambda b, m: models_form(b, [b, *m], "linear", W3)),
    "task_arithmetic": ("llama", lambda b, m: models_form(b, m, "task_arithmetic", W3, {"lambda": 0.8})),
    "task_arithmetic-normalize": ("mistral", lambda b, m: models_form(b, m, "task_arithmetic", W3,
                                                                      {"normalize": True})),
    "task_arithmetic-global-weight": ("qwen2", lambda b, m: models_form(b, m, "task_arithmetic", [{}, {}, {}],
                                                                        {"weight": 0.4})),
    "task_arithmetic-negative-weight": ("gpt2", lambda b, m: models_form(
        b, m, "task_arithmetic", [{"weight": 1.0}, {"weight": -0.5}, {"weight": 0.25}])),
    "ties": ("llama", lambda b, m: models_form(b, m, "ties", TIES3)),
    "ties-rescale": ("llama", lambda b, m: models_form(b, m, "ties", TIES3, {"rescale": True})),
    "ties-no-normalize-lambda": ("qwen2", lambda b, m: models_form(b, m, "ties", TIES3,
                                                                   {"normalize": False, "lambda": 1.3})),
    "ties-int8-mask": ("mistral", lambda b, m: models_form(b, m, "ties", TIES3, {"int8_mask": True})),
    "ties-gradients": ("llama", lambda b, m: models_form(
        b, m, "ties", [{"weight": [0.2, 1.0], "density": [0.9, 0.2]}, {"weight": 0.4, "density": 0.3},
                       {"weight": [1.0, 0.5, 0.0], "density": 0.7}])),
    "ties-filters": ("llama", lambda b, m: models_form(
        b, m, "ties", [{"weight": [{"filter": "self_attn", "value": 0.9}, {"filter": "mlp", "value": [0.1, 0.5]},
                                   {"value": 0.3}], "density": 0.5},
                       {"weight": {"filter": "mlp", "value": 0.7}, "density": [{"filter": "self_attn", "value": 0.2},
                                                                               {"value": 0.8}]},
                       {"weight": 0.5, "density": 0.6}], {"weight": 0.1})),
    "ties-zero-weight-sum": ("llama", lambda b, m: models_form(
        b, m, "ties", [{"weight": 0.5, "density": 0.5}, {"weight": -0.5, "density": 0.5}], n=2)),
    "ties-string-numbers": ("gpt2", lambda b, m: models_form(
        b, m, "ties", [{"weight": "0.6", "density": "5e-1"}, {"weight": 0.4, "density": 0.3}], n=2)),
    "ties-density-bounds": ("qwen2", lambda b, m: models_form(
        b, m, "ties", [{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 0.0},
                       {"weight": 0.3, "density": 0.01}])),
    "full-range-slices": ("llama", lambda b, m: {
        "merge_method": "ties", "base_model": b, "parameters": {"normalize": True},
        "slices": [{"sources": [{"model": x, "layer_range": [0, 3], "parameters": p}
                                for x, p in zip([b, *m], [{}, *TIES3], strict=True)]}]}),
    "sharded-checkpoint": ("sharded", lambda b, m: models_form(b, m, "ties", TIES3)),
    "gpt2-ties": ("gpt2", lambda b, m: models_form(b, m, "ties", TIES3)),
    # mergekit's ModelReference as a mapping ({model: {path, revision}}): the same as the path
    "model-reference-mapping": ("qwen2", lambda b, m: {
        "merge_method": "task_arithmetic", "base_model": {"model": {"path": b}},
        "models": [{"model": {"model": {"path": x}}, "parameters": p} for x, p in zip(m, W3, strict=True)]}),
    "dtype-float32-out-bfloat16": ("llama", lambda b, m: models_form(b, m, "task_arithmetic", W3, dtype="float32",
                                                                    out_dtype="bfloat16")),
    "bf16-checkpoint-dtype-float32": ("bf16", lambda b, m: models_form(b, m, "ties", TIES3, dtype="float32")),
}
# bf16/fp16 arithmetic: mergekit rounds intermediates, the fused kernel once (see the module docstring).
AGREE_ULPS = {
    "bf16-checkpoint-no-dtype-keeps-bf16": ("bf16", lambda b, m: models_form(b, m, "task_arithmetic", W3)),
    "dtype-bfloat16": ("llama", lambda b, m: models_form(b, m, "task_arithmetic", W3, dtype="bfloat16")),
    "dtype-float16": ("mistral", lambda b, m: models_form(b, m, "task_arithmetic", W3, dtype="float16")),
    "bf16-checkpoint-ties": ("bf16", lambda b, m: models_form(b, m, "ties", TIES3)),
    "bf16-checkpoint-linear-no-dtype": ("bf16", lambda b, m: models_form(b, m, "linear", W3, with_base=False)),
    # mergekit's examples/ (linear.yml, ties.yml, bio-merge.yml) on tiny families
    "example-linear": ("llama", lambda b, m: models_form(b, m, "linear", [{"weight": 1.0}, {"weight": 0.3},
                                                                          {"weight": 0.5}], with_base=False,
                                                         dtype="float16")),
    "example-ties": ("llama", lambda b, m: models_form(
        b, m, "ties", [{"density": [1, 0.7, 0.1], "weight": 1.0}, {"density": 0.5, "weight": [0, 0.3, 0.7, 1]},
                       {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}],
        {"normalize": True, "int8_mask": True}, dtype="float16")),
    "example-bio-merge": ("mistral", lambda b, m: models_form(
        b, m, "ties", [{"density": 0.5, "weight": 0.5}] * 2, {"normalize": False, "int8_mask": True}, n=2,
        dtype="float16")),
    # mergekit's tests/test_basic_merges.py: two models, weights 0.6 / 0.4, dtype bfloat16
    "basic-linear": ("llama", lambda b, m: models_form(b, m, "linear", BASIC, with_base=False, n=2,
                                                       dtype="bfloat16")),
    "basic-task_arithmetic": ("qwen2", lambda b, m: models_form(b, m, "task_arithmetic", BASIC, n=2,
                                                                dtype="bfloat16")),
    "basic-ties": ("llama", lambda b, m: models_form(b, m, "ties", BASIC, {"density": 0.3}, n=2,
                                                     dtype="bfloat16")),
    "basic-granite-linear": ("granite", lambda b, m: models_form(b, m, "linear", BASIC, with_base=False, n=2,
                                                                 dtype="bfloat16")),
}
# forms the fused engine does not run: mergeopt hands them to mergekit, so the result is mergekit's, bit for bit.
THROUGH_MERGEKIT = {
    "multislerp": ("llama", lambda b, m: models_form(b, m, "multislerp", W3, with_base=False)),
    "karcher": ("llama", lambda b, m: models_form(b, m, "karcher", [{}, {}, {}], {"max_iter": 5}, with_base=False)),
    "sce": ("llama", lambda b, m: models_form(b, m, "sce", [{}, {}, {}], {"select_topk": 0.5})),
    "ram": ("qwen2", lambda b, m: models_form(b, m, "ram", [{}, {}])),
    "nearswap": ("llama", lambda b, m: models_form(b, m, "nearswap", [{}], {"t": 0.001}, n=1)),
    "arcee_fusion": ("llama", lambda b, m: models_form(b, m, "arcee_fusion", [{}], n=1)),
    "passthrough-layer-stack": ("llama", lambda b, m: {
        "merge_method": "passthrough", "slices": [{"sources": [{"model": m[0], "layer_range": [0, 2]}]},
                                                  {"sources": [{"model": m[1], "layer_range": [1, 3]}]}]}),
    "partial-slices-ties": ("llama", lambda b, m: {
        "merge_method": "ties", "base_model": b,
        "slices": [{"sources": [{"model": b, "layer_range": [0, 2]},
                                {"model": m[0], "layer_range": [0, 2], "parameters": {"weight": 0.5,
                                                                                      "density": 0.5}}]}]}),
    "example-arcee_fusion": ("llama", lambda b, m: models_form(b, [b, m[0]], "arcee_fusion", [{}, {}],
                                                                dtype="bfloat16")),
    "basic-passthrough-copy": ("gpt2", lambda b, m: models_form(b, m, "passthrough", [{}], with_base=False, n=1,
                                                                dtype="bfloat16")),
    "basic-gpt2-stack": ("gpt2", lambda b, m: {
        "merge_method": "passthrough", "dtype": "bfloat16",
        "slices": [{"sources": [{"model": m[0], "layer_range": [0, 3]}]}] * 2}),
    "basic-passthrough-scale": ("llama", lambda b, m: models_form(
        b, m, "passthrough", [{"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}], with_base=False, n=1)),
    "basic-multislerp-base": ("mistral", lambda b, m: models_form(b, m, "multislerp", BASIC, n=2,
                                                                  dtype="bfloat16")),
    "basic-ramplus_tl": ("llama", lambda b, m: models_form(b, m, "ramplus_tl", BASIC, {"r": 0.05, "alpha": 1.0},
                                                           n=2)),
    "basic-karcher-base-ignored": ("qwen2", lambda b, m: models_form(b, m, "karcher", BASIC,
                                                                     {"max_iter": 5, "tol": 1e-5}, n=2)),
    "tokenizer-block": ("llama", lambda b, m: models_form(b, m, "task_arithmetic", W3,
                                                         tokenizer={"source": "base"})),
    # mergekit's README: a tokenizer block with per-token embedding sources and padding
    "tokenizer-block-tokens": ("llama", lambda b, m: models_form(
        b, m, "task_arithmetic", W3, tokenizer={"source": "union", "pad_to_multiple_of": 32,
                                                "tokens": {"<s>": {"source": {"kind": "zero"}},
                                                           "</s>": {"source": m[0], "force": True}}})),
    "model-reference-override-architecture": ("llama", lambda b, m: models_form(
        b, [{"model": {"path": m[0]}, "override_architecture": "LlamaForCausalLM"}, m[1]], "task_arithmetic",
        BASIC, n=2)),
    "basic-granite-copy": ("granite", lambda b, m: models_form(b, m, "passthrough", [{}], with_base=False, n=1,
                                                               dtype="bfloat16")),
}
# in mergeopt's engine through the torch path (optimizer/merge/torch_methods.py): float32 agrees to 1e-5 relative
# (trigonometry and norms summed in another order), bf16/fp16 arithmetic within ULPS like the fused forms.
TORCH_PATH = {
    "slerp": ("llama", lambda b, m: models_form(b, m, "slerp", [{}], {"t": [0.0, 0.5, 1.0]}, n=1)),
    "slerp-filters": ("mistral", lambda b, m: models_form(
        b, m, "slerp", [{}], {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}, n=1)),
    "nuslerp": ("llama", lambda b, m: models_form(b, m, "nuslerp", [{"weight": 0.3}, {"weight": 0.7}],
                                                  with_base=False, n=2)),
    "nuslerp-base": ("qwen2", lambda b, m: models_form(b, m, "nuslerp", [{"weight": 0.4}, {"weight": 0.6}], n=2)),
    "model_stock": ("llama", lambda b, m: models_form(b, m, "model_stock", [{}, {}, {}])),
    "breadcrumbs": ("llama", lambda b, m: models_form(b, m, "breadcrumbs", [{"weight": 0.5, "density": 0.8,
                                                                             "gamma": 0.05}] * 3)),
    "breadcrumbs_ties": ("mistral", lambda b, m: models_form(b, m, "breadcrumbs_ties",
                                                             [{"weight": 0.5, "density": 0.8}] * 3)),
    "example-gradient-slerp-slices": ("llama", lambda b, m: {
        "merge_method": "slerp", "base_model": b, "dtype": "float16",
        "slices": [{"sources": [{"model": b, "layer_range": [0, 3]}, {"model": m[0], "layer_range": [0, 3]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}),
    "basic-slerp": ("llama", lambda b, m: models_form(b, [b, m[0]], "slerp", BASIC, {"t": 0.35}, dtype="bfloat16")),
    "basic-nuslerp-row-wise": ("llama", lambda b, m: models_form(b, m, "nuslerp", BASIC, {"nuslerp_row_wise": True,
                                                                 "nuslerp_flatten": False}, with_base=False, n=2)),
    "basic-nuslerp-base-zero-sum": ("llama", lambda b, m: models_form(
        b, m, "nuslerp", [{"weight": -0.5}, {"weight": 0.5}], {"nuslerp_flatten": False}, n=2)),
    "basic-model_stock-filter-wise": ("llama", lambda b, m: models_form(b, m, "model_stock", BASIC,
                                                                        {"filter_wise": True}, n=2)),
    "basic-breadcrumbs": ("llama", lambda b, m: models_form(b, m, "breadcrumbs", BASIC, n=2, dtype="bfloat16")),
    "basic-model_stock": ("qwen2", lambda b, m: models_form(b, m, "model_stock", BASIC, n=2, dtype="bfloat16")),
    "basic-granite-slerp": ("granite", lambda b, m: models_form(b, [b, m[0]], "slerp", [{}, {}], {"t": 0.5},
                                                                dtype="bfloat16")),
    # mergekit's gradient-slerp example in its models: form (the base listed among the models)
    "example-gradient-slerp-models": ("mistral", lambda b, m: models_form(
        b, [b, m[0]], "slerp", [{}, {}], {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        dtype="float16")),
    # mergekit's docs: gamma >= 1 - density drops fewer outliers so that density elements are kept
    "docs-breadcrumbs-gamma-past-density": ("gpt2", lambda b, m: models_form(
        b, m, "breadcrumbs_ties", [{"weight": 0.5, "density": 0.9, "gamma": 0.2}] * 3)),
    # one full-range slice with output-slice parameters (mergekit's precedence: sources, slice, then global)
    "full-range-slice-parameters": ("llama", lambda b, m: {
        "merge_method": "breadcrumbs", "base_model": b, "parameters": {"lambda": 0.9},
        "slices": [{"parameters": {"density": 0.7, "gamma": 0.02},
                    "sources": [{"model": x, "layer_range": [0, 3], "parameters": p}
                                for x, p in zip([b, *m], [{}, *W3], strict=True)]}]}),
}
# mergekit's basic-merge tests run nuslerp over every (base, nuslerp_row_wise, nuslerp_flatten), in bfloat16
TORCH_PATH.update({
    f"basic-nuslerp-{'base' if base else 'no-base'}-row-wise-{row_wise}-flatten-{flatten}".lower(): (
        "llama", lambda b, m, base=base, rw=row_wise, fl=flatten: models_form(
            b, m, "nuslerp", BASIC, {"nuslerp_row_wise": rw, "nuslerp_flatten": fl}, with_base=base, n=2,
            dtype="bfloat16"))
    for base in (False, True) for row_wise in (False, True) for flatten in (False, True)})
# DELLA drops at random in both tools (mergekit: torch.bernoulli; mergeopt: the DARE counter hash): compared on the
# share of elements that moved away from the base.
DELLA = {
    "della": ("llama", lambda b, m: models_form(b, m, "della", [{"weight": 0.5, "density": 0.5, "epsilon": 0.1}] * 3,
                                                {"lambda": 1.0})),
    "della_linear": ("gpt2", lambda b, m: models_form(b, m, "della_linear", [{"weight": 0.5, "density": 0.6}] * 3)),
    # mergekit's basic-merge tests (bfloat16): DELLA with lambda, and DARE-TIES (random in both tools as well)
    "basic-della": ("llama", lambda b, m: models_form(b, m, "della", BASIC, {"density": 0.66, "epsilon": 0.05,
                                                                            "lambda": 0.5}, n=2, dtype="bfloat16")),
    "basic-dare_ties": ("qwen2", lambda b, m: models_form(b, m, "dare_ties", BASIC, {"density": 0.66}, n=2,
                                                          dtype="bfloat16")),
}
# forms refused in one line, before any model is loaded or any output folder made
REFUSED = {
    "linear-zero-weight-sum": ("llama", lambda b, m: models_form(b, m, "linear", [{"weight": 0.5}, {"weight": -0.5}],
                                                                 with_base=False, n=2),
                               "linear weights sum to 0"),
    "linear-base-outside-without-weight": ("llama", lambda b, m: models_form(b, m, "linear", W3),
                                           "needs a weight"),
    "density-out-of-range": ("llama", lambda b, m: models_form(b, m, "ties", [{"weight": 1, "density": 1.5}], n=1),
                             r"density: 1.5 is outside \[0, 1\]"),
    "density-typo": ("llama", lambda b, m: models_form(b, m, "ties", [{"weight": 1, "densty": 0.5}], n=1),
                     r"densty: unknown parameter \(did you mean 'density'"),
    "weight-not-a-number": ("llama", lambda b, m: models_form(b, m, "task_arithmetic", [{"weight": "abc"}], n=1),
                            "weight: 'abc' is not a number"),
    "unknown-method": ("llama", lambda b, m: models_form(b, m, "dare_tie", [{"weight": 1}], n=1),
                       r"did you mean 'dare_ties'"),
    "slerp-typo-through-mergekit": ("llama", lambda b, m: models_form(b, m, "slerp", [{}], {"tt": 0.5}, n=1),
                                    r"tt: unknown parameter \(did you mean 't'"),
    "basic-della-invalid-epsilon": ("llama", lambda b, m: models_form(
        b, m, "della", BASIC, {"density": 0.66, "epsilon": 1.35, "lambda": 0.5}, n=2),
        r"epsilon: 1.35 is outside \[0, 1\]"),
    "della-epsilon-past-density": ("llama", lambda b, m: models_form(
        b, m, "della", [{"weight": 0.5, "density": 0.9, "epsilon": 0.15}], n=1),
        r"density 0.9 \+/- epsilon 0.15 must stay within \(0, 1\)"),
    "lora-folder-is-not-an-adapter": ("llama", lambda b, m: models_form(b, [f"{m[0]}+{m[1]}", m[2]], "task_arithmetic",
                                                                     BASIC, n=2),
                                      "is not a PEFT adapter folder"),
    "hub-id-not-cached": ("llama", lambda b, m: {"merge_method": "task_arithmetic", "base_model": b,
                                                 "models": [{"model": "no-such-org/no-such-model@v1",
                                                             "parameters": {"weight": 1}}]},
                          "not in the local Hugging Face cache"),
}


@pytest.mark.parametrize("form", sorted(AGREE))
def test_agree_with_mergekit(form, families, tmp_path, capsys):
    family, build = AGREE[form]
    config = build(*families[family])
    theirs, ours, err = merge_both(config, tmp_path, capsys)
    assert "through mergekit" not in err  # the fused engine ran it
    assert_same(ours, theirs, form, **tie_exemption(form, families[family]))


@pytest.mark.parametrize("form", sorted(AGREE_ULPS))
def test_agree_with_mergekit_within_ulps_in_low_precision(form, families, tmp_path, capsys):
    family, build = AGREE_ULPS[form]
    config = build(*families[family])
    theirs, ours, err = merge_both(config, tmp_path, capsys)
    base, models = families[family]
    assert_same(ours, theirs, form, ulps=ULPS, inputs=[read_folder(Path(f)) for f in [base, *models]],
                **tie_exemption(form, families[family]))


def tie_exemption(form: str, family) -> dict:
    if form in AGREE_ULPS and AGREE_ULPS[form][1](*family)["merge_method"] == "ties":
        # low-precision TIES: mergekit trims and elects signs on rounded deltas, the fused kernel on exact ones, so
        # elements near a cut-off or with a near-zero sign sum may go either way: at most TIES_BF16_OUTLIERS.
        return {"outliers": TIES_BF16_OUTLIERS}
    if form not in TIES_TIED_AT_CUTOFF:
        return {}
    inputs = [read_folder(Path(f)) for f in [family[0], *family[1]]]
    return {"exempt": lambda name: tied_at_cutoff(inputs, name)}


@pytest.mark.parametrize("form", sorted(THROUGH_MERGEKIT))
def test_other_forms_go_through_mergekit(form, families, tmp_path, capsys):
    family, build = THROUGH_MERGEKIT[form]
    config = build(*families[family])
    theirs, ours, err = merge_both(config, tmp_path, capsys)
    notes = [line for line in err.splitlines() if "merging through mergekit" in line]
    assert len(notes) == 1, err
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), f"{form}: {name}"


@pytest.mark.parametrize("form", sorted(TORCH_PATH))
def test_torch_path_forms_agree_with_mergekit(form, families, tmp_path, capsys):
    family, build = TORCH_PATH[form]
    config = build(*families[family])
    theirs, ours, err = merge_both(config, tmp_path, capsys)
    assert "through mergekit" not in err  # mergeopt's engine ran it
    if config.get("dtype") in ("bfloat16", "float16"):
        base, models = families[family]
        ulps = NUSLERP_BASE_ULPS if config["merge_method"] == "nuslerp" and config.get("base_model") else ULPS
        assert_same(ours, theirs, form, ulps=ulps, inputs=[read_folder(Path(f)) for f in [base, *models]])
    else:
        assert_same(ours, theirs, form, rel=TORCH_REL)


@pytest.mark.parametrize("form", sorted(DELLA))
def test_della_forms_move_the_same_share_of_elements(form, families, tmp_path, capsys):
    family, build = DELLA[form]
    config = build(*families[family])
    theirs, ours, err = merge_both(config, tmp_path, capsys)
    assert "through mergekit" not in err, err
    base = read_folder(Path(families[family][0]))
    assert set(theirs) <= set(ours)
    moved = [sum(int((out[n] != base[n]).sum()) for n in theirs) for out in (ours, theirs)]
    total = sum(t.numel() for t in theirs.values())
    assert abs(moved[0] - moved[1]) / total < 0.02, moved


@pytest.mark.parametrize("form", sorted(REFUSED))
def test_refused_in_one_line_before_anything_is_written(form, families, tmp_path, capsys):
    family, build, message = REFUSED[form]
    config = build(*families[family])
    code, _, err = run_mergeopt(config, tmp_path, capsys)
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "error:" in lines[0], err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "mergeopt-out").exists()


# ---- tokenizer and chat template ----------------------------------------------------------------------------------
def tokenizer_of(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("source", ["base", "union"])
def test_tokenizer_source_copies_the_tokenizer_mergekit_builds(source, families, tmp_path, capsys):
    """mergekit builds the union of identical tokenizers: the base's. The merged folder loads with it."""
    base, models = families["llama"]
    config = models_form(base, models, "task_arithmetic", W3, tokenizer_source=source)
    theirs, ours, err = merge_both(config, tmp_path, capsys)
    assert "through mergekit" not in err, err
    assert_same(ours, theirs, source)
    assert tokenizer_of(tmp_path / "mergeopt-out").get_vocab() == tokenizer_of(tmp_path / "mergekit-out").get_vocab()


def test_tokenizer_source_with_a_different_vocabulary_goes_through_mergekit(families, tmp_path, capsys):
    """A 40-token tokenizer for a 48-row embedding: mergekit resizes the embeddings; mergeopt lets it do so."""
    base, models = families["llama"]
    small = tmp_path / "small-tokenizer-base"
    shutil.copytree(base, small)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (small / name).unlink(missing_ok=True)
    bpe_tokenizer(small, size=40)
    config = models_form(str(small), models, "task_arithmetic", W3, tokenizer_source="base")
    theirs, ours, err = merge_both(config, tmp_path, capsys)
    assert "merging through mergekit" in err, err
    assert ours["model.embed_tokens.weight"].shape[0] == theirs["model.embed_tokens.weight"].shape[0] == 40


@pytest.mark.parametrize("template", ["{% for m in messages %}{{ m['content'] }}\n{% endfor %}", "chatml"])
def test_chat_template_is_carried_to_the_output(template, families, tmp_path, capsys):
    base, models = families["qwen2"]
    config = models_form(base, models, "ties", TIES3, chat_template=template)
    run_mergekit(config, tmp_path / "mergekit-out")
    code, _, err = run_mergeopt(config, tmp_path, capsys)
    assert code == 0, err
    ours = tokenizer_of(tmp_path / "mergeopt-out").chat_template
    assert ours and ours == tokenizer_of(tmp_path / "mergekit-out").chat_template


def test_mergekit_missing_is_one_line(families, tmp_path):
    """Without mergekit, a form only mergekit runs is refused in one line naming the install command; what
    mergeopt's engine runs (slerp on the torch path) still merges."""
    base, models = families["llama"]
    outcomes = {}
    for method, params in (("karcher", {}), ("slerp", {"t": 0.5})):
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(models_form(base, models, method, [{}], params, n=1)))
        code = ("import sys; sys.modules['mergekit'] = None; from optimizer.cli import main; "
                f"sys.exit(main(['merge', {str(path)!r}, '--out', {str(tmp_path / method)!r}]))")
        outcomes[method] = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                          cwd=Path(__file__).resolve().parents[2])
    assert outcomes["karcher"].returncode == 1
    assert outcomes["karcher"].stderr.strip().splitlines() == [
        f"mergeopt merge: error: {tmp_path / 'karcher.yaml'}: merge_method karcher needs mergekit, which is not "
        "installed: pip install mergekit (or pip install 'mergeopt[mergekit]')"]
    assert not (tmp_path / "karcher").exists()
    assert outcomes["slerp"].returncode == 0, outcomes["slerp"].stderr[-500:]
    assert (tmp_path / "slerp" / "model.safetensors").is_file()


# ---- recipes a search exports, for the methods whose own parameters are genes ----------------------------------------
# (family, models used, space keys): each space's recipe at a random genome is merged by both tools. slerp's t per
# layer group and module is a mergekit gradient list under {filter, value} conditions, like mergekit's own examples.
SEARCHED = {
    "slerp-layer-groups-modules": ("llama", 1, {"merge_method": "slerp", "granularity": {"layer_groups": 3},
                                                "modules": ["self_attn", "mlp"]}),
    "slerp-gradient": ("mistral", 1, {"merge_method": "slerp", "granularity": {"gradient": 2},
                                      "bounds": {"t": [0.2, 0.9]}}),
    "nuslerp-per-layer": ("qwen2", 2, {"merge_method": "nuslerp", "granularity": "per_layer",
                                       "fixed": {"nuslerp_row_wise": True, "nuslerp_flatten": False}}),
    "nuslerp-per-model": ("llama", 2, {"merge_method": "nuslerp"}),
    "breadcrumbs-gamma-lambda": ("llama", 3, {"merge_method": "breadcrumbs",
                                              "bounds": {"gamma": [0.0, 0.1], "lambda": [0.5, 1.5]}}),
    "breadcrumbs_ties-gamma-per-layer": ("mistral", 2, {"merge_method": "breadcrumbs_ties", "granularity": "per_layer",
                                                        "bounds": {"gamma": [0.0, 0.1]}}),
    "ties-lambda-gradient": ("gpt2", 3, {"merge_method": "ties", "granularity": {"gradient": 2},
                                         "bounds": {"lambda": [0.5, 1.5]}}),
    "model_stock-which-models": ("qwen2", 3, {"merge_method": "model_stock", "fixed": {"filter_wise": True}}),
}


def searched_recipe(family, n: int, keys: dict, seed: int = 0) -> dict:
    """The mergekit YAML (as exported) of a search space's recipe at a random genome."""
    from optimizer.space import parse_space

    base, models = family
    space = parse_space({"name": "s", "base_model": base, "models": models[:n], "objectives": ["a"], **keys})
    gen = torch.Generator().manual_seed(seed)
    recipe = space.recipe(torch.rand(space.dimension, generator=gen).tolist())
    return yaml.safe_load(recipe.to_yaml())


@pytest.mark.parametrize("form", sorted(SEARCHED))
def test_recipes_searched_over_a_methods_own_parameters_merge_as_mergekit_merges_them(form, families, tmp_path,
                                                                                        capsys):
    family, n, keys = SEARCHED[form]
    config = searched_recipe(families[family], n, keys)
    assert "mergeopt" in config  # mergekit reads the exported file as it is, with mergeopt's block
    theirs, ours, err = merge_both(config, tmp_path, capsys)
    assert "through mergekit" not in err, err
    assert_same(ours, theirs, form, rel=TORCH_REL)


def test_a_searched_della_recipe_moves_the_share_of_elements_mergekit_moves(families, tmp_path, capsys):
    """DELLA with epsilon genes (capped inside the density's bounds): random in both tools, compared on shares."""
    config = searched_recipe(families["llama"], 3, {"merge_method": "della", "bounds": {"epsilon": [0.05, 0.3]},
                                                    "granularity": {"layer_groups": 3}}, seed=1)
    assert all("epsilon" in m["parameters"] for m in config["models"])
    theirs, ours, err = merge_both(config, tmp_path, capsys)
    assert "through mergekit" not in err, err
    base = read_folder(Path(families["llama"][0]))
    moved = [sum(int((out[n] != base[n]).sum()) for n in theirs) for out in (ours, theirs)]
    total = sum(t.numel() for t in theirs.values())
    assert abs(moved[0] - moved[1]) / total < 0.02, moved


@pytest.mark.slow  # 5-10 s of subprocesses: the slow tier (CI runs it) keeps the fast tier under 3 minutes
def test_mergekit_yaml_accepts_a_searched_slerp_recipe(families, tmp_path, capsys):
    """The command itself (not only its Python API): mergekit-yaml merges the exported slerp recipe to mergeopt's
    tensors."""
    config = searched_recipe(families["llama"], 1, SEARCHED["slerp-layer-groups-modules"][2], seed=2)
    path = tmp_path / "slerp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = Path(sys.executable).parent / "mergekit-yaml"
    if not command.is_file():
        pytest.skip("mergekit-yaml is not installed next to this Python")
    done = subprocess.run([str(command), str(path), str(tmp_path / "mergekit-out"), "--random-seed", "0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    code, ours, err = run_mergeopt(config, tmp_path, capsys)
    assert code == 0, err
    assert_same(ours, read_folder(tmp_path / "mergekit-out"), "mergekit-yaml slerp", rel=TORCH_REL)


# ---- LoRA references: model+adapter ------------------------------------------------------------------------------
def lora_adapter(model: str, folder: Path, seed: int = 0) -> Path:
    """A tiny PEFT LoRA adapter (rank 4 on q_proj and v_proj) with non-zero B matrices, saved as safetensors."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    tuned = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(model),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    tuned.save_pretrained(folder)
    assert (folder / "adapter_model.safetensors").is_file()
    return folder


def test_a_lora_reference_merges_through_mergekit_as_mergekit_yaml_does(families, tmp_path, capsys):
    """mergekit applies the adapter to a copy of the model (its --lora-merge-cache), then merges; mergeopt hands such a
    recipe to mergekit with a note, checks the adapter folder first, and leaves no copy behind."""
    base, models = families["llama"]
    adapter = lora_adapter(models[0], tmp_path / "adapter")
    config = models_form(base, [f"{models[0]}+{adapter}", models[1]], "task_arithmetic", BASIC, n=2)
    merge_config = MergeConfiguration.model_validate(copy.deepcopy(config))
    mergekit_merge.run_merge(merge_config, str(tmp_path / "mergekit-out"),
                             MergeOptions(quiet=True, lora_merge_cache=str(tmp_path / "lora-cache")))
    theirs = read_folder(tmp_path / "mergekit-out")
    code, ours, err = run_mergeopt(config, tmp_path, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "merging through mergekit" in line]
    assert len(notes) == 1 and "LoRA reference" in notes[0], err
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in theirs)
    assert not list(tmp_path.glob(".mergeopt-out.lora-*"))  # the adapted copy is removed
    # the adapter took part: without it the attention projections come out otherwise, the MLPs the same
    plain = run_mergekit(models_form(base, models, "task_arithmetic", BASIC, n=2), tmp_path / "plain")
    changed = {n for n in theirs if not torch.equal(plain[n], theirs[n])}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)


def test_a_pickled_lora_adapter_is_refused_unless_allowed(families, tmp_path, capsys):
    base, models = families["llama"]
    adapter = lora_adapter(models[0], tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    capsys.readouterr()  # the adapter's own build
    config = models_form(base, [f"{models[0]}+{adapter}", models[1]], "task_arithmetic", BASIC, n=2)
    code, _, err = run_mergeopt(config, tmp_path, capsys)
    assert code == 1 and err.strip().count("\n") == 0
    assert "is pickled (adapter_model.bin); convert it to safetensors, or pass --allow-pickle" in err
    assert not (tmp_path / "mergeopt-out").exists()


# ---- a vision-language model (mergekit's basic-merge tests on picoLlaVa) -----------------------------------------
VLM = {
    "linear": lambda b, m: models_form(b, m, "linear", BASIC, with_base=False, n=2, dtype="bfloat16"),
    "slerp": lambda b, m: models_form(b, [b, m[0]], "slerp", BASIC, {"t": 0.35}, dtype="bfloat16"),
    "nuslerp-row-wise": lambda b, m: models_form(b, m, "nuslerp", BASIC, {"nuslerp_row_wise": True,
                                                                          "nuslerp_flatten": False},
                                                 with_base=False, n=2, dtype="bfloat16"),
    "task_arithmetic": lambda b, m: models_form(b, m, "task_arithmetic", BASIC, n=2, dtype="bfloat16"),
    "breadcrumbs": lambda b, m: models_form(b, m, "breadcrumbs", BASIC, n=2, dtype="bfloat16"),
    "ties": lambda b, m: models_form(b, m, "ties", BASIC, {"density": 0.3}, n=2, dtype="bfloat16"),
    "nuslerp-base": lambda b, m: models_form(b, m, "nuslerp", BASIC, {"nuslerp_flatten": False}, n=2,
                                             dtype="bfloat16"),
    "model_stock": lambda b, m: models_form(b, m, "model_stock", BASIC, n=2, dtype="bfloat16"),
    "model_stock-filter-wise": lambda b, m: models_form(b, m, "model_stock", BASIC, {"filter_wise": True}, n=2,
                                                        dtype="bfloat16"),
}


# bf16 arithmetic on the vision tower (layer norms at 1.0, whose bf16 deltas are coarse, tie in magnitude):
# mergekit's TIES trims rounded deltas, and model_stock's filter-wise angle over the 4-element rows of the conv patch
# embedding is taken from rounded rows, and nuslerp's per-row angles between rounded deltas of the layer norms, so
# these shares of elements go another way (measured 0.53%, 0.25% and 0.02%)
VLM_BF16_OUTLIERS = {"ties": 0.01, "model_stock-filter-wise": 0.005, "nuslerp-base": 0.001}


@pytest.mark.parametrize("form", sorted(VLM))
def test_a_llava_checkpoint_merges_whole_and_agrees_where_mergekit_writes(form, families, tmp_path, capsys):
    """LLaVA saved by transformers 5 keeps the original tensor names (``language_model.model...``, ``vision_tower``);
    mergekit 0.1.5 infers the architecture from transformers 5's module layout (``model.language_model...``), so it
    writes the vision tower and projector under ``model.``-prefixed names and leaves the language model out (the
    output loads with 21 weights missing). mergeopt merges every tensor of the checkpoint under its own name; on the
    tensors mergekit writes the two agree, and the language model is merged by the same rule (checked for linear)."""
    base, models = families["llava"]
    config = VLM[form](base, models)
    theirs = {name.removeprefix("model."): t for name, t in run_mergekit(config, tmp_path / "mergekit-out").items()}
    code, ours, err = run_mergeopt(config, tmp_path, capsys)
    assert code == 0 and "through mergekit" not in err, err
    inputs = [read_folder(Path(f)) for f in [base, *models]]
    assert set(ours) == set(inputs[0])
    left_out = set(ours) - set(theirs)
    assert left_out and all(name.startswith("language_model.") for name in left_out)
    ulps = NUSLERP_BASE_ULPS if form == "nuslerp-base" else ULPS
    assert_same({n: ours[n] for n in theirs}, theirs, form, ulps=ulps, inputs=inputs,
                outliers=VLM_BF16_OUTLIERS.get(form, 0))
    if form == "linear":
        for name in left_out:
            a, b = (inputs[i][name].bfloat16().float() for i in (1, 2))
            expected = ((0.6 * a + 0.4 * b) / 1.0).bfloat16()
            assert_same({name: ours[name]}, {name: expected}, f"linear {name}", ulps=ULPS, inputs=inputs)
    transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "mergeopt-out")  # loads, nothing missing
