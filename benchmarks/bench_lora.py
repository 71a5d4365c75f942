"""LoRA adapters at many models (issue 22): build time and memory per candidate, adapters against dense fine-tunes.

On a synthetic Llama-shaped bf16 base (bench_merge.py's sizes) it writes 8 rank-16 LoRA adapters in PEFT's format
(adapter_config.json + adapter_model.safetensors, float32 factors as PEFT saves them), the same 8 as dense
fine-tunes (their merged checkpoints, as PEFT's merge_and_unload writes them: only the adapted tensors differ from
the base), and 3 dense fine-tunes of the kind full fine-tuning makes (every tensor changed). Then it builds
``--builds`` dare_ties candidates (density 0.5) into a live model with each input set, interleaved round by round
so that load on the machine falls on all of them alike, and prints one JSON line per input set: median seconds per
build, the bytes the engine holds (mapped checkpoints + adapter tensors) and the peak RSS growth during one build.

``--plan`` prints instead the memory plan of an 8B base (Llama-3-8B's configuration, no weights) with 10 rank-16
adapters on all linear modules (configurations only), on 24, 80 and 141 GB cards.

examples:
  python benchmarks/bench_lora.py --root /tmp/bench-lora --size large --builds 5
  python benchmarks/bench_lora.py --root /tmp/bench-lora --size large --targets q_proj,v_proj --builds 5
  python benchmarks/bench_lora.py --plan
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import SIZES, llama_config, other_cpu_load, timed_build, write_family  # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def write_adapter(folder: Path, base: Path, shapes: dict[str, tuple[int, ...]], targets: tuple[str, ...], rank: int,
                  seed: int, scale: float = 0.01) -> Path:
    """A PEFT LoRA adapter folder on ``base`` (rank ``rank`` on the ``targets`` of every layer), written directly."""
    import torch
    from safetensors.torch import save_file

    if (folder / "adapter_model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        out_features, in_features = shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * scale
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * scale
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
        "base_model_name_or_path": str(base), "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}))
    return folder


def write_merged(engine, index: int, folder: Path) -> Path:
    """Input ``index`` of the engine (an adapter) as the dense checkpoint its merge_and_unload would write."""
    from optimizer.merge import checkpoint

    if (folder / "model.safetensors").is_file():
        return folder
    store = engine.stored_weights(index)
    checkpoint.write_model_folder(folder, ((n, store[n].view(engine.shapes[n]).clone()) for n in engine.names),
                                  engine.base_path, engine.stored_dtype())
    return folder


def measure(args) -> int:
    import torch

    from optimizer.merge.engine import MergeEngine
    from optimizer.recipe import ModelSpec, Recipe

    torch.set_num_threads(args.threads) if args.threads else None
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-lora-"))
    config = llama_config(args.size)
    base, dense3 = write_family(root / args.size, config, 3, dtype="bfloat16", delta_scale=0.001)
    targets = tuple(args.targets.split(","))
    tag = "all-linear" if set(targets) == set(ALL_LINEAR) else "-".join(targets)
    from optimizer.merge.checkpoint import tensor_shapes

    shapes = tensor_shapes(base)
    adapters = [write_adapter(root / args.size / f"lora-{tag}-r{args.rank}-{i}", base, shapes, targets, args.rank,
                              seed=i) for i in range(args.adapters)]
    as_adapters = MergeEngine(base, adapters, device="cpu", verify=False)
    merged = [write_merged(as_adapters, 1 + i, root / args.size / f"merged-{tag}-r{args.rank}-{i}")
              for i in range(args.adapters)]
    sets = {f"{args.adapters} adapters (rank {args.rank}, {tag})": adapters,
            f"the same {args.adapters} as dense checkpoints": merged,
            "3 dense fine-tunes (every tensor changed)": dense3}
    engines = {label: MergeEngine(base, models, device="cpu", verify=False) for label, models in sets.items()}
    live = __import__("transformers").AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, args.dtype))
    live.eval()
    times: dict[str, list[float]] = {label: [] for label in sets}
    growth: dict[str, list[float]] = {label: [] for label in sets}
    for round_ in range(args.builds + 1):  # round 0 warms the kernels and the page cache, not counted
        for label, engine in engines.items():
            recipe = Recipe("dare_ties", [ModelSpec(str(m), {"weight": 0.3, "density": 0.5}) for m in sets[label]],
                            base_model=str(base), seed=round_)
            seconds, rss = timed_build(lambda: engine.build_into(recipe, live))  # noqa: B023
            if round_:
                times[label].append(seconds)
                if rss is not None:
                    growth[label].append(rss)
    held_base = engines[next(iter(engines))].stored_weights(0).nbytes
    for label, engine in engines.items():
        held = sum(engine.stored_weights(i).nbytes for i in range(1 + len(sets[label])))
        print(json.dumps({
            "inputs": label, "size": args.size, "parameters": sum(t.numel() for t in live.parameters()),
            "seconds_per_build_median": round(statistics.median(times[label]), 3),
            "seconds_all": [round(t, 3) for t in times[label]],
            "engine_holds_mib": round(held / 2**20, 1), "of_which_base_mib": round(held_base / 2**20, 1),
            "peak_rss_growth_per_build_mib": round(max(growth[label]), 1) if growth[label] else None,
            "live_dtype": args.dtype, "threads": torch.get_num_threads(), "load": other_cpu_load()}))
    return 0


def plan() -> int:
    from optimizer.merge.memory import GiB, plan_memory

    root = Path(tempfile.mkdtemp(prefix="plan-8b-"))
    (root / "llama-3-8b").mkdir()
    (root / "llama-3-8b" / "config.json").write_text(json.dumps(LLAMA3_8B))
    adapters = []
    for i in range(10):
        folder = root / f"adapter-{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                                                                "target_modules": list(ALL_LINEAR)}))
        adapters.append(str(folder))
    dense = []
    for i in range(10):  # the same 10 as dense fine-tunes (configurations alone), for comparison
        (root / f"dense-{i}").mkdir()
        (root / f"dense-{i}" / "config.json").write_text(json.dumps(LLAMA3_8B))
        dense.append(str(root / f"dense-{i}"))
    for card in (24, 80, 141):
        as_dense = plan_memory(root / "llama-3-8b", dense, engine_device="cuda:0", backend="vllm",
                               live_dtype="bfloat16", device_memory=card * GiB)
        print(f"## {card} GB card: the same 10 as dense fine-tunes, engine on cuda:0 with vllm: "
              f"{'fits' if as_dense.fits else 'does not fit'} ({as_dense.device_needed / GiB:.1f} GiB)")
        for backend, engine_device in (("hf", "cuda:0"), ("hf", "cpu"), ("vllm", "cuda:0"), ("vllm", "cpu")):
            result = plan_memory(root / "llama-3-8b", adapters, engine_device=engine_device, scoring_device="cuda:0",
                                 backend=backend, live_dtype="bfloat16", device_memory=card * GiB)
            print(f"## {card} GB card, backend {backend}, engine on {engine_device}: "
                  f"{'fits' if result.fits else 'does not fit'}")
            print(result.text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="folder for the family (kept for later runs; default: a temporary folder)")
    parser.add_argument("--size", default="large", choices=sorted(SIZES))
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(ALL_LINEAR), help="comma-separated module names")
    parser.add_argument("--builds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the live model")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--plan", action="store_true", help="print the 8B / 10-adapter memory plans and exit")
    args = parser.parse_args(argv)
    return plan() if args.plan else measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
