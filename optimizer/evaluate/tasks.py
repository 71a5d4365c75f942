"""Benchmark subsets as data: task sets built once per run, scored many times.

A task set YAML names tasks; each task is

* ``kind: generate`` -- a local JSONL file of ``{"prompt", "target"}``; greedy generation, exact match after an
  answer extractor and a normaliser (a chat model answers in a sentence: ``extract: first_number`` reads "The
  sum is 42." as ``42``; ``first_line`` keeps the first non-empty line; ``regex`` with ``pattern:`` keeps the
  first match, or its first group that matched);
* ``kind: multiple_choice`` -- a local JSONL file of ``{"prompt", "choices": [...], "answer": index}``; the choice
  with the highest log-likelihood wins (``acc``; ``acc_norm`` divides by the choice's length in characters);
* ``kind: lm_eval`` -- an lm-evaluation-harness task by name (``task: arc_easy``) or by its YAML (``path:``);
  its documents are read and its requests built once; each candidate only fills in the model's answers.

```yaml
seed: 0            # picks the subsets; the same items for every candidate of a run
limit: 100         # default size of the search range per task (null: all items)
validation: 50     # items per task in the validation range (default: half of the items search leaves)
tasks:
  - {name: add, kind: generate, path: add.jsonl, max_new_tokens: 8}
  - {name: arc, kind: lm_eval, task: arc_easy, metric: acc, limit: 200}
  - {name: capital, path: capital.jsonl, chat: true, system: "Answer in one word.", extract: first_line}
```

``chat: true`` renders each prompt (and a multiple-choice context) through the model's own chat template as one
user message (after an optional ``system`` message) with the assistant turn opened; the backend renders it, with
the live model's tokenizer, and then adds no special tokens of its own (the template holds them).

Every task's items fall in three disjoint ranges (:data:`SPLITS`), cut from one seeded permutation of its items:
``search`` (the first ``limit``: what every candidate is scored on), ``validation`` (the next ``validation``
items: what a run's finalists are re-scored on, to choose the best on items nothing was selected on) and ``test``
(the rest: the tool never looks at them; ``mergeopt eval --holdout`` scores them). A task may instead declare its
test range as a file of its own (``test_path:``); then the validation range is all that search leaves.

Building a task turns items into backend requests (:class:`GenerationRequest`, :class:`LoglikelihoodRequest`)
once; :meth:`PreparedTask.finish` turns the backend's answers into a :class:`Score`.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from optimizer.errors import MergeoptError

KINDS = ("generate", "multiple_choice", "lm_eval")
NORMALIZERS = ("none", "strip", "lower", "alnum")
EXTRACTORS = ("none", "first_number", "first_line", "regex")
"""How a generate task reads the answer out of a generation, before normalising it (``regex`` needs ``pattern``)."""


class TaskConfig(BaseModel):
    """One task of a task set as declared: its keys and their shapes. The rules between keys (a generate task needs
    a path, ``pattern`` goes with ``extract: regex``, ...) and the checks that keep today's one-line messages are in
    :func:`parse_task`."""

    model_config = ConfigDict(extra="forbid")
    name: str | int | None = None
    kind: str | None = None  # generate | multiple_choice | lm_eval (default: generate with a path, else lm_eval)
    path: str | None = None  # a JSONL file (generate, multiple_choice) or an lm-eval task YAML
    task: str | None = None  # an lm-eval task name
    metric: str | None = None
    limit: Any = None  # a positive integer
    max_new_tokens: Any = None  # a positive integer (default 32)
    normalizer: str | None = None  # one of NORMALIZERS
    stop: str | list[str] | None = None
    chat: Any = None  # true: the prompt goes through the tokenizer's chat template
    system: Any = None  # a system text for the chat template
    extract: str | None = None  # one of EXTRACTORS
    pattern: Any = None  # the regular expression of extract: regex
    validation: Any = None  # items of the validation range (a non-negative integer)
    test_path: str | None = None  # a JSONL file that is the task's test range (else: cut from path)


class TaskSetConfig(BaseModel):
    """A task-set YAML as declared: ``tasks`` (a non-empty list of :class:`TaskConfig`), ``seed``, ``limit``."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[Any]
    seed: Any = 0
    limit: Any = None
    validation: Any = None  # the default size of every task's validation range



