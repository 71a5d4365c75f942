"""Baselines: the merges a person tries first, scored on the candidates' own items before the search starts.

A search is worth its cost only when its best recipe beats what one would get by hand. Before the first trial a
run scores, on the same search items as every candidate:

* ``parents``: the base and each fine-tuned model as they are (the search already scores them);
* ``task_arithmetic``: task arithmetic of all the models at one shared weight, swept over :data:`SWEEP` (0.2 to 1.0:
  with five models a shared 0.2-0.3 is where task arithmetic is best);
* ``own``: the space's own merge method at its usual defaults (every model at weight 1, a sparsifying method at
  density 0.5, the other parameters at the registry's defaults, the space's ``fixed`` values applied);
* and any recipe listed explicitly.

The space's ``baselines:`` key chooses them: ``default`` (the three groups above), ``none``, or a list whose entries
are ``parents``, ``task_arithmetic``, ``own``, ``{method: M, weight: W, density: D, parameters: {...}}`` (every
model at weight W) or ``{recipe: FILE}`` (a recipe YAML over the space's models; relative to the working folder).

They are recorded in the study's user attribute ``baselines`` (label -> recipe, per-task scores, per-item values,
scalarized score, seconds), not as trials: samplers, the budget and the front never see them. When the best of
them is a recipe the space's genome can express exactly (the space's own method, every value inside its bounds),
CMA-ES starts there (its first mean) and TPE takes that genome as its first trial; random search and NSGA-II are
left as they are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from optimizer.space import BASELINE_GROUPS
from optimizer.study_store import Attr

log = logging.getLogger("mergeopt")

SWEEP = (0.2, 0.4, 0.6, 0.8, 1.0)  # the shared weights of the task-arithmetic baselines (0.2: for many models)
DEFAULT = BASELINE_GROUPS  # baselines: default (the key's schema: optimizer/space.py, check_baselines)
OWN_DENSITY = 0.5  # a sparsifying method's usual density
BASELINES_ATTR = Attr.BASELINES
WARM_STARTS = ("cma", "tpe")  # optimisers that start somewhere (random search and NSGA-II sample as they are)


@dataclass
class Baseline:
    """A baseline to score: a parent (its index: 0 the base, 1.. the models) or a recipe."""

    label: str
    recipe: Any = None  # Recipe
    parent: int | None = None


def _shared_weight_recipe(space, method: str, weight: float, density: float | None = None,
                          parameters: dict | None = None):
    from optimizer.methods import METHODS
    from optimizer.recipe import ModelSpec, Recipe

    spec = METHODS[method]
    per_model: dict[str, Any] = {}
    if spec.has("weight"):
        per_model["weight"] = weight
    if density is not None and spec.has("density"):
        per_model["density"] = density
    shared = dict(parameters or {})
    if spec.has("t") and "t" not in shared:
        shared["t"] = 0.5
    return Recipe(method, [ModelSpec(path, dict(per_model)) for path in space.models], base_model=space.base_model,
                  parameters=shared, dtype=space.dtype, seed=space.seed)


def own_default(space):
    """The space's own method at its usual defaults (None when one of its parameters has no usual value)."""
    from optimizer.methods import METHODS

    spec = METHODS[space.merge_method]
    if spec.selects_models:
        from optimizer.recipe import ModelSpec, Recipe

        return Recipe(space.merge_method, [ModelSpec(p) for p in space.models], base_model=space.base_model,
                      parameters=dict(space.fixed), dtype=space.dtype, seed=space.seed)
    density = OWN_DENSITY if spec.sparsification is not None and spec.has("density") else None
    shared = dict(space.fixed)
    for p in spec.parameters:
        if p.required and p.name not in ("weight", "t") and p.name not in shared:
            return None
    return _shared_weight_recipe(space, space.merge_method, 1.0, density, shared)


def _describe(method: str, weight: float | None, density: float | None) -> str:
    text = method + ("" if weight is None else f" w={weight:g}")
    return text + ("" if density is None else f" density={density:g}")


