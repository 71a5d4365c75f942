"""One table from a CUDA machine: candidate builds against the card's copy bandwidth, bit-identity with the CPU
engine, and (when vLLM is installed) ten candidates end to end. Run through ``benchmarks/gpu_check.sh``.

1. writes a bf16 synthetic Llama family (base + 3 fine-tunes; ``--size 1b`` ~1.2B or ``3b`` ~2.9B parameters per
   model) into a scratch folder;
2. loads it into the merge engine on the GPU (the torch kernel, models resident in bf16) and times ``--builds``
   dare_ties candidates built into a live bf16 model, against the time the card needs to copy the bytes a build
   must touch (read 4 models, write 1) at its measured device-to-device bandwidth;
3. builds the same recipe with the CPU engine (numba, memory-mapped files) for ``--samples`` sampled tensors and
   counts the bit-identical ones;
4. with vLLM importable: ten candidates (merge + swap + score on a small generation task) through the vllm backend,
   then its worker process killed (SIGKILL) mid-candidate: the time until a new engine holds the candidate, its
   scores against the ones before, the old processes gone and the card's free memory back;
5. a real CUDA fault in the search process (``MERGEOPT_FAULT=cuda``: a device-side assert, which poisons the
   context): a tiny ``mergeopt search`` on the hf backend must restart its process and still meet its budget.

``--dry-run`` runs the same code on the CPU with a tiny family (the torch kernel stands in for CUDA), so the script
is tested where no GPU is.

example:
  bash benchmarks/gpu_check.sh                  # on a CUDA machine, <= 8 minutes
  bash benchmarks/gpu_check.sh --size 3b
  bash benchmarks/gpu_check.sh --dry-run        # anywhere: tiny family on the CPU
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the package is imported as installed (pip install -e .); sibling benchmark modules are found because Python puts
# this script's folder first on sys.path

GPU_SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written per second), median of 5."""
    import torch

    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("1b", "3b"), default="1b", help="family size on the GPU (default 1b)")
    parser.add_argument("--builds", type=int, default=5, help="timed candidate builds (default 5)")
    parser.add_argument("--samples", type=int, default=24, help="tensors compared with the CPU engine (default 24)")
    parser.add_argument("--dry-run", action="store_true", help="tiny family on the CPU: tests the script anywhere")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from bench_merge import write_family
    from optimizer.merge.engine import MergeEngine
    from optimizer.recipe import ModelSpec, Recipe

    if args.dry_run:
        device, size = torch.device("cpu"), "tiny"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA device; run with --dry-run to test the script on a CPU",
                  file=sys.stderr)
            return 1
        device, size = torch.device("cuda:0"), args.size
    tmp = tempfile.TemporaryDirectory(prefix="mergeopt-gpu-check-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    rows: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    config = transformers.LlamaConfig(tie_word_embeddings=False, max_position_embeddings=2048,
                                      architectures=["LlamaForCausalLM"], **GPU_SIZES[size])
    base, models = write_family(work / f"family-{size}", config, 3, dtype="bfloat16")
    rows.append(("device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"))
    rows.append(("family", f"{size}: base + 3 fine-tunes, bfloat16, written in {time.perf_counter() - t0:.0f} s"))

    recipe = Recipe("dare_ties", [ModelSpec(str(m), {"weight": w, "density": 0.5})
                                  for m, w in zip(models, (0.5, 0.3, 0.2))], base_model=str(base), seed=0,
                    dtype="bfloat16")
    t1 = time.perf_counter()
    engine = MergeEngine(base, models, device=device, kernel="torch")
    rows.append(("engine load", f"{time.perf_counter() - t1:.1f} s (4 models resident in bfloat16 on {device})"))
    params = sum(engine.stored_weights(0)[n].numel() for n in engine.names)
    with torch.device("meta"):
        live = transformers.LlamaForCausalLM(config)
    live = live.to_empty(device=device).to(torch.bfloat16).eval()
    engine.build_into(recipe, live)  # warm-up
    _sync(device)
    times = []
    for _ in range(args.builds):
        start = time.perf_counter()
        engine.build_into(recipe, live)
        _sync(device)
        times.append(time.perf_counter() - start)
    build = sorted(times)[len(times) // 2]
    touched = params * 2 * (4 + 1)  # read base + 3 fine-tunes, write the live model (bf16)
    bandwidth = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
    floor = touched / (bandwidth * 1e9)
    rows.append(("parameters", f"{params / 1e6:,.1f}M per model"))
    rows.append(("build (dare_ties)", f"{build:.3f} s median of {args.builds}"))
    rows.append(("copy bandwidth", f"{bandwidth:.0f} GB/s (read + write)"))
    rows.append(("bytes a build touches", f"{touched / 1e9:.1f} GB -> {floor * 1000:.1f} ms at copy bandwidth; "
                                          f"build = {build / floor:.1f}x that floor"))

    # bit-identity with the CPU engine on sampled tensors
    cpu = MergeEngine(base, models, device="cpu")
    names = random.Random(0).sample(engine.names, min(args.samples, len(engine.names)))
    same = 0
    state = live.state_dict()
    positions = cpu._positions(recipe)
    for name in names:
        slot = cpu._slot_by_name[name]
        expected = torch.empty(cpu.shapes[name], dtype=torch.bfloat16)
        cpu._merge_into(slot, cpu.plan(recipe, slot, positions), expected)
        same += bool(torch.equal(state[name].cpu(), expected))
    rows.append(("bit-identical to CPU", f"{same}/{len(names)} sampled tensors"))

    rows.extend(_vllm_candidates(base, models, recipe, work, device))
    rows.append(("CUDA fault -> process restarted", _cuda_fault_search(work, device)))
    if args.json:
        args.json.write_text(json.dumps(dict(rows), indent=2))
    width = max(len(k) for k, _ in rows)
    print("| check | result |\n|---|---|")
    for key, value in rows:
        print(f"| {key:<{width}} | {value} |")
    if tmp:
        tmp.cleanup()
    elif args.workdir is not None:
        shutil.rmtree(args.workdir / "vllm-tasks", ignore_errors=True)
    return 0 if same == len(names) else 1


def _vllm_candidates(base, models, recipe, work: Path, device) -> list[tuple[str, str]]:
    """Ten candidates end to end through the vllm backend, then its worker killed mid-candidate; or why not."""
    rows = ("vLLM, 10 candidates", "vLLM worker killed mid-candidate")
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [(row, "skipped: vLLM is not installed") for row in rows]
    if device.type != "cuda":
        return [(row, "skipped: the dry run does not start vLLM") for row in rows]
    from optimizer.evaluate.scoring import evaluate_candidate, make_backend
    from optimizer.zoo.tokenizer import save_tokenizer

    for folder in [base, *models]:
        save_tokenizer(folder)
    task_set = _generation_tasks(work)
    from optimizer.merge.engine import MergeEngine

    engine = MergeEngine.for_recipe(recipe, device="cpu", verify=False)
    backend = make_backend("vllm", base, device=str(device), dtype="bfloat16")
    try:
        evaluate_candidate(backend, task_set, engine, recipe)  # warm-up
        swap = score = 0.0
        start = time.perf_counter()
        for _ in range(10):
            result = evaluate_candidate(backend, task_set, engine, recipe)
            swap += result.seconds.get("swap", 0.0)
            score += result.seconds.get("score", 0.0)
        total = time.perf_counter() - start
        killed = _kill_worker_mid_candidate(backend, engine, recipe, task_set, result, total / 10)
    finally:
        close = getattr(backend, "close", None)
        if close:
            close()
    return [(rows[0], f"{total:.1f} s ({total / 10:.2f} s per candidate; merge + swap {swap / total:.0%} of it)"),
            (rows[1], killed)]


def _generation_tasks(work: Path):
    from optimizer.evaluate.tasks import load_task_set

    tasks = work / "vllm-tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "gen.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "target": str(2 * i)}) + "\n"
                                             for i in range(32)))
    (tasks / "tasks.yaml").write_text("tasks:\n  - {name: gen, path: gen.jsonl, max_new_tokens: 4}\n")
    return load_task_set(str(tasks / "tasks.yaml"))


