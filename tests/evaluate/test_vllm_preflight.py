"""What the vllm backend refuses is refused before any model loads or any run file exists (the default tier: the
project's venv has no vLLM)."""

import importlib.util
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
from helpers import assert_one_line_error, run_cli, tiny_family, write_space

from optimizer.errors import MergeoptError
from optimizer.evaluate.vllm import check_engine_device, tied_embedding
from optimizer.evaluate.vllm_worker import engine_device


def test_a_search_on_vllm_without_vllm_is_refused_before_the_run_folder(search_setup, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    space = write_space(search_setup, "no-vllm", backend="vllm")
    done = subprocess.run([sys.executable, "-m", "optimizer.cli", "search", str(space), "--run-dir", str(tmp_path / "run"),
                           "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "the vllm backend needs vLLM" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists()


def test_the_tied_embedding_is_named_from_the_checkpoint_headers(tmp_path):
    tied_base, _ = tiny_family(tmp_path / "tied", 1, tied=True)
    untied_base, _ = tiny_family(tmp_path / "untied", 1)
    assert tied_embedding(tied_base) == "model.embed_tokens.weight"
    assert tied_embedding(untied_base) is None


def test_the_worker_engine_device_is_the_host_or_the_workers_own():
    import torch

    assert engine_device("cpu", "cuda:0") == torch.device("cpu")  # mapped on the host, built into the GPU's weights
    assert engine_device(None, "cuda:0") == torch.device("cuda:0")  # default: where the live weights are
    assert engine_device("cuda", "cuda:1") == torch.device("cuda:1")  # the worker's GPU, whatever its index
    assert engine_device(None, torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("command", ["search", "eval"])
def test_an_engine_device_the_worker_cannot_use_is_refused_before_the_run_folder(search_setup, tmp_path, command):
    space = write_space(search_setup, f"engine-device-{command}", backend="vllm")
    args = ([str(space), "--run-dir", str(tmp_path / "run"), "--quiet"] if command == "search"
            else [str(search_setup / "models" / "m0"), "--tasks", str(search_setup / "tasks.yaml"), "--backend", "vllm"])
    done = run_cli(command, *args, "--engine-device", "cuda:1")
    assert_one_line_error(done, "--engine-device cuda:1", "use cpu")
    assert not (tmp_path / "run").exists()
    with pytest.raises(MergeoptError, match="torch sees no CUDA device") if not torch.cuda.is_available() else nullcontext():
        check_engine_device("cuda")
    check_engine_device("cpu")


def test_a_folders_weights_are_read_from_safetensors_only(tmp_path):
    from optimizer.evaluate.vllm_worker import folder_tensors
    from optimizer.merge.checkpoint import load_state_dict

    base, _ = tiny_family(tmp_path / "models", 1)
    read = list(folder_tensors(base))
    expected = load_state_dict(base)
    assert [name for name, _ in read] and dict(read).keys() == expected.keys()
    assert all(tensor.equal(expected[name]) for name, tensor in read)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    with pytest.raises(MergeoptError, match="pickled weights"):
        list(folder_tensors(pickled))


def test_only_single_tensor_layers_holding_the_same_values_are_left_out_of_a_reload():
    """UnchangedLayers on a plain torch model laid out as vLLM's are (the worker runs it on vLLM's live model)."""
    import logging

    from optimizer.evaluate.vllm_worker import RELOAD_LOGGERS, UnchangedLayers, _ReloadNotices

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(64, 4)  # vLLM pads a vocabulary: the checkpoint's has 60 rows
    model.norm = torch.nn.LayerNorm(4, elementwise_affine=True, bias=False)  # one tensor
    model.proj = torch.nn.Linear(4, 4)  # weight and bias: never left out, even when both are equal
    unchanged = UnchangedLayers(model)
    weights = [("embed.weight", model.embed.weight.data[:60].clone()),
               ("norm.weight", model.norm.weight.data.clone()),
               ("proj.weight", model.proj.weight.data.clone()), ("proj.bias", model.proj.bias.data.clone()),
               ("extra.weight", torch.zeros(2))]
    assert [name for name, _ in unchanged.changed(weights)] == ["embed.weight", "proj.weight", "proj.bias",
                                                                "extra.weight"]
    assert unchanged.skipped == ["norm.weight"] and unchanged.unreported == {"LayerNorm": 1}
    changed_norm = UnchangedLayers(model)
    assert [n for n, _ in changed_norm.changed([("norm.weight", model.norm.weight.data + 1)])] == ["norm.weight"]
    assert not changed_norm.skipped
    # vLLM's warnings: the layer left out on purpose is dropped once, any other layer or weight still shows
    notices = _ReloadNotices()
    notices.expected = unchanged

    def record(logger, msg, *args):
        return logging.LogRecord(logger, logging.WARNING, __file__, 0, msg, args, None)

    layerwise, inplace = RELOAD_LOGGERS
    assert not notices.filter(record(layerwise, "%s: Failed to load weights", "LayerNorm"))
    assert notices.filter(record(layerwise, "%s: Failed to load weights", "LayerNorm"))  # a second one: not ours
    assert notices.filter(record(layerwise, "%s: Failed to load weights", "Linear"))
    assert not notices.filter(record(layerwise, "%s: Failed to load weights", "RotaryEmbedding"))
    message = "Following weights were not loaded from checkpoint: %s"
    assert not notices.filter(record(inplace, message, {"norm.weight"}))
    assert notices.filter(record(inplace, message, {"norm.weight", "proj.bias"}))
