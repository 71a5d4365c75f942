"""The outer loop: ask -> build -> score -> tell, until the budget is spent; resumable at every trial.

Everything a run knows lives in its Optuna study (``runs/<name>/study.db`` unless ``--storage`` names another
database): each candidate is one trial with its genome (params), per-task scores and standard errors, objective
values, recipe YAML, fidelity, timings and state. Re-running the same command continues the study:

* a trial that a killed process left RUNNING is marked FAIL (and, for CMA-ES, its candidate is queued again),
  so after ``kill -9`` at most the candidate in flight is lost and no trial is duplicated;
* Ctrl-C finishes nothing half-way: the candidate in flight is recorded as failed ("interrupted"), the tables
  are written, and the command exits 130;
* three failures in a row with the same reason stop the run with that reason (a broken setup should not burn
  the whole budget);
* a fault of the inference engine (dead, hung, a poisoned CUDA context) is not the candidate's: the backend replaces
  its engine and scores the candidate again (each fault survived is noted in the trial's ``engine_faults``); when it
  cannot, the candidate is left unscored as a killed worker leaves it (lost, queued again) and the run stops with
  ``engine_fault`` set (the command restarts its process or exits 75: optimizer/search/restart.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from optimizer.errors import EngineFault, MergeoptError, NonFiniteOutput
from optimizer.evaluate.scoring import (OWN_MERGE_ENGINE, CandidateResult, check_backend, evaluate_candidate,
                                        make_backend)
from optimizer.evaluate.recovery import EngineRecovery, pid_running
from optimizer.evaluate.tasks import load_task_set
from optimizer.files import write_atomic
from optimizer.merge.engine import MergeEngine
from optimizer.run import (FINISHED, RECORD_ATTR, SPACE_FILE, check_same_run, read_record, record_of, record_text,
                           spends_budget)
from optimizer import study_store
from optimizer.study_store import Attr
from optimizer.evaluate.stats import pack
from optimizer.search import baselines, faults, validation
from optimizer.search.interrupts import Interrupts
from optimizer.search.optimizers import make_optimizer, make_sampler
from optimizer.study_store import storage_url
from optimizer.search.workers import (DEFAULT_HEARTBEAT, Coordinated, StudyLock, join_study, stale_trials,
                                      worker_id)
from optimizer.space import BUDGET_KEYS, SearchSpace, model_labels

MAX_SAME_FAILURES = 3
SPENT = "the run has spent its budget (%d of %d trials); raise it with --trials to search on"
log = logging.getLogger("mergeopt")


@dataclass(frozen=True)
class SearchOptions:
    """What the command line decides besides the space (the CLI reads the environment; the library reads none)."""

    storage: str | None = None  # Optuna storage URL; None: SQLite in the run folder
    study_name: str | None = None  # default: the space's name
    device: str | None = None  # where the candidates are scored
    engine_device: str | None = None  # where the merge engine holds the models (default: device)
    progress: bool = True
    worker_trials: int | None = None  # at most this many new trials from this worker
    faults: dict[int, str] = field(default_factory=dict)  # the testing hook (search/faults.py), by trial number
    heartbeat: tuple[int, int] = DEFAULT_HEARTBEAT  # (interval, grace) seconds, with shared storage
    recovery: EngineRecovery | None = None  # how the backend survives its engine (None: its defaults)

    @property
    def shared(self) -> bool:
        return self.storage is not None and not self.storage.startswith("sqlite")


@dataclass
class SearchContext:
    """Everything one worker's search loop holds, built once by :func:`run_search` (instead of a dozen positional
    parameters handed from function to function)."""

    space: SearchSpace
    run_dir: Path
    options: SearchOptions
    engine: MergeEngine
    interrupts: Interrupts
    task_set: Any
    low_set: Any
    study: Any = None  # optuna.Study, once opened
    lock: Any = None  # StudyLock
    optimizer: Any = None  # Coordinated
    backend: Any = None  # the live inference engine
    validation: Any = None  # validation.Plan: the validation range's task set, or why there is none


@dataclass
class SearchResult:
    run_dir: Path
    study: optuna.Study
    new_trials: int = 0
    interrupted: bool = False
    stopped_reason: str | None = None
    parents: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)  # label -> record (optimizer/search/baselines.py)
    seconds: dict = field(default_factory=dict)  # this worker's time: evaluating, coordination (lock), waiting
    engine_fault: EngineFault | None = None  # the engine fault that stopped the run (stopped_reason says it too)


def open_study(space: SearchSpace, run_dir: Path, storage: str | None = None, study_name: str | None = None,
               lock: StudyLock | None = None, heartbeat: tuple[int, int] = DEFAULT_HEARTBEAT) -> optuna.Study:
    """The run's study, created when new; its record checked (a resume may only grow the budget) and updated."""
    url = storage_url(run_dir, storage)
    local = url.startswith("sqlite")
    # Shared databases get heartbeats so trials of a dead worker are detected; a local run folder uses its lock.
    directions: list[Any] = [o.direction for o in space.objectives] if space.multi_objective else ["maximize"]
    sampler = make_sampler(space.optimizer, space.seed, space.optimizer_settings)
    name = study_name or space.name
    # workers starting together must not race creating the tables and the study (lock: see search/workers.py)
    with lock() if lock is not None else contextlib.nullcontext():
        if local:
            study_store.create_sqlite_whole(url)
        rdb = study_store.open_storage(url, None if local else heartbeat)
        study = optuna.create_study(study_name=name, storage=rdb, directions=directions, sampler=sampler,
                                    load_if_exists=True)
        recorded = study.user_attrs.get(RECORD_ATTR)
        if recorded is not None:
            check_same_run(recorded["config"], space, f"study {name!r}")
        study.set_user_attr(RECORD_ATTR, record_of(space))  # the budget as this command sets it
        existing = len(study.get_trials(deepcopy=False))
        if not existing and study.metric_names is None:  # optuna-dashboard labels the objectives by these
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([o.task for o in space.objectives] if space.multi_objective
                                       else ["scalarized"])
        worker = 0
        if lock is not None and lock.shared:  # same space for all; a number per worker, so draws differ
            worker = join_study(study)
    if existing or worker:
        # A resumed run (or another worker) must not replay the random draws of the first one: the sampler's
        # seed moves on with the study, deterministically.
        study.sampler = make_sampler(space.optimizer, space.seed + 7919 * existing + 104729 * worker,
                                     space.optimizer_settings)
    return study


