"""How fast does the merge engine build a candidate into a live model, compared with a plain weighted sum?

Builds a synthetic Llama-shaped homologous family (a base and three "fine-tunes" = base + small random deltas,
written as safetensors into a temporary folder), loads it once into ``MergeEngine`` on the CPU, and then times,
interleaved over ``--repeats`` rounds, one full build of every tensor into a live float32 ``LlamaForCausalLM``:

  (a) dare_linear      engine.build_into, density 0.5 (p = 0.5) per model, DARE 1/(1-p) rescale
  (b) dare_ties        engine.build_into, same masks plus the TIES sign election
  (c) task_arithmetic  engine.build_into, no masks
  (d) numba wsum       the fused numba ``weighted_sum`` kernel reading the same stored (bf16) models: THE BASELINE
  (e) torch wsum       torch, unfused: out = base + w0*(ft0 - base) (+ ...), widened per tensor
  (f) torch DARE       naive torch DARE: out += w/(1-p) * d * (torch.rand_like(d) >= p), per model

The models are kept as stored (bf16 files, memory-mapped) and every variant forms the deltas as it goes.
Reported per variant: median seconds per build, GB/s of stored input bytes read ((1 + n_models) * numel *
itemsize / time), the ratio to (d) (median of per-round ratios, so a slow round hits both sides), and the growth
of the peak RSS during one build (Linux ``VmHWM`` reset through ``/proc/self/clear_refs`` right before the build).

example:
  . .venv/bin/activate
  python benchmarks/bench_merge.py                       # medium (~134M params/model), 5 rounds
  python benchmarks/bench_merge.py --size small --repeats 5 --threads 1
  python benchmarks/bench_merge.py --size tiny --repeats 2   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Llama-shaped configurations (untied embeddings, full multi-head attention, 32k vocabulary unless tiny).
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=1024),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  vocab_size=32000),
    "medium": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   vocab_size=32000),
    "large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                  vocab_size=32000),
    # the memory issue's family: 0.84B parameters per model, GQA 32/4
    "0.84b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000),
}
WEIGHTS = (0.5, 0.3, 0.2)
DROP_RATE = 0.5


# ---------------------------------------------------------------------------------------------------------
# the synthetic family
# ---------------------------------------------------------------------------------------------------------
def llama_config(size: str):
    import transformers

    return transformers.LlamaConfig(tie_word_embeddings=False, max_position_embeddings=2048,
                                    architectures=["LlamaForCausalLM"], **SIZES[size])


def live_model(config):
    """A float32 LlamaForCausalLM with uninitialised weights (built on meta, then materialised: no slow init)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return model.to_empty(device="cpu").float().eval()