def _declared(model: type[BaseModel], data: dict, where: str) -> None:
    """The declared schema applied to one mapping: an unknown key is one line with the nearest known name."""
    from optimizer.errors import schema_error

    try:
        model.model_validate(data)
    except ValidationError as exc:
        raise schema_error(exc, where, {"": list(model.model_fields)}) from None


@dataclass(frozen=True)
class ChatFormat:
    """Render a prompt through the tokenizer's chat template: one user turn, after an optional system turn."""

    system: str | None = None

    def render(self, tokenizer: Any, text: str) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise MergeoptError("a task asks for the chat template (chat: true) but the model's tokenizer has none; "
                                "drop 'chat: true' or use an instruct model")
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else [])
        messages.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    chat: ChatFormat | None = None  # None: the prompt is fed as it is


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str
    continuation: str
    chat: ChatFormat | None = None  # the context is rendered as a user turn; the continuation is the answer


def render_prompt(tokenizer: Any, text: str, chat: ChatFormat | None) -> tuple[str, bool]:
    """The text a backend tokenizes for a request, and whether the tokenizer should add its special tokens.

    A rendered chat template already holds them (a second BOS would change what the model sees).
    """
    return (text, True) if chat is None else (chat.render(tokenizer, text), False)


@dataclass
class Score:
    """One task's result for one candidate. ``value`` is None when scoring failed (``error`` says why)."""

    metric: str
    value: float | None
    stderr: float | None
    n: int
    error: str | None = None
    items: list[float] | None = field(default=None, repr=False)  # each item's value, in the task's item order

    def to_dict(self) -> dict[str, Any]:
        out = {"metric": self.metric, "value": self.value, "stderr": self.stderr, "n": self.n}
        if self.error:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str = "generate"
    path: Path | None = None
    task: str | None = None  # lm-eval task name
    metric: str | None = None
    limit: int | None = None
    max_new_tokens: int = 32
    normalizer: str = "strip"
    stop: tuple[str, ...] = ()
    chat: bool = False
    system: str | None = None
    extract: str = "none"
    pattern: str | None = None
    validation: int | None = None  # items of the validation range (None: half of what the search leaves)
    test_path: Path | None = None  # the test range as a file of its own

    @property
    def chat_format(self) -> ChatFormat | None:
        return ChatFormat(self.system) if self.chat else None


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error with the sample variance (lm-evaluation-harness' convention)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def normalize(text: str, rule: str) -> str:
    if rule == "none":
        return text
    text = text.strip()
    if rule == "lower":
        return text.lower()
    if rule == "alnum":
        return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()
    return text


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str, rule: str, pattern: str | None = None) -> str:
    """The answer a generation gives under ``rule`` (see EXTRACTORS); "" when there is none."""
    if rule == "none":
        return text
    if rule == "first_number":
        match = _NUMBER.search(text.replace(",", ""))
        return match.group(0) if match else ""
    if rule == "first_line":
        return next((line for line in text.splitlines() if line.strip()), "")
    match = re.search(pattern or "", text)
    if not match:
        return ""
    # the first group that took part in the match (alternatives may each have their own), else the whole match
    return next((group for group in match.groups() if group is not None), match.group(0))


class PreparedTask:
    """A task with its subset chosen and its requests built; scored by :meth:`finish`."""

    def __init__(self, spec: TaskSpec, generation: list[GenerationRequest], loglikelihood: list[LoglikelihoodRequest]):
        self.spec = spec
        self.generation = generation
        self.loglikelihood = loglikelihood

    @property
    def metric(self) -> str:
        raise NotImplementedError

    def finish(self, generated: list[str], loglikelihoods: list[tuple[float, bool]]) -> Score:
        raise NotImplementedError


class GenerateTask(PreparedTask):
    def __init__(self, spec: TaskSpec, items: list[dict]):
        requests = [GenerationRequest(item["prompt"], spec.max_new_tokens, spec.stop, spec.chat_format)
                    for item in items]
        super().__init__(spec, requests, [])
        self.targets = [normalize(str(item["target"]), spec.normalizer) for item in items]

    @property
    def metric(self) -> str:
        return "exact_match"

    def answer(self, text: str) -> str:
        """What a generation answers, as compared with the target."""
        answer = extract_answer(cut_at_stop(text, self.spec.stop), self.spec.extract, self.spec.pattern)
        return normalize(answer, self.spec.normalizer)

    def finish(self, generated, loglikelihoods):
        hits = [float(self.answer(text) == target) for text, target in zip(generated, self.targets)]
        value, stderr = mean_and_stderr(hits)
        return Score(self.metric, value, stderr, len(hits), items=hits)

    def examples(self, generated: list[str]) -> list[dict[str, Any]]:
        """The first ``len(generated)`` items as a person checks them: prompt, generation, answer, target, hit."""
        return [{"prompt": request.prompt, "generated": text, "answer": self.answer(text), "target": target,
                 "correct": self.answer(text) == target}
                for request, text, target in zip(self.generation, generated, self.targets)]


