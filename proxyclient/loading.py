"""Loading the local models: a model folder, a LoRA pair on one model, several steering pairs
(each distinct model once), the tokenizer; the checks that expert and anti-expert fit together,
and their EOS ids."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxyclient.errors import ConfigError, ModelLoadError
from proxyclient.local import LocalModel, check_model_source

logger = logging.getLogger(__name__)

ModelSource = str | Path | LocalModel
# (expert, anti-expert, weight): one steering pair, scores += alpha * weight * (expert - anti).
PairSpec = tuple[ModelSource, ModelSource, float]


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
    raise ModelLoadError(
        f"expert and anti-expert have different vocabularies ({len(expert_vocab)} vs "
        f"{len(anti_vocab)} tokens; e.g. {_differing(expert_vocab, anti_vocab)!r} differ). "
        f"Proxy-tuning needs the tuned and untuned versions of one small model, sharing one "
        f"tokenizer."
    )


def _differing(one: dict[str, int], other: dict[str, int]) -> list[str]:
    """A few tokens two vocabularies disagree on (missing from one, or with another id)."""
    differing = sorted((t for t in one.keys() ^ other.keys()), key=lambda t: (len(t), t))[:5]
    return differing or [t for t in one if one[t] != other[t]][:5]


def source_key(model: ModelSource) -> object:
    """What makes two model sources one model: the object, or the folder (resolved)."""
    if isinstance(model, LocalModel):
        return ("object", id(model))
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def load_pairs(
    pairs: Sequence[PairSpec], device: Any, dtype: Any
) -> list[tuple[LocalModel, LocalModel, float]]:
    """Each pair's models, each distinct model loaded once: a folder (or object) several pairs
    name, a shared anti-expert say, is one LocalModel in memory."""
    loaded: dict[object, LocalModel] = {}

    def one(model: ModelSource, role: str) -> LocalModel:
        key = source_key(model)
        if key not in loaded:
            loaded[key] = load_local(model, role, device, dtype)
        return loaded[key]

    def role(number: int, name: str) -> str:
        return name if len(pairs) == 1 else f"pair {number} {name}"

    return [
        (one(expert, role(n, "expert")), one(anti, role(n, "anti-expert")), weight)
        for n, (expert, anti, weight) in enumerate(pairs, 1)
    ]


def pair_tokenizers(
    pairs: Sequence[PairSpec], tokenizer: Any, tokenizer_source: ModelSource | None = None
) -> Any:
    """The experts' tokenizer (the first pair's expert's: its chat template renders the prompt
    every expert reads), once every pair's models are checked to share ``tokenizer``'s
    vocabulary (``tokenizer_source``: the folder it was loaded from, not loaded again)."""
    if len(pairs) == 1:
        expert = pairs[0][0]
        expert_tokenizer = load_tokenizer(expert) if isinstance(expert, str | Path) else tokenizer
        check_same_vocabulary(expert_tokenizer, tokenizer)
        return expert_tokenizer
    reference = tokenizer.get_vocab()
    against = "pair 1's anti-expert" if tokenizer_source is not None else "the tokenizer given"
    loaded: dict[object, Any] = {}
    if tokenizer_source is not None:
        loaded[source_key(tokenizer_source)] = tokenizer
    experts = []
    for number, (expert, anti, _) in enumerate(pairs, 1):
        for model, role in ((expert, "expert"), (anti, "anti-expert")):
            own = tokenizer  # a LocalModel object reads the tokenizer given
            if isinstance(model, str | Path):
                key = source_key(model)
                if key not in loaded:
                    loaded[key] = load_tokenizer(model)
                own = loaded[key]
                vocab = own.get_vocab()
                if vocab != reference:
                    raise ConfigError(
                        f"pair {number}'s {role} {str(model)!r} has another vocabulary than "
                        f"{against} ({len(vocab)} vs {len(reference)} tokens; e.g. "
                        f"{_differing(vocab, reference)!r} differ): every pair's expert and "
                        f"anti-expert must share one tokenizer. Use small models of one family "
                        f"(one tokenizer) in every pair, or steer with that pair in a ProxyTuner "
                        f"of its own."
                    )
            if role == "expert":
                experts.append(own)
    templates = {repr(getattr(t, "chat_template", None)) for t in experts}
    if len(templates) > 1:
        logger.warning(
            "the experts' chat templates differ; every expert reads the prompt in pair 1's "
            "expert's template (chat prompts and expert_chat_template)"
        )
    return experts[0]


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


def freeze_loaded_heap() -> None:
    """Leave what is alive now (the loaded models, torch's and transformers' modules: about
    400,000 objects) out of the garbage collector's full collections, as vLLM does after
    loading. Each full collection would walk all of them again: measured at 64 concurrent
    generations, a sixth of the client's CPU. Reference counting still frees them; only cycles
    among them wait for ``thaw_heap``. No collection first: one walks them all (0.1-0.3 s), per
    tuner."""
    gc.freeze()


def thaw_heap() -> None:
    """Give the frozen objects back to the collector (a closed tuner's models may be garbage)."""
    gc.unfreeze()