def write_family(root: Path, config, n_models: int, dtype: str = "bfloat16", delta_scale: float = 0.01,
                 seed: int = 0) -> tuple[Path, list[Path]]:
    """Base + ``n_models`` fine-tunes (base + N(0, delta_scale^2) noise) as safetensors folders under ``root``."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    names = ["base", *(f"ft{i}" for i in range(n_models))]
    if all((root / n / "model.safetensors").is_file() for n in names):  # written by an earlier run
        return root / "base", [root / n for n in names[1:]]
    gen = torch.Generator().manual_seed(seed)
    model = live_model(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    del model
    base = {name: (torch.randn(shape, generator=gen) * 0.02) for name, shape in shapes.items()}
    folders = []
    for i in range(n_models + 1):
        folder = root / ("base" if i == 0 else f"ft{i - 1}")
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        if i == 0:
            tensors = {n: t.to(torch_dtype).contiguous() for n, t in base.items()}
        else:
            tensors = {n: (t + torch.randn(t.shape, generator=gen) * delta_scale).to(torch_dtype).contiguous()
                       for n, t in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        folders.append(folder)
    return folders[0], folders[1:]


# ---------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed_build(fn) -> tuple[float, float | None]:
    """(seconds, peak RSS growth in MiB or None) of one call of ``fn``."""
    can_reset = _reset_peak_rss()
    rss_before = _status_kb("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    growth = (_status_kb("VmHWM") - rss_before) / 1024 if can_reset else None
    return seconds, growth


def other_cpu_load() -> str:
    """Load average and the busiest other processes, so a reader can judge the noise."""
    load = os.getloadavg()
    busy = []
    try:
        import psutil

        procs = list(psutil.process_iter(["pid", "name"]))
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(0.5)
        for p in procs:
            try:
                if p.pid != os.getpid():
                    pct = p.cpu_percent(None)
                    if pct >= 20:
                        busy.append(f"{p.info['name']}({p.pid}) {pct:.0f}%")
            except psutil.Error:
                pass
    except ImportError:
        pass
    return f"loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; other busy processes: {', '.join(busy) or 'none'}"


def make_variants(engine, model, base_dir: Path, model_dirs: list[Path]):
    import numpy as np
    import torch

    from optimizer.merge import sparsify
    from optimizer.recipe import ModelSpec, Recipe

    def recipe(method: str) -> Recipe:
        models = []
        for path, w in zip(model_dirs, WEIGHTS):
            params = {"weight": w}
            if method.startswith("dare"):
                params["density"] = 1.0 - DROP_RATE
            models.append(ModelSpec(model=str(path), parameters=params))
        return Recipe(merge_method=method, models=models, base_model=str(base_dir), seed=0, rescale="dare")

    recipes = {m: recipe(m) for m in ("dare_linear", "dare_ties", "task_arithmetic")}
    targets = dict(model.state_dict())
    # (flat output view, stored base, stored fine-tunes) per tensor, resolved once, as the engine itself does
    triples = [(targets[n].view(-1), *engine.inputs(n)) for n in engine.names]
    weights = np.asarray(WEIGHTS[: len(model_dirs)], dtype=np.float32)
    kernels = sparsify.numba_kernels()

    def numba_wsum():
        for out, base, tuned in triples:
            base_bits, base_kind = sparsify.kernel_view(base)
            arrays, kinds = sparsify.kernel_views(tuned)
            kernels.weighted_sum(out.numpy(), base_bits, base_kind, arrays, kinds, kernels.F16_TABLE, weights)

    @torch.no_grad()
    def torch_wsum():
        for out, base, tuned in triples:
            wide = base.float()
            out.copy_(wide)
            for m, t in enumerate(tuned):
                out.add_(t.float() - wide, alpha=float(weights[m]))

    rescale = 1.0 / (1.0 - DROP_RATE)

    @torch.no_grad()
    def torch_dare():
        for out, base, tuned in triples:
            wide = base.float()
            out.copy_(wide)
            for m, t in enumerate(tuned):
                delta = t.float() - wide
                keep = torch.rand_like(delta) >= DROP_RATE
                out.add_(delta * keep, alpha=float(weights[m]) * rescale)

    return {
        "(a) dare_linear build_into": lambda: engine.build_into(recipes["dare_linear"], model),
        "(b) dare_ties build_into": lambda: engine.build_into(recipes["dare_ties"], model),
        "(c) task_arithmetic build_into": lambda: engine.build_into(recipes["task_arithmetic"], model),
        "(d) numba weighted_sum_kernel [baseline]": numba_wsum,
        "(e) torch unfused weighted sum": torch_wsum,
        "(f) torch naive DARE (rand_like)": torch_dare,
    }, recipes


def check_agreement(engine, model, variants, recipes) -> float:
    """Max |task_arithmetic build - numba weighted sum| over all parameters (should be float32 rounding)."""
    variants["(d) numba weighted_sum_kernel [baseline]"]()
    reference = {n: t.clone() for n, t in model.state_dict().items()}
    engine.build_into(recipes["task_arithmetic"], model)
    worst = 0.0
    for n, t in model.state_dict().items():
        worst = max(worst, float((t - reference[n]).abs().max()))
    del reference
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="medium",
                        help="model shape: tiny (~0.6M params), small (~58M), medium (~134M, default), large (~219M)")
    parser.add_argument("--models", type=int, default=3, choices=(1, 2, 3), help="fine-tunes in the family (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; every variant runs once per round (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="numba and torch threads (default: numba's and torch's own defaults)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the synthetic family (default: a temporary folder, deleted afterwards)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    if args.threads is not None:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    import numba
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from optimizer.merge import sparsify
    from optimizer.merge.engine import MergeEngine

    config = llama_config(args.size)
    load_before = other_cpu_load()
    tmp = tempfile.TemporaryDirectory(prefix="mergeopt-bench-") if args.workdir is None else None
    root = Path(tmp.name) if tmp else args.workdir
    t0 = time.perf_counter()
    base_dir, model_dirs = write_family(root, config, args.models)
    t1 = time.perf_counter()
    engine = MergeEngine(base_dir, model_dirs, device="cpu")
    t2 = time.perf_counter()
    model = live_model(config)
    n_params = sum(engine.stored_weights(0)[n].numel() for n in engine.names)
    itemsize = engine.stored_weights(0)[engine.names[0]].element_size()
    delta_bytes = n_params * (len(model_dirs) + 1) * itemsize  # the stored bytes one build reads
    print(f"family: {args.size}, {n_params / 1e6:.1f}M params/model, {len(model_dirs)} fine-tunes, "
          f"{len(engine.names)} tensors; written in {t1 - t0:.1f}s, engine loaded in {t2 - t1:.1f}s", file=sys.stderr)

    variants, recipes = make_variants(engine, model, base_dir, model_dirs)
    t3 = time.perf_counter()
    for fn in variants.values():  # JIT compile / cache load, first-touch page faults
        fn()
    print(f"warm-up (compile + first touch) {time.perf_counter() - t3:.1f}s", file=sys.stderr)
    agreement = check_agreement(engine, model, variants, recipes)

    names = list(variants)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    growth: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate so no variant always runs first
        for name in order:
            s, g = timed_build(variants[name])
            seconds[name].append(s)
            if g is not None:
                growth[name].append(g)
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    load_after = other_cpu_load()

    baseline = "(d) numba weighted_sum_kernel [baseline]"
    rows = []
    for name in names:
        med = statistics.median(seconds[name])
        ratios = [b / s for s, b in zip(seconds[name], seconds[baseline])]
        rows.append(dict(variant=name, median_s=med, min_s=min(seconds[name]), max_s=max(seconds[name]),
                         delta_gbps=delta_bytes / med / 1e9, speed_vs_baseline=statistics.median(ratios),
                         peak_rss_growth_mib=max(growth[name]) if growth[name] else None))

    info = dict(size=args.size, params_per_model=n_params, fine_tunes=len(model_dirs), tensors=len(engine.names),
                delta_bytes=delta_bytes, repeats=args.repeats, drop_rate=DROP_RATE, weights=WEIGHTS[: len(model_dirs)],
                numba_threads=numba.get_num_threads(), numba_threading_layer=_threading_layer(),
                torch_threads=torch.get_num_threads(), cpu=_cpu_name(), cores=os.cpu_count(),
                python=platform.python_version(), torch=torch.__version__, numba=numba.__version__,
                chunk=sparsify.numba_kernels().CHUNK, max_abs_diff_task_arithmetic_vs_wsum=agreement,
                load_before=load_before, load_after=load_after)

    print(f"\n**{args.size}**: {n_params / 1e6:.1f}M params/model x {len(model_dirs)} fine-tunes "
          f"({delta_bytes / 1e9:.2f} GB of stored inputs read per build), {len(engine.names)} tensors, "
          f"{args.repeats} interleaved rounds; numba {info['numba_threads']} threads "
          f"({info['numba_threading_layer']}), torch {info['torch_threads']} threads\n")
    print("| variant | median s/build | min-max s | input GB/s | speed vs (d) | peak RSS growth MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        g = "n/a" if row["peak_rss_growth_mib"] is None else f"{row['peak_rss_growth_mib']:.1f}"
        print(f"| {row['variant']} | {row['median_s']:.3f} | {row['min_s']:.3f}-{row['max_s']:.3f} | "
              f"{row['delta_gbps']:.2f} | {row['speed_vs_baseline']:.2f} | {g} |")
    dare = next(r for r in rows if r["variant"].startswith("(a)"))
    ties = next(r for r in rows if r["variant"].startswith("(b)"))
    for label, row in (("dare_linear (a)", dare), ("dare_ties (b)", ties)):
        verdict = "MEETS" if row["speed_vs_baseline"] >= 0.8 else "MISSES"
        print(f"\nDARE build {label} runs at {row['speed_vs_baseline']:.0%} of the fused weighted sum: "
              f"{verdict} the >= 80% target.")
    print(f"task_arithmetic build vs numba weighted sum: max |diff| = {agreement:.2e}")
    print(f"load before: {load_before}\nload after:  {load_after}")
    if args.json:
        args.json.write_text(json.dumps(dict(info=info, rows=rows, seconds=seconds), indent=2))
    if tmp:
        tmp.cleanup()
    return 0


def _threading_layer() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
