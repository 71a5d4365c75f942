"""Train the zoo from scratch: a char-level Llama base and one specialist per skill, fine-tuned from it.

    python -m optimizer.builders.tiny [OUT_DIR] [--seed 0] [--scale 1.0]

The base is pretrained on copying plus the easy level of every skill, so it partly has each skill; each
specialist is fine-tuned briefly (small lr, few steps) on the mid level of one skill, with 25% of its training items
replaying the pretraining mixture. The fine-tuning deltas stay
small and the specialists share the base's representation, which is what lets task arithmetic combine them.
Everything is seeded explicitly, so a rebuild with the same seed, scale and torch version gives the same weights
on the same machine (bit-identity across CPU types or thread counts is not promised).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from optimizer.zoo import MODEL_NAMES, SPECIALIST_TASK, TASK_MAX_NEW_TOKENS, ZOO_DIR
from optimizer.zoo.data import (
    EVAL_SEED,
    EVAL_SIZE,
    PRETRAIN_MIXTURE,
    SKILLS,
    eval_items,
    heldout_prompts,
    specialist_mixture,
    training_stream,
    SHIPPED_EVAL_SIZE,
)
from optimizer.zoo.tokenizer import BOS_ID, EOS_ID, MODEL_MAX_LENGTH, PAD_ID, VOCAB_SIZE, encode, save_tokenizer

log = logging.getLogger("mergeopt")


@dataclass(frozen=True)
class TrainSettings:
    """Step counts and learning rates of a rebuild (``scale`` multiplies the step counts)."""

    pretrain_steps: int = 2500
    pretrain_lr: float = 1e-3
    pretrain_weight_decay: float = 0.01
    finetune_steps: int = 400
    finetune_lr: float = 1e-4
    finetune_replay: float = 0.25
    batch_size: int = 64
    warmup_fraction: float = 0.04


def model_config() -> LlamaConfig:
    """The architecture every zoo model shares (~0.9M parameters; head_dim 32 is the floor of vLLM's CPU backend)."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def _batches(stream: Iterator[tuple[str, str]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded training batches; the loss covers the target and EOS only, never the prompt."""
    while True:
        rows = [next(stream) for _ in range(batch_size)]
        sequences, label_rows = [], []
        for prompt, target in rows:
            prompt_ids, target_ids = [BOS_ID, *encode(prompt)], [*encode(target), EOS_ID]
            sequences.append(prompt_ids + target_ids)
            label_rows.append([-100] * len(prompt_ids) + target_ids)
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((batch_size, width), PAD_ID, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (ids, label_ids) in enumerate(zip(sequences, label_rows)):
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            labels[row, : len(ids)] = torch.as_tensor(label_ids)
            attention_mask[row, : len(ids)] = 1
        yield {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _log(progress: bool, message: str) -> None:
    if progress:
        log.info("[zoo] %s", message)


def train_steps(
    model: LlamaForCausalLM,
    stream: Iterator[tuple[str, str]],
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    warmup_fraction: float = 0.04,
    label: str = "train",
    progress: bool = True,
) -> float:
    """AdamW with linear warmup and cosine decay to 10% of ``lr``; returns the mean loss of the last 50 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    warmup = max(1, round(steps * warmup_fraction))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    batches = _batches(stream, batch_size)
    recent: list[float] = []
    started = time.perf_counter()
    log_every = max(1, steps // 10)
    for step in range(steps):
        loss = model(**next(batches)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - started
            _log(progress, f"{label}: step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} ({elapsed:.0f}s)")
    model.eval()
    return sum(recent) / max(1, len(recent))


def save_model(model: LlamaForCausalLM, folder: Path) -> None:
    """A complete transformers folder: config, float32 safetensors, generation config, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    model.float().save_pretrained(folder, safe_serialization=True)
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=16
    ).save_pretrained(folder)
    save_tokenizer(folder)


@dataclass(frozen=True)
class Stage:
    """One training stream of a rebuild: what it draws from, its seed, how many optimiser steps."""

    name: str
    mixture: dict[tuple[str, str], float]
    seed: int
    steps: int


def training_stages(seed: int, settings: TrainSettings, scale: float) -> list[Stage]:
    """The base's pretraining, then each specialist's fine-tuning, in the order a rebuild trains them.

    The one definition both :func:`rebuild` (training) and :func:`trained_prompts` (its replay) read, so the replay
    cannot drift from what was trained.
    """
    def steps(count: int) -> int:
        return max(1, round(count * scale))

    return [Stage("base", PRETRAIN_MIXTURE, seed * 1000, steps(settings.pretrain_steps))] + [
        Stage(name, specialist_mixture(skill, settings.finetune_replay), seed * 1000 + index,
              steps(settings.finetune_steps))
        for index, (name, skill) in enumerate(SPECIALIST_TASK.items(), start=1)]


def trained_prompts(seed: int = 0, settings: TrainSettings = TrainSettings(), scale: float = 1.0) -> frozenset[str]:
    """Every prompt the training of a rebuild with ``seed`` draws (a replay of its streams, no training)."""
    excluded = heldout_prompts()
    prompts: set[str] = set()
    for stage in training_stages(seed, settings, scale):
        stream = training_stream(stage.mixture, seed=stage.seed, exclude=excluded)
        prompts.update(prompt for prompt, _ in itertools.islice(stream, stage.steps * settings.batch_size))
    return frozenset(prompts)


def write_tasks(folder: Path, n: int = SHIPPED_EVAL_SIZE, seed: int = EVAL_SEED, train_seed: int = 0,
                settings: TrainSettings = TrainSettings(), scale: float = 1.0) -> dict[str, Path]:
    """The held-out JSONL sets (one per skill) and ``zoo.yaml`` describing them.

    Items past ``EVAL_SIZE`` skip every prompt the training with ``train_seed`` draws, so all ``n`` are unseen.
    """
    folder.mkdir(parents=True, exist_ok=True)
    skip = trained_prompts(train_seed, settings, scale) if n > EVAL_SIZE else frozenset()
    paths: dict[str, Path] = {}
    for skill in SKILLS:
        path = folder / f"{skill}.jsonl"
        with path.open("w") as handle:
            for item in eval_items(skill, n, seed, skip):
                handle.write(json.dumps(item) + "\n")
        paths[skill] = path
    lines = [
        "# Held-out tasks of the embedded zoo (mid difficulty; never seen in training).",
        "# Rebuilt by `python -m optimizer.builders.tiny`; paths are relative to this file.",
        "tasks:",
    ]
    for skill in SKILLS:
        lines += [
            f"  - name: {skill}",
            f"    path: {skill}.jsonl",
            "    kind: generate",
            "    metric: exact_match",
            f"    max_new_tokens: {TASK_MAX_NEW_TOKENS[skill]}",
        ]
    (folder / "zoo.yaml").write_text("\n".join(lines) + "\n")
    return paths


def rebuild(
    out_dir: Path | None = None,
    seed: int = 0,
    progress: bool = True,
    scale: float = 1.0,
    settings: TrainSettings = TrainSettings(),
) -> dict[str, Path]:
    """Train the whole zoo into ``out_dir`` (default: the package's own zoo folder); returns name -> model folder.

    Writes ``models/{base,adder,reverser,sorter}/`` and ``tasks/{add,reverse,sort}.jsonl`` + ``tasks/zoo.yaml``.
    ``scale`` multiplies every step count (e.g. 0.01 for a smoke test).
    """
    out_dir = Path(out_dir) if out_dir is not None else ZOO_DIR
    started = time.perf_counter()
    write_tasks(out_dir / "tasks", train_seed=seed, settings=settings, scale=scale)
    excluded = heldout_prompts()
    pretrain, *finetunes = training_stages(seed, settings, scale)

    torch.manual_seed(seed)
    base = LlamaForCausalLM(model_config())
    _log(progress, f"base: {sum(p.numel() for p in base.parameters()):,} parameters")
    train_steps(
        base,
        training_stream(pretrain.mixture, seed=pretrain.seed, exclude=excluded),
        pretrain.steps,
        settings.pretrain_lr,
        settings.batch_size,
        weight_decay=settings.pretrain_weight_decay,
        warmup_fraction=settings.warmup_fraction,
        label=pretrain.name,
        progress=progress,
    )
    folders = {"base": out_dir / "models" / "base"}
    save_model(base, folders["base"])

    for stage in finetunes:
        torch.manual_seed(stage.seed)
        specialist = copy.deepcopy(base)
        train_steps(
            specialist,
            training_stream(stage.mixture, seed=stage.seed, exclude=excluded),
            stage.steps,
            settings.finetune_lr,
            settings.batch_size,
            warmup_fraction=settings.warmup_fraction,
            label=stage.name,
            progress=progress,
        )
        folders[stage.name] = out_dir / "models" / stage.name
        save_model(specialist, folders[stage.name])

    assert list(folders) == list(MODEL_NAMES)
    _log(progress, f"zoo rebuilt in {time.perf_counter() - started:.0f}s -> {out_dir}")
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Retrain the embedded zoo (example: python -m optimizer.builders.tiny)")
    parser.add_argument("out_dir", nargs="?", type=Path, default=None, help="default: the package's zoo folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step count")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # a command line owns the log settings
    rebuild(args.out_dir, seed=args.seed, scale=args.scale)


if __name__ == "__main__":
    main()
