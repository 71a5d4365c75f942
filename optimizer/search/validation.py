"""The end of a run: the finalists re-scored on items nothing was chosen on, and the search set against its baselines.

Selecting the best of many candidates on the items they were scored on overstates it (the winner's curse): the
run re-scores its finalists -- the K best of the front by scalarized score, filled up with the next best trials
when the front is smaller (one objective) -- and the best baseline on the task set's validation range (see
optimizer/evaluate/tasks.py), and ``best.yaml`` is the finalist best on validation. The study's user attribute
``validation`` holds ``{"finalists": K, "items": {task: n}, "trials": {"<number>": record}, "baselines": {label:
record}}`` (record: per-task scores, per-item values, scalarized score, seconds); a resume re-scores only what is
new.

:func:`comparison_line` is the run's verdict in one line, e.g. ``best (validated) 0.842 +- 0.012 vs best baseline
task_arithmetic w=0.8 0.811: better by 2.6 s.e. (paired, 600 validation items)``: the paired difference of the
per-item values on the same items (optimizer/evaluate/stats.py). Reading needs no model and no torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from optimizer.evaluate import stats
from optimizer.search.baselines import BASELINES_ATTR, best_baseline
from optimizer.study_store import Attr

log = logging.getLogger("mergeopt")
VALIDATION_ATTR = Attr.VALIDATION


def coefficients(space) -> dict[str, float]:
    return stats.coefficients([(o.task, o.direction == "maximize") for o in space.objectives], space.scalarization)


def finalists(space, records, k: int) -> list:
    """The K best trials to validate: the front by scalarized score, then the next best comparable trials."""
    from optimizer.run import comparable, front_trials

    front = front_trials(records, space)
    chosen = front[:k]
    if len(chosen) < k:
        numbers = {t.number for t in chosen}
        rest = sorted((t for t in records if comparable(t) and t.number not in numbers),
                      key=lambda t: (-t.user_attrs["scalarized"], t.number))
        chosen += rest[:k - len(chosen)]
    return chosen


@dataclass
class Plan:
    """What a run's validation will score on: its task set, or why there is none."""

    task_set: Any = None  # TaskSet of the validation range
    reason: str | None = None  # why not (no validation items, or finalists: 0)


def plan(space) -> Plan:
    """The validation task set of a space; a range that is empty is a reason, not an error (the search still runs)."""
    from optimizer.errors import MergeoptError
    from optimizer.evaluate.tasks import load_task_set

    if space.finalists == 0:
        return Plan(reason="validation: {finalists: 0}")
    try:
        return Plan(load_task_set(space.tasks, limit=space.limit, seed=space.seed, split="validation"))
    except MergeoptError as exc:
        if "no validation items" not in str(exc):
            raise
        return Plan(reason=str(exc))


def _record(space, result, seconds: float) -> dict:
    values = {t: s.value for t, s in result.scores.items()}
    record = {"scores": result.to_dict(), "items": {t: stats.pack(v) for t, v in result.items().items()},
              "seconds": round(seconds, 3)}
    if not result.failed and all(values.get(o.task) is not None for o in space.objectives):
        record["scalarized"] = space.scalarize(values)
    else:
        record["error"] = result.error or "an objective has no score"
    return record


def record_reason(study, reason: str) -> None:
    """Why this run validates nothing (kept with the run, said in its comparison line)."""
    if (study.user_attrs.get(VALIDATION_ATTR) or {}).get("reason") != reason:
        study.set_user_attr(VALIDATION_ATTR, {**(study.user_attrs.get(VALIDATION_ATTR) or {}), "reason": reason})


