"""Helpers of the reliability suite: broken model variants, the CLI as a subprocess, study invariants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
from optuna.trial import TrialState
from helpers import run_cli
from safetensors.torch import load_file, save_file


def variant(root: Path, name: str, edit=None, config_edit=None, source: str = "m1") -> Path:
    """A copy of model ``source`` under models/NAME, its tensors changed by ``edit(state)`` (in place)."""
    src = root / "models" / source
    folder = root / "models" / name
    if folder.exists():
        return folder
    shutil.copytree(src, folder)
    if edit is not None:
        state = load_file(src / "model.safetensors")
        edit(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if config_edit is not None:
        config = json.loads((src / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


mergeopt_cli = run_cli  # the suite's one CLI runner (tests/helpers.py)



# ---- the study as a record: snapshots and invariants ---------------------------------------------------------
def load(db: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def completed(study: optuna.Study) -> dict[int, tuple]:
    """trial number -> (values, genome) of every COMPLETE trial."""
    return {t.number: (tuple(t.values), tuple(sorted(t.params.items())))
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def duplicate_genomes(study: optuna.Study) -> list:
    genomes = [g for _, g in completed(study).values()]
    return sorted({g for g in genomes if genomes.count(g) > 1})


def cma_problems(study: optuna.Study) -> list[str]:
    """Ways the CMA state in the study disagrees with its trials (empty: consistent)."""
    import base64
    import pickle

    attrs = study.user_attrs
    if "cma:state" not in attrs:
        return []
    state = pickle.loads(base64.b64decode(attrs["cma:state"]))
    es = state["es"] if isinstance(state, dict) else state
    generation = state["generation"] if isinstance(state, dict) else attrs.get("cma:generation", -1)
    told = state["told"] if isinstance(state, dict) and "told" in state else attrs.get("cma:told", -1)
    problems = []
    if attrs.get("cma:generation") != generation:
        problems.append(f"cma:generation {attrs.get('cma:generation')} but the state is at {generation}")
    if attrs.get("cma:told", -1) != told:
        problems.append(f"cma:told {attrs.get('cma:told')} but the state was told {told}")
    if es.countiter != told + 1:
        problems.append(f"CMA was told {es.countiter} generations but cma:told is {told}")
    trials = study.get_trials(deepcopy=False)
    by_slot: dict[tuple[int, int], list] = {}
    for t in trials:
        if "cma_generation" in t.user_attrs:
            by_slot.setdefault((t.user_attrs["cma_generation"], t.user_attrs["cma_index"]), []).append(t)
    generations = {g for g, _ in by_slot}
    if generations and max(generations) != generation:
        problems.append(f"trials reach generation {max(generations)} but cma:generation is {generation}")
    for g in range(generation + 1):
        for i in range(es.popsize):
            copies = by_slot.get((g, i), [])
            if sum(t.state == TrialState.COMPLETE for t in copies) > 1:
                problems.append(f"generation {g} candidate {i} completed twice")
            if g <= told and not any(t.state in (TrialState.COMPLETE, TrialState.FAIL) and not t.user_attrs.get("lost")
                                     for t in copies):
                problems.append(f"generation {g} was told but candidate {i} never finished")
            scored = [t for t in copies if not t.user_attrs.get("lost")]  # a lost copy may hold half its params
            if len({(tuple(sorted(t.params.items())), tuple(t.user_attrs["cma_x"])) for t in scored}) > 1:
                problems.append(f"generation {g} candidate {i} was scored with two different genomes")
    return problems
