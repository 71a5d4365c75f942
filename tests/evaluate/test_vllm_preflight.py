"""What the vllm backend refuses is refused before any model loads or any run file exists (the default tier: the
project's venv has no vLLM)."""

import importlib.util
import subprocess
import sys

import pytest
from helpers import tiny_family, write_space

from optimizer.evaluate.vllm import tied_embedding


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
