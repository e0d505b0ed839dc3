"""Tokenizers of the other families, built offline: SentencePiece-style (Metaspace + byte fallback)
and a tiktoken encoding made from ranks (tiktoken cannot download its files here)."""

from __future__ import annotations

from functools import cache


@cache
def metaspace_tokenizer():
    """A Llama-2-style BPE: Metaspace pre-tokenizer, <0xNN> byte fallback, <s>/</s>/<unk>."""
    from scripts.make_tiny_models import build_metaspace_tokenizer

    return build_metaspace_tokenizer()


@cache
def metaspace_tokenizer_special_bytes():
    """The same family, but its <0xNN> byte-fallback tokens are *special* added tokens (as the
    ``tokenizers`` BPE trainer makes them when given as its special tokens); byte fallback is on."""
    from scripts.make_tiny_models import build_metaspace_tokenizer_special_bytes

    return build_metaspace_tokenizer_special_bytes()


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
