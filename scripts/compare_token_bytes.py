"""proxyclient's token bytes (``from_hf`` / ``from_tiktoken``) against llguidance's and xgrammar's.

For each tokenizer: the time each takes to produce the id -> bytes table, and the ids where the
tables disagree: different bytes for an ordinary token, or a token one side calls special (no
bytes) and the other gives bytes. Libraries that are not installed are skipped; neither is a
dependency of proxyclient. Run it in an environment that has them, for example:

    python -m venv /tmp/tokvenv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > /tmp/tokvenv/lib/python3.11/site-packages/project.pth
    /tmp/tokvenv/bin/pip install llguidance apache-tvm-ffi
    /tmp/tokvenv/bin/pip install --no-deps xgrammar
    /tmp/tokvenv/bin/python scripts/compare_token_bytes.py --real DIR

(xgrammar asks for torch and triton; ``--no-deps`` keeps the project's torch.)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxyclient.vocab import ByteVocab, from_hf, from_tiktoken
from scripts.make_tiny_models import build_tiny_models
from scripts.real_tokenizers import hf_tokenizer, openai_encoding

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Table:
    """One library's answer: bytes per id (None where it has none) and its special ids."""

    token_bytes: list[bytes | None]
    special: set[int]
    seconds: float
    note: str = ""


@dataclass
class Diff:
    differ: list[int] = field(default_factory=list)  # ordinary on both sides, bytes differ
    ours_only_special: list[int] = field(default_factory=list)  # we: special; they: bytes
    theirs_only_special: list[int] = field(default_factory=list)  # we: bytes; they: special
    compared: int = 0


def diff(ours: ByteVocab, theirs: Table, upto: int | None = None) -> Diff:
    result = Diff()
    size = upto if upto is not None else max(len(ours), len(theirs.token_bytes))
    for i in range(size):
        mine = ours.token_bytes[i] if i < len(ours) else None
        other = theirs.token_bytes[i] if i < len(theirs.token_bytes) else None
        other_special = i in theirs.special or other is None
        if mine is None and other_special:
            continue
        result.compared += 1
        if mine is None:
            result.ours_only_special.append(i)
        elif other_special:
            result.theirs_only_special.append(i)
        elif mine != other:
            result.differ.append(i)
    return result


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def ours(inner: Any) -> Table:
    is_tiktoken = hasattr(inner, "decode_single_token_bytes")
    vocab, seconds = timed(lambda: from_tiktoken(inner) if is_tiktoken else from_hf(inner))
    return Table(list(vocab.token_bytes), set(vocab.special_ids), seconds)


def llguidance_table(inner: Any) -> Table | None:
    try:
        import llguidance.hf
        import llguidance.tiktoken
    except ImportError:
        return None

    def run() -> tuple[list[bytes | None], set[int]]:
        if hasattr(inner, "decode_single_token_bytes"):
            tok = llguidance.tiktoken.lltokenizer_from_encoding(inner)
        else:
            tok = llguidance.hf.from_tokenizer(inner)
        special = {i for i in range(tok.vocab_size) if tok.is_special_token(i)}
        table = [None if i in special else tok.decode_bytes([i]) for i in range(tok.vocab_size)]
        return table, special

    (table, special), seconds = timed(run)
    return Table(table, special, seconds)


def xgrammar_table(inner: Any) -> Table | None:
    try:
        import xgrammar
    except ImportError:
        return None
    note = ""
    if hasattr(inner, "decode_single_token_bytes"):  # no tiktoken path: go through HF's converter
        inner, convert_s = timed(lambda: hf_from_tiktoken(inner))
        note = f"via transformers' TikTokenConverter ({convert_s:.1f} s, not counted)"

    def run() -> tuple[list[bytes | None], set[int]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = xgrammar.TokenizerInfo.from_huggingface(inner)
        return list(info.decoded_vocab), set(info.special_token_ids)

    (table, special), seconds = timed(run)
    return Table(table, special, seconds, note)


def hf_from_tiktoken(encoding: Any) -> Any:
    """The HF fast tokenizer transformers makes of a tiktoken encoding (ordinary ids agree)."""
    import base64
    import tempfile

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "ranks.tiktoken")
        ranks = sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1])
        lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks]
        Path(path).write_text("".join(lines))
        converter = TikTokenConverter(
            vocab_file=path,
            pattern=encoding._pat_str,
            extra_special_tokens=encoding._special_tokens,
        )
        return PreTrainedTokenizerFast(tokenizer_object=converter.converted())


