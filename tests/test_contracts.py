"""Contract tests run over every registered plug-in (as Optuna tests every sampler): each optimiser of the registry
asks, tells and resumes through one study; each backend implements the whole Backend protocol, and the hf backend
runs it on a tiny real model."""

import inspect

import optuna
import pytest
from helpers import tiny_family

from optimizer.catalogue import CATALOGUE
from optimizer.evaluate.scoring import BACKENDS, Backend
from optimizer.search.optimizers import OPTIMIZERS, make_optimizer, make_sampler

GENES = ["w.a", "w.b", "d.a"]


def test_the_registry_and_the_catalogue_name_the_same_optimizers():
    assert tuple(OPTIMIZERS) == tuple(CATALOGUE)
    for name, spec in OPTIMIZERS.items():
        assert spec.info is CATALOGUE[name] and spec.multi_objective == CATALOGUE[name].multi_objective


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_asks_tells_and_resumes_on_one_study(name):
    storage = optuna.storages.InMemoryStorage()
    directions = ["maximize", "maximize"] if CATALOGUE[name].multi_objective else ["maximize"]
    defaults = CATALOGUE[name].settings()
    settings = defaults.model_copy(update={"popsize": 4}) if name == "cma" else defaults

    def step(optimizer, study, count):
        numbers = []
        for _ in range(count):
            trial = optimizer.ask(study)
            assert trial is not None
            genome = {g: trial.params[g] for g in trial.params} or {g: trial.suggest_float(g, 0.0, 1.0) for g in GENES}
            assert set(genome) == set(GENES) and all(0.0 <= v <= 1.0 for v in genome.values())
            value = -sum((v - 0.3) ** 2 for v in genome.values())
            optimizer.tell(study, trial, [value] * len(directions))
            numbers.append(trial.number)
        return numbers

    study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                sampler=make_sampler(name, 0, settings))
    first = step(make_optimizer(name, GENES, 0, settings), study, 6)
    # a new process (resume): a fresh optimizer on the same study continues it, numbering on
    resumed = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(name, 1, settings))
    second = step(make_optimizer(name, GENES, 0, settings), resumed, 4)
    assert second[0] > first[-1] and len(resumed.trials) >= 10
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in resumed.trials if t.number in first + second)
    failed = make_optimizer(name, GENES, 0, settings)  # a failed candidate is told as such
    trial = failed.ask(resumed)
    if not trial.params:
        for g in GENES:
            trial.suggest_float(g, 0.0, 1.0)
    failed.tell(resumed, trial, None)
    assert resumed.trials[-1].state != optuna.trial.TrialState.RUNNING or name == "cma"


PROTOCOL = [n for n, member in inspect.getmembers(Backend) if inspect.isfunction(member) and not n.startswith("_")]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_implements_the_whole_protocol(name):
    import importlib

    assert {"swap", "load_parent", "load_state", "generate", "loglikelihood", "close"} <= set(PROTOCOL)
    module, _, cls = BACKENDS[name].partition(":")
    try:
        backend_class = getattr(importlib.import_module(module), cls)
    except ImportError as exc:  # vllm's module imports vllm lazily; a missing optional dependency is not a defect
        pytest.skip(f"{name}: {exc}")
    missing = [m for m in PROTOCOL if not callable(getattr(backend_class, m, None))]
    assert not missing, f"{name} lacks {missing}"
    for method in PROTOCOL:
        declared = inspect.signature(getattr(Backend, method)).parameters
        actual = inspect.signature(getattr(backend_class, method)).parameters
        assert list(actual)[:len(declared)] == list(declared), (name, method)


def test_the_hf_backend_runs_the_protocol_on_a_tiny_model(tmp_path):
    from optimizer.evaluate.scoring import make_backend
    from optimizer.evaluate.tasks import GenerationRequest, LoglikelihoodRequest
    from optimizer.merge.engine import MergeEngine
    from optimizer.recipe import ModelSpec, Recipe

    base, models = tiny_family(tmp_path, 2)
    engine = MergeEngine(base, models, device="cpu")
    backend = make_backend("hf", base, device="cpu")
    try:
        request = [LoglikelihoodRequest("1+1=", "2")]
        backend.load_parent(engine, 1)
        parent = backend.loglikelihood(request)[0][0]
        backend.load_parent(engine, 0)
        base_ll = backend.loglikelihood(request)[0][0]
        assert parent != base_ll  # the fine-tune is not the base
        backend.swap(engine, Recipe("task_arithmetic", [ModelSpec(str(models[0]), {"weight": 1.0})],
                                    base_model=str(base)))
        assert backend.loglikelihood(request)[0][0] == pytest.approx(parent, abs=1e-5)  # weight 1: the fine-tune
        assert len(backend.generate([GenerationRequest("1+1=", max_new_tokens=3)])) == 1
    finally:
        backend.close()