def check_resume(space: SearchSpace, run_dir: Path) -> None:
    """Before anything is loaded: a run folder holding another run (not just a bigger budget) is refused."""
    path = run_dir / SPACE_FILE
    if not path.is_file():
        return
    record = read_record(run_dir)
    if record is not None:
        check_same_run(record["config"], space, str(run_dir))
        return
    old = yaml.safe_load(path.read_text()) or {}  # a run recorded before records: its YAML as written
    new = space.source
    changed = sorted(k for k in set(old) | set(new) if k not in BUDGET_KEYS and old.get(k) != new.get(k))
    if changed:
        raise MergeoptError(f"{run_dir} holds a run of a different search space (key {changed[0]!r} differs); "
                            "use another --run-dir or restore the original space file")


def _save_record(space: SearchSpace, run_dir: Path) -> None:
    """The run's record next to its study (written whole: a worker starting beside another reads all or nothing)."""
    write_atomic(run_dir / SPACE_FILE, record_text(space))


def _take_lock(run_dir: Path, shared: bool) -> Path | None:
    """One local worker per run folder; with shared storage (PostgreSQL), heartbeats guard instead."""
    lock = run_dir / ".lock"
    if shared:
        return None
    _check_lock(run_dir)
    lock.write_text(str(os.getpid()))
    return lock


def _check_lock(run_dir: Path) -> None:
    """Refuse a run folder that another living local search holds."""
    lock = run_dir / ".lock"
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return
    if pid and pid != os.getpid() and pid_running(pid):
        raise MergeoptError(f"{run_dir} is in use by process {pid}; wait for it, or use --storage with a database "
                            "server to run several workers on one study")