def _kill_worker_mid_candidate(backend, engine, recipe, task_set, before, per_candidate: float) -> str:
    """SIGKILL the engine's worker process half-way through a candidate; the same candidate must come back with the
    same scores from a new engine, the old processes gone and the card's memory freed."""
    import os
    import signal
    import threading

    import torch

    from optimizer.evaluate.recovery import pid_running
    from optimizer.evaluate.scoring import evaluate_candidate

    old = dict(backend.processes.names)
    workers = [pid for pid, name in old.items() if "Worker" in name] or list(old)
    free_before = torch.cuda.mem_get_info()[0]
    timer = threading.Timer(per_candidate / 2, lambda: [os.kill(pid, signal.SIGKILL) for pid in workers])
    start = time.perf_counter()
    timer.start()
    after = evaluate_candidate(backend, task_set, engine, recipe)
    seconds = time.perf_counter() - start
    timer.join()
    events = backend.engine_events
    left = [pid for pid in old if pid_running(pid)]
    free_after = torch.cuda.mem_get_info()[0]
    same = after.to_dict() == before.to_dict()
    recovery = events[-1].recovery_seconds if events else None
    return (f"{len(events)} fault(s) survived; candidate back in {seconds:.1f} s (new engine + rebuild "
            f"{recovery or 0:.1f} s); scores {'equal' if same else 'DIFFER'}; old processes left: {len(left)}; "
            f"free GPU memory {free_before / 2**30:.1f} -> {free_after / 2**30:.1f} GiB")


