"""The memory plan (sized from headers or, for weightless templates, on the meta device) and --threads."""

import json
import subprocess
import sys

import pytest
import yaml

from optimizer.errors import MergeoptError
from optimizer.merge.memory import GiB, model_size, plan_memory

# Llama-3-8B's published configuration: 8.03B parameters, untied, bf16
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def template_8b(tmp_path_factory):
    """The lm_eval_example template's family as configs alone: base + 3 fine-tunes, no weights."""
    root = tmp_path_factory.mktemp("8b")
    folders = []
    for name in ("llama-3-8b", "llama-3-8b-math", "llama-3-8b-code", "llama-3-8b-chat"):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(LLAMA3_8B))
        folders.append(root / name)
    return folders


def test_a_config_alone_is_sized_on_the_meta_device(template_8b):
    size = model_size(template_8b[0])
    assert size.from_config and size.dtype == "bfloat16"
    assert size.parameters == 8_030_261_248  # Llama-3-8B's parameter count
    assert size.nbytes == 2 * size.parameters
    assert size.largest == 128256 * 4096


def test_sizes_from_headers_match_the_files(llama_family):
    base, _ = llama_family
    size = model_size(base)
    assert not size.from_config and size.dtype == "float32"
    assert size.nbytes == pytest.approx((base / "model.safetensors").stat().st_size, rel=0.02)


def test_8b_template_fits_an_h200_beside_vllm_and_is_refused_on_80gb(template_8b):
    base, *models = template_8b
    plan = plan_memory(base, models, engine_device="cuda:0", backend="vllm", live_dtype="bfloat16",
                       device_memory=int(139.7 * GiB))
    assert plan.fits
    text = plan.text()
    assert "4 models x 15.0 GiB bfloat16 on cuda:0" in text and "vLLM gpu_memory_utilization 0.5" in text
    small = plan_memory(base, models, engine_device="cuda:0", backend="vllm", live_dtype="bfloat16",
                        device_memory=80 * GiB)
    with pytest.raises(MergeoptError) as err:
        small.check()
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("100.1 GiB needed of 80.0 GiB on cuda:0 (engine: 59.8 GiB; scoring: 40.0 GiB")
    assert "lower vLLM's gpu_memory_utilization" in line and "--engine-device cpu" in line
    assert "merge fewer models" in line and "larger card" in line
    # the way out it names works: models mapped on the host, only vLLM's share on the card
    hosted = plan_memory(base, models, engine_device="cpu", scoring_device="cuda:0", backend="vllm",
                         live_dtype="bfloat16", device_memory=80 * GiB)
    assert hosted.fits and hosted.host_needed >= 4 * 14.9 * GiB


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "optimizer.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.slow  # 5-10 s of subprocesses: the slow tier (CI runs it) keeps the fast tier under 3 minutes
def test_search_plan_prints_and_refuses_before_anything_is_created(template_8b, tmp_path):
    space = yaml.safe_load(open("search_spaces/lm_eval_example.yaml"))
    space["base_model"] = str(template_8b[0])
    space["models"] = [str(m) for m in template_8b[1:]]
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    run_dir = tmp_path / "run"
    ok = run_cli("search", str(path), "--plan", "--device", "cuda:0", "--gpu-memory", "139.7GiB",
                 "--run-dir", str(run_dir))
    assert ok.returncode == 0, ok.stderr
    assert "memory plan:" in ok.stdout and "4 models x 15.0 GiB bfloat16 on cuda:0" in ok.stdout
    refused = run_cli("search", str(path), "--plan", "--device", "cuda:0", "--gpu-memory", "80GB",
                      "--run-dir", str(run_dir))
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "needed of 80.0 GiB on cuda:0" in errors[0]
    assert not run_dir.exists()


def test_merge_plan_loads_nothing(llama_family, tmp_path):
    base, models = llama_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                      "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]}))
    out = tmp_path / "merged"
    result = run_cli("merge", str(recipe), "--out", str(out), "--plan", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "engine      4 models" in result.stdout and not out.exists()


def test_threads_are_set_together_and_bad_counts_refused():
    code = ("import sys; from optimizer.cli import configure_threads; n = configure_threads(1); import numba, torch, "
            "os; print(n, torch.get_num_threads(), numba.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1", "1", "1"]
    bad = run_cli("merge", "x.yaml", "--out", "y", "--threads", "0")
    assert bad.returncode == 1 and "--threads must be at least 1" in bad.stderr


def test_adapters_are_planned_at_their_own_size_from_configs_alone(template_8b, tmp_path):
    """An 8B base (config only) with 10 rank-16 adapters on every linear module (adapter_config.json only): each
    adapter is sized from its configuration over the base's modules on the meta device, the scratch counts one
    adapted tensor per adapter, and the whole fits an 80 GB card beside vLLM where the same 10 dense do not."""
    from optimizer.merge.memory import adapter_size

    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = []
    for i in range(10):
        folder = tmp_path / f"adapter-{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                                                                "target_modules": linear}))
        adapters.append(folder)
    size = adapter_size(adapters[0], template_8b[0])
    # per layer: 16 x (in + out) of q (4096+4096), k and v (4096+1024), o (4096+4096), gate, up, down (4096+14336)
    assert size.from_config and size.parameters == 32 * 16 * 81920 and size.nbytes == 4 * size.parameters
    assert size.largest == 14336 * 4096
    plan = plan_memory(template_8b[0], [str(a) for a in adapters], engine_device="cuda:0", backend="vllm",
                       live_dtype="bfloat16", device_memory=80 * GiB)
    text = plan.text()
    assert "base 15.0 GiB bfloat16 on cuda:0" in text and "10 LoRA adapters (1.6 GiB in all, float32)" in text
    assert "10 adapted tensors of 58,720,256 elements" in text
    assert plan.fits
    dense = plan_memory(template_8b[0], template_8b[1:] * 3 + template_8b[1:2], engine_device="cuda:0",
                        backend="vllm", live_dtype="bfloat16", device_memory=80 * GiB)
    assert not dense.fits


def test_adapter_files_are_planned_from_their_headers(llama_family, tmp_path):
    from helpers import make_adapter

    pytest.importorskip("peft")
    base, _ = llama_family
    adapter = make_adapter(base, tmp_path / "a", r=4, targets=("q_proj", "down_proj"))
    plan = plan_memory(base, [f"{base}+{adapter}", str(adapter)], engine_device="cpu", backend=None)
    adapters = next(row for row in plan.rows if row[0] == "adapters")
    file = adapter / "adapter_model.safetensors"
    assert adapters[2] == 2 * (file.stat().st_size - 8 - int.from_bytes(file.read_bytes()[:8], "little"))
    assert "2 LoRA adapters" in adapters[1]
    scratch = next(row for row in plan.rows if row[0] == "scratch")
    assert "2 adapted tensors of 6,144 elements" in scratch[1]  # down_proj: 64 x 96
