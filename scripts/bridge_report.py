"""How much vocabulary a base and its proxies share, and what the bridge between them costs.

For each (base, proxy) tokenizer pair: vocabulary sizes; the shared vocabulary (base tokens with a
proxy token of exactly the same bytes) as a share of each side; the time to read each side's bytes
(``from_hf`` / ``from_tiktoken``), to build the bridge (``VocabBridge.build``) and to get it through
``cached_bridge`` cold (built and saved) and warm (loaded); and the share of base tokens, by
occurrence, that have a twin on real text (Python sources and English/CJK prose).

The tiny test pair is always reported. Real tokenizers come from ``scripts/real_tokenizers.py``
(offline once built); a row whose sources are not given is skipped:

    python scripts/bridge_report.py [--real DIR] [--cl100k FILE] [--o200k FILE]
                                    [--llama2 DIR] [--llama3 DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers.utils import logging as hf_logging

from proxyclient.bridge import VocabBridge
from proxyclient.bridge_cache import cached_bridge
from proxyclient.tokenizer import BaseTokenizer
from proxyclient.vocab import ByteVocab, from_hf, from_tiktoken
from scripts.make_tiny_models import build_tiny_models
from scripts.real_tokenizers import hf_tokenizer, openai_encoding

REPO = Path(__file__).resolve().parent.parent
CODE_FILES = ("json/decoder.py", "email/utils.py", "http/cookies.py", "textwrap.py")
CODE_CHARS = 12_000  # taken from the files above, in that order

# Written for this report: ordinary English, Chinese and Japanese prose.
PROSE = """\
The river had risen overnight, and by morning the lower fields were under a sheet of brown water.
Farmers stood along the embankment, counting what they could still reach, while children threw
sticks into the current to see how fast it ran. Nobody expected the bridge to hold another day.

今年的春天来得特别晚，山上的雪直到四月还没有化完。村里的老人说，这样的年份庄稼会长得慢一些，
但是秋天的收成不一定差。学校门口的樱花树终于开了，孩子们放学以后都喜欢在树下多待一会儿。