def recover_stale(study: optuna.Study, optimizer, shared: bool) -> list:
    """Mark trials left RUNNING by a dead worker as failed; let the optimiser re-queue their candidates."""
    if shared:  # heartbeat-based, under the study lock (search/workers.py)
        stale = stale_trials(study)
        reason = "worker stopped sending heartbeats while scoring this candidate"
    else:  # we hold the folder's lock: every RUNNING trial belongs to a dead process
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        reason = "worker died while scoring this candidate"
    _mark_lost(study, optimizer, stale, reason)
    return stale


def _mark_lost(study: optuna.Study, optimizer, trials: list, reason: str) -> None:
    """Candidates that were never scored to the end: FAIL with ``lost`` (no budget spent), then re-queued."""
    study_store.fail_as_lost(study, trials, reason)
    optimizer.recover(study, trials)  # even with none: CMA repairs bookkeeping a kill cut between two writes


def _objective_values(space: SearchSpace, result: CandidateResult) -> list[float] | None:
    if result.failed:
        return None
    values = {name: s.value for name, s in result.scores.items() if s.value is not None}
    if any(o.task not in values or not math.isfinite(values[o.task]) for o in space.objectives):
        return None
    if space.multi_objective:
        return [values[o.task] for o in space.objectives]
    return [space.scalarize(values)]


def _score_parents(ctx: SearchContext, progress: bool) -> dict:
    study = ctx.study
    if Attr.PARENTS in study.user_attrs:
        return study.user_attrs[Attr.PARENTS]
    with ctx.lock.claim("parents") as mine:  # one of several workers starting together scores them
        if not mine:
            return {}
        if Attr.PARENTS in study.user_attrs:
            return study.user_attrs[Attr.PARENTS]
        return _score_parents_now(ctx, progress)


def _score_parents_now(ctx: SearchContext, progress: bool) -> dict:
    space = ctx.space
    parents = {}
    labels = ["base", *model_labels(space.models)]
    for index, (label, folder) in enumerate(zip(labels, [space.base_model, *space.models])):
        start = time.perf_counter()
        ctx.backend.load_parent(ctx.engine, index)  # from the engine's own mapped weights (vLLM: its worker's engine)
        result = evaluate_candidate(ctx.backend, ctx.task_set)
        parents[label] = {"path": folder, "scores": result.to_dict(), "seconds": round(time.perf_counter() - start, 3),
                          "items": {t: pack(v) for t, v in result.items().items()}}  # per item: paired comparisons
        if progress:
            shown = ", ".join(f"{t} {s.value:.3f}" for t, s in result.scores.items() if s.value is not None)
            log.info("  parent %-12s %s", label, shown)
    ctx.study.set_user_attr(Attr.PARENTS, parents)
    return parents


