"""`mergeopt` command line: argument parsing only; each command calls one function of the package."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

from optimizer.errors import EngineFault, MergeoptError
from optimizer.recipe import DTYPES


EXAMPLES = {
    "zoo": """examples:
  mergeopt zoo                      # one line per model: <name><TAB><folder>
  mergeopt zoo --rebuild --out /tmp/zoo   # retrain the zoo reproducibly (a few minutes on a CPU)
  mergeopt zoo --family smollm2 --build   # SmolLM2-135M-Instruct + 3 fine-tunes into ~/.cache/mergeopt/smollm2
  mergeopt zoo --family smollm2           # its models (MERGEOPT_CACHE moves the cache folder)""",
    "merge": """examples:
  mergeopt merge search_spaces/example_recipe.yaml --out /tmp/merged
  mergeopt merge runs/demo/best.yaml --out merged --device cuda --shard-size 2GB
  mergeopt merge recipe.yaml --out merged --plan          # print the memory plan and stop
  mergeopt merge recipe.yaml --out merged --threads 4      # torch, numba and BLAS threads together""",
    "search": """examples:
  mergeopt search search_spaces/demo.yaml                      # runs/demo/, resumes if it exists
  mergeopt search search_spaces/demo.yaml --trials 100 --optimizer nsga2 --run-dir runs/demo-nsga2
  mergeopt search space.yaml --storage postgresql://user@db/mergeopt --study big-merge --device cuda:1
  mergeopt search search_spaces/lm_eval_example.yaml --plan --gpu-memory 80GB   # will it fit? (loads nothing)
  mergeopt search space.yaml --device cuda --engine-device cpu   # models mapped on the host, scoring on the GPU""",
    "export": """examples:
  mergeopt export runs/demo                      # pareto/*.yaml, pareto/front.csv, best.yaml, trials.csv
  mergeopt export runs/demo --materialize        # also the merged model of every front recipe
  mergeopt export runs/demo --validate 5         # re-score the 5 best of the front on the validation items""",
    "report": """examples:
  mergeopt report runs/demo                      # summary here, runs/demo/report.html (opens offline)
  mergeopt report runs/demo --html /tmp/demo.html
  python -c "import optimizer; print(optimizer.load_run('runs/demo').front)"   # the same tables in pandas""",
    "eval": """examples:
  mergeopt eval zoo:adder --tasks zoo                 # a model folder (or zoo:NAME) on the zoo's task set
  mergeopt eval search_spaces/example_recipe.yaml --tasks zoo --limit 50 --json   # merged in memory
  mergeopt eval ./my-model --tasks tasks.yaml --backend vllm
  mergeopt eval ./my-model --tasks arc_easy,hellaswag --limit 200   # lm-eval tasks by name
  mergeopt eval runs/demo/best.yaml --tasks zoo --limit 200 --holdout   # the test range: no run looks at it
  mergeopt eval zoo:adder --tasks zoo --show 5        # also print 5 prompts per task, the generation and target""",
}


def _size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not understood; write e.g. 500MB or 5GB") from None


