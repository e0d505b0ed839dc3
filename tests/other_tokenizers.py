"""Tokenizers of the other families, built offline: SentencePiece-style (Metaspace + byte fallback)
and a tiktoken encoding made from ranks (tiktoken cannot download its files here)."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path


def _training_text() -> list[str]:
    stdlib = Path(os.__file__).parent
    files = sorted(stdlib.glob("*.py"))[:60]
    return [f.read_text(encoding="utf-8", errors="ignore") for f in files]


@cache
def metaspace_tokenizer(vocab_size: int = 800):
    """A Llama-2-style BPE: Metaspace pre-tokenizer, <0xNN> byte fallback, <s>/</s>/<unk>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False
    )
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    draft.train_from_iterator(_training_text(), trainer=trainer)
    trained = json.loads(draft.to_str())["model"]
    # As in Llama-2, the 256 byte pieces are ordinary vocabulary entries right after the specials.
    vocab = {t: i for i, t in enumerate(specials)}
    vocab |= {f"<0x{b:02X}>": len(specials) + b for b in range(256)}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiktoken_encoding():
    """A small tiktoken Encoding: all 256 bytes plus a few merges, and one special token."""
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)}
    for merged in (b"he", b"the", b" t", b" the", b"in", b"ing", b"de", b"def", b" m", b"ma"):
        ranks[merged] = len(ranks)
    return tiktoken.Encoding(
        name="tiny_test",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )


def tiktoken_twin(hf_tokenizer):
    """A tiktoken Encoding with the same ids and token bytes as a byte-level HF tokenizer, standing
    in for an OpenAI encoding (cl100k and friends cannot be downloaded here)."""
    import tiktoken

    from proxyclient.vocab import from_hf

    vocab = from_hf(hf_tokenizer)
    ranks = {data: i for i, data in enumerate(vocab.token_bytes) if data is not None}
    specials = {t: i for t, i in zip(hf_tokenizer.all_special_tokens,
                                     hf_tokenizer.all_special_ids, strict=True)}  # fmt: skip
    return tiktoken.Encoding(
        "tiny_twin",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens=specials,
    )