def _promote(study: optuna.Study, space: SearchSpace, low_value: float) -> bool:
    """Successive-halving rule: go to the full subset when the low-fidelity score is in the top fraction so far."""
    earlier = [t.user_attrs.get(Attr.LOW_VALUE) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    earlier = sorted(v for v in earlier if v is not None)
    if len(earlier) < 3:
        return True
    cut = earlier[min(len(earlier) - 1, int(len(earlier) * (1 - space.fidelity_promote)))]
    return low_value >= cut


def run_search(space: SearchSpace, run_dir: Path, options: SearchOptions | None = None, **settings: Any
                ) -> SearchResult:
    """Run (or resume) a search; ``options`` (or its fields as keywords: storage=..., progress=False, ...) say what
    the command line decided besides the space."""
    options = options if options is not None else SearchOptions(**settings)
    run_dir = Path(run_dir)
    task_set, low_set = _preflight(space, options)  # bad input is refused before the run folder or the study
    check_resume(space, run_dir)  # before the (long) model loading: another run in this folder is said at once
    if not options.shared:
        _check_lock(run_dir)
    # the weights themselves (NaN or inf in a checkpoint) are checked as they load, still before the run folder
    # the models stay memory-mapped on the host with engine_device="cpu" while a GPU scores; with vLLM the candidates
    # are built by an engine inside its worker (on engine_device), and this one only checks recipes: on the host
    engine = MergeEngine(space.base_model, space.models, progress=options.progress,
                         device="cpu" if space.backend in OWN_MERGE_ENGINE else options.engine_device or options.device)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MergeoptError(f"cannot create run folder {run_dir} ({exc.strerror}); choose another --run-dir") from None
    lock = _take_lock(run_dir, options.shared)
    ctx = SearchContext(space, run_dir, options, engine, Interrupts(), task_set, low_set)
    ctx.validation = validation.plan(space)  # the validation range (or why there is none), read before any weight
    try:
        with _worker_prefix(worker_id(options.device) if options.shared else None):
            return _run(ctx)
    finally:
        ctx.interrupts.restore()
        if lock is not None and lock.exists() and lock.read_text().strip() == str(os.getpid()):
            lock.unlink()


@contextlib.contextmanager
def _worker_prefix(worker: str | None):
    """With several workers on one study, each of this worker's log lines starts with its id."""
    if worker is None:
        yield
        return

    def prefix(record: logging.LogRecord) -> bool:
        record.msg = f"[{worker}] {record.msg}"
        return True

    log.addFilter(prefix)
    try:
        yield
    finally:
        log.removeFilter(prefix)


def _preflight(space: SearchSpace, options: SearchOptions):
    """What can be checked before any weight is read: the backend, tasks and objectives (the engine checks the
    models next)."""
    check_backend(space.backend, space.base_model, engine_device=options.engine_device)  # e.g. vLLM missing
    task_set = load_task_set(space.tasks, limit=space.limit, seed=space.seed)
    missing = [o.task for o in space.objectives if o.task not in task_set.names]
    if missing:
        raise MergeoptError(f"objective task {missing[0]!r} is not in the task set {space.tasks} "
                            f"(it has {', '.join(task_set.names)})")
    low_set = (load_task_set(space.tasks, limit=space.fidelity_low, seed=space.seed)
               if space.fidelity_low else None)
    return task_set, low_set


def _run(ctx: SearchContext) -> SearchResult:
    space, options = ctx.space, ctx.options
    _save_record(space, ctx.run_dir)
    ctx.lock = StudyLock(storage_url(ctx.run_dir, options.storage), options.study_name or space.name)
    ctx.study = open_study(space, ctx.run_dir, options.storage, options.study_name, lock=ctx.lock,
                           heartbeat=options.heartbeat)
    genes = [g.name for g in space.genes()]
    inner = make_optimizer(space.optimizer, genes, space.seed, space.optimizer_settings)
    with ctx.lock():
        stale = recover_stale(ctx.study, inner, options.shared)
    # ask/tell under the study lock, a heartbeat while scoring, stale trials of dead workers failed and re-queued
    ctx.optimizer = Coordinated(inner, ctx.lock, lambda s: recover_stale(s, inner, options.shared),
                                worker_id(options.device), heartbeat=options.heartbeat)
    if stale and options.progress:
        log.info("resuming: %d unfinished trial(s) of a stopped run marked failed", len(stale))

    # closed however the search ends, so an inference engine (vLLM's worker processes) is always shut down
    with contextlib.closing(make_backend(space.backend, space.base_model, device=options.device, dtype=space.dtype,
                                         engine_device=options.engine_device, recovery=options.recovery)) as backend:
        ctx.backend = backend
        result = _search(ctx)
        if not (result.interrupted or result.stopped_reason):  # the finalists re-scored on the validation range
            try:
                validation.after_search(space, ctx.study, backend, ctx.engine, ctx.validation, ctx.lock,
                                        options.progress)
            except EngineFault as fault:  # the trials are all recorded; the validation is left for a rerun
                result.engine_fault, result.stopped_reason = fault, f"engine fault ({fault.cause}): {fault}"
        return result


def _search(ctx: SearchContext) -> SearchResult:
    """The loop itself: ask a candidate, build and score it, tell its values; until the budget or time is spent."""
    from tqdm import tqdm

    space, study, optimizer, interrupts = ctx.space, ctx.study, ctx.optimizer, ctx.interrupts
    progress = ctx.options.progress
    result = SearchResult(run_dir=ctx.run_dir, study=study)
    try:
        result.parents = _score_parents(ctx, progress)
        result.baselines = baselines.before_search(space, study, ctx.backend, ctx.task_set, ctx.engine,
                                                   result.parents, ctx.lock, optimizer, progress)
    except EngineFault as fault:  # before any trial: nothing to leave unscored
        result.engine_fault, result.stopped_reason = fault, f"engine fault ({fault.cause}): {fault}"
        optimizer.close()
        return result

    def finished() -> int:
        return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED) if spends_budget(t))

    start = time.monotonic()
    deadline = start + space.minutes * 60 if space.minutes else None
    worker_trials = ctx.options.worker_trials
    target = space.trials if worker_trials is None else min(space.trials, finished() + worker_trials)
    spent = finished()
    if spent >= space.trials and progress:
        log.info(SPENT, spent, space.trials)
    bar = tqdm(total=space.trials, initial=spent, desc=f"search {space.name}", unit="trial",
               disable=not progress, file=sys.stderr)
    failures: list[str] = []
    best = _best_value(study, space)
    evaluating = 0.0
    interrupts.hold()  # Ctrl-C now stops the loop between steps; only a candidate's build and scoring is cut short
    while finished() < target and (deadline is None or time.monotonic() < deadline) and not interrupts.pending:
        with interrupts.deferred():  # Ctrl-C never cuts a database step in two (optimizer/search/interrupts.py)
            trial = optimizer.ask(study, target, deadline, stop=lambda: interrupts.pending)
        if trial is None:  # budget met (or handed out and finished by other workers), or out of time
            break
        evaluate_start = time.perf_counter()
        try:
            interrupts.check()
            values = _evaluate_watching_engine(ctx, trial)
        except EngineFault as fault:
            result.engine_fault, result.stopped_reason = fault, _engine_fault(ctx, trial, fault)
            break
        except KeyboardInterrupt:
            # not the candidate's fault: recorded as lost (it does not spend the budget) and queued again
            with interrupts.deferred(), ctx.lock():
                _mark_lost(study, optimizer, [study_store.frozen(study, trial)], "interrupted")
            result.interrupted = True
            break
        except optuna.exceptions.UpdateFinishedTrialError:
            # another worker took this trial for dead (no heartbeat for the grace period) and queued it again
            optimizer.tell(study, trial, None)  # a no-op tell (skip_if_finished) that stops its heartbeat
            if progress:
                log.info("trial %d was failed as stale by another worker; moving on", trial.number)
            continue
        finally:
            evaluating += time.perf_counter() - evaluate_start
        reason = trial.user_attrs.get(Attr.ERROR, "unknown") if values is None else None
        kind = str(trial.user_attrs.get(Attr.FAILURE_KIND, "unknown")) if values is None else ""
        with interrupts.deferred():
            optimizer.tell(study, trial, values)
        result.new_trials += 1
        bar.update(1)
        if values is None:
            failures.append(kind)
            if len(failures) >= MAX_SAME_FAILURES and len(set(failures[-MAX_SAME_FAILURES:])) == 1:
                result.stopped_reason = (f"{MAX_SAME_FAILURES} candidates in a row failed with the same fault "
                                         f"({failures[-1]}): {reason}")
                break
        else:
            failures.clear()
            if not space.multi_objective and (best is None or values[0] > best):
                best = values[0]
            if best is not None:
                bar.set_postfix_str(f"best {best:.3f}")
    bar.close()
    result.interrupted = result.interrupted or interrupts.pending
    if not result.parents and not result.interrupted and result.engine_fault is None:
        # another worker had the claim: its scores, or (it died) ours
        result.parents = _score_parents(ctx, False)
    optimizer.close()
    result.seconds = {"evaluating": evaluating, **optimizer.seconds}
    return result


