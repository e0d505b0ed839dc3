"""The local expert and anti-expert: loading, device/dtype, and KV-cached incremental forwards."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from proxyclient.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if str(device) != "auto":
        try:
            return torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"device {device!r} is not a torch device ({exc})") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on cuda, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ConfigError(f"dtype must be auto or one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


def check_model_source(path: str | Path, role: str) -> str:
    """A local directory, or something shaped like a Hub id; anything else fails now, clearly."""
    source = str(path)
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    if _HUB_ID.match(source) and not Path(source).exists():
        return source
    raise ModelLoadError(
        f"{role} model {source!r} is not a directory. Pass the folder that holds the model's "
        f"config.json and weights (e.g. a save_pretrained() output)."
    )


@dataclass
class KVState:
    """One sequence's KV cache in one local model."""

    cache: Any = None  # transformers Cache, grown in place by each forward
    length: int = 0  # tokens fed so far


@dataclass
class LocalModel:
    """A causal LM that returns next-token log-probabilities, feeding only new tokens each step."""

    model: Any
    device: torch.device
    name: str = "local"
    _cache_arg: str = field(init=False, default="past_key_values")
    _accepts_logits_to_keep: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.model.forward).parameters
        # transformers >= 5.2x renamed past_key_values to cache (the old name warns until 5.40).
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._accepts_logits_to_keep = "logits_to_keep" in params

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        role: str = "local",
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
    ) -> LocalModel:
        from transformers import AutoModelForCausalLM

        source = check_model_source(path, role)
        resolved_device = resolve_device(device)
        resolved_dtype = resolve_dtype(dtype, resolved_device)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=resolved_dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the {role} model from {source!r}: {exc}"
            ) from None
        # Older transformers call the argument torch_dtype; converting here holds for both.
        model.to(device=resolved_device, dtype=resolved_dtype).eval()
        logger.info("loaded %s from %s on %s as %s", role, source, resolved_device, resolved_dtype)
        return cls(model=model, device=resolved_device, name=role)

    @property
    def output_size(self) -> int:
        """Number of logits per position (may exceed the tokenizer's size: padded vocabularies)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @torch.inference_mode()
    def feed(self, state: KVState, token_ids: Sequence[int], positions: int = 1) -> torch.Tensor:
        """Append ``token_ids`` to the sequence; log-probs of the token after each of the last
        ``positions`` of them, [positions, output_size] float32 on the CPU. Only the new tokens go
        through the model: cost does not grow with the prefix beyond attention over the cache."""
        if not token_ids:
            raise ValueError("feed needs at least one token")
        if not 1 <= positions <= len(token_ids):
            raise ValueError(f"positions must be in [1, {len(token_ids)}], got {positions}")
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {self._cache_arg: state.cache, "use_cache": True}
        if self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = positions
        out = self.model(input_ids=input_ids, **kwargs)
        state.cache = out[self._cache_arg]
        state.length += len(token_ids)
        logits = out.logits[0, -positions:].float()  # [positions, output_size]
        return torch.log_softmax(logits, dim=-1).cpu()

    def crop(self, state: KVState, length: int) -> None:
        """Forget everything after the first ``length`` tokens of ``state`` (speculation's
        rollback): the next feed continues from there."""
        if not 0 <= length <= state.length:
            raise ValueError(f"cannot crop a {state.length}-token cache to {length} tokens")
        if length == state.length:
            return
        if length == 0:
            state.cache, state.length = None, 0
            return
        cache = state.cache
        if not getattr(cache, "is_croppable", True) or not hasattr(cache, "crop"):
            raise ConfigError(
                f"the {self.name} model's KV cache ({type(cache).__name__}) cannot be rolled "
                f"back; speculative decoding needs a model with a croppable cache"
            )
        # A negative argument removes that many tokens, in transformers 4.x and 5.x alike.
        cache.crop(length - state.length)
        state.length = length


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
