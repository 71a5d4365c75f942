"""Tiny real models, built inside the tests, so every test runs on a CPU in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

ARCHS = {
    # Llama with grouped-query attention (4 heads, 2 KV heads) and tied embeddings
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=None),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=48, n_embd=64, n_layer=3, n_head=4, n_positions=64),
}


def make_family(root: Path, arch: str = "llama", n_models: int = 3, delta_scale: float = 0.02,
                seed: int = 0) -> tuple[Path, list[Path]]:
    """A base model and ``n_models`` fine-tunes of it (base + small random deltas), saved as safetensors."""
    torch.manual_seed(seed)
    config = ARCHS[arch]()
    base = transformers.AutoModelForCausalLM.from_config(config)
    base_dir = root / f"{arch}-base"
    base.save_pretrained(base_dir)
    folders = []
    for i in range(n_models):
        gen = torch.Generator().manual_seed(seed * 100 + i + 1)
        tuned = transformers.AutoModelForCausalLM.from_config(config)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * delta_scale)
        folder = root / f"{arch}-ft{i}"
        tuned.save_pretrained(folder)
        folders.append(folder)
    return base_dir, folders


def tiny_family(root: Path, n: int = 2, tied: bool = False):
    """Char-level Llamas sharing the zoo tokenizer: a base and ``n`` perturbed copies (random, untrained);
    ``tied``: the output head is the input embedding (as SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B)."""
    from optimizer.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, save_tokenizer

    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, bos_token_id=BOS_ID,
                                      eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=tied)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    folders = []
    for i in range(n + 1):
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.5 * (i > 0))
        folder = root / f"m{i}"
        model.save_pretrained(folder)
        save_tokenizer(folder)
        folders.append(folder)
    return folders[0], folders[1:]


def write_space(root: Path, name: str, **overrides) -> Path:
    import yaml

    space = {"name": name, "base_model": str(root / "models" / "m0"),
             "models": [str(root / "models" / f"m{i}") for i in (1, 2, 3)],
             "merge_method": "dare_ties", "objectives": ["gen", "mc"], "optimizer": {"name": "random"},
             "budget": {"trials": 4}, "tasks": str(root / "tasks.yaml"), "limit": 12, "seed": 0,
             # the baselines and the validation of a run are tested in tests/search/test_baselines.py; the other
             # tests of searches score the parents only, so the fast tier stays fast
             "baselines": ["parents"], "validation": {"finalists": 1}}
    space.update(overrides)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def run_cli(*args, env: dict | None = None, timeout: float = 300, cwd=None):
    """The `mergeopt` command line as a user runs it: a subprocess; returns the CompletedProcess (text mode)."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "optimizer.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})), cwd=cwd)


def assert_one_line_error(proc, *fragments: str) -> None:
    """A refusal as the CLI promises it: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def write_search_setup(root: Path, tied: bool = False) -> Path:
    """A folder with tiny char-level models (models/m0..m3, ``tied``: input and output embeddings shared) and a
    two-task task set (gen + mc) for ``write_space``."""
    tiny_family(root / "models", 3, tied=tied)
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "target": str(2 * i)}) + "\n"
                                            for i in range(30)))
    (root / "mc.jsonl").write_text("".join(json.dumps({"prompt": f"{i}=", "choices": [str(i), str(i + 1), "x"],
                                                       "answer": i % 3}) + "\n" for i in range(30)))
    (root / "tasks.yaml").write_text("tasks:\n  - {name: gen, path: gen.jsonl, max_new_tokens: 3}\n"
                                     "  - {name: mc, kind: multiple_choice, path: mc.jsonl}\n")
    return root


def make_adapter(base: Path, folder: Path, r: int = 4, alpha: float = 8, targets=("q_proj", "v_proj"), seed: int = 0,
                 scale: float = 0.05, **config) -> Path:
    """A real PEFT LoRA adapter on ``base``, saved as safetensors, with every B matrix (PEFT starts them at zero) and
    every A matrix drawn at random (``scale`` sets how large the adapted deltas are); ``config``: more LoraConfig
    fields (use_rslora, rank_pattern, alpha_pattern, modules_to_save, fan_in_fan_out...)."""
    import peft

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                       **config))
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    tuned.save_pretrained(folder)
    return folder


def merged_adapter(base: Path, adapter: Path, folder: Path, dtype=None) -> Path:
    """PEFT's own merge of an adapter into its base (merge_and_unload), saved as a model folder: what mergekit
    builds for ``base+adapter`` in its --lora-merge-cache."""
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(folder)
    return folder
