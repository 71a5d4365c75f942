"""A run's record and its read model: what a run was (the effective configuration and what it resolved to), and
its study as tables. ``mergeopt report``, ``mergeopt export`` and :func:`load_run` read a run through this module
alone: no model folder is opened, torch is not imported, and the global logging is left as it is.

The record is written by the search in two places that say the same thing: ``space.yaml`` in the run folder
(the search space YAML with the command line's overrides applied, plus a ``resolved:`` block) and the study's
user attribute ``mergeopt:run`` (so a study in a shared database carries it too). A resume may change the budget
(``--trials``, ``--minutes``: a run may grow); any other difference is a different run and is refused.

``load_run(path)`` gives a :class:`Run` whose ``trials`` DataFrame is exactly what ``trials.csv`` holds (both are
built by :func:`trials_table`), and whose ``front`` is the set ``mergeopt export`` writes to ``pareto/`` (both
use :func:`front_trials`). Which trials count: the front, best-per-task values and hypervolume use completed
trials scored at full fidelity (a low-fidelity score is on fewer items and is not comparable).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import TrialState

from optimizer.errors import MergeoptError
from optimizer.recipe import Recipe, read_yaml_file
from optimizer import study_store
from optimizer.study_store import Attr
from optimizer.pareto import hypervolume, non_dominated
from optimizer.space import BUDGET_KEYS, SearchSpace, load_space, parse_space, recipe_value

RECORD_ATTR = Attr.RUN  # the study's copy of the record: {"config": ..., "resolved": ...}
RESOLVED_KEY = "resolved"  # space.yaml's block of resolved facts
SPACE_FILE = "space.yaml"
FLAGS = {"optimizer": "--optimizer", "seed": "--seed", "backend": "--backend"}  # identity keys a flag overrides


# ---- the record --------------------------------------------------------------------------------------
def record_of(space: SearchSpace) -> dict[str, Any]:
    return {"config": space.config(), RESOLVED_KEY: space.facts()}


def space_of(record: dict[str, Any], source: str) -> SearchSpace:
    """The SearchSpace a record describes, rebuilt without looking at any model folder."""
    return parse_space(record["config"], source=source, facts=record[RESOLVED_KEY])


def record_text(space: SearchSpace) -> str:
    record = record_of(space)
    header = ("# The effective configuration of this run (the search space with the command line's overrides),\n"
              "# written by mergeopt search; 'resolved' is what it resolved to. mergeopt report/export read it.\n")
    return header + yaml.safe_dump({**record["config"], RESOLVED_KEY: record[RESOLVED_KEY]}, sort_keys=False)


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The record in ``run_dir/space.yaml``; None for a run written before records had a ``resolved`` block."""
    data = read_yaml_file(run_dir / SPACE_FILE, "run record")
    if not isinstance(data, dict) or not isinstance(data.get(RESOLVED_KEY), dict):
        return None
    config = {k: v for k, v in data.items() if k != RESOLVED_KEY}
    return {"config": config, RESOLVED_KEY: data[RESOLVED_KEY]}


