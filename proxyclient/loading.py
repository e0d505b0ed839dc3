"""Loading the local models: a model folder, a LoRA pair on one model, the tokenizer; the checks
that expert and anti-expert fit together, and their EOS ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxyclient.errors import ConfigError, ModelLoadError
from proxyclient.local import LocalModel, check_model_source


def load_lora_pair(
    anti_expert: str | Path, adapter: str | Path, device: Any, dtype: Any
) -> tuple[LocalModel, LocalModel]:
    """Expert and anti-expert from one model in memory: the anti-expert's weights with a LoRA
    adapter (a PEFT adapter folder) switched on for the expert, off for the anti-expert."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(
            "a LoRA expert needs peft: pip install 'proxyclient[lora]' (or pip install peft)"
        ) from None
    anti = LocalModel.load(anti_expert, role="anti-expert", device=device, dtype=dtype)
    source = check_model_source(adapter, "expert LoRA adapter")
    try:
        wrapped = PeftModel.from_pretrained(anti.model, source).eval()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load the LoRA adapter from {source!r} onto the anti-expert: {exc}"
        ) from None
    wrapped.to(device=anti.device)
    return (
        LocalModel(wrapped, anti.device, "expert (anti-expert + LoRA)", adapter=True),
        LocalModel(wrapped, anti.device, "anti-expert", adapter=False),
    )


def load_local(model: str | Path | LocalModel, role: str, device: Any, dtype: Any) -> LocalModel:
    if isinstance(model, LocalModel):
        return model
    return LocalModel.load(model, role=role, device=device, dtype=dtype)


def load_tokenizer(model: str | Path | LocalModel) -> Any:
    from transformers import AutoTokenizer

    if isinstance(model, LocalModel):
        raise ConfigError("pass tokenizer=... when expert/anti-expert are LocalModel objects")
    source = check_model_source(model, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {source!r}: {exc}") from None


def check_same_vocabulary(expert_tokenizer: Any, anti_tokenizer: Any) -> None:
    expert_vocab, anti_vocab = expert_tokenizer.get_vocab(), anti_tokenizer.get_vocab()
    if expert_vocab == anti_vocab:
        return
    differing = sorted(
        (t for t in expert_vocab.keys() ^ anti_vocab.keys()), key=lambda t: (len(t), t)
    )[:5]
    if not differing:
        differing = [t for t in expert_vocab if expert_vocab[t] != anti_vocab[t]][:5]
    raise ModelLoadError(
        f"expert and anti-expert have different vocabularies ({len(expert_vocab)} vs "
        f"{len(anti_vocab)} tokens; e.g. {differing!r} differ). Proxy-tuning needs the tuned and "
        f"untuned versions of one small model, sharing one tokenizer."
    )


def eos_ids_of(tokenizer: Any, *models: Any) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for model in models:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return frozenset(ids)
