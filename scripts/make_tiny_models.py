"""Build tiny, deterministic Llama models and one shared tokenizer, offline, in a few seconds.

The models are random (not trained): they exist so that tests and servers have real checkpoints
with a real byte-level BPE tokenizer. ``lm_head`` is scaled so that top-k lists are not flat.

    python scripts/make_tiny_models.py OUT_DIR [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

# Bump whenever anything below changes the files produced.
BUILD_VERSION = "tiny-models-v3"

MODEL_KEYS = (
    "base",
    "expert",
    "anti_expert",
    "expert_padded",
    "anti_expert_padded",
    "expert_sp",
    "anti_expert_sp",
    "base_fine",
    "expert_fine",
    "anti_expert_fine",
)

VOCAB_SIZE = 1024
NUM_TRAINING_FILES = 200
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
PADDED_EXTRA_ROWS = 8
FINE_VOCAB_SIZE = 300  # asks for few merges: the trainer keeps every character it saw (~425 tokens)
LM_HEAD_SCALE = 20.0
EXPERT_NOISE = 0.5  # noise std, relative to each perturbed weight's std

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

ROUND_TRIP_SAMPLES = ("def main():\n    return 0\n", "héllo 日本 🙂", "  tabs\tand\nnewlines  ")


def _training_files() -> list[Path]:
    stdlib = Path(os.__file__).parent
    return sorted(stdlib.glob("*.py"))[:NUM_TRAINING_FILES]


def _training_texts() -> Iterator[str]:
    for path in _training_files():
        yield path.read_text(encoding="utf-8", errors="replace")


def build_tokenizer(
    texts: Sequence[str] | None = None, vocab_size: int = VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <s>, </s>, <pad>, trained on ``texts`` (default: a fixed
    slice of the stdlib's sources: the shared tokenizer of the tiny models)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts() if texts is None else texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        # Cleanup would turn "a ." into "a." and break decode(encode(x)) == x.
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    _check_round_trip(fast, ROUND_TRIP_SAMPLES + tuple(texts or ())[:50])
    return fast


def build_metaspace_tokenizer(
    vocab_size: int = 800, texts: Iterable[str] | None = None, split_punctuation: bool = False
) -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: BPE over Metaspace words, <0xNN> byte fallback, <unk>/<s>/</s>.

    As in Llama-2, the 256 byte pieces are ordinary vocabulary entries right after the specials.
    It learns its merges from ``texts`` (default: the same stdlib slice as the byte-level one).
    ``split_punctuation`` keeps newlines and punctuation out of word pieces, as SentencePiece's
    split by Unicode script does (without it, pieces like "?\nA:" span lines).
    """
    specials = ["<unk>", "<s>", "</s>"]
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    if split_punctuation:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split("\n", behavior="isolated"),
                pre_tokenizers.Punctuation(behavior="isolated"),
                pre_tokenizer,
            ]
        )
    draft.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False
    )
    draft.train_from_iterator(_training_texts() if texts is None else texts, trainer=trainer)
    trained = json.loads(draft.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab |= {f"<0x{b:02X}>": len(specials) + b for b in range(256)}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    # Like Llama-2's, this tokenizer does not give back leading spaces of a text: no such sample.
    _check_round_trip(tokenizer, tuple(s for s in ROUND_TRIP_SAMPLES if not s.startswith(" ")))
    return tokenizer


def build_metaspace_tokenizer_special_bytes(
    vocab_size: int = 800, texts: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer whose 256 <0xNN> byte-fallback tokens are *special* added
    tokens: the BPE trainer registers them so when they are passed as its ``special_tokens``. The
    BPE model still has ``byte_fallback`` and emits them for bytes no piece covers.

    Not used by the committed tiny models (tests only). Decoding with ``skip_special_tokens=True``
    drops those byte tokens, so the round trip is checked on text that needs none of them.
    """
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(_training_texts() if texts is None else texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    spec = json.loads(tok.to_str())
    added = {t["content"]: t for t in spec["added_tokens"]}
    if not spec["model"].get("byte_fallback") or not all(
        added.get(f"<0x{b:02X}>", {}).get("special") for b in range(256)
    ):
        raise RuntimeError("expected 256 special <0xNN> added tokens and byte_fallback")
    _check_round_trip(tokenizer, ("def main():\n    return 0\n",))
    return tokenizer


def _check_round_trip(
    tokenizer: PreTrainedTokenizerFast, samples: tuple[str, ...] = ROUND_TRIP_SAMPLES
) -> None:
    for text in samples:
        ids = tokenizer.encode(text)
        if ids[0] != tokenizer.bos_token_id or ids.count(tokenizer.bos_token_id) != 1:
            raise RuntimeError(f"expected exactly one leading {BOS} in {ids} for {text!r}")
        back = tokenizer.decode(ids, skip_special_tokens=True)
        if back != text:
            raise RuntimeError(f"tokenizer round trip failed: {text!r} -> {ids} -> {back!r}")


def llama_config(
    tokenizer: PreTrainedTokenizerFast,
    num_layers: int,
    vocab_size: int,
    hidden: int = 128,
    intermediate: int | None = None,
    max_positions: int = 2048,
) -> LlamaConfig:
    """A small Llama: heads of 64, untied embeddings, the tokenizer's special ids."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden if intermediate is None else intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _random_model(
    tokenizer: PreTrainedTokenizerFast, num_layers: int, seed: int, hidden: int = 128
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = llama_config(tokenizer, num_layers, len(tokenizer), hidden)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return model.eval()


def _perturbed(model: LlamaForCausalLM, seed: int) -> LlamaForCausalLM:
    """A related model: noise on lm_head and the last decoder layer (norm weights stay at 1)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    params = [out.lm_head.weight, *out.model.layers[-1].parameters()]
    with torch.no_grad():
        for p in params:
            std = p.std().item() if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=gen) * (EXPERT_NOISE * std))
    return out


def _padded(model: LlamaForCausalLM, extra: int, seed: int) -> LlamaForCausalLM:
    """The same weights with `extra` random rows appended to the embeddings and lm_head."""
    vocab = model.config.vocab_size
    config = copy.deepcopy(model.config)
    config.vocab_size = vocab + extra
    padded = LlamaForCausalLM(config).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = state[name]
        rows = torch.randn((extra, w.shape[1]), generator=gen) * w.std()
        state[name] = torch.cat([w, rows], dim=0)
    padded.load_state_dict(state, strict=True)
    return padded.eval()


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # transformers 5 writes "TokenizersBackend", which transformers 4 (e.g. in other tools' venvs)
    # cannot resolve; "PreTrainedTokenizerFast" loads the same tokenizer in both.
    config_file = path / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _paths(out_dir: Path) -> dict[str, Path]:
    return {key: out_dir / key for key in MODEL_KEYS}


def _is_current(out_dir: Path) -> bool:
    version_file = out_dir / "BUILD_VERSION"
    if not version_file.is_file() or version_file.read_text().strip() != BUILD_VERSION:
        return False
    return all((p / "config.json").is_file() for p in _paths(out_dir).values())


def build_tiny_models(out_dir: Path, force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the tiny models under `out_dir`; returns {key: model dir}.

    Keys: base (3 layers), anti_expert (2 layers), expert (anti_expert perturbed),
    expert_padded / anti_expert_padded (vocab padded by 8 rows, tokenizer unchanged),
    expert_sp / anti_expert_sp (2 layers on a different, Metaspace + byte-fallback tokenizer), and
    base_fine / expert_fine / anti_expert_fine (3 and 2 layers on a Metaspace + byte-fallback
    tokenizer with almost no merges: about one token per character).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _paths(out_dir)
    # Serialise concurrent builders (e.g. parallel test workers) on the same directory.
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _is_current(out_dir):
            return paths
        (out_dir / "BUILD_VERSION").unlink(missing_ok=True)
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)

        tokenizer = build_tokenizer()
        base = _random_model(tokenizer, num_layers=3, seed=0)
        anti_expert = _random_model(tokenizer, num_layers=2, seed=1)
        expert = _perturbed(anti_expert, seed=2)
        metaspace = build_metaspace_tokenizer()
        anti_sp = _random_model(metaspace, num_layers=2, seed=5)
        sp_models = {"anti_expert_sp": anti_sp, "expert_sp": _perturbed(anti_sp, seed=6)}
        # Nearly one token per character: against the byte-level base, one base token is spelled
        # by several of these (as proxies) and one of these by part of a base token (as base).
        fine = build_metaspace_tokenizer(vocab_size=FINE_VOCAB_SIZE)
        anti_fine = _random_model(fine, num_layers=2, seed=7)
        fine_models = {
            "base_fine": _random_model(fine, num_layers=3, seed=9),
            "anti_expert_fine": anti_fine,
            "expert_fine": _perturbed(anti_fine, seed=8),
        }
        models_by_key = {
            "base": base,
            "expert": expert,
            "anti_expert": anti_expert,
            "expert_padded": _padded(expert, PADDED_EXTRA_ROWS, seed=3),
            "anti_expert_padded": _padded(anti_expert, PADDED_EXTRA_ROWS, seed=4),
        }
        with _quiet_progress_bars():
            for key, model in models_by_key.items():
                _save(model, tokenizer, paths[key])
            for key, model in sp_models.items():
                _save(model, metaspace, paths[key])
            for key, model in fine_models.items():
                _save(model, fine, paths[key])
        (out_dir / "BUILD_VERSION").write_text(BUILD_VERSION + "\n")
        logger.info("built tiny models in %s", out_dir)
    return paths


def build_proxy_pair(
    tokenizer_dir: Path, out_dir: Path, *, hidden: int, layers: int
) -> tuple[Path, Path]:
    """A larger random expert and anti-expert on the tiny tokenizer, for timing: (expert, anti)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    anti_path = out_dir / f"anti-h{hidden}-l{layers}"
    expert_path = out_dir / f"expert-h{hidden}-l{layers}"
    if not (expert_path / "config.json").exists():
        with _quiet_progress_bars():
            anti = _random_model(tokenizer, layers, seed=1, hidden=hidden)
            _save(anti, tokenizer, anti_path)
            _save(_perturbed(anti, seed=2), tokenizer, expert_path)
    return expert_path, anti_path


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build into OUT_DIR and print one `key<TAB>path` line per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for key, path in build_tiny_models(args.out_dir, force=args.force).items():
        print(f"{key}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