def build_parser() -> argparse.ArgumentParser:
    from optimizer.evaluate.scoring import BACKENDS
    from optimizer.catalogue import CATALOGUE

    parser = argparse.ArgumentParser(
        prog="mergeopt",
        description="Search DARE / task-arithmetic merge recipes for homologous language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  mergeopt zoo\n  mergeopt merge search_spaces/example_recipe.yaml --out /tmp/merged\n\n"
               "Run 'mergeopt COMMAND --help' for a command's options.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads for torch, numba and BLAS together (default: the cores other processes "
                            "leave free, from the 1-minute load average)")
        return p

    zoo = command("zoo", "List the embedded tiny model zoo (or retrain it with --rebuild).")
    zoo.add_argument("--rebuild", action="store_true", help="retrain base and specialists from scratch")
    zoo.add_argument("--out", type=Path, default=None, help="folder for --rebuild (default: the package's own zoo)")
    zoo.add_argument("--seed", type=int, default=0, help="training seed for --rebuild (default 0)")
    zoo.add_argument("--family", choices=("tiny", "smollm2", "mix"), default="tiny",
                     help="tiny: the embedded zoo (default); smollm2: a real LLM family built into the cache folder")
    zoo.add_argument("--build", action="store_true", help="build the --family smollm2 or mix models (resumes; ~30 min on 2 cores)")
    zoo.add_argument("--reduced", action="store_true", help="the reduced smollm2 family (a few training steps; for CI)")

    merge = command("merge", "Merge the models of a recipe YAML into a safetensors model folder.")
    from optimizer.methods import methods_help

    merge.description = (f"{merge.description}\n\nAny mergekit configuration: forms the fused engine does not run go "
                         f"through mergekit (pip install mergekit).\nmerge methods and their parameters:\n"
                         f"{methods_help()}")
    merge.add_argument("recipe", type=Path, help="recipe YAML (mergekit format, optional mergeopt: block)")
    merge.add_argument("--out", type=Path, required=True, help="output model folder")
    merge.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    merge.add_argument("--shard-size", type=_size, default="5GB", help="largest safetensors shard (default 5GB)")
    merge.add_argument("--plan", action="store_true", help="print the memory plan and stop (loads no weights)")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="also load pickled .bin weights (with weights_only=True); off by default")
    ev = command("eval", "Score a model folder or a recipe (merged in memory) on a task set.")
    ev.add_argument("target", help="a model folder, zoo:NAME, or a recipe YAML")
    ev.add_argument("--tasks", required=True, help="'zoo', a task-set YAML, an lm-eval task YAML, or lm-eval task names")
    ev.add_argument("--limit", type=int, default=None, help="items per task (a fixed-seed subset)")
    ev.add_argument("--seed", type=int, default=None, help="seed of the subsets (default: the task set's, else 0)")
    ev.add_argument("--holdout", action="store_true",
                    help="score the test range: items a search with this --limit neither scored nor validated on")
    ev.add_argument("--split", choices=("search", "validation", "test"), default=None,
                    help="which range of the items to score (default search; --holdout is test)")
    ev.add_argument("--backend", choices=tuple(BACKENDS), default="hf", help="inference engine (default hf)")
    ev.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    ev.add_argument("--batch-size", type=int, default=64, help="generation batch size of the hf backend")
    ev.add_argument("--engine-device", default=None,
                    help="where the merge engine holds a recipe's models: cpu (memory-mapped) or the scoring device "
                         "(default: the scoring device); with --backend vllm: cpu or cuda (vLLM's worker's GPU)")
    ev.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    ev.add_argument("--show", type=int, default=0, metavar="N",
                    help="print the first N items of each generate task: prompt, generation, answer read, target")
    ev.add_argument("--allow-pickle", action="store_true", help="also load pickled .bin weights (weights_only=True)")
    ev.add_argument("--dtype", choices=DTYPES, default=None,
                    help="scoring dtype (default: the recipe's or run's own, the one it was searched in; "
                         "float32 for a model folder)")
    se = command("search", "Search merge recipes: ask -> merge -> score -> tell, recorded in an Optuna study.")
    se.add_argument("space", type=Path, help="search-space YAML (see search_spaces/)")
    se.add_argument("--run-dir", type=Path, default=None, help="run folder (default runs/<space name>)")
    se.add_argument("--trials", type=int, default=None, help="total trials of the study (overrides budget.trials)")
    se.add_argument("--minutes", type=float, default=None, help="time budget of this invocation")
    se.add_argument("--optimizer", choices=tuple(CATALOGUE), default=None, help="overrides the space's optimizer: "
                    + "; ".join(f"{name}: {info.summary}" for name, info in CATALOGUE.items()))
    se.add_argument("--seed", type=int, default=None, help="sampler and DARE mask seed (overrides the space)")
    se.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in the run folder)")
    se.add_argument("--study", default=None, help="study name in the storage (default: the space's name)")
    se.add_argument("--backend", choices=tuple(BACKENDS), default=None, help="inference engine (overrides the space)")
    se.add_argument("--device", default=None, help="cpu, cuda or cuda:N (one worker per device)")
    se.add_argument("--quiet", action="store_true", help="no progress output")
    se.add_argument("--engine-device", default=None,
                    help="where the merge engine holds the models: cpu (memory-mapped) or the scoring device "
                         "(default: the scoring device); with --backend vllm the engine runs in vLLM's worker: cpu "
                         "or cuda (the worker's own GPU)")
    se.add_argument("--gpu-memory", default=None, metavar="SIZE",
                    help="plan for a card of this size (e.g. 80GB) instead of the one torch sees")
    se.add_argument("--plan", action="store_true", help="print the memory plan and stop (loads no weights)")

    ex = command("export", "Write a run's Pareto front and best recipe as mergekit YAML.")
    ex.add_argument("run", type=Path, help="run folder")
    ex.add_argument("--storage", default=None, help="Optuna storage URL, if the search used one")
    ex.add_argument("--study", default=None, help="study name, if not the space's name")
    ex.add_argument("--materialize", action="store_true", help="also write the merged models of the front")
    ex.add_argument("--device", default=None, help="device for --materialize and --validate")
    ex.add_argument("--validate", type=int, default=None, metavar="K",
                    help="first re-score the K best of the front and the best baseline on the validation items")

    rp = command("report", "Summarize a run's trade-offs here and in a self-contained HTML report.")
    rp.add_argument("run", type=Path, help="run folder")
    rp.add_argument("--html", type=Path, default=None, metavar="FILE",
                    help="HTML file to write (default <run>/report.html)")
    rp.add_argument("--storage", default=None, help="Optuna storage URL, if the search used one")
    rp.add_argument("--study", default=None, help="study name, if not the space's name")
    return parser


