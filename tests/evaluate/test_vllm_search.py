"""A short search on the vllm backend, started as the README says (vLLM venv, PYTHONPATH=<clone>), on a tied model.

The CLI runs `search --backend vllm`, `export` and `report` in the vLLM venv; every trial's recorded scores, and the
parents', equal what the transformers backend gives on the same recipes (CI tier `-m vllm`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from helpers import tiny_family, write_space  # noqa: E402

from optimizer.evaluate.hf import HFBackend  # noqa: E402
from optimizer.evaluate.scoring import evaluate_candidate  # noqa: E402
from optimizer.evaluate.tasks import load_task_set  # noqa: E402
from optimizer.merge.engine import MergeEngine  # noqa: E402

CLONE = Path(__file__).resolve().parents[2]


def mergeopt(*args):
    env = {**os.environ, "PYTHONPATH": str(CLONE)}
    done = subprocess.run([sys.executable, "-m", "optimizer.cli", *map(str, args)], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_search_on_a_tied_model_records_the_scores_transformers_gives(tmp_path):
    tiny_family(tmp_path / "models", 3, tied=True)
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "target": str(2 * i)}) + "\n"
                                                for i in range(30)))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"prompt": f"{i}=", "choices": [str(i), str(i + 1), "x"],
                                                           "answer": i % 3}) + "\n" for i in range(30)))
    (tmp_path / "tasks.yaml").write_text("tasks:\n  - {name: gen, path: gen.jsonl, max_new_tokens: 3}\n"
                                         "  - {name: mc, kind: multiple_choice, path: mc.jsonl}\n")
    space = write_space(tmp_path, "tied-vllm", backend="vllm", budget={"trials": 3})
    run_dir = tmp_path / "run"
    mergeopt("search", space, "--run-dir", run_dir)
    mergeopt("export", run_dir)
    mergeopt("report", run_dir)
    assert (run_dir / "best.yaml").is_file() and (run_dir / "report.html").is_file()

    import optimizer

    run = optimizer.load_run(run_dir)
    records = [t for t in run.records if t.user_attrs.get("scores")]
    assert len(records) == 3
    base, models = run.space.base_model, run.space.models
    engine = MergeEngine(base, models, device="cpu")
    hf = HFBackend(base, device="cpu")
    task_set = load_task_set(run.space.tasks, limit=run.space.limit, seed=run.space.seed)
    assert len(run.parents) == 1 + len(models)  # base first, then the models in order
    for index, parent in enumerate(run.parents.values()):
        hf.load_parent(engine, index)
        expected = evaluate_candidate(hf, task_set).to_dict()
        assert {t: s["value"] for t, s in parent["scores"].items()} == {t: s["value"] for t, s in expected.items()}, index
    seen = set()
    for record in records:
        result = evaluate_candidate(hf, task_set, engine, run.recipe(record.number))
        recorded = {t: s["value"] for t, s in record.user_attrs["scores"].items()}
        assert recorded == {t: s.value for t, s in result.scores.items()}, record.number
        seen.add(tuple(sorted(recorded.items())))
    assert len(seen) > 1  # the trials really scored different models
