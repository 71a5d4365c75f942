"""Export a run: the Pareto front and the best recipe as mergekit YAML, the trial table, merged models on request.

Files written into the run folder:
  ``pareto/trial-NNNN.yaml``  one recipe per non-dominated trial (full fidelity), scores in its mergeopt block
  ``pareto/front.csv``        the front as a table
  ``best.yaml``               the best trial: of the finalists re-scored on the validation items, the best there
                              (optimizer/search/validation.py); before any validation, the best scalarized
  ``trials.csv``              every trial, flattened
  ``pareto/trial-NNNN/``      (``--materialize``) the merged model of each front recipe

Each recipe is the exact YAML that was built and scored, so ``mergeopt merge`` of it gives the same bits.
Files are written to a temporary name and renamed, so a full disk or a read-only folder leaves the previous
export (and the study, which is only read) intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from optimizer.study_store import Attr
from optimizer.errors import MergeoptError
from optimizer.files import write_atomic
from optimizer.recipe import Recipe


@dataclass
class FrontEntry:
    trial: int
    objectives: dict[str, float]
    scalarized: float
    path: Path


@dataclass
class ExportResult:
    run_dir: Path
    front: list[FrontEntry] = field(default_factory=list)
    best: FrontEntry | None = None
    trials: int = 0
    line: str | None = None  # the verdict: best (validated) vs the best baseline (optimizer/search/validation.py)


def _write(path: Path, text: str) -> None:
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise MergeoptError(f"cannot write {path} ({exc.strerror}); free space or make the run folder writable — "
                            "the study is untouched, rerun 'mergeopt export' after") from None


def export_run(run_dir: str | Path, storage: str | None = None, study_name: str | None = None,
               materialize: bool = False, device: str | None = None, progress: bool = False) -> ExportResult:
    from optimizer.run import comparable, front_trials, open_run, trials_table
    from optimizer.search.validation import comparison_line, validated_best

    run_dir = Path(run_dir)
    space, study = open_run(run_dir, storage, study_name)
    records = study.get_trials(deepcopy=False)
    trials = [t for t in records if comparable(t)]
    result = ExportResult(run_dir=run_dir, trials=len(records))
    pareto = run_dir / "pareto"
    try:
        pareto.mkdir(exist_ok=True)
    except OSError as exc:
        raise MergeoptError(f"cannot create {pareto} ({exc.strerror}); make the run folder writable") from None
    table = trials_table(study, space, records)  # the same table load_run(run_dir).trials gives
    _write(run_dir / "trials.csv", table.to_csv(index=False))
    if not trials:
        return result

    keep = set()
    rows = ["trial," + ",".join(o.task for o in space.objectives) + ",scalarized,file"]
    for t in front_trials(records, space):
        name = f"trial-{t.number:04d}.yaml"
        keep.add(name)
        path = pareto / name
        _write(path, _recipe_text(t, space))
        entry = FrontEntry(t.number, {o.task: t.user_attrs[Attr.SCORES][o.task]["value"] for o in space.objectives},
                           t.user_attrs[Attr.SCALARIZED], path)
        result.front.append(entry)
        rows.append(f"{t.number}," + ",".join(f"{v:.6g}" for v in entry.objectives.values())
                    + f",{entry.scalarized:.6g},{path.name}")
    for stale in pareto.glob("trial-*.yaml"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    _write(pareto / "front.csv", "\n".join(rows) + "\n")

    best = max(trials, key=lambda t: t.user_attrs[Attr.SCALARIZED])
    validated = validated_best(space, study, records)  # the finalist best on the validation items, when validated
    if validated is not None:
        best = next(t for t in trials if t.number == validated)
    result.line = comparison_line(space, study, records)
    _write(run_dir / "best.yaml", _recipe_text(best, space))
    result.best = FrontEntry(best.number, {o.task: best.user_attrs[Attr.SCORES][o.task]["value"] for o in space.objectives},
                             best.user_attrs[Attr.SCALARIZED], run_dir / "best.yaml")
    if materialize:
        from optimizer.merge.engine import MergeEngine

        engine = MergeEngine(space.base_model, space.models, device=device, progress=progress)
        for entry in result.front:
            engine.save(Recipe.load(entry.path), pareto / entry.path.stem, progress=progress)
    return result


def _recipe_text(trial, space) -> str:
    recipe = Recipe.from_dict(yaml.safe_load(trial.user_attrs[Attr.RECIPE]))
    recipe.info = {
        "trial": trial.number,
        "study": space.name,
        "scores": {task: {k: v for k, v in s.items() if k in ("metric", "value", "stderr", "n")}
                   for task, s in trial.user_attrs[Attr.SCORES].items()},
        "objectives": {"scalarized": trial.user_attrs[Attr.SCALARIZED]},
    }
    return recipe.to_yaml()
