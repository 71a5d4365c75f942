"""The trade-off study of a run: one trials table, the Pareto front, a terminal summary and an HTML report.

``load_run(path)`` gives a :class:`Run` whose ``trials`` DataFrame is exactly what ``trials.csv`` holds (both are
built by :func:`trials_table`), and whose ``front`` is the set ``mergeopt export`` writes to ``pareto/``
(both use :func:`front_trials`). ``write_html`` makes a single self-contained file (plots as base64 PNG, no
scripts, no network) so it opens offline and can be mailed or archived with the run.

Which trials count: the front, best-per-task values and hypervolume use completed trials scored at full
fidelity (a low-fidelity score is on fewer items and is not comparable); every trial, failed or low-fidelity,
is in the table and counts as one evaluation on the progress plot.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

from optuna.trial import TrialState

from optimizer.study_store import Attr
from optimizer.errors import MergeoptError
from optimizer.files import write_atomic
from optimizer.recipe import Recipe, relative_depth, resolve_parameter
from optimizer.run import Run, comparable, front_trials, load_run, open_run, param_name, signed, trials_table
from optimizer.run import spends_budget
from optimizer.pareto import hypervolume
from optimizer.space import model_labels

__all__ = ["Run", "comparable", "front_trials", "load_run", "open_run", "trials_table", "summarize", "write_html"]

MIN_IMPORTANCE_TRIALS = 8  # fewer full-fidelity trials make any importance estimate noise
TOP_GENES = 15  # genes shown on the importance plot


# ---- numbers for the summary and the plots ---------------------------------------------------------
def best_per_task(run: Run) -> list[dict]:
    """Per objective task: the best comparable trial, its value, and the best parent's."""
    out = []
    trials = run.comparable_trials()
    for o in run.space.objectives:
        pick = max if o.direction == "maximize" else min
        best = pick(trials, key=lambda t: t.user_attrs[Attr.SCORES][o.task]["value"], default=None)
        parents = [(label, ((info.get("scores") or {}).get(o.task) or {}).get("value"))
                   for label, info in run.parents.items()]
        parents = [(label, v) for label, v in parents if v is not None]
        parent = pick(parents, key=lambda p: float(p[1] or 0.0), default=(None, None))
        out.append({"task": o.task, "direction": o.direction,
                    "trial": best.number if best else None,
                    "value": best.user_attrs[Attr.SCORES][o.task]["value"] if best else None,
                    "parent": parent[0], "parent_value": parent[1]})
    return out


def budget(run: Run) -> dict:
    trials = run.records
    seconds = sum(sum((t.user_attrs.get(Attr.SECONDS) or {}).values()) for t in trials)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return {
        "planned": run.planned_trials,
        "finished": sum(1 for t in trials if spends_budget(t)),
        "complete": sum(1 for t in trials if t.state == TrialState.COMPLETE),
        "failed": sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get(Attr.LOST)),
        "lost": sum(1 for t in trials if t.user_attrs.get(Attr.LOST)),
        "running": sum(1 for t in trials if t.state == TrialState.RUNNING),
        "low_only": sum(1 for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(Attr.FIDELITY) == "low"),
        "scoring_s": seconds,
        "wall_s": (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0,
    }


def progress_curves(run: Run) -> dict:
    """Per evaluation (finished trials in order): best-so-far per objective and scalarized, and hypervolume."""
    space = run.space
    reference = run.reference_point()
    finished = sorted((t for t in run.records
                       if t.state in (TrialState.COMPLETE, TrialState.FAIL)), key=lambda t: t.number)
    curves: dict[str, list] = {"evaluation": [], "scalarized": [], "hypervolume": []}
    curves.update({o.task: [] for o in space.objectives})
    points: list[list[float]] = []
    volume = None
    best: dict[str, float | None] = {k: None for k in ["scalarized"] + [o.task for o in space.objectives]}
    for i, t in enumerate(finished, 1):
        if comparable(t) and (vector := signed(space, t.user_attrs[Attr.SCORES])) is not None:
            points.append(vector)
            volume = hypervolume(points, reference)  # only changes when a point is added
            for o in space.objectives:
                v = t.user_attrs[Attr.SCORES][o.task]["value"]
                better = max if o.direction == "maximize" else min
                best[o.task] = v if best[o.task] is None else better(best[o.task], v)
            s = t.user_attrs[Attr.SCALARIZED]
            best["scalarized"] = s if best["scalarized"] is None else max(best["scalarized"], s)
        curves["evaluation"].append(i)
        for key, value in best.items():
            curves[key].append(value)
        curves["hypervolume"].append(volume)
    return curves


