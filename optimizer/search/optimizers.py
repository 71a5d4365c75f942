"""Optimisers behind one ask/tell interface; every candidate is a trial of one Optuna study.

``ask(study)`` returns an Optuna trial whose params are the genome (unit-cube coordinates by gene name);
``tell(study, trial, values)`` records its objective values (None: the candidate failed).

* ``tpe``, ``nsga2``, ``random``: Optuna's samplers, used as they are (they read the study, so they resume and
  share a study across workers for free).
* ``cma``: pycma's CMA-ES. Each generation's solutions are enqueued as Optuna trials (tagged with their
  generation and index); once all of a generation's trials are finished, their fitness is told to CMA. The CMA
  state is pickled into the study's user attributes after every ask and tell, so a resumed run (or another worker
  on the same study) continues the same CMA run. A failed candidate gets the worst fitness of its generation.
  Several workers share one generation: they pop its queued trials, and the one that finishes its last candidate
  tells CMA and enqueues the next (under the study lock of optimizer/search/workers.py).
"""

from __future__ import annotations

import base64
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import TrialState

from optimizer.study_store import Attr
from optimizer.run import FINISHED
from optimizer.catalogue import CATALOGUE, CmaSettings, Nsga2Settings, OptimizerInfo, RandomSettings, TpeSettings

def distributions(gene_names: list[str]) -> dict[str, BaseDistribution]:
    return {name: FloatDistribution(0.0, 1.0) for name in gene_names}


class Optimizer(Protocol):
    """What the search loop needs of an optimiser; every candidate is a trial of the study."""

    def ask(self, study: optuna.Study) -> optuna.Trial | None:
        """The next candidate (its params are the genome), or None when it must wait for other workers."""

    def tell(self, study: optuna.Study, trial: optuna.Trial, values: list[float] | None) -> None:
        """Record a candidate's objective values (None: it failed)."""

    def recover(self, study: optuna.Study, stale: list[optuna.trial.FrozenTrial]) -> None:
        """Trials a dead worker left unfinished are already failed; queue their candidates again if needed."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimiser of the registry: its declaration (optimizer/catalogue.py: name, settings schema) and its
    implementation. ``settings`` arguments are instances of ``info.settings``, validated with the space."""

    info: OptimizerInfo
    sampler: Callable[[int, Any], optuna.samplers.BaseSampler]  # (seed, settings)
    build: Callable[[list[str], int, Any], Optimizer]  # (gene names, seed, settings)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def multi_objective(self) -> bool:
        return self.info.multi_objective


def _enqueued_only(seed: int, settings: RandomSettings) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)  # cma enqueues every trial's params; the sampler never draws


def _tpe(seed: int, settings: TpeSettings) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.n_startup_trials, multivariate=True,
                                      constant_liar=True)


def _nsga2(seed: int, settings: Nsga2Settings) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=settings.population_size)


def _cma(genes: list[str], seed: int, settings: CmaSettings) -> Optimizer:
    return CMAOptimizer(genes, seed, popsize=settings.popsize, sigma0=settings.sigma0)


def _sampled(genes: list[str], seed: int, settings: Any) -> Optimizer:
    return OptunaOptimizer(genes)


_IMPLEMENTATIONS: dict[str, tuple[Callable, Callable]] = {
    "cma": (_enqueued_only, _cma),
    "tpe": (_tpe, _sampled),
    "nsga2": (_nsga2, _sampled),
    "random": (lambda seed, settings: optuna.samplers.RandomSampler(seed=seed), _sampled),
}
OPTIMIZERS: dict[str, OptimizerSpec] = {name: OptimizerSpec(CATALOGUE[name], *_IMPLEMENTATIONS[name])
                                        for name in CATALOGUE}


def settings_of(name: str, settings: Any = None) -> Any:
    """The optimiser's typed settings: as given, or its defaults (a mapping is validated here)."""
    model = CATALOGUE[name].settings
    if isinstance(settings, model):
        return settings
    return model.model_validate(settings or {})