def _cuda_fault_search(work: Path, device) -> str:
    """A tiny `mergeopt search` on the hf backend on the GPU whose trial 1 hits a real device-side assert: the process
    must restart itself on the same study and meet the budget (3 trials COMPLETE, trial 1 lost)."""
    if device.type != "cuda":
        return "skipped: the dry run has no CUDA context to poison"
    import os
    import subprocess

    import optuna
    import transformers
    import yaml

    from bench_merge import write_family
    from optimizer.zoo.tokenizer import save_tokenizer

    config = transformers.LlamaConfig(tie_word_embeddings=False, max_position_embeddings=256,
                                      architectures=["LlamaForCausalLM"], **GPU_SIZES["tiny"])
    base, models = write_family(work / "family-cuda-fault", config, 3, dtype="float32")
    for folder in [base, *models]:
        save_tokenizer(folder)
    _generation_tasks(work)
    space = work / "cuda-fault.yaml"
    space.write_text(yaml.safe_dump({"name": "cuda-fault", "base_model": str(base), "models": [str(m) for m in models],
                                     "merge_method": "dare_ties", "objectives": ["gen"], "optimizer": {"name": "random"},
                                     "budget": {"trials": 3}, "tasks": str(work / "vllm-tasks" / "tasks.yaml"),
                                     "limit": 8, "seed": 0}))
    run_dir = work / "cuda-fault-run"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "optimizer.cli", "search", str(space), "--run-dir", str(run_dir),
                           "--device", str(device), "--quiet"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MERGEOPT_FAULT": "cuda@trial:1", "MERGEOPT_ENGINE_TIMEOUT": "4",
                               "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return f"FAILED: exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}"
    trials = optuna.load_study(study_name="cuda-fault", storage=f"sqlite:///{run_dir / 'study.db'}").get_trials()
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    lost = [t.number for t in trials if t.user_attrs.get("lost")]
    restarts = sum("restarting the process" in line for line in done.stderr.splitlines())
    return f"exit 0 in {seconds:.0f} s: {complete}/3 trials COMPLETE, lost {lost}, {restarts} restart(s)"


if __name__ == "__main__":
    sys.exit(main())