def layer_values(recipe: Recipe, space) -> dict[str, dict[str, list[float]]]:
    """Per searched parameter ("weight", "drop_rate", slerp's "t", "gamma"...), per model column label: the value at
    every layer.

    Resolved with mergekit's semantics (``resolve_parameter``): per-model settings first, then the recipe's
    global parameters; a module split gives one column per model and module.
    """
    n = max(1, space.num_layers)
    modules = space.modules or [None]
    names = [searched.name for searched in space.searched()]
    out: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    labels = dict(zip(space.models, model_labels(space.models)))
    for spec in recipe.models:
        if recipe.uses_base and spec.model == recipe.base_model:
            continue
        label = labels.get(spec.model, Path(spec.model).name or spec.model)
        scopes = [spec.parameters, recipe.parameters]
        for module in modules:
            column = label if module is None else f"{label} {module}"
            for name in names:
                series = []
                for layer in range(n):
                    tensor = f"model.layers.{layer}.{module or 'mlp'}.weight"
                    t = relative_depth(layer, n)
                    if name == "drop_rate":
                        density = resolve_parameter("density", scopes, tensor, t, default=None)
                        if density is not None:
                            series.append(round(1.0 - float(density), 6))  # recipes hold 6 significant digits
                    else:
                        value = resolve_parameter(name, scopes, tensor, t, default=None)
                        if value is not None:
                            series.append(float(value))
                if series:
                    out[name][column] = series
    return {name: columns for name, columns in out.items() if columns}


def param_importances(run: Run) -> tuple[dict[str, dict[str, float]], str]:
    """Gene importances per target (the scalarized mean and each objective), and a note on how or why not.

    Uses Optuna's fANOVA evaluator (seeded) when scikit-learn is present, else PED-ANOVA; only comparable
    trials take part (a copy of them in an in-memory study), and fewer than MIN_IMPORTANCE_TRIALS give no plot.
    """
    import optuna

    trials = [t for t in run.comparable_trials() if t.params]
    if len(trials) < MIN_IMPORTANCE_TRIALS:
        return {}, (f"parameter importance needs at least {MIN_IMPORTANCE_TRIALS} completed full-fidelity trials; "
                    f"this run has {len(trials)}")
    if len(trials[0].params) < 2:
        return {}, "parameter importance needs at least two genes; this space has one"
    try:
        import sklearn  # noqa: F401

        evaluator: optuna.importance.BaseImportanceEvaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        method = "fANOVA (Optuna's FanovaImportanceEvaluator, seed 0)"
    except ImportError:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        method = "PED-ANOVA (Optuna's PedAnovaImportanceEvaluator)"
    copy = optuna.create_study(directions=["maximize"])
    copy.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                               value=t.user_attrs[Attr.SCALARIZED], user_attrs=t.user_attrs)
                     for t in trials])
    genes = {g.name: g for g in run.space.genes()}
    targets = {"scalarized": lambda t: t.value}
    for o in run.space.objectives:
        targets[o.task] = (lambda task: lambda t: t.user_attrs[Attr.SCORES][task]["value"])(o.task)
    result: dict[str, dict[str, float]] = {}
    notes = []
    for name, target in targets.items():
        values = {target(t) for t in copy.trials}
        if len(values) < 2:
            notes.append(f"{name}: every trial scored the same")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(copy, evaluator=evaluator, target=target,
                                                              normalize=True)
        except Exception as exc:  # an evaluator's own limit (e.g. too few trials per quantile) is a note, not a crash
            notes.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        result[name] = {(param_name(k, genes[k].param) if k in genes else k): float(v) for k, v in imp.items()}
    note = f"{method} on {len(trials)} completed full-fidelity trials"
    if notes:
        note += "; skipped " + "; ".join(notes)
    return result, note