FRONT_ROWS = 12  # the terminal shows the best of the front by mean; front.csv has all of it


def print_front(result, verdict: bool = True) -> None:
    if not result.front:
        print("no completed full-fidelity trial yet: nothing to export")
        return
    from optimizer.report import front_lines

    tasks = list(result.front[0].objectives)
    print("Pareto front (" + ", ".join(tasks) + "):")
    shown = result.front[:FRONT_ROWS]
    rows = [(e.trial, list(e.objectives.values()), e.scalarized, str(e.path)) for e in shown]
    print("\n".join(front_lines(tasks, rows, best=result.best.trial if result.best else None)))
    if len(result.front) > len(shown):
        print(f"  ... {len(result.front) - len(shown)} more in {result.run_dir / 'pareto' / 'front.csv'}")
    print(f"recipes:     {result.run_dir / 'pareto'}/trial-NNNN.yaml (one per front member)")
    on_front = any(e.trial == result.best.trial for e in shown)
    print(f"best recipe: {result.best.path}  " + ("(* above)" if on_front else f"(trial {result.best.trial})"))
    print(f"all trials:  {result.run_dir / 'trials.csv'}")
    if verdict and result.line:
        print(result.line)


def cmd_search(args: argparse.Namespace) -> int:
    import os

    from optimizer.export import export_run
    from optimizer.search import faults
    from optimizer.search.loop import SearchOptions, run_search
    from optimizer.search.workers import HEARTBEAT_ENV, heartbeat_settings
    from optimizer.space import load_space

    overrides = {"trials": args.trials, "minutes": args.minutes, "optimizer": args.optimizer, "seed": args.seed,
                 "backend": args.backend}
    space = load_space(args.space, overrides)
    # the testing hook and the heartbeat timing come from the environment, read here only (never in the library)
    options = SearchOptions(storage=args.storage, study_name=args.study, device=args.device,
                            engine_device=args.engine_device, progress=not args.quiet,
                            faults=faults.parse(os.environ.get(faults.ENV, "")),
                            heartbeat=heartbeat_settings(os.environ.get(HEARTBEAT_ENV)),
                            recovery=_engine_recovery())
    if args.threads is None and space.threads is not None:  # the space's own thread count, unless --threads
        configure_threads(space.threads)
    run_dir = args.run_dir or Path("runs") / space.name
    if not _search_plan(space, args):
        return 0
    result = run_search(space, run_dir, options)
    fault = result.engine_fault
    if fault is not None:  # a new process on the same study, or one line and exit 75 (optimizer/search/restart.py)
        from optimizer.evaluate.recovery import EngineRecovery
        from optimizer.search.restart import restart_if_allowed

        fault = restart_if_allowed(fault, options.recovery or EngineRecovery(), os.environ, sys.orig_argv)
    exported = export_run(run_dir, storage=args.storage, study_name=args.study)
    print_front(exported, verdict=False)
    if exported.front:
        _search_report(run_dir, args.storage, args.study)
    if exported.line:  # the run's verdict, last: the validated best against the best baseline
        print(exported.line)
    if fault is not None:
        from optimizer.search.restart import EXIT_ENGINE, stopped_line

        print(stopped_line(fault), file=sys.stderr)
        return EXIT_ENGINE
    if result.stopped_reason:
        print(f"mergeopt search: stopped: {result.stopped_reason}", file=sys.stderr)
        return 1
    if result.interrupted:
        print("mergeopt search: interrupted; everything so far is saved — rerun the same command to continue",
              file=sys.stderr)
        return 130
    return 0