def make_sampler(name: str, seed: int, settings: Any = None) -> optuna.samplers.BaseSampler:
    return OPTIMIZERS[name].sampler(seed, settings_of(name, settings))


class OptunaOptimizer:
    def __init__(self, gene_names: list[str]):
        self.dists = distributions(gene_names)

    def ask(self, study: optuna.Study) -> optuna.Trial:
        trial = study.ask(self.dists)
        return trial

    def tell(self, study: optuna.Study, trial: optuna.Trial, values: list[float] | None) -> None:
        if values is None:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        else:
            study.tell(trial, values, skip_if_finished=True)

    def recover(self, study: optuna.Study, stale: list[optuna.trial.FrozenTrial]) -> None:
        """Trials a dead worker left RUNNING: already marked failed; samplers need nothing more."""


class CMAOptimizer:
    """CMA-ES over the unit cube with pycma's smooth bound transform (no clipping plateaus)."""

    STATE = "cma:state"
    GENERATION = "cma:generation"
    TOLD = "cma:told"  # the last generation whose fitness CMA has been told
    PENDING = "cma:pending"  # the current generation's solutions (genotypes), to complete a half-enqueued one

    def __init__(self, gene_names: list[str], seed: int, popsize: int | None = None, sigma0: float = 0.25,
                 x0: list[float] | None = None):
        self.names = list(gene_names)
        self.dists = distributions(gene_names)
        self.seed = seed
        self.popsize = popsize
        self.sigma0 = sigma0
        self.x0 = x0 if x0 is not None else [0.5] * len(gene_names)

    # ---- CMA state in the study ---------------------------------------------------------------------
    def _new_es(self):
        import cma

        # CMA runs unbounded on genotypes; candidates are mapped into the unit cube by pycma's smooth bound
        # transform (identity inside, quadratic near the edges, reflected beyond), see _phenotype.
        options = {"seed": self.seed + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0, "tolfun": 0, "tolx": 0,
                   "tolstagnation": 10**9, "tolflatfitness": 10**9}
        if self.popsize:
            options["popsize"] = int(self.popsize)
        return cma.CMAEvolutionStrategy(list(self.x0), self.sigma0, options)

    def _load(self, study: optuna.Study):
        blob = study.user_attrs.get(self.STATE)
        if blob is None:
            return self._new_es(), -1
        es = pickle.loads(base64.b64decode(blob))  # our own state, written by this class into our own study
        return es, int(study.user_attrs.get(self.GENERATION, -1))

    def _save(self, study: optuna.Study, es, generation: int) -> None:
        study.set_user_attr(self.STATE, base64.b64encode(pickle.dumps(es)).decode())
        study.set_user_attr(self.GENERATION, generation)

    def _generation_trials(self, study: optuna.Study, generation: int) -> list[optuna.trial.FrozenTrial]:
        return [t for t in study.get_trials(deepcopy=False)
                if t.system_attrs.get("fixed_params") is not None and t.user_attrs.get(Attr.CMA_GENERATION) == generation]

    def _phenotype(self, x) -> list[float]:
        from cma.transformations import BoxConstraintsLinQuadTransformation

        transform = BoxConstraintsLinQuadTransformation([[0.0, 1.0]] * len(self.names))
        return [min(1.0, max(0.0, float(v))) for v in transform(list(x))]

    # ---- ask / tell ---------------------------------------------------------------------------------
    def ask(self, study: optuna.Study) -> optuna.Trial | None:
        """A queued candidate; else the next generation once the current one is told; else None (wait).

        With several workers this runs under the study lock (optimizer/search/workers.py), so only one worker
        tells a generation and creates the next; a worker that finds the generation handed out but not complete
        gets None and polls, rather than asking CMA for more candidates than one generation.
        """
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return study.ask(self.dists)
        es, generation = self._load(study)
        if generation >= 0 and study.user_attrs.get(self.TOLD) != generation:
            self._requeue_missing(study, generation)
            self._maybe_update(study)
            if study.user_attrs.get(self.TOLD) != generation:
                waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                return study.ask(self.dists) if waiting else None  # the rest is in flight elsewhere
            es, generation = self._load(study)
        solutions = [[float(v) for v in x] for x in es.ask()]
        generation += 1
        # state first, then the trials: a worker dying half-way leaves a generation whose missing candidates
        # the next asker enqueues (_requeue_missing) instead of a second, different generation
        study.set_user_attr(self.PENDING, solutions)
        self._save(study, es, generation)
        for index, x in enumerate(solutions):
            self._enqueue(study, generation, index, x)
        return study.ask(self.dists)

    def _enqueue(self, study: optuna.Study, generation: int, index: int, x: list[float]) -> None:
        unit = self._phenotype(x)
        study.enqueue_trial({n: float(v) for n, v in zip(self.names, unit)},
                            user_attrs={"cma_generation": generation, "cma_index": index, "cma_x": list(x)},
                            skip_if_exists=False)

    def _requeue_missing(self, study: optuna.Study, generation: int) -> None:
        pending = study.user_attrs.get(self.PENDING) or []
        # a lost copy (FAIL, "lost") whose re-queue a kill prevented does not count as present
        present = {t.user_attrs[Attr.CMA_INDEX] for t in self._generation_trials(study, generation)
                   if not t.user_attrs.get(Attr.LOST)}
        for index, x in enumerate(pending):
            if index not in present:
                self._enqueue(study, generation, index, x)

    def tell(self, study: optuna.Study, trial: optuna.Trial, values: list[float] | None) -> None:
        # skip_if_finished: another worker may have failed this trial as stale (and re-queued it) meanwhile
        if values is None:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        else:
            study.tell(trial, values, skip_if_finished=True)
        self._maybe_update(study)

    def _maybe_update(self, study: optuna.Study) -> None:
        """Tell CMA a generation's fitness once every one of its candidates is finished."""
        es, generation = self._load(study)
        if generation < 0 or study.user_attrs.get(self.TOLD) == generation:
            return
        if es.countiter > generation:  # told (the state says so), but the process died before cma:told was written
            study.set_user_attr(self.TOLD, generation)
            return
        by_index: dict[int, list[optuna.trial.FrozenTrial]] = {}
        for t in self._generation_trials(study, generation):
            by_index.setdefault(t.user_attrs[Attr.CMA_INDEX], []).append(t)
        if len(by_index) < es.popsize:
            return
        maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        fitness: list[float | None] = []
        for index in range(es.popsize):
            copies = by_index.get(index, [])
            complete = [t for t in copies if t.state == TrialState.COMPLETE and t.value is not None
                        and math.isfinite(t.value)]
            if complete:
                value = float(complete[0].value)  # type: ignore[arg-type]  # complete: a finite value
                fitness.append(-value if maximize else value)
            elif (scored := [t for t in copies if not t.user_attrs.get(Attr.LOST)]) and all(
                    t.state in FINISHED for t in scored):
                fitness.append(None)  # failed: gets the generation's worst fitness below
            else:
                return  # still running or re-queued
        done = [f for f in fitness if f is not None]
        worst = max(done) + 1.0 if done else 1.0
        solutions = [by_index[i][0].user_attrs[Attr.CMA_X] for i in range(es.popsize)]
        es.tell(solutions, [worst if f is None else f for f in fitness])
        self._save(study, es, generation)
        study.set_user_attr(self.TOLD, generation)

    def recover(self, study: optuna.Study, stale: list[optuna.trial.FrozenTrial]) -> None:
        """Re-queue the candidates a dead worker left unfinished, so the generation can complete."""
        for t in stale:
            if "cma_generation" in t.user_attrs:
                # from the genotype, not t.params: a worker killed inside study.ask leaves only some params set
                a = t.user_attrs
                self._enqueue(study, a["cma_generation"], a["cma_index"], a["cma_x"])
        self._maybe_update(study)


def make_optimizer(name: str, gene_names: list[str], seed: int, settings: Any = None) -> Optimizer:
    return OPTIMIZERS[name].build(gene_names, seed, settings_of(name, settings))
