"""One sequence's KV cache in one local model, and the shims over transformers 4.x / 5.x caches
that batched forwards need (take a DynamicCache apart, stack several left-padded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class KVState:
    """One sequence's KV cache in one local model.

    After a batched forward the sequence's keys and values are its rows of the batch's tensors;
    they become a transformers Cache only when one is needed (a forward of this sequence alone,
    a rollback), because building one per row and step costs more than the forward saves."""

    __slots__ = ("_cache", "_layers", "length")

    def __init__(self, cache: Any = None, length: int = 0) -> None:
        self._cache = cache  # transformers Cache, grown in place by each forward
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.length = length  # tokens fed so far

    @property
    def cache(self) -> Any:
        if self._layers is not None:
            self._cache, self._layers = cache_of(self._layers), None
        return self._cache

    @cache.setter
    def cache(self, value: Any) -> None:
        self._cache, self._layers = value, None

    def set_layers(self, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Keys and values per layer, [1, heads, length, head_dim] (a batched forward's rows)."""
        self._cache, self._layers, self.length = None, layers, length

    def crop_rows(self, length: int) -> bool:
        """Keep the first ``length`` tokens of rows held from a batched forward, as a
        DynamicCache's crop would (a view of each); False when no rows are held."""
        if self._layers is None:
            return False
        self._layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self._layers]
        self.length = length
        return True

    def layer_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keys and values per layer, or None when nothing was fed."""
        if self._layers is not None:
            return self._layers
        return layer_kv(self._cache) if self._cache is not None else None

    def batchable(self) -> bool:
        """Whether a batched forward can take this cache apart: rows of one, none yet, or a plain
        DynamicCache."""
        return self._layers is not None or croppable_dynamic(self._cache)

    def __repr__(self) -> str:
        return f"KVState(length={self.length})"


def croppable_dynamic(cache: Any) -> bool:
    """A cache the batched forward can take apart: none yet, or a plain DynamicCache."""
    from transformers import DynamicCache

    if cache is None:
        return True
    if type(cache) is not DynamicCache:
        return False
    layers = getattr(cache, "layers", None)
    return layers is None or all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def layer_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values, [batch, heads, length, head_dim]."""
    if hasattr(cache, "layers"):  # transformers 5.x
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # 4.x


def cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):  # 4.x
        return DynamicCache.from_legacy_cache(tuple(layers))
    return DynamicCache(layers)


def stacked_cache(states: Sequence[KVState], past: int) -> Any:
    """One cache for the batch: every sequence's keys and values left-padded to ``past``."""
    if past == 0:
        return None
    per_state = [s.layer_kv() for s in states]
    template = next(kv for kv in per_state if kv is not None)
    stacked = []
    for index, (key, value) in enumerate(template):
        keys, values = [], []
        for kv in per_state:
            if kv is None:
                k = key.new_zeros(1, key.shape[1], 0, key.shape[3])
                v = value.new_zeros(1, value.shape[1], 0, value.shape[3])
            else:
                k, v = kv[index]
            pad = past - k.shape[2]
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        stacked.append((torch.cat(keys), torch.cat(values)))
    return cache_of(stacked)