def baselines_of(space, parent_labels: list[str]) -> list[Baseline]:
    """The space's baselines, in order, labels unique."""
    from optimizer.recipe import Recipe

    chosen = space.baselines
    if chosen == "none":
        return []
    entries: list[Any] = list(DEFAULT) if chosen == "default" else list(chosen)
    out: list[Baseline] = []
    for entry in entries:
        if entry == "parents":
            out += [Baseline(f"parent {label}", parent=i) for i, label in enumerate(parent_labels)]
        elif entry == "task_arithmetic":
            out += [Baseline(_describe("task_arithmetic", w, None), _shared_weight_recipe(space, "task_arithmetic", w))
                    for w in SWEEP]
        elif entry == "own":
            recipe = own_default(space)
            if recipe is not None:
                density = recipe.models[0].parameters.get("density") if recipe.models else None
                weight = recipe.models[0].parameters.get("weight") if recipe.models else None
                out.append(Baseline(_describe(space.merge_method, weight, density) + " (defaults)", recipe))
        elif isinstance(entry, dict) and "recipe" in entry:
            recipe = Recipe.load(entry["recipe"])
            out.append(Baseline(entry.get("label") or f"recipe {entry['recipe']}", recipe))
        elif isinstance(entry, dict):
            recipe = _shared_weight_recipe(space, entry["method"], float(entry.get("weight", 1.0)),
                                           entry.get("density"), entry.get("parameters"))
            out.append(Baseline(entry.get("label") or _describe(entry["method"], entry.get("weight", 1.0),
                                                                entry.get("density")), recipe))
    seen: dict[str, Baseline] = {}
    recipes: set[str] = set()
    for b in out:  # one of each label, and one of each recipe (a task_arithmetic space's own default is w=1)
        text = b.recipe.to_yaml() if b.recipe is not None else ""
        if b.label in seen or (text and text in recipes):
            continue
        seen[b.label] = b
        recipes.add(text)
    return list(seen.values())


def check_recipes(space, baselines: list[Baseline]) -> None:
    """Before anything is scored: every baseline recipe must merge the space's base and models (one clear line)."""
    from optimizer.errors import MergeoptError

    known = {str(p) for p in (space.base_model, *space.models)}
    for b in baselines:
        if b.recipe is None:
            continue
        used = [str(m.model) for m in b.recipe.models] + ([str(b.recipe.base_model)] if b.recipe.base_model else [])
        stranger = next((m for m in used if m not in known), None)
        if stranger is not None:
            raise MergeoptError(f"baseline {b.label!r} merges {stranger}, which is not a model of the space; a "
                                "baseline recipe may use only the space's base_model and models")


def score_baselines(space, study, backend, task_set, engine, parents: dict, progress: bool = False) -> dict:
    """Score the baselines not yet in the study (a resume scores only new ones); returns label -> record."""
    from optimizer.evaluate.scoring import evaluate_candidate
    from optimizer.evaluate.stats import pack

    labels = list(parents) if parents else ["base", *[f"model{i}" for i in range(len(space.models))]]
    done = dict(study.user_attrs.get(BASELINES_ATTR) or {})
    todo = [b for b in baselines_of(space, labels) if b.label not in done]
    for b in todo:
        if b.parent is not None:
            info = parents.get(labels[b.parent]) or {}
            if not info.get("items"):
                continue  # a run recorded before per-item results: this parent cannot be compared item by item
            record = {"kind": "parent", "parent": b.parent, "scores": info["scores"], "items": info["items"],
                      "seconds": info.get("seconds", 0.0)}
        else:
            start = time.perf_counter()
            result = evaluate_candidate(backend, task_set, engine, b.recipe)
            seconds = round(time.perf_counter() - start, 3)
            record = {"kind": "recipe", "recipe": b.recipe.to_yaml(), "scores": result.to_dict(),
                      "items": {t: pack(v) for t, v in result.items().items()}, "seconds": seconds}
            if result.failed:
                record["error"] = result.error
        values = {t: s.get("value") for t, s in record["scores"].items()}
        if not record.get("error") and all(values.get(o.task) is not None for o in space.objectives):
            record["scalarized"] = space.scalarize(values)
        done[b.label] = record
        if progress:
            shown = "failed" if "scalarized" not in record else f"{record['scalarized']:.3f}"
            log.info("  baseline %-40s %s  (%.1f s)", b.label, shown, record["seconds"])
    if todo:
        study.set_user_attr(BASELINES_ATTR, done)
    return done


