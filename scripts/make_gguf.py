"""Convert a Hugging Face Llama checkpoint to an f32 GGUF with llama.cpp's own converter.

The converter (convert_hf_to_gguf.py, conversion/, gguf-py/) is the one vendored in the
llama-cpp-python sdist, installed by scripts/setup_llamacpp.sh into .cache/llama.cpp/ (or
$PROXYCLIENT_LLAMACPP_DIR). It runs in a child of this interpreter, which needs torch,
transformers and numpy (the project's .venv has them).

Pre-tokenizer: for a BPE vocabulary the converter hashes the tokenization of a fixed text and
looks the hash up in a table of known models (generated from hub downloads); a home-made
tokenizer is in no table, and the converter stops. When, and only when, the hash is unknown
and tokenizer.json declares exactly GPT-2's pre-tokenizer (ByteLevel with its regex, no prefix
space, no normalizer), this script answers "gpt-2" for it: the converter's own fallback with a
check, without editing the vendored sources. Anything else still fails as upstream does.

    python scripts/make_gguf.py MODEL_DIR OUT.gguf [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_DIR_ENV_VAR = "PROXYCLIENT_LLAMACPP_DIR"
SETUP_HINT = "run scripts/setup_llamacpp.sh (builds llama-server and installs the converter)"
_CHILD_FLAG = "--in-this-process"

logger = logging.getLogger(__name__)


def llamacpp_dir() -> Path:
    """$PROXYCLIENT_LLAMACPP_DIR, else the repository's .cache/llama.cpp."""
    env = os.environ.get(LLAMACPP_DIR_ENV_VAR)
    return Path(env) if env else REPO_ROOT / ".cache" / "llama.cpp"


def declares_gpt2_pretokenizer(tokenizer_json: Path) -> bool:
    """True if tokenizer.json is a BPE with GPT-2's byte-level pre-tokenizer and no normalizer."""
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return (
        spec.get("model", {}).get("type") == "BPE"
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and pre.get("add_prefix_space", False) is False
    )


def _is_current(model_dir: Path, out_file: Path) -> bool:
    if not out_file.is_file():
        return False
    newest_input = max(p.stat().st_mtime for p in model_dir.iterdir() if p.is_file())
    return out_file.stat().st_mtime > newest_input


def build_gguf(
    model_dir: Path,
    out_file: Path,
    *,
    force: bool = False,
    python: str | Path | None = None,
    converter_dir: Path | None = None,
) -> Path:
    """Convert `model_dir` to an f32 GGUF at `out_file` (skipped when newer than the model)."""
    model_dir, out_file = Path(model_dir), Path(out_file)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir} (config.json missing)")
    if not force and _is_current(model_dir, out_file):
        return out_file
    converter_dir = converter_dir or llamacpp_dir()
    if not (converter_dir / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"no llama.cpp converter in {converter_dir}: {SETUP_HINT}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    cmd = [
        str(python or sys.executable),
        str(Path(__file__).resolve()),
        _CHILD_FLAG,
        str(converter_dir),
        str(model_dir),
        str(tmp),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not tmp.is_file():
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            raise RuntimeError(f"GGUF conversion of {model_dir} failed:\n{tail}")
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


def _convert_in_this_process(converter_dir: Path, model_dir: Path, out_file: Path) -> None:
    """Run the vendored converter here, with the GPT-2 pre-tokenizer fallback installed."""
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    from conversion.base import TextModel  # the vendored converter's package

    known_pre: Callable[[Any, Any], str] = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return known_pre(self, tokenizer)
        except NotImplementedError:
            if declares_gpt2_pretokenizer(Path(self.dir_model) / "tokenizer.json"):
                logger.warning("unknown BPE hash; tokenizer.json declares GPT-2's: using gpt-2")
                return "gpt-2"
            raise

    TextModel.get_vocab_base_pre = get_vocab_base_pre  # type: ignore[method-assign]
    converter = converter_dir / "convert_hf_to_gguf.py"
    sys.argv = [str(converter), str(model_dir), "--outfile", str(out_file), "--outtype", "f32"]
    runpy.run_path(str(converter), run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    """CLI: MODEL_DIR OUT.gguf [--force]."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_CHILD_FLAG]:
        logging.basicConfig(level=logging.INFO)
        _convert_in_this_process(*(Path(a) for a in argv[1:4]))
        return 0
    parser = argparse.ArgumentParser(description="Convert a HF Llama model to an f32 GGUF.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_file", type=Path)
    parser.add_argument("--force", action="store_true", help="convert even if up to date")
    args = parser.parse_args(argv)
    try:
        print(build_gguf(args.model_dir, args.out_file, force=args.force))
    except (FileNotFoundError, RuntimeError) as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
