"""Module boundaries the design promises: Optuna's private API in one adapter, no process-wide side effects at
import, typed candidate failures, one registry per plug-in point."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimizer.errors import CandidateOutOfMemory, NonFiniteOutput, failure_kind

PACKAGE = Path(__file__).resolve().parents[1] / "optimizer"
OPTUNA_PRIVATE = re.compile(r"\._storage\b|\._trial_id\b|\._study_id\b|\._get_stale_trial_ids\b")


def test_optunas_private_api_is_used_in_one_adapter_only():
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if OPTUNA_PRIVATE.search(p.read_text()))
    assert users == ["study_store.py"]


def test_importing_the_library_sets_no_environment_variable_and_no_log_level():
    modules = sorted(".".join(("optimizer", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
                     for p in PACKAGE.rglob("*.py") if not {"zoo", "builders"} & set(p.parts) and p.name != "vllm.py")
    code = f"""
import logging, os
import optuna, torch, transformers, numba, pandas, cma, safetensors, tqdm  # their own import-time settings
before = (dict(os.environ), optuna.logging.get_verbosity(), logging.getLogger().level,
          {{name: logging.getLogger(name).level for name in ("mergeopt", "optuna", "transformers")}})
import importlib, warnings
filters = list(warnings.filters)
for name in {modules!r}:
    importlib.import_module(name)
after = (dict(os.environ), optuna.logging.get_verbosity(), logging.getLogger().level,
         {{name: logging.getLogger(name).level for name in ("mergeopt", "optuna", "transformers")}})
assert before == after, [(a, b) for a, b in zip(before, after) if a != b]
assert warnings.filters == filters, "an import changed the warning filters"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("exc,kind", [
    (torch.OutOfMemoryError("CUDA out of memory"), "oom"),
    (CandidateOutOfMemory("out of memory while scoring"), "oom"),
    (NonFiniteOutput("NaN logits"), "nan"),
    (RuntimeError("the message says out of memory and nan, but the type is what counts"), "RuntimeError"),
    (ValueError("x"), "ValueError"),
])
def test_a_candidate_failure_is_classified_by_its_type_not_its_message(exc, kind):
    assert failure_kind(exc) == kind


def test_the_registries_drive_validation_and_the_command_line():
    from optimizer.cli import build_parser
    from optimizer.evaluate.scoring import BACKENDS
    from optimizer.search.optimizers import OPTIMIZERS
    from optimizer.space import parse_space

    search = build_parser()._subparsers._group_actions[0].choices["search"]
    choices = {a.dest: a.choices for a in search._actions}
    assert tuple(choices["optimizer"]) == tuple(OPTIMIZERS) and tuple(choices["backend"]) == tuple(BACKENDS)
    from optimizer.errors import MergeoptError

    with pytest.raises(MergeoptError, match="optimizer.name: 'pso' is not one of " + ", ".join(OPTIMIZERS)):
        parse_space({"base_model": "b", "models": ["m"], "objectives": ["a"], "optimizer": "pso"},
                    resolve_models=False)