def check_same_run(recorded: dict[str, Any], space: SearchSpace, where: str) -> None:
    """Refuse, in one line, a command that would continue a run with another identity (the budget may change)."""
    old = {k: v for k, v in recorded.items() if k not in BUDGET_KEYS}
    new = _canonical(space.identity())
    old = _canonical(old)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not changed:
        return
    key = changed[0]
    was, now = old.get(key), new.get(key)
    if key == "optimizer" and isinstance(was, dict) and isinstance(now, dict) and was.get("name") != now.get("name"):
        was, now = was.get("name"), now.get("name")
    if key in FLAGS and not isinstance(was, dict):
        raise MergeoptError(f"{where} was searched with {key} {was!r} but this command asks for {now!r}; rerun with "
                            f"{FLAGS[key]} {was} to continue it, or use another --run-dir")
    raise MergeoptError(f"{where} holds a different search space (key {key!r} differs: {_short(was)} there, "
                        f"{_short(now)} now); use another --run-dir or restore the original space file")


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- the typed trial record --------------------------------------------------------------------------
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def spends_budget(trial) -> bool:
    """Finished and not lost: a candidate lost with a dead or interrupted worker is scored again, for free."""
    return trial.state in FINISHED and not trial.user_attrs.get(Attr.LOST)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the search recorded it: the typed view of its user attributes (keys: study_store.Attr)."""

    number: int
    state: str
    scores: dict
    scalarized: float | None
    fidelity: str | None
    error: str | None
    failure_kind: str | None
    lost: bool
    low_value: float | None
    seed: int | None
    seconds: dict
    recipe_yaml: str | None

    @classmethod
    def of(cls, trial) -> TrialRecord:
        attrs = trial.user_attrs
        return cls(number=trial.number, state=trial.state.name, scores=dict(attrs.get(Attr.SCORES) or {}),
                   scalarized=attrs.get(Attr.SCALARIZED), fidelity=attrs.get(Attr.FIDELITY),
                   error=attrs.get(Attr.ERROR), failure_kind=attrs.get(Attr.FAILURE_KIND),
                   lost=bool(attrs.get(Attr.LOST, False)), low_value=attrs.get(Attr.LOW_VALUE),
                   seed=attrs.get(Attr.SEED), seconds=dict(attrs.get(Attr.SECONDS) or {}),
                   recipe_yaml=attrs.get(Attr.RECIPE))


# ---- opening a run -----------------------------------------------------------------------------------
def open_run(run_dir: str | Path, storage: str | None = None, study_name: str | None = None):
    """(space, study) of a run folder, from its record alone; one clear line when the folder or study is not there."""
    run_dir = Path(run_dir)
    if not (run_dir / SPACE_FILE).is_file():
        raise MergeoptError(f"{run_dir} is not a run folder (no {SPACE_FILE}); run 'mergeopt search' first")
    record = read_record(run_dir)
    if record is None:  # a run recorded before its resolved facts were: read as then (the models must be there)
        space = load_space(run_dir / SPACE_FILE)
        name = study_name or space.name
    else:
        name = study_name or str(record["config"]["name"])
    if storage is None and not (run_dir / "study.db").is_file():
        raise MergeoptError(f"{run_dir} has no study.db; pass the --storage the search used")
    try:
        study = study_store.load_study(study_store.storage_url(run_dir, storage), name)
    except KeyError:
        raise MergeoptError(f"no study named {name!r} in the run's storage") from None
    stored = study.user_attrs.get(RECORD_ATTR)
    if stored is not None:  # the study's copy is the latest (a resume may have grown the budget)
        record = stored
    if record is not None:
        space = space_of(record, str(run_dir / SPACE_FILE))
    return space, study


def comparable(trial) -> bool:
    """A completed, full-fidelity trial with scores: the ones the front and the curves are made of."""
    return (trial.state == TrialState.COMPLETE and trial.user_attrs.get(Attr.FIDELITY) == "full"
            and bool(trial.user_attrs.get(Attr.SCORES)) and trial.user_attrs.get(Attr.SCALARIZED) is not None)


def signed(space, scores: dict) -> list[float] | None:
    """Objective vector with every objective turned to 'larger is better'; None when one is missing."""
    out = []
    for o in space.objectives:
        value = (scores.get(o.task) or {}).get("value")
        if value is None or not math.isfinite(value):
            return None
        out.append(value if o.direction == "maximize" else -value)
    return out


def front_trials(trials, space) -> list:
    """The non-dominated comparable trials, best scalarized first (the recipes ``mergeopt export`` writes)."""
    pool, points = [], []
    for t in trials:
        if comparable(t) and (point := signed(space, t.user_attrs[Attr.SCORES])) is not None:
            pool.append(t)
            points.append(point)
    ids = non_dominated(points)
    return sorted((pool[i] for i in ids), key=lambda t: (-t.user_attrs[Attr.SCALARIZED], t.number))


def param_name(gene_name: str, param: str) -> str:
    # gene names abbreviate the parameter ("w.adder.g0"); tables spell it out ("weight.adder.g0")
    return param + gene_name[1:]


def trials_table(study, space=None, trials=None):
    """All trials as one flat pandas table, one row per trial; ``trials.csv`` is this table.

    Columns: trial, state, fidelity, on_front, scalarized, error, failure_kind, lost; per task ``<task>``,
    ``<task>_stderr``, ``<task>_n``, ``<task>_error``; the study's values ``objective_<i>``; with the space, each
    gene in parameter units (``weight.<model>[.<module>][.g<k>]``, ``drop_rate...``), and always the raw unit-cube
    genome (``gene.<name>``); ``low_scalarized`` (the low-fidelity screen), seed, ``seconds_<phase>``, started,
    duration_s.
    """
    import pandas as pd

    trials = study.get_trials(deepcopy=False) if trials is None else trials
    genes = {g.name: g for g in space.genes()} if space is not None else {}
    front = {t.number for t in front_trials(trials, space)} if space is not None else set()
    rows = []
    for t in trials:
        record = TrialRecord.of(t)
        row: dict[str, Any] = {"trial": t.number, "state": record.state, "fidelity": record.fidelity,
                               "on_front": t.number in front, "scalarized": record.scalarized,
                               "error": record.error, "lost": record.lost}
        for task, s in record.scores.items():
            row[task] = s.get("value")
            row[f"{task}_stderr"] = s.get("stderr")
            row[f"{task}_n"] = s.get("n")
            row[f"{task}_error"] = s.get("error")
        for i, v in enumerate(t.values or []):
            row[f"objective_{i}"] = v
        for name, unit in t.params.items():
            if name in genes:
                # rounded as the recipe rounds them: the value that was built and scored
                row[param_name(name, genes[name].param)] = recipe_value(genes[name].value(unit))
        for name, unit in t.params.items():
            row[f"gene.{name}"] = unit
        row["low_scalarized"] = record.low_value
        row["seed"] = record.seed
        for k, v in record.seconds.items():
            row[f"seconds_{k}"] = v
        row["started"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["duration_s"] = t.duration.total_seconds() if t.duration else None
        rows.append(row)
    return pd.DataFrame(rows, columns=_column_order(rows))


def _column_order(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen) or ["trial", "state", "fidelity", "on_front", "scalarized", "error", "lost"]


@dataclass
class Run:
    """A run folder read back: ``trials`` (= trials.csv), ``front`` (= pareto/), the parents' scores, the space."""

    path: Path
    space: Any  # SearchSpace, rebuilt from the record
    study: Any  # optuna.Study
    trials: Any  # pandas.DataFrame, one row per trial
    front: Any  # pandas.DataFrame, the front's rows of ``trials`` plus ``file``, best scalarized first
    parents: dict = field(default_factory=dict)  # label -> {"path", "scores": {task: {metric, value, ...}}}
    records: list = field(default_factory=list, repr=False)  # the study's FrozenTrials when it was read

    @property
    def tasks(self) -> list[str]:
        return [o.task for o in self.space.objectives]

    @property
    def planned_trials(self) -> int:
        """The budget of the run as last set (``--trials`` may grow a run on resume)."""
        return self.space.trials

    def recipe(self, trial: int) -> Recipe:
        """The exact recipe a trial built and scored."""
        record = next(t for t in self.records if t.number == trial)
        return Recipe.from_dict(yaml.safe_load(record.user_attrs[Attr.RECIPE]), source=f"trial {trial}")

    def comparable_trials(self) -> list:
        return [t for t in self.records if comparable(t) and signed(self.space, t.user_attrs[Attr.SCORES]) is not None]

    def _points(self) -> list[list[float]]:
        return [p for t in self.comparable_trials() if (p := signed(self.space, t.user_attrs[Attr.SCORES])) is not None]

    def reference_point(self) -> list[float]:
        """Hypervolume reference: the worst signed score seen per objective, parents included."""
        points = self._points()
        points += [p for p in (signed(self.space, info.get("scores") or {}) for info in self.parents.values()) if p]
        if not points:
            return [0.0] * len(self.space.objectives)
        return [min(p[i] for p in points) for i in range(len(self.space.objectives))]

    def hypervolume(self) -> float:
        points = self._points()
        return hypervolume(points, self.reference_point()) if points else 0.0


def load_run(path: str | Path, storage: str | None = None, study_name: str | None = None) -> Run:
    """Read a run folder (and its study) into pandas tables. ``storage``/``study_name`` as given to the search."""
    space, study = open_run(path, storage, study_name)
    records = study.get_trials(deepcopy=False)
    table = trials_table(study, space, records)
    front_numbers = [t.number for t in front_trials(records, space)]
    if len(table):
        front = table.set_index("trial").loc[front_numbers].reset_index()
    else:
        front = table.copy()
    front["file"] = [f"pareto/trial-{n:04d}.yaml" for n in front_numbers]
    return Run(Path(path), space, study, table, front, dict(study.user_attrs.get(Attr.PARENTS) or {}), records)