def _engine_recovery():
    """How a run survives its inference engine: MERGEOPT_ENGINE_RESTARTS, MERGEOPT_ENGINE_TIMEOUT (README,
    "Safety and reliability"); a bad value is one line before anything loads."""
    import os

    from optimizer.evaluate.recovery import EngineRecovery

    return EngineRecovery.from_env(os.environ)


def _trims_by_magnitude(method: str) -> bool:
    from optimizer.methods import METHODS

    spec = METHODS.get(method)
    return spec is not None and spec.sparsification == "magnitude"


def _search_plan(space, args: argparse.Namespace) -> bool:
    """Print the search's memory plan; refuse in one line what cannot fit. False: --plan, stop here."""
    from optimizer.merge.engine import default_device
    from optimizer.merge.memory import parse_size, plan_memory

    device = args.device or str(default_device())
    plan = plan_memory(space.base_model, list(space.models), engine_device=args.engine_device or device,
                       scoring_device=device, backend=space.backend, live_dtype=space.dtype,
                       device_memory=None if args.gpu_memory is None else parse_size(args.gpu_memory),
                       magnitude_trim=_trims_by_magnitude(space.merge_method))
    if args.plan or not args.quiet:
        print(plan.text(), file=sys.stdout if args.plan else sys.stderr)
    plan.check()
    return not args.plan


def _search_report(run_dir: Path, storage: str | None, study: str | None) -> None:
    """The HTML report at the end of a search; a report that cannot be drawn never fails the search."""
    from optimizer.report import write_html
    from optimizer.run import load_run

    try:
        path = write_html(load_run(run_dir, storage=storage, study_name=study))
    except Exception as exc:  # the study and the exported recipes are already safe on disk
        print(f"mergeopt search: no report ({type(exc).__name__}: {exc}); try 'mergeopt report {run_dir}'",
              file=sys.stderr)
        return
    print(f"report:      {path}")
    print(f"next:        mergeopt merge {run_dir / 'best.yaml'} --out {run_dir / 'merged'}   # the best recipe as a model")