駅前の小さな本屋は、雨の日になると不思議と客が増える。傘をたたみながら入ってきた人たちは、
目的の本がなくても、しばらく棚の間を歩き回ってから帰っていく。店主はそれを少し嬉しく思っている。
"""


@dataclass
class Side:
    """One tokenizer: how to build it, and what proxyclient sees of it."""

    label: str
    load: Callable[[], Any]
    inner: Any = None
    vocab: ByteVocab | None = None
    vocab_s: float = 0.0

    def ready(self) -> Side:
        if self.inner is None:
            self.inner = self.load()
            started = time.perf_counter()
            is_tiktoken = hasattr(self.inner, "decode_single_token_bytes")
            self.vocab = from_tiktoken(self.inner) if is_tiktoken else from_hf(self.inner)
            self.vocab_s = time.perf_counter() - started
        return self

    @property
    def tokenizer(self) -> BaseTokenizer:
        tok = BaseTokenizer(self.inner, name=self.label)
        tok.__dict__["vocab"] = self.vocab  # the cached_property, already measured
        return tok

    @property
    def eos_ids(self) -> frozenset[int]:
        eos = self.tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset({eos})


def code_text() -> str:
    stdlib = Path(os.__file__).parent
    text = "".join((stdlib / name).read_text(encoding="utf-8") for name in CODE_FILES)
    return text[:CODE_CHARS]


def measure(base: Side, proxy: Side, texts: dict[str, str]) -> dict[str, Any]:
    base.ready()
    proxy.ready()
    assert base.vocab is not None and proxy.vocab is not None
    started = time.perf_counter()
    specials = {}
    base_eos = base.tokenizer.eos_token_id
    if base_eos is not None and proxy.eos_ids:
        specials[base_eos] = min(proxy.eos_ids)
    bridge = VocabBridge.build(base.vocab, proxy.vocab, specials)
    build_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get("PROXYCLIENT_CACHE_DIR")
        os.environ["PROXYCLIENT_CACHE_DIR"] = cache
        try:
            timings = []
            for _ in ("cold", "warm"):
                started = time.perf_counter()
                cached = cached_bridge(base.tokenizer, proxy.vocab, proxy.eos_ids, len(proxy.vocab))
                timings.append(time.perf_counter() - started)
        finally:
            if previous is None:
                os.environ.pop("PROXYCLIENT_CACHE_DIR", None)
            else:
                os.environ["PROXYCLIENT_CACHE_DIR"] = previous
    if not bool((cached.twin == bridge.twin).all()):
        raise RuntimeError(f"{base.label} -> {proxy.label}: cached bridge differs from a fresh one")

    # Shared vocabulary: ordinary tokens only (special pairs such as EOS are left out).
    twin = bridge.twin.tolist()
    has_twin = [
        t >= 0 and data is not None for t, data in zip(twin, base.vocab.token_bytes, strict=True)
    ]
    shared = sum(has_twin)
    coverage = {}
    for name, text in texts.items():
        ids = base.tokenizer.encode(text, add_special_tokens=False)
        coverage[name] = (sum(has_twin[i] for i in ids) / len(ids), len(ids))
    return {
        "pair": f"{base.label} -> {proxy.label}",
        "v_base": len(base.vocab),
        "v_proxy": len(proxy.vocab),
        "shared": shared,
        "of_base": shared / len(base.vocab),
        "of_proxy": shared / len(proxy.vocab),
        "vocab_base_s": base.vocab_s,
        "vocab_proxy_s": proxy.vocab_s,
        "build_s": build_s,
        "cold_s": timings[0],
        "warm_s": timings[1],
        "coverage": coverage,
    }


COLUMNS = (
    ("pair", "base -> proxy", "{}"),
    ("v_base", "V base", "{:,}"),
    ("v_proxy", "V proxy", "{:,}"),
    ("shared", "shared", "{:,}"),
    ("of_base", "% of base", "{:.1%}"),
    ("of_proxy", "% of proxy", "{:.1%}"),
    ("vocab_base_s", "bytes base s", "{:.3f}"),
    ("vocab_proxy_s", "bytes proxy s", "{:.3f}"),
    ("build_s", "build s", "{:.3f}"),
    ("cold_s", "cache cold s", "{:.3f}"),
    ("warm_s", "cache warm s", "{:.3f}"),
)


def table(rows: list[dict[str, Any]], text_names: list[str]) -> str:
    header = [title for _, title, _ in COLUMNS] + [f"twin tokens: {n}" for n in text_names]
    body = []
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        cells += [f"{row['coverage'][n][0]:.1%} of {row['coverage'][n][1]:,}" for n in text_names]
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for cells in body:
        pairs = enumerate(zip(cells, widths, strict=True))
        aligned = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("| " + " | ".join(aligned) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, help="a folder written by real_tokenizers.py")
    parser.add_argument("--cl100k", type=Path, help="cl100k_base.tiktoken")
    parser.add_argument("--o200k", type=Path, help="o200k_base.tiktoken")
    parser.add_argument("--llama2", type=Path, help="Llama-2 tokenizer folder")
    parser.add_argument("--llama3", type=Path, help="Llama-3 tokenizer folder")
    parser.add_argument("--tiny", type=Path, default=REPO / ".cache" / "tiny-models")
    args = parser.parse_args(argv)
    if args.real:
        for name, rel in (("cl100k", "cl100k_base.tiktoken"), ("o200k", "o200k_base.tiktoken"),
                          ("llama2", "llama2"), ("llama3", "llama3")):  # fmt: skip
            if getattr(args, name) is None and (args.real / rel).exists():
                setattr(args, name, args.real / rel)

    hf_logging.set_verbosity_error()  # no warnings about texts longer than a model's context
    tiny = build_tiny_models(args.tiny)
    sides: dict[str, Side] = {
        "tiny-bpe": Side("tiny byte-level BPE", lambda: hf_tokenizer(tiny["base"])),
        "tiny-sp": Side("tiny Metaspace", lambda: hf_tokenizer(tiny["anti_expert_sp"])),
    }
    if args.cl100k:
        sides["cl100k"] = Side("cl100k_base", lambda: openai_encoding("cl100k_base", args.cl100k))
    if args.o200k:
        sides["o200k"] = Side("o200k_base", lambda: openai_encoding("o200k_base", args.o200k))
    if args.llama2:
        sides["llama2"] = Side("Llama-2", lambda: hf_tokenizer(args.llama2))
    if args.llama3:
        sides["llama3"] = Side("Llama-3", lambda: hf_tokenizer(args.llama3))
    pairs = [
        ("tiny-bpe", "tiny-sp"),
        ("cl100k", "llama2"),
        ("o200k", "llama2"),
        ("llama3", "llama2"),
        ("cl100k", "llama3"),
        ("o200k", "llama3"),
        ("llama2", "llama3"),
    ]
    texts = {"code": code_text(), "prose": PROSE}
    rows = [measure(sides[b], sides[p], texts) for b, p in pairs if b in sides and p in sides]
    print(table(rows, list(texts)))
    print(
        f"\ncode: {len(texts['code']):,} chars of CPython's {', '.join(CODE_FILES)}; prose: "
        f"{len(PROSE.encode()):,} bytes of English, Chinese and Japanese.\n'shared': ordinary base "
        f"tokens whose exact bytes are one proxy token. 'bytes': from_hf / from_tiktoken on the "
        f"loaded tokenizer, first call, one run. 'cache cold': cached_bridge with an empty cache "
        f"(fingerprint + build + save); 'warm': the next call (fingerprint + load)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
