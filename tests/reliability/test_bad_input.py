"""Bad input is refused before anything is spent: one line naming the problem, no trial, no study, no run folder."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from helpers import write_space
from reliability_helpers import mergeopt_cli, variant
from safetensors.torch import load_file

from optimizer.errors import MergeoptError
from optimizer.search.loop import run_search
from optimizer.space import load_space

REPO = Path(__file__).resolve().parents[2]


def refused(space_path, run_dir, match):
    """run_search refuses with ``match`` and leaves no run folder, hence no study and no trial."""
    with pytest.raises(MergeoptError, match=match) as info:
        run_search(load_space(space_path), run_dir, progress=False)
    assert "\n" not in str(info.value)
    assert not run_dir.exists(), "the refusal came after the run folder (and maybe the study) was created"


def _widen(state):
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)


def _drop(state):
    del state["model.layers.1.self_attn.k_proj.weight"]


@pytest.mark.parametrize("name,edit,config_edit,match", [
    ("m_shape", _widen, None, r"tensor model\.layers\.1\.mlp\.up_proj\.weight has shape \[96, 64\] .* \[100, 64\]"),
    ("m_missing", _drop, None, r"tensor model\.layers\.1\.self_attn\.k_proj\.weight .* is missing from .*m_missing"),
    ("m_vocab", None, lambda c: c.update(vocab_size=c["vocab_size"] + 7), r"vocab_size \d+ .* must share one tokenizer"),
])
def test_models_that_are_not_homologous_are_refused_before_the_search(search_setup, tmp_path, figures, name, edit,
                                                                      config_edit, match):
    bad = variant(search_setup, name, edit, config_edit)
    space = write_space(search_setup, f"nonhom-{name}", models=[str(search_setup / "models" / "m1"), str(bad)])
    refused(space, tmp_path / "run", match)
    figures("bad input refused before any trial")


def test_corrupt_truncated_pickled_and_configless_models(search_setup, tmp_path, figures):
    data = (search_setup / "models" / "m1" / "model.safetensors").read_bytes()
    cases = {
        "m_trunc": (lambda f: (f / "model.safetensors").write_bytes(data[: len(data) // 2]), "corrupt or truncated"),
        "m_garbage": (lambda f: (f / "model.safetensors").write_bytes(b"\x07" * 64), "corrupt or truncated"),
        "m_noconf": (lambda f: (f / "config.json").unlink(), "has no config.json"),
        "m_pickle": (lambda f: (torch.save(load_file(f / "model.safetensors"), f / "pytorch_model.bin"),
                                (f / "model.safetensors").unlink()), r"pickled weights .*--allow-pickle"),
    }
    for name, (breakit, match) in cases.items():
        folder = variant(search_setup, name)
        breakit(folder)
        space = write_space(search_setup, f"broken-{name}", models=[str(search_setup / "models" / "m1"), str(folder)])
        refused(space, tmp_path / name, match)
        figures("bad input refused before any trial")


class _Payload:
    """A pickle that runs code when loaded without weights_only (it would create a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weights_load_only_with_opt_in_and_weights_only(search_setup, tmp_path, figures):
    from optimizer.merge.checkpoint import load_state_dict

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((search_setup / "models" / "m1" / "config.json").read_text())
    state = load_file(search_setup / "models" / "m1" / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(MergeoptError, match="--allow-pickle"):
        load_state_dict(folder)
    loaded = load_state_dict(folder, allow_pickle=True)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # a pickle carrying code is refused even with the opt-in: weights_only=True never runs it
    marker = tmp_path / "code-ran"
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"w": _Payload(marker)}, handle, protocol=2)
    with pytest.raises(MergeoptError, match="cannot be loaded with weights_only=True"):
        load_state_dict(folder, allow_pickle=True)
    assert not marker.exists()
    figures("malicious pickle refused")


def _remote_code(config):
    config.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


def test_a_model_that_needs_remote_code_is_refused(search_setup, tmp_path, figures):
    folder = variant(search_setup, "m_remote", config_edit=_remote_code)
    marker = tmp_path / "remote-code-ran"
    for module in ("configuration_evil.py", "modeling_evil.py"):
        (folder / module).write_text(f"open({str(marker)!r}, 'w').close()\n")
    space = write_space(search_setup, "remote", models=[str(search_setup / "models" / "m1"), str(folder)])
    refused(space, tmp_path / "run", "needs custom model code .*trust_remote_code stays off")
    proc = mergeopt_cli("eval", folder, "--tasks", search_setup / "tasks.yaml", "--limit", 2)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "needs custom model code" in proc.stderr
    assert not marker.exists()
    figures("bad input refused before any trial", injected=2, survived=2)