def cmd_export(args: argparse.Namespace) -> int:
    from optimizer.export import export_run

    if args.validate is not None:
        from optimizer.search.validation import validate_run

        validate_run(args.run, args.validate, storage=args.storage, study_name=args.study, device=args.device,
                     progress=True)
    print_front(export_run(args.run, storage=args.storage, study_name=args.study, materialize=args.materialize,
                           device=args.device, progress=True))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from optimizer.export import export_run
    from optimizer.report import summarize, write_html
    from optimizer.run import load_run

    # export first, so the report's links (pareto/*.yaml) and trials.csv match the study as it is now
    export_run(args.run, storage=args.storage, study_name=args.study)
    run = load_run(args.run, storage=args.storage, study_name=args.study)
    print(summarize(run))
    print(f"report: {write_html(run, args.html)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from optimizer.evaluate.scoring import OWN_MERGE_ENGINE, check_backend, evaluate_candidate, make_backend
    from optimizer.evaluate.tasks import load_task_set
    from optimizer.recipe import Recipe, zoo_path

    if args.limit is not None and args.limit < 1:
        raise MergeoptError("--limit must be a positive number of items")
    if args.show < 0:
        raise MergeoptError("--show must be a number of items (0 or more)")
    if args.holdout and args.split not in (None, "test"):
        raise MergeoptError("--holdout is --split test; give one of them")
    if (args.holdout or args.split in ("validation", "test")) and args.limit is None:
        flag = "--holdout" if args.holdout else f"--split {args.split}"
        raise MergeoptError(f"{flag} needs the --limit the search used (its subset is what is held out from)")
    target = args.target
    run_record = Path(target) / "space.yaml"
    if run_record.is_file():  # a run folder: its best recipe, as `mergeopt export` wrote it
        target = str(Path(target) / "best.yaml")
        if not Path(target).is_file():
            raise MergeoptError(f"{args.target} has no best.yaml yet; run 'mergeopt export {args.target}' first")
    recipe = Recipe.load(target) if target.endswith((".yaml", ".yml")) else None
    folder = None
    if recipe is None:
        folder = zoo_path(target) if target.startswith("zoo:") else target
        if not Path(folder).is_dir():
            raise MergeoptError(f"{target} is neither a model folder, a run folder nor a recipe YAML")
        from optimizer.merge.checkpoint import weight_files

        weight_files(folder, allow_pickle=args.allow_pickle)  # the pickle policy of merge and search, before loading
    # before loading anything (a folder is scored as it is: nothing reloaded, so nothing to refuse for its head)
    check_backend(args.backend, folder if recipe is None else recipe.base_model or recipe.models[0].model,
                  swaps=recipe is not None, engine_device=args.engine_device)
    # a recipe records the dtype its search scored in: the same dtype gives the same scores
    # a recipe is scored in the dtype its search used; a plain mergekit file without one, and a folder, in float32
    dtype = args.dtype or (recipe.dtype if recipe is not None else None) or "float32"
    task_set = load_task_set(args.tasks, limit=args.limit, seed=args.seed, holdout=args.holdout, split=args.split)
    extra = {"batch_size": args.batch_size} if args.backend == "hf" else {"swaps": recipe is not None}
    engine = None
    if recipe is not None:
        from optimizer.merge.engine import MergeEngine

        # with vLLM the worker builds the candidate (on --engine-device); this engine only checks the recipe, on the CPU
        own_engine = args.backend in OWN_MERGE_ENGINE
        engine = MergeEngine.for_recipe(recipe, device="cpu" if own_engine else args.engine_device or args.device,
                                        allow_pickle=args.allow_pickle)
        folder = engine.base_path
    with contextlib.closing(make_backend(args.backend, folder, device=args.device, dtype=dtype,
                                         engine_device=args.engine_device, recovery=_engine_recovery(),
                                         **extra)) as backend:
        result = evaluate_candidate(backend, task_set, engine, recipe, progress=not args.json)
        # the examples need the live model: before the backend closes
        shown = None
        if args.show:
            from optimizer.evaluate.tasks import show_examples

            shown = show_examples(task_set, backend, args.show)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{'task':<16} {'metric':<12} {'value':>7} {'stderr':>7} {'n':>5}")
        for name, s in result.scores.items():
            value = "failed" if s.value is None else f"{s.value:.4f}"
            stderr = "" if s.stderr is None else f"{s.stderr:.4f}"
            print(f"{name:<16} {s.metric:<12} {value:>7} {stderr:>7} {s.n:>5}")
        print(f"swap {result.seconds.get('swap', 0):.2f}s, score {result.seconds.get('score', 0):.2f}s", file=sys.stderr)
    if shown is not None:
        print(shown, file=sys.stderr if args.json else sys.stdout)
    if result.failed:
        print(f"mergeopt eval: candidate failed: {result.error}", file=sys.stderr)
        return 1
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from optimizer import zoo

    if args.family in ("smollm2", "mix") or args.build or args.reduced:
        return _zoo_family(args)
    if args.rebuild:
        from optimizer.builders.tiny import rebuild

        models = rebuild(out_dir=args.out, seed=args.seed, progress=True)
    else:
        models = zoo.zoo_models()
        missing = [name for name, folder in models.items() if not (Path(folder) / "config.json").is_file()]
        if missing:
            raise MergeoptError(f"the zoo model {missing[0]} is not built; run 'mergeopt zoo --rebuild'")
    for name, folder in models.items():
        print(f"{name}\t{Path(folder).resolve()}")
    return 0


def _zoo_family(args: argparse.Namespace) -> int:
    from optimizer.zoo import mix, smollm2

    if args.family not in ("smollm2", "mix"):
        raise MergeoptError("--build and --reduced build a real family: add --family smollm2")
    if args.rebuild or args.out is not None:
        raise MergeoptError("--rebuild and --out are for the tiny zoo; the smollm2 family uses --build (and MERGEOPT_CACHE)")
    family = {"smollm2": smollm2, "mix": mix}[args.family]
    if args.build:
        if args.family == "mix":
            from optimizer.builders.mix import build_family
        else:
            from optimizer.builders.smollm2 import build_family

        models = build_family(_cache_root(), reduced=args.reduced, progress=True)
    else:
        models = family.family_models(_cache_root(), reduced=args.reduced)
        missing = [name for name, folder in models.items() if not (folder / "config.json").is_file()]
        if missing:
            flags = " --reduced" if args.reduced else ""
            raise MergeoptError(f"the {args.family} model {missing[0]} is not built in {models[missing[0]].parent}; "
                                f"run 'mergeopt zoo --family {args.family} --build{flags}'")
    for name, folder in models.items():
        print(f"{name}\t{Path(folder).resolve()}")
    return 0


def _cache_root() -> Path | None:
    """The folder built families live in: $MERGEOPT_CACHE, else the library's default (~/.cache/mergeopt)."""
    import os

    return Path(os.environ["MERGEOPT_CACHE"]) if os.environ.get("MERGEOPT_CACHE") else None


def cmd_merge(args: argparse.Namespace) -> int:
    """A merge that fails after it started takes back the --out folder it created (a folder that was there stays)."""
    created = not args.out.exists()
    try:
        return _merge(args)
    except BaseException:
        if created and args.out.is_dir():
            import shutil

            shutil.rmtree(args.out, ignore_errors=True)
        raise


def _merge(args: argparse.Namespace) -> int:
    from optimizer.merge import mergekit_fallback
    from optimizer.recipe import Recipe, read_yaml_file, reference_model

    root = args.recipe.parent
    data, reason = mergekit_fallback.route(read_yaml_file(args.recipe, "recipe file"), root)
    start = time.perf_counter()
    if reason is not None:  # a form only mergekit runs: checked here, then merged by mergekit itself
        if not mergekit_fallback.available():
            raise MergeoptError(f"{args.recipe}: {reason} needs mergekit, which is not installed: "
                                f"{mergekit_fallback.INSTALL_HINT}")
        config = mergekit_fallback.prepare(data, root, allow_pickle=args.allow_pickle)
        print(f"mergeopt merge: {reason} is not in the fused engine; merging through mergekit", file=sys.stderr)
        if args.plan:
            return 0
        seed = (data.get("mergeopt") or {}).get("seed", 0)
        out = mergekit_fallback.merge(config, args.out, seed=seed, device=args.device, shard_size=args.shard_size)
        print(f"merged with mergekit ({data['merge_method']}) into {out.resolve()} "
              f"({time.perf_counter() - start:.1f}s)", file=sys.stderr)
        print(out.resolve())
        return 0
    from optimizer.merge.engine import MergeEngine, default_device
    from optimizer.merge.memory import plan_memory

    recipe = Recipe.from_dict(data, source=str(args.recipe))
    recipe.resolve_paths(root)
    base = recipe.base_model or reference_model(recipe.models[0].model)
    device = args.device or str(default_device())
    plan = plan_memory(base, [m.model for _, m in recipe.delta_models()], engine_device=device, backend=None,
                       allow_pickle=args.allow_pickle, magnitude_trim=_trims_by_magnitude(recipe.merge_method))
    print(plan.text(), file=sys.stdout if args.plan else sys.stderr)
    plan.check()
    if args.plan:
        return 0
    start = time.perf_counter()
    # each input tensor is checked for NaN/inf as it is merged: one pass over the files, not two
    engine = MergeEngine.for_recipe(recipe, device=args.device, allow_pickle=args.allow_pickle, progress=True,
                                    verify=False)
    loaded = time.perf_counter()
    out = engine.save(recipe, args.out, max_shard_bytes=args.shard_size, progress=True)
    done = time.perf_counter()
    print(f"merged {len(recipe.models)} models with {recipe.merge_method} into {out.resolve()} "
          f"(load {loaded - start:.1f}s, merge+write {done - loaded:.1f}s)", file=sys.stderr)
    print(out.resolve())
    return 0


class _StderrHandler(logging.StreamHandler):
    """Log lines to whatever sys.stderr is when they are written (tests and tools may swap it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_output(args: argparse.Namespace) -> None:
    """The process-wide settings a command line owns (library modules set none): log format and levels."""
    import warnings

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("mergeopt")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if args.debug else logging.INFO)
    logger.propagate = False
    logging.getLogger("optuna").setLevel(logging.WARNING)  # Optuna's per-trial INFO lines would drown the progress
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", message="Could not import matplotlib.pyplot")


def default_threads() -> int:
    """The cores other processes leave free, at least one: torch's default of every core oversubscribes a shared
    machine (measured: an eval took 38-82 s instead of 6.8 s on 2 busy cores).

    Busy cores are the whole part of the 1-minute load average: the average lags a job that just ended, and a
    fraction of a core (that tail, a shell, a monitor) is not worth a thread (measured: rounding it up gave the demo
    search, run right after another job, 1 of 2 cores and made it 24% slower)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, cores - busy)


