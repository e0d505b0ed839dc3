"""One local model (the expert or the anti-expert): KV-cached incremental forwards, alone or
batched over several sequences. Devices and dtypes: ``devices``; KV caches: ``kvcache``;
loading a model folder, a LoRA pair or a tokenizer: ``loading``."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from proxyclient.devices import resolve_device, resolve_dtype
from proxyclient.errors import ConfigError, ModelLoadError
from proxyclient.kvcache import KVPool, KVState, Layers, layer_kv

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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
class LocalModel:
    """A causal LM that returns next-token log-probabilities, feeding only new tokens each step."""

    model: Any
    device: torch.device
    name: str = "local"
    # A PEFT model serves two roles: its adapter on (the expert) or off (the anti-expert).
    adapter: bool | None = None
    _cache_arg: str = field(init=False, default="past_key_values")
    _accepts_logits_to_keep: bool = field(init=False, default=False)
    # The keys and values of the sequences batched forwards have held.
    pool: KVPool = field(init=False, default_factory=KVPool, repr=False)

    def __post_init__(self) -> None:
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        params = inspect.signature(inner.forward).parameters
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
        if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
            raise ModelLoadError(
                f"{role} model {source!r} has no config.json (a tokenizer alone?). Pass the folder "
                f"that holds the model's config.json and weights (a save_pretrained() output)."
            )
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
    def adapter_name(self) -> str:
        """The PEFT adapter this model's forwards use: its active one, or ``"__base__"`` (none)."""
        return str(self.model.active_adapter) if self.adapter else "__base__"

    @property
    def output_size(self) -> int:
        """Number of logits per position (may exceed the tokenizer's size: padded vocabularies)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @torch.inference_mode()
    def feed(
        self,
        state: KVState,
        token_ids: Sequence[int],
        positions: int = 1,
        adapter_name: str | None = None,
    ) -> torch.Tensor:
        """Append ``token_ids`` to the sequence; log-probs of the token after each of the last
        ``positions`` of them, [positions, output_size] float32 on the CPU. Only the new tokens go
        through the model: cost does not grow with the prefix beyond attention over the cache."""
        if not token_ids:
            raise ValueError("feed needs at least one token")
        if not 1 <= positions <= len(token_ids):
            raise ValueError(f"positions must be in [1, {len(token_ids)}], got {positions}")
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {self._cache_arg: state.cache, "use_cache": True}
        if adapter_name is not None:
            kwargs["adapter_names"] = [adapter_name]
        if self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = positions
        out = self._forward(input_ids=input_ids, **kwargs)
        state.extend(out[self._cache_arg], len(token_ids))
        logits = out.logits[0, -positions:].float()  # [positions, output_size]
        return torch.log_softmax(logits, dim=-1).cpu()

    @torch.inference_mode()
    def feed_many(
        self,
        states: Sequence[KVState],
        token_lists: Sequence[Sequence[int]],
        positions: int | Sequence[int] = 1,
        adapter_names: Sequence[str] | None = None,
    ) -> list[torch.Tensor]:
        """``feed`` for several sequences in one batched forward: each list of new tokens is
        appended to its own state; log-probs at the last ``positions`` (one number for all, or
        one per sequence) of each, [positions, V]. ``adapter_names`` (a PEFT model): each row's
        adapter, ``"__base__"`` for none, so that a LoRA expert and its anti-expert share a
        forward.

        The sequences' keys and values live in the model's ``KVPool`` (a sequence fed alone so
        far is copied in): its rows, right-padded to the longest, are the batch's cache, the new
        tokens right-padded after them, with an attention mask over the padding and each row's
        own positions; the new columns go back to the pool. Models whose cache is not a plain
        DynamicCache are fed one sequence at a time."""
        wanted = [positions] * len(states) if isinstance(positions, int) else list(positions)
        names = list(adapter_names) if adapter_names is not None else [None] * len(states)
        if len(states) == 1 or not all(s.batchable() for s in states):
            return [
                self.feed(s, t, p, name)
                for s, t, p, name in zip(states, token_lists, wanted, names, strict=True)
            ]
        lengths = [s.length for s in states]
        counts = [len(t) for t in token_lists]
        if any(not 1 <= p <= c for p, c in zip(wanted, counts, strict=True)):
            raise ValueError(f"positions {wanted} must be in [1, new tokens {counts}] each")
        past, width = max(lengths), max(counts)
        # Rows for the sequences not pooled yet: before the forward where there is a cache to
        # read (one of them or the pool has the shapes), after it where nobody has one yet.
        slots = self._rows(states) if past else None
        cache = self.pool.gather(slots, past) if slots is not None else None
        input_ids = torch.tensor([[*t, *[0] * (width - len(t))] for t in token_lists])
        length_col = torch.tensor(lengths)[:, None]
        columns = torch.arange(past + width)[None, :]
        mask = (columns < length_col) | (
            (columns >= past) & (columns < past + torch.tensor(counts)[:, None])
        )
        kwargs: dict[str, Any] = {
            self._cache_arg: cache,
            "use_cache": True,
            "attention_mask": mask.long().to(self.device),
            "position_ids": (length_col + torch.arange(width)).to(self.device),
        }
        if adapter_names is not None:
            kwargs["adapter_names"] = names
        out = self._forward(input_ids=input_ids.to(self.device), **kwargs)
        logits = out.logits
        layers = layer_kv(out[self._cache_arg])
        if slots is None:
            slots = self._rows(states, template=layers)
        self.pool.reserve(past + width)
        self.pool.write(slots, length_col[:, 0].to(self.device), layers, start=past)
        for state, count in zip(states, counts, strict=True):
            state.length += count
        # The wanted positions of every row in one log-softmax: [sum(wanted), V].
        rows = torch.tensor([row for row, n in enumerate(wanted) for _ in range(n)])
        columns = torch.tensor([c - n + i for c, n in zip(counts, wanted, strict=True)
                                for i in range(n)])  # fmt: skip
        logprobs = torch.log_softmax(logits[rows, columns].float(), dim=-1).cpu()
        return list(torch.split(logprobs, wanted))

    def _rows(self, states: Sequence[KVState], template: Layers | None = None) -> torch.Tensor:
        """The states' rows in the pool (the device's index tensor), admitting those without."""
        if newcomers := [s for s in states if s.pool is None]:
            self.pool.admit(newcomers, template)
        return torch.tensor([s.slot for s in states], device=self.device)

    def _forward(self, **kwargs: Any) -> Any:
        if self.adapter is False and "adapter_names" not in kwargs:
            with self.model.disable_adapter():
                return self.model(**kwargs)
        return self.model(**kwargs)

    def crop(self, state: KVState, length: int) -> None:
        """Forget everything after the first ``length`` tokens of ``state`` (speculation's
        rollback): the next feed continues from there."""
        if not 0 <= length <= state.length:
            raise ValueError(f"cannot crop a {state.length}-token cache to {length} tokens")
        if length == state.length:
            return
        if state.pool is not None:  # a pool's row: its first ``length`` columns are the cache
            state.length = length
            return
        if length == 0:
            state.forget()
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