# ---- terminal summary -------------------------------------------------------------------------------
def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def verdict(run: Run) -> dict:
    """The search set against its baselines: the baselines (search scores, cost), the finalists' search and
    validation scores side by side (the winner's curse shows as the drop), and the one-line comparison."""
    from optimizer.search.baselines import BASELINES_ATTR
    from optimizer.search.validation import comparison_line, finalist_table

    baselines = [{"label": label, "value": r.get("scalarized"), "seconds": r.get("seconds"), "error": r.get("error")}
                 for label, r in (run.study.user_attrs.get(BASELINES_ATTR) or {}).items()]
    return {"baselines": baselines, "finalists": finalist_table(run.space, run.study, run.records),
            "line": comparison_line(run.space, run.study, run.records)}


def _verdict_lines(run: Run) -> list[str]:
    v, lines = verdict(run), []
    if v["baselines"]:
        lines.append("baselines (scalarized on the search items; cost):")
        for b in v["baselines"]:
            shown = "failed" if b["value"] is None else _fmt(b["value"])
            lines.append(f"  {b['label']:<40} {shown:>8}  {_fmt(b['seconds'], 1):>6} s")
    if v["finalists"]:
        lines.append("finalists (scalarized: search items vs validation items):")
        lines.append(f"  {'trial':>5}  {'search':>15}  {'validation':>15}")
        for f in v["finalists"]:
            search = _fmt(f.search) + (f" +- {f.search_se:.3f}" if f.search_se is not None else "")
            valid = "failed" if f.validation is None else f"{f.validation:.3f} +- {f.validation_se:.3f}"
            lines.append(f"  {f.trial:>5}  {search:>15}  {valid:>15}")
    if v["line"]:
        lines.append(v["line"])
    return lines


def summarize(run: Run) -> str:
    space, lines = run.space, []
    b = budget(run)
    lines.append(f"run {space.name} ({run.path}): {space.optimizer}, {space.merge_method}, {len(space.models)} models, "
                 f"objectives {', '.join(run.tasks)}")
    extra = [f"{b['failed']} failed"] + ([f"{b['lost']} lost"] if b["lost"] else []) + (
        [f"{b['low_only']} low-fidelity only"] if space.fidelity_low else []) + (
        [f"{b['running']} running"] if b["running"] else [])
    lines.append(f"budget: {b['finished']}/{b['planned']} trials ({', '.join(extra)}); "
                 f"scoring {_duration(b['scoring_s'])}, wall {_duration(b['wall_s'])}")
    if not len(run.front):
        lines.append("no completed full-fidelity trial yet: no front, no hypervolume")
        return "\n".join(lines)
    reference = ", ".join(_fmt(abs(v)) for v in run.reference_point())
    lines.append(f"hypervolume: {run.hypervolume():.4g} (reference: worst score seen per task, parents included: "
                 f"{reference})")
    lines.append("best per task:")
    lines.append(f"  {'task':<12} {'best':>8} {'trial':>6}   best parent")
    for row in best_per_task(run):
        parent = f"{_fmt(row['parent_value'])} ({row['parent']})" if row["parent"] else "-"
        trial = row["trial"] if row["trial"] is not None else "-"
        lines.append(f"  {row['task']:<12} {_fmt(row['value']):>8} {trial:>6}"
                     f"   {parent}")
    lines.append(f"Pareto front ({_count(len(run.front), 'recipe')}, best mean first):")
    rows = [(int(row["trial"]), [row[t] for t in run.tasks], row["scalarized"], row["file"])
            for _, row in run.front.iterrows()]
    lines += front_lines(run.tasks, rows)
    lines += _verdict_lines(run)  # ends with the comparison line
    return "\n".join(lines)