def best_baseline(space, baselines: dict) -> tuple[str, dict] | None:
    """The baseline with the best scalarized search score (ties: the first listed)."""
    scored = [(label, r) for label, r in baselines.items() if r.get("scalarized") is not None]
    if not scored:
        return None
    return max(scored, key=lambda item: item[1]["scalarized"])


def genome_of(space, recipe) -> dict[str, float] | None:
    """The unit-cube genome of ``recipe`` when the space expresses it exactly, else None.

    Only a recipe of the space's own method with one value per parameter and model (no depth or module
    variation) that lies inside the bounds: each gene takes its parameter's value (a drop rate is 1 - density).
    """
    from optimizer.methods import METHODS

    if recipe is None or recipe.merge_method != space.merge_method or METHODS[space.merge_method].selects_models:
        return None
    if [str(m.model) for m in recipe.models] != [str(p) for p in space.models]:
        return None
    genome = {}
    for gene in space.genes():
        if gene.param == "drop_rate":
            values = [m.parameters.get("density", 1.0) for m in recipe.models]
            values = [1.0 - v if isinstance(v, (int, float)) else v for v in values]
        elif gene.model >= 0 or space.granularity == "global":
            values = [m.parameters.get(gene.param) for m in recipe.models]
        else:
            values = [recipe.parameters.get(gene.param)]
        if gene.model >= 0:
            values = [values[gene.model]]
        if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values) \
                or len(set(values)) != 1:
            return None
        lo, hi = gene.low, gene.high
        value = float(values[0])
        if not lo - 1e-9 <= value <= hi + 1e-9:
            return None
        genome[gene.name] = min(1.0, max(0.0, gene.unit(value)))
    return genome


def before_search(space, study, backend, task_set, engine, parents: dict, lock, optimizer,
                  progress: bool = False) -> dict:
    """The loop's hook before the first trial: baselines scored once (one worker of several), then a warm start."""
    if space.baselines == "none":
        return {}
    check_recipes(space, baselines_of(space, list(parents)))
    with lock.claim("baselines") as mine:
        if not mine:
            return dict(study.user_attrs.get(BASELINES_ATTR) or {})
        if progress:
            log.info("baselines (on the candidates' items; not trials of the optimiser):")
        done = score_baselines(space, study, backend, task_set, engine, parents, progress)
    warm_start(space, study, optimizer, done, progress)
    return done


def warm_start(space, study, optimizer, baselines: dict, progress: bool = False) -> str | None:
    """A fresh study starts from the best baseline when the genome expresses it exactly; returns its label."""
    import yaml

    from optimizer.recipe import Recipe

    best = best_baseline(space, baselines)
    if space.optimizer not in WARM_STARTS or best is None or best[1].get("kind") != "recipe" \
            or study.get_trials(deepcopy=False):
        return None
    genome = genome_of(space, Recipe.from_dict(yaml.safe_load(best[1]["recipe"])))
    if genome is None:
        return None
    inner = getattr(optimizer, "optimizer", optimizer)
    if hasattr(inner, "x0"):  # CMA-ES: its first mean (the state is created at the first ask)
        if study.user_attrs.get(getattr(inner, "STATE", "")) is not None:
            return None
        inner.x0 = [genome[name] for name in inner.names]
    else:
        study.enqueue_trial(genome, user_attrs={Attr.WARM_START: best[0]})
    study.set_user_attr(Attr.WARM_START, best[0])
    if progress:
        log.info("  the search starts from the best baseline, %s", best[0])
    return best[0]
