"""The optimiser catalogue: which optimisers exist, what each optimises, and its settings as a declared schema.

Declarations only, below both the search space (which validates an ``optimizer:`` block against them) and the
search loop (whose registry, :data:`optimizer.search.optimizers.OPTIMIZERS`, pairs each entry with its
implementation). Adding an optimiser is one entry here and one there; a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from optimizer.schema import Fraction, PositiveInt, Strict, integer


class CmaSettings(Strict):
    popsize: PositiveInt | None = Field(None, description="candidates per generation (default: pycma's "
                                        "4 + 3 ln(genes)); at least the number of workers")
    sigma0: Fraction = Field(0.25, description="initial step size in the unit cube")


class TpeSettings(Strict):
    n_startup_trials: PositiveInt = Field(10, description="random trials before TPE models the study")


class Nsga2Settings(Strict):
    population_size: Annotated[int, integer(2)] = Field(16, description="individuals per generation")


class RandomSettings(Strict):
    pass


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    summary: str
    multi_objective: bool  # optimises several objectives jointly (else their weighted mean)
    settings: type[Strict]  # the optimizer: block's settings, typed, with their defaults


CATALOGUE: dict[str, OptimizerInfo] = {info.name: info for info in (
    OptimizerInfo("cma", "CMA-ES (pycma) on the weighted mean of the objectives", False, CmaSettings),
    OptimizerInfo("tpe", "Optuna's multivariate TPE (constant liar for candidates in flight)", True, TpeSettings),
    OptimizerInfo("nsga2", "Optuna's NSGA-II", True, Nsga2Settings),
    OptimizerInfo("random", "uniform random sampling", True, RandomSettings),
)}
OPTIMIZER_NAMES = tuple(CATALOGUE)