class MultipleChoiceTask(PreparedTask):
    def __init__(self, spec: TaskSpec, items: list[dict]):
        requests: list[LoglikelihoodRequest] = []
        self.spans, self.answers, self.lengths = [], [], []
        for item in items:
            start = len(requests)
            requests += [LoglikelihoodRequest(item["prompt"], str(choice), spec.chat_format)
                         for choice in item["choices"]]
            self.spans.append((start, len(requests)))
            self.answers.append(int(item["answer"]))
            self.lengths.append([max(1, len(str(c))) for c in item["choices"]])
        super().__init__(spec, [], requests)

    @property
    def metric(self) -> str:
        return self.spec.metric or "acc"

    def finish(self, generated, loglikelihoods):
        hits = []
        for (start, stop), answer, lengths in zip(self.spans, self.answers, self.lengths):
            scores = [ll for ll, _ in loglikelihoods[start:stop]]
            if self.metric == "acc_norm":
                scores = [s / n for s, n in zip(scores, lengths)]
            hits.append(float(max(range(len(scores)), key=scores.__getitem__) == answer))
        value, stderr = mean_and_stderr(hits)
        return Score(self.metric, value, stderr, len(hits), items=hits)


class LmEvalTask(PreparedTask):
    """An lm-evaluation-harness task: documents loaded and requests built once, metrics by the task itself."""

    def __init__(self, spec: TaskSpec, seed: int, split: str = "search"):
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise MergeoptError(f"task {spec.name} is an lm-eval task but lm-eval is not installed; "
                                "pip install lm-eval") from None
        if spec.path is not None:
            task_manager = TaskManager(include_path=str(spec.path.parent), include_defaults=False)
            task_name = spec.task or _yaml_task_name(spec.path)
        else:
            task_manager = TaskManager()
            task_name = str(spec.task)
        try:
            loaded = task_manager.load([task_name])
        except Exception as exc:  # lm-eval raises several types for unknown tasks or missing data
            raise MergeoptError(f"lm-eval task {task_name!r} cannot be loaded ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); check the name or its data files") from None
        tasks = list(loaded["tasks"].values())
        if len(tasks) != 1:
            raise MergeoptError(f"lm-eval task {task_name!r} is a group of {len(tasks)} tasks; list its tasks one by one")
        self.task = tasks[0]
        docs = list(self.task.eval_docs)
        indices = pick(spec, len(docs), seed, split)
        self.indices = indices
        self.task.build_all_requests(samples=indices, rank=0, world_size=1)
        self.instances = sorted(self.task.instances, key=lambda inst: (inst.doc_id, inst.idx))
        generation, loglikelihood, self.routes = [], [], []
        for inst in self.instances:
            if inst.request_type == "generate_until":
                context, kwargs = inst.args[0], dict(inst.args[1])
                until = kwargs.get("until") or []
                until = (until,) if isinstance(until, str) else tuple(until)
                generation.append(GenerationRequest(context, int(kwargs.get("max_gen_toks", spec.max_new_tokens)), until))
                self.routes.append(("g", len(generation) - 1))
            elif inst.request_type == "loglikelihood":
                loglikelihood.append(LoglikelihoodRequest(inst.args[0], inst.args[1]))
                self.routes.append(("l", len(loglikelihood) - 1))
            else:
                raise MergeoptError(f"lm-eval task {task_name!r} needs {inst.request_type} requests, which mergeopt "
                                    "does not score yet; choose a generate_until, loglikelihood or multiple_choice task")
        super().__init__(spec, generation, loglikelihood)
        metrics = list(self.task.aggregation())
        self._metric = spec.metric or metrics[0]
        if self._metric not in metrics:
            raise MergeoptError(f"task {spec.name}: metric {self._metric!r} is not one of {', '.join(metrics)}")

    @property
    def metric(self) -> str:
        return self._metric

    def finish(self, generated, loglikelihoods):
        for inst, (route, index) in zip(self.instances, self.routes):
            inst.resps = [generated[index] if route == "g" else loglikelihoods[index]]
            inst.filtered_resps = {}
        self.task.apply_filters()
        by_doc: dict[int, list] = {}
        for inst in self.instances:
            by_doc.setdefault(inst.doc_id, []).append(inst)
        filter_key = next(iter(self.instances[0].filtered_resps))
        values = []
        for doc_id, instances in sorted(by_doc.items()):
            metrics = self.task.process_results(instances[0].doc, [i.filtered_resps[filter_key] for i in instances])
            if self.metric in metrics:
                values.append(float(metrics[self.metric]))
        value, stderr = mean_and_stderr(values)
        return Score(self.metric, value, stderr, len(values), items=values)


