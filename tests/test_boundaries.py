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


# ---- layers: imports point down this list (ARCHITECTURE.md); a module may import its own layer or lower ones ----
LAYERS = [
    # declarations every layer may read: errors, atomic files, schema types, the registries' declarations, the
    # study adapter (attribute keys, storage), Pareto math, the zoo's data (where models and task files are)
    ("errors", "files", "schema", "catalogue", "methods", "pareto", "study_store", "zoo", "hub", "side_files"),
    ("recipe",),
    ("merge",),
    ("evaluate",),
    ("space",),
    ("run",),
    ("search", "export", "report", "builders"),
    ("cli", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """optimizer.merge.engine -> merge; optimizer.recipe -> recipe; optimizer -> the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    """Every optimizer module a file imports, at its top or inside a function (a lazy import is still a
    dependency)."""
    import ast

    here = ".".join(("optimizer", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("optimizer.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("optimizer"):
            if node.module == "optimizer":  # from optimizer import study_store
                found |= {f"optimizer.{a.name}" for a in node.names}
            else:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names
                          if (PACKAGE / Path(*node.module.split(".")[1:]) / f"{a.name}.py").is_file()}
    return {m for m in found if m != here}


def test_every_module_sits_in_a_layer_and_imports_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "models" in path.parts:  # the zoo's embedded model folders
            continue
        own = _unit(".".join(("optimizer", *path.relative_to(PACKAGE).with_suffix("").parts)))
        if own == "" or own == "__init__":
            continue
        assert own in RANK, f"optimizer/{own} is in no layer of tests/test_boundaries.py (add it where it belongs)"
        for module in _imports(path):
            target = _unit(module)
            if target and RANK[target] > RANK[own]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {module} (layer {RANK[target]} > {RANK[own]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_modules():
    """Module-level graph (lazy imports included): no cycle, such as recipe <-> merge.methods was."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if "models" in path.parts:
            continue
        name = ".".join(("optimizer", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        graph[name] = {m for m in _imports(path) if m != "optimizer"}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
