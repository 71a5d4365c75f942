"""Short searches on the vllm backend, started as the README says (vLLM venv, PYTHONPATH=<clone>), on tied models.

The CLI runs `search --backend vllm` (then `export` and `report`) in the vLLM venv; every trial's recorded scores, and
the parents', equal what the transformers backend gives on the same recipes, and no candidate goes through a file
(CI tier `-m vllm`). Two families: the tiny tied Llama of tests/helpers.py, and the reduced SmolLM2 family (the real
SmolLM2-135M-Instruct, tied, and three fine-tunes) that CI's smollm2 tier builds into the cache folder.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from helpers import write_search_setup, write_space  # noqa: E402

from optimizer.evaluate.hf import HFBackend  # noqa: E402
from optimizer.evaluate.scoring import evaluate_candidate  # noqa: E402
from optimizer.evaluate.tasks import load_task_set  # noqa: E402
from optimizer.merge.engine import MergeEngine  # noqa: E402

CLONE = Path(__file__).resolve().parents[2]


def mergeopt(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(CLONE), **(env or {})}
    done = subprocess.run([sys.executable, "-m", "optimizer.cli", *map(str, args)], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


class WeightFileWatch:
    """Every safetensors file that appears under ``places`` while it runs (polled: a candidate of even the tiny models
    takes far longer to write and reload than one poll)."""

    def __init__(self, places):
        self.places = [Path(p) for p in places if Path(p).is_dir()]
        self.before = self._listing()
        self.seen = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _listing(self):
        found = set()
        for place in self.places:
            try:
                found |= {str(f) for f in place.rglob("*.safetensors")}
            except OSError:  # a file removed while listed (other processes use /dev/shm too)
                pass
        return found

    def _poll(self):
        while not self._stop.wait(0.05):
            self.seen |= self._listing() - self.before

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.seen |= self._listing() - self.before


def search_writing_no_weights(space, run_dir, tmp_path, *extra):
    """`mergeopt search` on the vllm backend; fails if any weight file appears in /dev/shm, a private TMPDIR or the
    run folder meanwhile, or if the backend says it fell back to files."""
    # short: vLLM puts its IPC sockets in TMPDIR, and a socket path has at most 107 characters
    private_tmp = Path(tempfile.mkdtemp(prefix="mo-"))
    try:
        with WeightFileWatch(["/dev/shm", private_tmp, tmp_path]) as watch:
            done = mergeopt("search", space, "--run-dir", run_dir, *extra, env={"TMPDIR": str(private_tmp)})
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)
    assert not watch.seen, f"weight files written during the search: {sorted(watch.seen)[:5]}"
    assert "candidates go through files" not in done.stderr, done.stderr[-2000:]
    return done


def assert_recorded_scores_are_transformers(run_dir, trials):
    """Every parent's and trial's recorded scores equal the hf backend's on the same weights, and they differ."""
    import optimizer

    run = optimizer.load_run(run_dir)
    records = [t for t in run.records if t.user_attrs.get("scores")]
    assert len(records) == trials
    base, models = run.space.base_model, run.space.models
    engine = MergeEngine(base, models, device="cpu")
    hf = HFBackend(base, device="cpu", dtype=run.space.dtype)
    task_set = load_task_set(run.space.tasks, limit=run.space.limit, seed=run.space.seed)
    assert len(run.parents) == 1 + len(models)  # base first, then the models in order
    seen = set()
    for index, parent in enumerate(run.parents.values()):
        hf.load_parent(engine, index)
        expected = {t: s.value for t, s in evaluate_candidate(hf, task_set).scores.items()}
        recorded = {t: s["value"] for t, s in parent["scores"].items()}
        assert recorded == expected, index
        seen.add(tuple(sorted(recorded.items())))
    for record in records:
        result = evaluate_candidate(hf, task_set, engine, run.recipe(record.number))
        recorded = {t: s["value"] for t, s in record.user_attrs["scores"].items()}
        assert recorded == {t: s.value for t, s in result.scores.items()}, record.number
        seen.add(tuple(sorted(recorded.items())))
    assert len(seen) > 1  # the loads really changed the model (a stale one would repeat its scores)


def test_search_on_a_tied_model_records_the_scores_transformers_gives(tmp_path):
    write_search_setup(tmp_path, tied=True)
    space = write_space(tmp_path, "tied-vllm", backend="vllm", budget={"trials": 3})
    run_dir = tmp_path / "run"
    search_writing_no_weights(space, run_dir, tmp_path, "--engine-device", "cpu")
    mergeopt("export", run_dir)
    mergeopt("report", run_dir)
    assert (run_dir / "best.yaml").is_file() and (run_dir / "report.html").is_file()
    assert_recorded_scores_are_transformers(run_dir, trials=3)


@pytest.fixture(scope="module")
def smollm2_reduced():
    """The reduced SmolLM2 family's folders (base first). CI builds it in its smollm2 tier and sets
    MERGEOPT_REQUIRE_SMOLLM2=1, where a missing family fails the test instead of skipping it."""
    from optimizer.zoo.smollm2 import family_models

    cache = os.environ.get("MERGEOPT_CACHE")
    models = family_models(Path(cache) if cache else None, reduced=True)
    missing = [str(folder) for folder in models.values() if not (folder / "config.json").is_file()]
    if missing:
        message = f"the reduced smollm2 family is not built ({missing[0]}); run 'mergeopt zoo --family smollm2 --build --reduced'"
        if os.environ.get("MERGEOPT_REQUIRE_SMOLLM2") == "1":
            pytest.fail(message + "; MERGEOPT_REQUIRE_SMOLLM2=1 requires it")
        pytest.skip(message)
    return list(models.values())


def test_search_on_smollm2_records_the_scores_transformers_gives(smollm2_reduced, tmp_path):
    """The real tied model: its four tasks (the chat-template one included), a few items each, three trials."""
    import yaml

    base, *models = smollm2_reduced
    space = {"name": "smollm2-vllm-ci", "base_model": str(base), "models": [str(m) for m in models],
             "merge_method": "dare_ties", "granularity": "per_model", "backend": "vllm",
             "objectives": ["add", "mul", "letter", "capital"], "optimizer": {"name": "random"},
             "budget": {"trials": 3}, "tasks": "smollm2", "limit": 5, "seed": 0}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    run_dir = tmp_path / "run"
    search_writing_no_weights(path, run_dir, tmp_path, "--quiet")
    assert_recorded_scores_are_transformers(run_dir, trials=3)
    # `eval` of the run's best recipe on the vllm backend, its merge engine mapped on the host: the recorded scores
    best = yaml.safe_load((run_dir / "best.yaml").read_text())["mergeopt"]["scores"]
    done = mergeopt("eval", run_dir, "--tasks", "smollm2", "--limit", "5", "--backend", "vllm", "--engine-device", "cpu",
                    "--json")
    again = json.loads(done.stdout.strip().splitlines()[-1])
    assert {t: s["value"] for t, s in again.items()} == {t: s["value"] for t, s in best.items()}
