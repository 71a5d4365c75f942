"""A character-level tokenizer written as standard Hugging Face fast-tokenizer files.

``save_tokenizer(folder)`` writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``;
``transformers.AutoTokenizer.from_pretrained(folder)`` then loads it offline as a fast tokenizer (vLLM too, since
it reads the same files). Each character is one token; encoding prepends ``<bos>``; decoding joins tokens with no
separator, so ``decode(encode(text), skip_special_tokens=True) == text`` for any text over the vocabulary.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
CHARACTERS: tuple[str, ...] = tuple(" " + string.digits + string.ascii_lowercase + "+-=:,.;|()")
VOCAB: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[token] for token in SPECIAL_TOKENS)
VOCAB_SIZE = 56
"""Embedding rows: the vocabulary rounded up to a multiple of 8 (spare rows are never produced by encoding)."""
assert len(VOCAB) <= VOCAB_SIZE

MODEL_MAX_LENGTH = 64


def encode(text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS (a fast path for training, equal to the saved tokenizer's ids)."""
    return [VOCAB.get(char, UNK_ID) for char in text]


def build_tokenizer() -> Tokenizer:
    """The backend ``tokenizers.Tokenizer``: one token per character, ``<bos>`` prepended."""
    tokenizer = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK))
    # Split every character off on its own (spaces included), then look each one up in the vocabulary.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, BOS_ID)],
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def save_tokenizer(folder: Path) -> None:
    """Write the tokenizer files into ``folder`` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