def validate(space, study, backend, engine, task_set, k: int, progress: bool = False) -> dict:
    """Score the finalists and the best baseline on ``task_set`` (the validation range); record and return it."""
    import yaml

    from optimizer.evaluate.scoring import evaluate_candidate
    from optimizer.recipe import Recipe

    done = dict(study.user_attrs.get(VALIDATION_ATTR) or {})
    trials, baselines = dict(done.get("trials") or {}), dict(done.get("baselines") or {})
    records = study.get_trials(deepcopy=False)
    for t in finalists(space, records, k):
        if str(t.number) in trials:
            continue
        recipe = Recipe.from_dict(yaml.safe_load(t.user_attrs["recipe"]), source=f"trial {t.number}")
        start = time.perf_counter()
        result = evaluate_candidate(backend, task_set, engine, recipe)
        trials[str(t.number)] = _record(space, result, time.perf_counter() - start)
        if progress:
            shown = trials[str(t.number)].get("scalarized")
            log.info("  validation: trial %-5d search %.3f  validation %s", t.number, t.user_attrs["scalarized"],
                     "failed" if shown is None else f"{shown:.3f}")
    best = best_baseline(space, study.user_attrs.get(BASELINES_ATTR) or {})
    if best is not None and best[0] not in baselines:
        label, info = best
        start = time.perf_counter()
        if info.get("kind") == "parent":
            backend.load_parent(engine, int(info["parent"]))
            result = evaluate_candidate(backend, task_set)
        else:
            recipe = Recipe.from_dict(yaml.safe_load(info["recipe"]), source=f"baseline {label}")
            result = evaluate_candidate(backend, task_set, engine, recipe)
        baselines[label] = _record(space, result, time.perf_counter() - start)
        if progress:
            shown = baselines[label].get("scalarized")
            log.info("  validation: baseline %s  search %.3f  validation %s", label, info["scalarized"],
                     "failed" if shown is None else f"{shown:.3f}")
    record = {**{key: v for key, v in done.items() if key != "reason"}, "finalists": k, "items": {t.spec.name: _n_items(t) for t in task_set.tasks},
              "trials": trials, "baselines": baselines}
    study.set_user_attr(VALIDATION_ATTR, record)
    return record


def _n_items(task) -> int:
    return len(getattr(task, "targets", None) or getattr(task, "answers", None) or getattr(task, "indices", None)
               or [])


# ---- reading ------------------------------------------------------------------------------------------
@dataclass
class Finalist:
    trial: int
    search: float  # scalarized on the search items
    search_se: float | None
    validation: float | None  # scalarized on the validation items (None: not validated, or failed)
    validation_se: float | None


def _items(record: dict, tasks) -> dict[str, list[float]] | None:
    items = record.get("items") or {}
    if any(t not in items for t in tasks):
        return None
    return {t: stats.unpack(items[t]) for t in tasks}


def _search_se(space, trial) -> float | None:
    coefs = coefficients(space)
    scores = trial.user_attrs.get("scores") or {}
    ses = [(scores.get(t) or {}).get("stderr") for t in coefs]
    if any(s is None for s in ses):
        return None
    return float(sum((c * float(s or 0.0)) ** 2 for c, s in zip(coefs.values(), ses)) ** 0.5)


def finalist_table(space, study, records) -> list[Finalist]:
    """The validated finalists (search vs validation score), best by validation first."""
    record = study.user_attrs.get(VALIDATION_ATTR) or {}
    coefs = coefficients(space)
    by_number = {t.number: t for t in records}
    out = []
    for number, rec in (record.get("trials") or {}).items():
        trial = by_number.get(int(number))
        if trial is None or trial.user_attrs.get("scalarized") is None:
            continue
        items = _items(rec, coefs)
        estimate = stats.scalarized(items, coefs) if items and rec.get("scalarized") is not None else None
        out.append(Finalist(trial.number, trial.user_attrs["scalarized"], _search_se(space, trial),
                            None if estimate is None else estimate.value, None if estimate is None else estimate.se))
    current = {t.number for t in finalists(space, records, int(record.get("finalists") or 0))}
    out = [f for f in out if f.trial in current]
    return sorted(out, key=lambda f: (f.validation is None, -(f.validation or 0.0), f.trial))


