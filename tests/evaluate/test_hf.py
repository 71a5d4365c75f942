"""The transformers backend on real tiny models: log-likelihoods, generation, in-place swaps, failures."""

from pathlib import Path

import torch

from optimizer.evaluate.hf import HFBackend
from optimizer.evaluate.scoring import evaluate_candidate
from optimizer.evaluate.tasks import GenerationRequest, LoglikelihoodRequest, TaskSpec, GenerateTask, TaskSet
from optimizer.merge.engine import MergeEngine
from optimizer.recipe import ModelSpec, Recipe
from helpers import tiny_family


def test_loglikelihood_matches_a_direct_computation(tmp_path):
    base, _ = tiny_family(tmp_path, 0)
    backend = HFBackend(base, device="cpu", batch_size=2)
    requests = [LoglikelihoodRequest("12+3", "4="), LoglikelihoodRequest("abc", "cba"), LoglikelihoodRequest("x", "y")]
    got = backend.loglikelihood(requests)
    tok, model = backend.tokenizer, backend.model
    for (ll, greedy), r in zip(got, requests):
        ctx = tok(r.context)["input_ids"]
        cont = tok(r.continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
        expected = sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert abs(ll - expected) < 1e-4
        argmax = [int(logprobs[len(ctx) - 1 + i].argmax()) for i in range(len(cont))]
        assert greedy == (argmax == cont)


def test_swap_changes_scores_and_writes_no_file(tmp_path):
    base, models = tiny_family(tmp_path, 2)
    engine = MergeEngine(base, models, device="cpu")
    backend = HFBackend(base, device="cpu")
    items = [{"prompt": f"{i}+{i}=", "target": str(2 * i)} for i in range(10)]
    task_set = TaskSet([GenerateTask(TaskSpec(name="t", max_new_tokens=4), items)])
    request = [LoglikelihoodRequest("1+1=", "2")]
    before = backend.loglikelihood(request)[0][0]

    # wchar counts every byte this process writes (files anywhere, /tmp, /dev/shm, pipes); the snapshot also shows
    # nothing appeared in the test's and the working folder. Shared folders like /tmp and /dev/shm are not
    # snapshotted: other processes (PostgreSQL's shared memory, parallel jobs) write there.
    watched = [Path.cwd() / "runs", tmp_path]

    def snapshot():
        return {p: p.stat().st_mtime_ns for d in watched if d.is_dir() for p in d.rglob("*") if p.is_file()}

    def written():
        with open("/proc/self/io") as f:
            return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])

    def candidate(seed):
        return Recipe("dare_linear", [ModelSpec(str(m), {"weight": 0.5, "density": 0.5}) for m in models],
                      base_model=str(base), seed=seed)

    evaluate_candidate(backend, task_set, engine, candidate(99))  # warm-up: numba may write its compile cache once
    files, chars = snapshot(), written()
    lls = []
    for seed in range(5):
        recipe = candidate(seed)
        result = evaluate_candidate(backend, task_set, engine, recipe)
        assert not result.failed and result.scores["t"].n == 10
        lls.append(backend.loglikelihood(request)[0][0])
    assert written() - chars < 4096, "the hf backend wrote to a file or pipe while scoring candidates"
    assert snapshot() == files
    assert len({round(x, 5) for x in lls}) == 5 and before not in lls  # every candidate really was swapped in


def test_a_failing_candidate_is_recorded_and_the_backend_stays_usable(tmp_path):
    base, models = tiny_family(tmp_path, 1)
    engine = MergeEngine(base, models, device="cpu")
    backend = HFBackend(base, device="cpu")
    mc = TaskSet([GenerateTask(TaskSpec(name="t", max_new_tokens=3), [{"prompt": "1+1=", "target": "2"}])])
    from optimizer.evaluate.tasks import MultipleChoiceTask

    ll_task = TaskSet([MultipleChoiceTask(TaskSpec(name="mc", kind="multiple_choice"),
                                          [{"prompt": "1+1=", "choices": ["2", "3"], "answer": 0}])])
    nan = Recipe("task_arithmetic", [ModelSpec(str(models[0]), {"weight": float("nan")})], base_model=str(base))
    result = evaluate_candidate(backend, ll_task, engine, nan)
    assert result.failed and "NaN" in result.error and result.scores["mc"].value is None
    good = Recipe("task_arithmetic", [ModelSpec(str(models[0]), {"weight": 0.5})], base_model=str(base))
    result = evaluate_candidate(backend, ll_task, engine, good)
    assert not result.failed and result.scores["mc"].value in (0.0, 1.0)
    assert not evaluate_candidate(backend, mc, engine, good).failed


def test_generation_requests_respect_lengths_and_stops(tmp_path):
    base, _ = tiny_family(tmp_path, 0)
    backend = HFBackend(base, device="cpu")
    out = backend.generate([GenerationRequest("ab", 3), GenerationRequest("ab", 6), GenerationRequest("ab", 6, ("a",))])
    assert len(out[0]) <= 3 and len(out[1]) <= 6
    assert out[1].startswith(out[0])
    assert "a" not in out[2] and out[1].startswith(out[2])