def _yaml_task_name(path: Path) -> str:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or "task" not in data:
        raise MergeoptError(f"{path} is not an lm-eval task YAML (no 'task:' key)")
    return str(data["task"])


@dataclass
class TaskSet:
    """The tasks of a run: subsets chosen and requests built once, in a fixed order."""

    tasks: list[PreparedTask]
    seed: int = 0
    source: str = ""
    names: list[str] = field(default_factory=list)
    split: str = "search"  # which of SPLITS its items are

    def __post_init__(self):
        self.names = [t.spec.name for t in self.tasks]

    def __iter__(self):
        return iter(self.tasks)


def read_jsonl(path: Path, kind: str, task: str) -> list[dict]:
    if not path.is_file():
        raise MergeoptError(f"task {task}: data file {path} does not exist")
    required = ("prompt", "target") if kind == "generate" else ("prompt", "choices", "answer")
    items = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise MergeoptError(f"{path}:{number}: not valid JSON; one object per line") from None
            missing = [k for k in required if k not in item]
            if missing:
                raise MergeoptError(f"{path}:{number}: missing key {missing[0]!r} (a {kind} item needs {', '.join(required)})")
            items.append(item)
    if not items:
        raise MergeoptError(f"task {task}: {path} holds no items")
    return items


SPLITS = ("search", "validation", "test")
"""A task's three disjoint item ranges: what candidates are scored on, what finalists are re-scored on, what only
``mergeopt eval --holdout`` scores (see the module's docstring)."""


def split_indices(n: int, limit: int | None, seed: int, validation: int | None = None,
                  test_file: bool = False) -> dict[str, list[int]]:
    """The three ranges of a task of ``n`` items, each in file order: one seeded permutation, cut in three.

    ``search`` is its first ``limit`` items (all with ``limit`` None), so subsets are nested: the small subset of
    a multi-fidelity search lies inside the full one. ``validation`` is the next ``validation`` items (default: half
    of the rest, rounded down; all of the rest with ``test_file``, whose test range is another file), ``test`` what
    remains. The ranges are disjoint and, without a test file, cover every item.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = n if limit is None else min(limit, n)
    rest = order[cut:]
    size = (len(rest) if test_file else len(rest) // 2) if validation is None else min(validation, len(rest))
    return {"search": sorted(order[:cut]), "validation": sorted(rest[:size]),
            "test": [] if test_file else sorted(rest[size:])}


def subset_indices(n: int, limit: int | None, seed: int, holdout: bool = False) -> list[int]:
    """Indices of the ``limit`` items a seed picks, in file order (with ``holdout``: the test range)."""
    return split_indices(n, limit, seed)["test" if holdout else "search"]


def pick(spec: TaskSpec, n: int, seed: int, split: str = "search") -> list[int]:
    """The indices of a task's items in one of its ranges; an empty validation or test range is one clear line."""
    indices = split_indices(n, spec.limit, seed, spec.validation, spec.test_path is not None)[split]
    if not indices:
        if split == "search":
            raise MergeoptError(f"task {spec.name}: no items")
        raise MergeoptError(f"task {spec.name}: no {split} items (the search range of {spec.limit} takes "
                            f"{min(n, spec.limit or n)} of its {n}"
                            + (f" and validation {spec.validation}" if split == "test" and spec.validation else "")
                            + "); lower the limit")
    return indices