def _best_value(study: optuna.Study, space: SearchSpace) -> float | None:
    if space.multi_objective:
        return None
    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.user_attrs.get(Attr.FIDELITY) == "full" and t.value is not None]
    return max(values) if values else None


def _evaluate_watching_engine(ctx: SearchContext, trial) -> list[float] | None:
    """The trial's evaluation; the engine faults the backend survived meanwhile are noted in the trial
    (``engine_faults``: cause, detail, recovery seconds). One it could not survive is raised (:func:`_engine_fault`)."""
    events = getattr(ctx.backend, "engine_events", [])
    seen = len(events)
    try:
        backend = ctx.interrupts.around(faults.with_faults(ctx.backend, trial.number, ctx.options.faults))
        return _evaluate_trial(ctx, trial, backend)
    finally:
        if len(events) > seen:
            with ctx.interrupts.deferred():
                trial.set_user_attr(Attr.ENGINE_FAULTS, [e.to_dict() for e in events[seen:]])


def _engine_fault(ctx: SearchContext, trial, fault: EngineFault) -> str:
    """The engine failed and the backend could not replace it here: the candidate is not at fault. It is left
    unscored as a killed worker leaves it (FAIL with ``lost``: no budget spent, the optimiser is told nothing, CMA-ES
    queues it again); the line that stops the run."""
    reason = f"engine fault ({fault.cause}): {fault}"
    with ctx.interrupts.deferred(), ctx.lock():
        _mark_lost(ctx.study, ctx.optimizer, [study_store.frozen(ctx.study, trial)], reason)
    log.warning("trial %d left unscored: %s", trial.number, reason)
    return reason