def front_lines(tasks: list[str], rows: list[tuple[int, list, float, str]], best: int | None = None,
                limit: int | None = None) -> list[str]:
    """The front as a table, one row per recipe (trial, a score per task, the mean, its file): the one printer of
    the front (``mergeopt search``/``export`` and ``report`` show the same table). ``best`` is starred."""
    width = max(8, *(len(t) for t in tasks))
    lines = [f"  {'trial':>5}  " + "  ".join(f"{t:>{width}}" for t in tasks) + f"  {'mean':>8}  file"]
    for trial, values, mean, path in rows[:limit]:
        star = "*" if best is not None and trial == best else " "
        lines.append(f" {star}{trial:>5}  " + "  ".join(f"{_fmt(v):>{width}}" for v in values)
                     + f"  {_fmt(mean):>8}  {path}")
    return lines


# ---- plots (matplotlib, rendered to PNG bytes) ------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


PARENT_MARKERS = "osD^vP"


def plot_front(run: Run) -> bytes | None:
    """The Pareto front: 2 tasks as one scatter, more as pairwise panels; parents marked, the base a star."""
    plt = _pyplot()
    tasks = run.tasks
    trials = run.comparable_trials()
    if not trials:
        return None
    values = {task: [t.user_attrs[Attr.SCORES][task]["value"] for t in trials] for task in tasks}
    on_front = set(run.front["trial"].astype(int)) if len(run.front) else set()
    is_front = [t.number in on_front for t in trials]
    if len(tasks) == 1:
        fig, ax = plt.subplots(figsize=(7, 4))
        task = tasks[0]
        ax.scatter([t.number for t in trials], values[task], s=18, color="0.65", label="trials")
        ax.scatter([t.number for t, f in zip(trials, is_front) if f],
                   [v for v, f in zip(values[task], is_front) if f], s=50, color="tab:red", label="best")
        _parent_lines(ax, run, task)
        ax.set_xlabel("trial")
        ax.set_ylabel(task)
        ax.legend(fontsize=8, loc="best")
        return _png(fig)
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    size = 5.2 if len(pairs) == 1 else 4.0
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows * 0.9), squeeze=False)
    for k, (i, j) in enumerate(pairs):
        ax = axes[k // cols][k % cols]
        x, y = tasks[i], tasks[j]
        ax.scatter(values[x], values[y], s=16, color="0.7", label="trials", zorder=2)
        fx = [v for v, f in zip(values[x], is_front) if f]
        fy = [v for v, f in zip(values[y], is_front) if f]
        ax.scatter(fx, fy, s=42, color="tab:red", edgecolor="darkred", label="Pareto front", zorder=4)
        if len(tasks) == 2 and fx:
            # the 2-D front as a staircase between its points (signed so both axes grow to the better side)
            pts = sorted(zip(fx, fy), key=lambda p: -_sign(run, x) * p[0])
            stair_x: list[float] = []
            stair_y: list[float] = []
            for a, b in pts:
                if stair_x:
                    stair_x.append(a)
                    stair_y.append(stair_y[-1])
                stair_x.append(a)
                stair_y.append(b)
            ax.plot(stair_x, stair_y, color="tab:red", lw=1, alpha=0.6, zorder=3)
        for m, (label, info) in enumerate(run.parents.items()):
            scores = info.get("scores") or {}
            px, py = (scores.get(x) or {}).get("value"), (scores.get(y) or {}).get("value")
            if px is None or py is None:
                continue
            if label == "base":
                ax.scatter([px], [py], marker="*", s=220, color="black", label="base", zorder=5)
            else:
                ax.scatter([px], [py], marker=PARENT_MARKERS[m % len(PARENT_MARKERS)], s=70, facecolor="none",
                           edgecolor="tab:blue", linewidth=1.6, label=f"parent {label}", zorder=5)
            ax.annotate(label, (px, py), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel(x + ("" if _sign(run, x) > 0 else " (lower is better)"))
        ax.set_ylabel(y + ("" if _sign(run, y) > 0 else " (lower is better)"))
        ax.grid(alpha=0.3)
    for k in range(len(pairs), rows * cols):
        axes[k // cols][k % cols].axis("off")
    # one legend for all panels, under them, so it never hides a point
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    title = f"Pareto front of {_count(len(on_front), 'recipe')} among {_count(len(trials), 'full-fidelity trial')}"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06 if rows == 1 else 0.03, 1, 1))
    return _png(fig)


def _sign(run: Run, task: str) -> int:
    return next(1 if o.direction == "maximize" else -1 for o in run.space.objectives if o.task == task)


def _parent_lines(ax, run: Run, task: str) -> None:
    for label, info in run.parents.items():
        v = ((info.get("scores") or {}).get(task) or {}).get("value")
        if v is not None:
            ax.axhline(v, lw=1, ls="--" if label != "base" else "-", color="black" if label == "base" else "tab:blue",
                       alpha=0.6)
            ax.annotate(label, (0, v), textcoords="offset points", xytext=(2, 3), fontsize=8)


def plot_progress(run: Run) -> bytes | None:
    """Best-so-far per task and of the scalarized mean, and the hypervolume, against evaluations."""
    curves = progress_curves(run)
    if not curves["evaluation"] or all(v is None for v in curves["scalarized"]):
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = curves["evaluation"]
    for task in run.tasks:
        left.step(x, _nan(curves[task]), where="post", label=task)
    left.step(x, _nan(curves["scalarized"]), where="post", color="black", lw=2, label="scalarized (mean)")
    left.set_xlabel("evaluations")
    left.set_ylabel("best so far")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    right.step(x, _nan(curves["hypervolume"]), where="post", color="tab:purple")
    right.set_xlabel("evaluations")
    right.set_ylabel("hypervolume")
    right.set_title("reference: worst score seen per task", fontsize=9)
    right.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def _nan(values: list) -> list[float]:
    return [math.nan if v is None else v for v in values]


def plot_importances(importances: dict[str, dict[str, float]]) -> bytes | None:
    if not importances:
        return None
    plt = _pyplot()
    import numpy as np

    order = sorted(next(iter(importances.values())), key=lambda g: -importances.get("scalarized", next(
        iter(importances.values()))).get(g, 0.0))[:TOP_GENES]
    order = order[::-1]  # most important at the top
    targets = list(importances)
    height = 0.8 / len(targets)
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.3 * len(order) * max(1, len(targets) / 2)))
    ys = np.arange(len(order))
    for k, target in enumerate(targets):
        ax.barh(ys + (k - (len(targets) - 1) / 2) * height, [importances[target].get(g, 0.0) for g in order],
                height=height, label=target, color="black" if target == "scalarized" else None)
    ax.set_yticks(ys, order, fontsize=8)
    ax.set_xlabel("importance (normalised per target)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def plot_layers(run: Run) -> bytes | None:
    """Heatmaps of each searched parameter per layer (weight, drop rate, slerp's t...), one row per front recipe,
    one column block per model."""
    if not len(run.front):
        return None
    plt = _pyplot()
    import numpy as np

    trials = [int(n) for n in run.front["trial"]]
    per_trial = [layer_values(run.recipe(n), run.space) for n in trials]
    params = list(per_trial[0])
    if not params:
        return None
    columns = list(per_trial[0][params[0]])
    n_layers = len(next(iter(per_trial[0][params[0]].values())))
    width = max(6.0, min(18.0, 1.2 + 0.32 * n_layers * len(columns)))
    height = 1.5 + 0.28 * len(trials)  # per panel: title and model labels need room even for a 1-recipe front
    fig, axes = plt.subplots(len(params), 1, figsize=(width, height * len(params)), squeeze=False,
                             layout="constrained")
    for ax, param in zip(axes[:, 0], params):
        grid = np.array([[v for c in columns for v in values[param][c]] for values in per_trial])
        image = ax.imshow(grid, aspect="auto", cmap="viridis" if param == "weight" else "magma",
                          interpolation="nearest")
        ax.set_yticks(range(len(trials)), [f"trial {n}" for n in trials], fontsize=8)
        ax.set_xticks([i * n_layers + (n_layers - 1) / 2 for i in range(len(columns))], columns, fontsize=8)
        ax.tick_params(axis="x", length=0)
        for i in range(1, len(columns)):
            ax.axvline(i * n_layers - 0.5, color="white", lw=2)
        if grid.size <= 400:
            for (r, c), v in np.ndenumerate(grid):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if v < (grid.min() + grid.max()) / 2 else "black")
        ax.set_title(f"{param.replace('_', ' ')} per layer (layers 0..{n_layers - 1} left to right in each block)",
                     fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01, aspect=max(5, 4 * len(trials)))
    return _png(fig)