def show(ids: list[int], ours: Table, theirs: Table, n: int = 3) -> str:
    def one(i: int) -> str:
        mine = ours.token_bytes[i] if i < len(ours.token_bytes) else None
        other = theirs.token_bytes[i] if i < len(theirs.token_bytes) else None
        return f"{i}: ours {mine!r} / theirs {other!r}"

    return "; ".join(one(i) for i in ids[:n])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, help="a folder written by real_tokenizers.py")
    parser.add_argument("--tiny", type=Path, default=REPO / ".cache" / "tiny-models")
    args = parser.parse_args(argv)
    tiny = build_tiny_models(args.tiny)
    sources: dict[str, Callable[[], Any]] = {
        "tiny byte-level BPE": lambda: hf_tokenizer(tiny["base"]),
        "tiny Metaspace": lambda: hf_tokenizer(tiny["anti_expert_sp"]),
    }
    if args.real:
        real = args.real
        sources["cl100k_base"] = lambda: openai_encoding(
            "cl100k_base", real / "cl100k_base.tiktoken"
        )
        sources["o200k_base"] = lambda: openai_encoding("o200k_base", real / "o200k_base.tiktoken")
        sources["Llama-2"] = lambda: hf_tokenizer(real / "llama2")
        sources["Llama-3"] = lambda: hf_tokenizer(real / "llama3")

    header = "| tokenizer | V | ours s | library | library s | compared | bytes differ | "
    header += "special: ours only | special: theirs only |"
    lines = [header, "|" + "---|" * header.count(" | ")]
    notes = []
    for name, load in sources.items():
        inner = load()
        mine = ours(inner)
        vocab = ByteVocab(tuple(mine.token_bytes), frozenset(mine.special))
        is_tiktoken = hasattr(inner, "decode_single_token_bytes")
        for library, make in (("llguidance", llguidance_table), ("xgrammar", xgrammar_table)):
            theirs = make(inner)
            if theirs is None:
                notes.append(f"{library}: not installed")
                continue
            # transformers' converter numbers tiktoken's special tokens anew: compare ranks only.
            upto = len(inner._mergeable_ranks) if is_tiktoken and library == "xgrammar" else None
            d = diff(vocab, theirs, upto)
            lines.append(
                f"| {name} | {len(vocab):,} | {mine.seconds:.3f} | {library} | "
                f"{theirs.seconds:.3f} | {d.compared:,} | {len(d.differ)} | "
                f"{len(d.ours_only_special)} | {len(d.theirs_only_special)} |"
            )
            for label, ids in (("bytes differ", d.differ),
                               ("special: ours only", d.ours_only_special),
                               ("special: theirs only", d.theirs_only_special)):  # fmt: skip
                if ids:
                    notes.append(f"{name} / {library} / {label}: {show(ids, mine, theirs)}")
            if theirs.note:
                notes.append(f"{name} / {library}: {theirs.note}")
        if is_tiktoken:  # our two paths must agree: from_tiktoken and from_hf of HF's conversion
            converted = from_hf(hf_from_tiktoken(inner))
            upto = len(inner._mergeable_ranks)
            same = converted.token_bytes[:upto] == vocab.token_bytes[:upto]
            notes.append(f"{name}: from_hf(converted) == from_tiktoken on {upto:,} ranks: {same}")
    print("\n".join(lines))
    print()
    print("\n".join(dict.fromkeys(notes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