def configure_threads(threads: int | None) -> int:
    """One thread count for torch, numba and the BLAS/OpenMP pools, set before they start their pools."""
    import os

    if threads is not None and threads < 1:
        raise MergeoptError("--threads must be at least 1")
    n = threads or default_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if threads is not None or var not in os.environ:
            os.environ[var] = str(n)
    if "numba" not in sys.modules:
        # numba sizes its pool from this at import; changing it after the pool started breaks numba's launches
        if threads is not None or "NUMBA_NUM_THREADS" not in os.environ:
            os.environ["NUMBA_NUM_THREADS"] = str(n)
    else:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mergeopt-numba"))
    if "torch" in sys.modules:  # otherwise torch sizes its pool from OMP_NUM_THREADS when it loads (report and
        import torch            # export never load it)

        torch.set_num_threads(n)
    return n


COMMANDS = {"zoo": cmd_zoo, "merge": cmd_merge, "eval": cmd_eval, "search": cmd_search, "export": cmd_export,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_output(args)
    try:
        configure_threads(getattr(args, "threads", None))
        if _cache_root() is not None:
            from optimizer.zoo.smollm2 import set_cache_root

            set_cache_root(_cache_root())
        return COMMANDS[args.command](args)
    except MergeoptError as exc:
        if args.debug:
            raise
        print(f"mergeopt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mergeopt {args.command}: interrupted", file=sys.stderr)
        return 130
    except EngineFault as exc:  # the engine's, not the input's (optimizer/evaluate/recovery.py): exit 75
        if args.debug:
            raise
        from optimizer.search.restart import EXIT_ENGINE, stopped_line

        print(stopped_line(exc, f"mergeopt {args.command}"), file=sys.stderr)
        return EXIT_ENGINE
    except BrokenPipeError:  # `mergeopt ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # the last resort: a bug or an unforeseen failure is still one line without --debug
        if args.debug:
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(f"mergeopt {args.command}: error: {type(exc).__name__}: {text} (unexpected; rerun with --debug for "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
