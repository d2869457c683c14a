"""The Hugging Face tokenizer files (byte-level BPE) that built-in models and GGUF import write."""

from __future__ import annotations

from typing import Any

__all__ = ["added_token", "bpe_tokenizer", "byte_level", "tokenizer_config"]


def byte_level() -> dict[str, Any]:
    """The byte-level step: bytes <-> printable characters, with no splitting of its own."""
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }


def added_token(token_id: int, content: str, *, special: bool) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def bpe_tokenizer(
    vocab: dict[str, int],
    merges: list[str],
    *,
    added: list[dict[str, Any]],
    pre_tokenizer: dict[str, Any],
    post_processor: dict[str, Any] | None,
) -> dict[str, Any]:
    """tokenizer.json of a byte-level BPE tokenizer."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": byte_level(),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config(special: dict[str, str], *, add_bos: bool, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json; `special` names the bos/eos/unk/pad tokens there are."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        # Otherwise decode() rewrites " ," to "," and text stops round-tripping.
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