def test_no_code_path_turns_trust_remote_code_on():
    """Every trust_remote_code in the package defaults to False and no call passes a literal True."""
    seen = 0
    for path in sorted((REPO / "optimizer").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                seen += 1
                assert not (isinstance(node.value, ast.Constant) and node.value.value is not False), \
                    f"{path}:{node.value.lineno} passes trust_remote_code={ast.unparse(node.value)}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                    + node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg == "trust_remote_code":
                        assert isinstance(default, ast.Constant) and default.value is False, \
                            f"{path}:{node.lineno} {node.name}: trust_remote_code must default to False"
    assert seen >= 2  # the hf and vllm backends pass it through
    for path in (REPO / "optimizer").rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text().replace(" ", ""), path


# ---- search-space YAML through the CLI ------------------------------------------------------------------
SPACE_ERRORS = {
    "unknown key": ({"wieghts": 1}, "unknown key 'wieghts'"),
    "wrong type": ({"limit": "ten"}, "limit: must be a positive integer, got 'ten'"),
    "wrong type (seed)": ({"seed": [1]}, "seed: must be an integer"),
    "bounds reversed": ({"bounds": {"weight": [1.0, 0.2]}}, "bounds.weight: low 1.0 is above high 0.2"),
    "bounds out of range": ({"bounds": {"drop_rate": [0.1, 1.2]}}, "bounds.drop_rate: must lie within"),
    "objective task missing": ({"objectives": ["gen", "arithmetic"]}, "objective task 'arithmetic' is not in the task set"),
    "empty model list": ({"models": []}, "models: must be a non-empty list"),
    "not a mapping": (None, "a search space is a mapping"),
}


def test_search_space_errors_are_one_line_naming_the_key(search_setup, tmp_path, capsys, figures):
    """``mergeopt search`` (its main(), in this process: same code path, no interpreter start per case)."""
    from optimizer.cli import main

    for label, (override, match) in SPACE_ERRORS.items():
        slug = label.replace(" ", "-").replace("(", "").replace(")", "")
        if override is None:
            path = tmp_path / "list.yaml"
            path.write_text("- base_model\n- models\n")
        else:
            path = write_space(search_setup, f"cli-{slug}", **override)
        run_dir = tmp_path / slug
        code = main(["search", str(path), "--run-dir", str(run_dir), "--quiet"])
        err = capsys.readouterr().err
        assert code == 1, (label, err)
        assert err.count("\n") == 1 and err.startswith("mergeopt search: error: "), (label, err)
        assert match in err and "Traceback" not in err, (label, err)
        assert not run_dir.exists(), label
        figures("bad input refused before any trial")


def test_a_bad_space_through_the_real_command(search_setup, tmp_path):
    path = write_space(search_setup, "cli-subprocess", bounds={"weight": [1.0, 0.2]})
    proc = mergeopt_cli("search", path, "--run-dir", tmp_path / "run")
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr == f"mergeopt search: error: {path}: bounds.weight: low 1.0 is above high 0.2 " \
                          "(expected {weight: [lo, hi], drop_rate: [lo, hi]} and the method's other genes, e.g. t, " \
                          "gamma, epsilon, lambda)\n"


@pytest.mark.slow  # 5-10 s of subprocesses: the slow tier (CI runs it) keeps the fast tier under 3 minutes
def test_a_model_with_nan_or_inf_weights_is_refused_before_the_search(search_setup, inf_model, tmp_path, figures):
    def nan(state):
        state["model.layers.1.self_attn.q_proj.weight"][3, :5] = float("nan")

    cases = {"m_inf": (inf_model, r"tensor model\.layers\.0\.mlp\.down_proj\.weight of .*m_inf holds 1 NaN or "
                                  r"infinite value; the checkpoint is damaged"),
             "m_nan": (variant(search_setup, "m_nan", nan), r"model\.layers\.1\.self_attn\.q_proj\.weight of .*m_nan "
                                                            r"holds 5 NaN or infinite values")}
    for name, (folder, match) in cases.items():
        space = write_space(search_setup, f"nonfinite-{name}", models=[str(search_setup / "models" / "m1"),
                                                                        str(folder)])
        refused(space, tmp_path / name, match)
        figures("bad input refused before any trial")
    # scoring the damaged model on its own is not refused (no merge reads it), but it fails with the reason
    proc = mergeopt_cli("eval", inf_model, "--tasks", search_setup / "tasks.yaml", "--limit", "2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "NaN or infinite logits" in proc.stderr.splitlines()[-1]