# ---- HTML -----------------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{padding:.25em .7em;border-bottom:1px solid #eee;
text-align:right;white-space:nowrap} th{background:#f5f5f5} td.l,th.l{text-align:left;white-space:normal}
.muted{color:#777;font-size:.85em}
img{max-width:100%;height:auto;display:block;margin:.5em 0} .kv td{text-align:left} code{font-size:.9em}
"""


def _img(png: bytes | None, alt: str, missing: str) -> str:
    if png is None:
        return f'<p class="muted">{html.escape(missing)}</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[str]], left: int = 1, text_columns: tuple[int, ...] = ()) -> str:
    """An HTML table; the first ``left`` columns and ``text_columns`` are left-aligned, numbers right-aligned."""
    def cls(i: int) -> str:
        return ' class="l"' if i < left or i in text_columns else ""

    head = "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(run: Run, html_path: Path) -> str:
    space, esc = run.space, html.escape
    b = budget(run)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mergeopt report: "
             f"{esc(space.name)}</title><style>{STYLE}</style></head><body>",
             f"<h1>mergeopt report: {esc(space.name)}</h1>",
             f'<p class="muted">run folder <code>{esc(str(run.path))}</code>, generated '
             f'{datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}</p>']
    grouped = space.granularity in ("layer_groups", "gradient")
    granularity = space.granularity + (f" ({space.groups})" if grouped else "")
    kv = [("merge method", space.merge_method), ("models", ", ".join(Path(m).name for m in space.models)),
          ("base model", Path(space.base_model).name), ("granularity", granularity),
          ("genes", str(space.dimension)), ("optimizer", space.optimizer),
          ("objectives", ", ".join(f"{o.task} ({o.direction})" for o in space.objectives)),
          ("tasks", f"{space.tasks}, {space.limit} items per task"
           + (f", low fidelity {space.fidelity_low} items" if space.fidelity_low else "")),
          ("budget spent", f"{b['finished']} of {b['planned']} trials ({b['complete']} complete, {b['failed']} failed"
           + (f", {b['lost']} lost" if b["lost"] else "") + (f", {b['low_only']} stopped at low fidelity"
                                                             if space.fidelity_low else "")
           + f"); scoring {_duration(b['scoring_s'])}, wall {_duration(b['wall_s'])}")]
    if len(run.front):
        kv.append(("hypervolume", f"{run.hypervolume():.4g} (reference: the worst score seen per task, parents "
                                  f"included: {', '.join(_fmt(abs(v)) for v in run.reference_point())})"))
    parts.append('<table class="kv">' + "".join(f'<tr><th class="l">{esc(k)}</th><td>{esc(v)}</td></tr>'
                                                 for k, v in kv) + "</table>")

    v = verdict(run)
    if v["line"] or v["baselines"]:
        parts.append("<h2>Search against baselines</h2>")
        if v["line"]:
            parts.append(f'<p class="verdict"><b>{esc(v["line"])}</b></p>')
        if v["finalists"]:
            rows = [[str(f.trial), _fmt(f.search) + (f" ±{f.search_se:.3f}" if f.search_se is not None else ""),
                     "failed" if f.validation is None else f"{f.validation:.3f} ±{f.validation_se:.3f}",
                     _fmt(None if f.validation is None else f.validation - f.search)] for f in v["finalists"]]
            parts.append('<p class="muted">finalists: the best of the front, re-scored on validation items no '
                         "candidate was chosen on (best.yaml is the best there):</p>")
            parts.append(_table(["trial", "search", "validation", "validation - search"], rows))
        if v["baselines"]:
            rows = [[esc(b["label"]), "failed" if b["value"] is None else _fmt(b["value"]), _fmt(b["seconds"], 1)]
                    for b in v["baselines"]]
            parts.append('<p class="muted">baselines: the merges one tries first, scored on the candidates\' items '
                         "before the search (not trials of the optimiser):</p>")
            parts.append(_table(["baseline", "scalarized", "seconds"], rows))

    parts.append("<h2>Best per task</h2>")
    rows = [[esc(r["task"]), _fmt(r["value"]), str(r["trial"]) if r["trial"] is not None else "-",
             f"{_fmt(r['parent_value'])} ({esc(r['parent'])})" if r["parent"] else "-"] for r in best_per_task(run)]
    parts.append(_table(["task", "best merge", "trial", "best parent"], rows))
    parent_rows = [[esc(label)] + [_fmt(((info.get("scores") or {}).get(t) or {}).get("value")) for t in run.tasks]
                   for label, info in run.parents.items()]
    if parent_rows:
        parts.append('<p class="muted">parents (the base and the fine-tuned models, scored on the same items):</p>')
        parts.append(_table(["model"] + [esc(t) for t in run.tasks], parent_rows))

    parts.append("<h2>Pareto front</h2>")
    parts.append(_img(plot_front(run), "Pareto front", "no completed full-fidelity trial yet"))
    parts.append("<h2>Progress</h2>")
    parts.append(_img(plot_progress(run), "best so far and hypervolume against evaluations",
                      "no finished trial yet"))
    parts.append("<h2>Parameter importance</h2>")
    importances, note = param_importances(run)
    parts.append(_img(plot_importances(importances), "parameter importance", note))
    if importances:
        parts.append(f'<p class="muted">{esc(note)}; top {TOP_GENES} genes by importance for the scalarized mean.</p>')
    parts.append("<h2>Per-layer weights and drop rates across the front</h2>")
    parts.append(_img(plot_layers(run), "per-layer weights and drop rates of the front's recipes",
                      "no front yet"))

    parts.append("<h2>Front recipes</h2>")
    if len(run.front):
        rows = []
        for _, row in run.front.iterrows():
            n = int(row["trial"])
            recipe_file = run.path / row["file"]
            if recipe_file.is_file():
                href = os.path.relpath(recipe_file.resolve(), html_path.resolve().parent)
                link = f'<a href="{esc(Path(href).as_posix())}">{esc(row["file"])}</a>'
            else:
                link = f'{esc(row["file"])} <span class="muted">(run mergeopt export)</span>'
            values = layer_values(run.recipe(n), space)
            short = {"weight": "w", "drop_rate": "drop"}
            columns = list(next(iter(values.values()))) if values else []
            summary = "; ".join(
                f"{esc(c)}: " + ", ".join(f"{short.get(name, name)} {sum(v[c]) / len(v[c]):.2f}"
                                          for name, v in values.items() if c in v)
                for c in columns)
            scores = []
            for t in run.tasks:
                err = row.get(f"{t}_stderr")
                scores.append(_fmt(row[t]) + (f" <span class=\"muted\">±{err:.3f}</span>"
                                             if err is not None and not (isinstance(err, float) and math.isnan(err))
                                             else ""))
            rows.append([str(n)] + scores + [_fmt(row["scalarized"]), summary, link])
        columns = ["trial"] + [esc(t) for t in run.tasks] + ["mean", "recipe (mean over layers)", "YAML"]
        parts.append(_table(columns, rows, text_columns=(len(columns) - 2, len(columns) - 1)))
        parts.append('<p class="muted">Every YAML is the exact mergekit recipe that was scored; '
                     "<code>mergeopt merge FILE --out DIR</code> rebuilds its model bit for bit.</p>")
    else:
        parts.append('<p class="muted">no front yet</p>')

    failed = run.trials[run.trials["state"] == "FAIL"] if len(run.trials) else run.trials
    if len(failed):
        parts.append("<h2>Failed trials</h2>")
        rows = [[str(int(r["trial"])), esc(str(r.get("error") or "")[:200])] for _, r in failed.head(20).iterrows()]
        parts.append(_table(["trial", "error"], rows, left=2))
    parts.append('<p class="muted">All trials: <code>trials.csv</code>; in Python: '
                 "<code>optimizer.load_run(path).trials</code>. The study database opens in optuna-dashboard.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(run: Run, path: str | Path | None = None) -> Path:
    """Write the self-contained report (default: ``<run>/report.html``) and return its path."""
    path = Path(path) if path is not None else run.path / "report.html"
    text = render_html(run, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except OSError as exc:
        raise MergeoptError(f"cannot write {path} ({exc.strerror}); choose another --html file") from None
    return path