def prepare(spec: TaskSpec, seed: int, split: str = "search") -> PreparedTask:
    if split not in SPLITS:
        raise MergeoptError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if spec.kind == "lm_eval":
        return LmEvalTask(spec, seed, split)
    if split == "test" and spec.test_path is not None:
        items = read_jsonl(spec.test_path, spec.kind, spec.name)  # the declared test file, whole
    else:
        assert spec.path is not None  # a JSONL task has a file (the schema requires it)
        items = read_jsonl(spec.path, spec.kind, spec.name)
        items = [items[i] for i in pick(spec, len(items), seed, split)]
    return GenerateTask(spec, items) if spec.kind == "generate" else MultipleChoiceTask(spec, items)


def parse_task(entry: Any, root: Path, default_limit: int | None, where: str,
               default_validation: Any = None) -> TaskSpec:
    if not isinstance(entry, dict):
        raise MergeoptError(f"{where}: each task must be a mapping with at least 'name'")
    _declared(TaskConfig, entry, where)
    name = entry.get("name") or entry.get("task")
    if not name:
        raise MergeoptError(f"{where}: a task needs a 'name'")
    kind = entry.get("kind", "generate" if "path" in entry and "task" not in entry else "lm_eval")
    if kind not in KINDS:
        raise MergeoptError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    path = entry.get("path")
    if path is not None:
        path = Path(path)
        path = path if path.is_absolute() else (root / path).resolve()
    if kind != "lm_eval" and path is None:
        raise MergeoptError(f"{where}: a {kind} task needs 'path' (a JSONL file)")
    if kind == "lm_eval" and path is None and not entry.get("task"):
        raise MergeoptError(f"{where}: an lm_eval task needs 'task' (its name) or 'path' (its YAML)")
    normalizer = entry.get("normalizer", "strip")
    if normalizer not in NORMALIZERS:
        raise MergeoptError(f"{where}: normalizer {normalizer!r} is not one of {', '.join(NORMALIZERS)}")
    limit = entry.get("limit", default_limit)
    for key, value in (("limit", limit), ("max_new_tokens", entry.get("max_new_tokens", 32))):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise MergeoptError(f"{where}: {key} must be a positive integer, got {value!r}")
    metric = entry.get("metric")
    if kind == "generate" and metric not in (None, "exact_match"):
        raise MergeoptError(f"{where}: a generate task's metric is exact_match, got {metric!r}")
    if kind == "multiple_choice" and metric not in (None, "acc", "acc_norm"):
        raise MergeoptError(f"{where}: a multiple_choice task's metric is acc or acc_norm, got {metric!r}")
    chat, system = entry.get("chat", False), entry.get("system")
    if not isinstance(chat, bool):
        raise MergeoptError(f"{where}: chat must be true or false, got {chat!r}")
    if system is not None and (not chat or not isinstance(system, str)):
        raise MergeoptError(f"{where}: 'system' is a text for the chat template; it needs 'chat: true'")
    if chat and kind == "lm_eval":
        raise MergeoptError(f"{where}: chat: true is for JSONL tasks; an lm-eval task formats its own prompts")
    extract, pattern = entry.get("extract", "none"), entry.get("pattern")
    if extract not in EXTRACTORS:
        raise MergeoptError(f"{where}: extract {extract!r} is not one of {', '.join(EXTRACTORS)}")
    if kind != "generate" and extract != "none":
        raise MergeoptError(f"{where}: extract applies to generate tasks only")
    if (extract == "regex") != (pattern is not None):
        raise MergeoptError(f"{where}: 'pattern' (a regular expression) goes with 'extract: regex' and only with it")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise MergeoptError(f"{where}: pattern {pattern!r} is not a valid regular expression ({exc})") from None
    stop = entry.get("stop") or ()
    validation = entry.get("validation", default_validation)
    if validation is not None and (not isinstance(validation, int) or isinstance(validation, bool) or validation < 0):
        raise MergeoptError(f"{where}: validation must be a number of items (0 or more), got {validation!r}")
    test_path = entry.get("test_path")
    if test_path is not None:
        if kind == "lm_eval":
            raise MergeoptError(f"{where}: test_path is for JSONL tasks; an lm-eval task's ranges are cut from its "
                                "documents")
        test_path = Path(test_path) if Path(test_path).is_absolute() else (root / test_path).resolve()
    return TaskSpec(name=str(name), kind=kind, path=path, task=entry.get("task"), metric=metric, limit=limit,
                    max_new_tokens=int(entry.get("max_new_tokens", 32)), normalizer=normalizer,
                    stop=(stop,) if isinstance(stop, str) else tuple(stop), chat=chat, system=system,
                    extract=extract, pattern=pattern, validation=validation, test_path=test_path)