def validated_best(space, study, records) -> int | None:
    """The trial ``best.yaml`` is: the finalist best on validation (None: nothing validated)."""
    table = [f for f in finalist_table(space, study, records) if f.validation is not None]
    return table[0].trial if table else None


def comparison_line(space, study, records) -> str | None:
    """The run's verdict in one line (None before any trial has completed)."""
    from optimizer.run import comparable

    coefs = coefficients(space)
    scored = [t for t in records if comparable(t)]
    if not scored:
        return None
    baselines = study.user_attrs.get(BASELINES_ATTR) or {}
    best_base = best_baseline(space, baselines)
    validation = study.user_attrs.get(VALIDATION_ATTR) or {}
    number = validated_best(space, study, records)
    if number is not None:
        mine = _items(validation["trials"][str(number)], coefs)
        theirs = None if best_base is None else _items(validation.get("baselines", {}).get(best_base[0]) or {}, coefs)
        where, what = "validated", "validation items"
    else:  # nothing validated: say so, and compare on the search items
        trial = max(scored, key=lambda t: (t.user_attrs["scalarized"], -t.number))
        mine = _items({"items": trial.user_attrs.get(Attr.ITEMS) or {}}, coefs)
        theirs = None if best_base is None else _items(best_base[1], coefs)
        reason = validation.get("reason")
        where, what = "search", "search items, not validated" + (f": {reason}" if reason else "")
        number = trial.number
    if mine is None:
        return None
    own = stats.scalarized(mine, coefs)
    head = f"best ({where}) {own.value:.3f} +- {own.se:.3f}"
    if best_base is None:
        why = "baselines: none" if space.baselines == "none" else "no baseline scored"
        return f"{head} (trial {number}; {why}; {own.n} {what})"
    label = best_base[0]
    if theirs is None:
        return f"{head} vs best baseline {label}: not scored on these items (trial {number}; {own.n} {what})"
    comparison = stats.compare(mine, theirs, coefs)
    return (f"{head} vs best baseline {label} {comparison.b.value:.3f}: {comparison.words()} "
            f"(paired, {own.n} {what})")


def after_search(space, study, backend, engine, plan: Plan, lock, progress: bool = False) -> None:
    """The loop's hook after the last trial: the finalists and the best baseline on the validation range."""
    if plan.task_set is None:
        record_reason(study, plan.reason or "no validation range")
        return
    with lock.claim("validation") as mine:
        if not mine:
            return
        if progress:
            log.info("validation (%d finalists and the best baseline, on items the search never scored):",
                     space.finalists)
        validate(space, study, backend, engine, plan.task_set, space.finalists, progress)


def validate_run(run_dir, k: int, storage: str | None = None, study_name: str | None = None,
                 device: str | None = None, progress: bool = False) -> dict:
    """``mergeopt export RUN --validate K``: the K best of a finished run (and its best baseline) on validation."""
    import contextlib
    import dataclasses

    from optimizer.errors import MergeoptError
    from optimizer.evaluate.scoring import OWN_MERGE_ENGINE, make_backend
    from optimizer.merge.engine import MergeEngine
    from optimizer.run import open_run

    space, study = open_run(run_dir, storage, study_name)
    if k < 1:
        raise MergeoptError("--validate needs a number of finalists (1 or more)")
    wanted = plan(dataclasses.replace(space, finalists=k))
    if wanted.task_set is None:
        raise MergeoptError(f"{run_dir}: cannot validate: {wanted.reason}")
    task_set = wanted.task_set
    engine = MergeEngine(space.base_model, space.models, progress=progress,
                         device="cpu" if space.backend in OWN_MERGE_ENGINE else device)
    with contextlib.closing(make_backend(space.backend, space.base_model, device=device, dtype=space.dtype)) as backend:
        return validate(space, study, backend, engine, task_set, k, progress)