def _evaluate_trial(ctx: SearchContext, trial, backend) -> list[float] | None:
    space, engine, task_set, low_set, study = ctx.space, ctx.engine, ctx.task_set, ctx.low_set, ctx.study
    genome = {name: trial.params[name] for name in trial.params} if trial.params else None
    if not genome:
        genome = {g.name: trial.suggest_float(g.name, 0.0, 1.0) for g in space.genes()}
    recipe = space.recipe(genome)
    trial.set_user_attr(Attr.RECIPE, recipe.to_yaml())
    trial.set_user_attr(Attr.SEED, recipe.seed)
    timings: dict[str, float] = {}
    fidelity = "full"
    if low_set is not None:
        low = evaluate_candidate(backend, low_set, engine, recipe)
        timings["low_swap"], timings["low_score"] = low.seconds.get("swap", 0.0), low.seconds.get("score", 0.0)
        low_values = _objective_values(space, low)
        if low_values is None:
            return _record(trial, space, low, "low", timings)
        low_scalar = space.scalarize({n: s.value for n, s in low.scores.items() if s.value is not None})
        trial.set_user_attr(Attr.LOW_VALUE, low_scalar)
        trial.set_user_attr(Attr.LOW_SCORES, low.to_dict())
        if not _promote(study, space, low_scalar):
            return _record(trial, space, low, "low", timings)
        result = evaluate_candidate(backend, task_set, engine, recipe)
    else:
        result = evaluate_candidate(backend, task_set, engine, recipe)
    return _record(trial, space, result, fidelity, timings)


def _record(trial, space, result: CandidateResult, fidelity: str, timings: dict) -> list[float] | None:
    timings.update({k: round(v, 4) for k, v in result.seconds.items()})
    trial.set_user_attr(Attr.SCORES, result.to_dict())
    if fidelity == "full" and not result.failed:  # per-item values, for paired comparisons (compact: "0110...")
        trial.set_user_attr(Attr.ITEMS, {t: pack(v) for t, v in result.items().items()})
    trial.set_user_attr(Attr.FIDELITY, fidelity)
    trial.set_user_attr(Attr.SECONDS, timings)
    values = _objective_values(space, result)
    if values is None:
        trial.set_user_attr(Attr.ERROR, result.error or "an objective has no finite score")
        trial.set_user_attr(Attr.FAILURE_KIND, result.kind or NonFiniteOutput.kind)
    else:
        trial.set_user_attr(Attr.SCALARIZED, space.scalarize({n: s.value for n, s in result.scores.items()}))
    return values