def task_specs(spec: str | Path, limit: int | None = None) -> tuple[list[TaskSpec], int, str]:
    """Parse SPEC (``zoo``, a task-set YAML, an lm-eval task YAML, or lm-eval task names) without loading data."""
    text = str(spec)
    if text == "zoo":
        from optimizer.zoo import zoo_task_spec

        return task_specs(zoo_task_spec(), limit)
    if text in ("mix", "mix-heldout"):  # the mix family's search split (test range: held-out), or its held-out split
        from optimizer.zoo.mix import task_set_path as mix_tasks

        return task_specs(mix_tasks("heldout" if text.endswith("heldout") else "search"), limit)
    if text in ("smollm2", "smollm2-heldout"):  # the smollm2 family's search split, or its held-out split
        from optimizer.zoo.smollm2 import task_set_path

        return task_specs(task_set_path("heldout" if text.endswith("heldout") else "search"), limit)
    path = Path(text)
    if path.suffix in (".yaml", ".yml"):
        from optimizer.recipe import read_yaml_file

        data = read_yaml_file(path, "task file")
        if isinstance(data, dict) and "task" in data and "tasks" not in data:
            return [TaskSpec(name=str(data["task"]), kind="lm_eval", path=path.resolve(), limit=limit)], 0, text
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
            raise MergeoptError(f"{path}: a task set needs a non-empty 'tasks:' list")
        _declared(TaskSetConfig, data, str(path))
        default_limit = limit if limit is not None else data.get("limit")
        specs = [parse_task(entry, path.parent.resolve(), default_limit, f"{path}: tasks[{i}]",
                            data.get("validation"))
                 for i, entry in enumerate(data["tasks"])]
        if limit is not None:
            specs = [replace(s, limit=limit) for s in specs]
        names = [s.name for s in specs]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise MergeoptError(f"{path}: task name {duplicate!r} appears twice")
        seed = data.get("seed", 0)
        if not isinstance(seed, int):
            raise MergeoptError(f"{path}: seed must be an integer")
        return specs, seed, text
    if path.suffix == ".jsonl":
        return [TaskSpec(name=path.stem, kind="generate", path=path.resolve(), limit=limit)], 0, text
    names = [n.strip() for n in text.split(",") if n.strip()]
    return [TaskSpec(name=n, kind="lm_eval", task=n, limit=limit) for n in names], 0, text


def load_task_set(spec: str | Path, limit: int | None = None, seed: int | None = None,
                  holdout: bool = False, split: str | None = None) -> TaskSet:
    """Build a task set once per run: its items in one range (``split``, one of SPLITS), requests built.

    ``holdout=True`` is ``split="test"``: the items the same ``(limit, seed)`` leave to the test range, to check a
    search's best recipe on items the search neither scored nor chose on.
    """
    split = "test" if holdout else (split or "search")
    specs, file_seed, source = task_specs(spec, limit)
    seed = file_seed if seed is None else seed
    return TaskSet([prepare(s, seed, split) for s in specs], seed=seed, source=source, split=split)


def show_examples(task_set: TaskSet, backend: Any, count: int) -> str:
    """The first ``count`` items of each generate task, generated again by ``backend``, as a person reads them."""
    blocks = []
    for task in task_set.tasks:
        if not isinstance(task, GenerateTask):
            blocks.append(f"== {task.spec.name}: a {task.spec.kind} task; --show prints generate tasks only")
            continue
        requests = task.generation[:count]
        lines = [f"== {task.spec.name} (first {len(requests)} items; extract: {task.spec.extract}"
                 + (", chat template" if task.spec.chat else "") + ")"]
        for number, example in enumerate(task.examples(backend.generate(requests)), 1):
            lines += [f"[{number}] prompt:    {example['prompt']!r}",
                      f"    generated: {example['generated']!r}",
                      f"    answer:    {example['answer']!r}   target: {example['target']!r}   "
                      + ("correct" if example["correct"] else "WRONG")]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
