"""One sequence's KV cache in one local model, and the pool that holds every sequence's keys and
values for batched forwards (with the shims over transformers 4.x / 5.x caches they need)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # keys and values per layer, [B, H, T, D] each


class KVState:
    """One sequence's KV cache in one local model: its own transformers Cache while it is fed
    alone, or, once it has been in a batched forward, a row of the model's ``KVPool``."""

    __slots__ = ("__weakref__", "_cache", "length", "pool", "slot")

    def __init__(self, cache: Any = None, length: int = 0) -> None:
        self._cache = cache  # transformers Cache, grown in place by each forward (not pooled)
        self.length = length  # tokens fed so far
        self.pool: KVPool | None = None
        self.slot = -1  # the pool's row

    @property
    def cache(self) -> Any:
        """The Cache a forward of this sequence alone extends (None: nothing fed yet)."""
        if self.pool is not None:
            return self.pool.row_cache(self.slot, self.length)
        return self._cache

    def extend(self, cache: Any, count: int) -> None:
        """Keep what a forward of this sequence alone returned: ``count`` more tokens."""
        if self.pool is not None:
            self.pool.write_row(self.slot, self.length, layer_kv(cache), count)
        else:
            self._cache = cache
        self.length += count

    def forget(self) -> None:
        """Nothing fed (a rollback to the start of a sequence not pooled)."""
        self._cache, self.length = None, 0

    def batchable(self) -> bool:
        """Whether a batched forward can hold this sequence: pooled already, nothing fed yet, or
        a plain DynamicCache (whose tensors it copies into the pool)."""
        return self.pool is not None or croppable_dynamic(self._cache)

    def __repr__(self) -> str:
        return f"KVState(length={self.length})"


class KVPool:
    """Every batched sequence's keys and values in one local model: per layer one tensor of keys
    and one of values, [rows, heads, capacity, head_dim]. A sequence owns a row and its first
    ``length`` columns, so a rollback is a new length, and a batched forward reads its rows with
    one ``index_select`` per tensor and writes their new columns back with one indexed write:
    stacking per-sequence tensors instead took a pad and a slice per sequence and layer (each a
    kernel launch on a GPU).

    The batch's cache is right-padded: row i holds its own ``length_i`` columns, then padding up
    to the batch's longest; the new tokens follow, and the attention mask and position ids say
    which columns are whose. A row is released when its KVState is collected; with no row in use
    the tensors are dropped (the memory goes back)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._free: list[int] = []
        self._live = 0
        self._lock = threading.Lock()  # rows are released by the collector, on any thread

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def admit(self, states: Sequence[KVState], template: Layers | None = None) -> None:
        """Give each of ``states`` (none pooled yet) a row, with the tensors of its own Cache
        copied in. ``template``: any layers of this model (shapes, dtype, device), for a pool
        not yet allocated whose newcomers have no tensors of their own."""
        owns = [layer_kv(s._cache) if s._cache is not None and s.length else None for s in states]
        with self._lock:
            if not self.keys:
                first = next((own for own in owns if own is not None), template)
                if first is None:
                    raise ValueError("an empty pool needs a template or a state with a cache")
                self._allocate(first, rows=max(8, len(states)))
            if len(self._free) < len(states):
                self._grow(rows=max(2 * self.rows, self.rows + len(states) - len(self._free)))
            slots = [self._free.pop() for _ in states]
            self._live += len(states)
        self.reserve(max(s.length for s in states))
        for state, slot, own in zip(states, slots, owns, strict=True):
            if own is not None:
                self.write_row(slot, 0, own, state.length)
            state.pool, state.slot, state._cache = self, slot, None
            weakref.finalize(state, self._release, slot).atexit = False

    def reserve(self, columns: int) -> None:
        """Room for ``columns`` tokens in every row."""
        if columns > self.capacity:
            with self._lock:
                self._grow(capacity=_rounded(max(columns, self.capacity * 3 // 2)))

    def tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.keys, self.values, strict=True))

    def gather(self, slots: torch.Tensor, past: int) -> Any:
        """One Cache over the rows ``slots`` (on the pool's device), ``past`` columns each."""
        return cache_of(
            [
                (k[:, :, :past].index_select(0, slots), v[:, :, :past].index_select(0, slots))
                for k, v in self.tensors()
            ]
        )

    def write(self, slots: torch.Tensor, lengths: torch.Tensor, layers: Layers, start: int) -> None:
        """Row ``slots[i]`` takes columns ``start:`` of the batch's row i at its own ``lengths[i]``
        onwards (the batch's padding columns too: past every row's length, they are never read)."""
        width = layers[0][0].shape[2] - start
        rows = slots[:, None]
        columns = lengths[:, None] + torch.arange(width, device=lengths.device)
        for (pool_k, pool_v), (k, v) in zip(self.tensors(), layers, strict=True):
            pool_k[rows, :, columns] = k[:, :, start:].transpose(1, 2)
            pool_v[rows, :, columns] = v[:, :, start:].transpose(1, 2)

    def row_cache(self, slot: int, length: int) -> Any:
        """A Cache of one row's first ``length`` columns, for a forward of it alone."""
        if not length:
            return None
        return cache_of([(k[slot : slot + 1, :, :length], v[slot : slot + 1, :, :length])
                         for k, v in self.tensors()])  # fmt: skip

    def write_row(self, slot: int, length: int, layers: Layers, count: int) -> None:
        """Row ``slot`` takes columns ``length:length + count`` of a one-row forward's cache."""
        self.reserve(length + count)
        end = length + count
        for (pool_k, pool_v), (k, v) in zip(self.tensors(), layers, strict=True):
            pool_k[slot, :, length:end] = k[0, :, length:end]
            pool_v[slot, :, length:end] = v[0, :, length:end]

    def _release(self, slot: int) -> None:
        with self._lock:
            self._live -= 1
            self._free.append(slot)
            if not self._live:
                self.keys, self.values, self._free = [], [], []

    def _allocate(self, template: Layers, rows: int) -> None:
        capacity = _rounded(0)
        self.keys = [k.new_zeros(rows, k.shape[1], capacity, k.shape[3]) for k, _ in template]
        self.values = [v.new_zeros(rows, v.shape[1], capacity, v.shape[3]) for _, v in template]
        self._free = list(range(rows - 1, -1, -1))

    def _grow(self, rows: int | None = None, capacity: int | None = None) -> None:
        """Larger tensors with the old ones copied in (zeros elsewhere: padding a masked column
        reads must stay finite, since attention weighs it by zero)."""
        old_rows, old_capacity = self.rows, self.capacity
        rows, capacity = rows or old_rows, capacity or old_capacity

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = old.new_zeros(rows, old.shape[1], capacity, old.shape[3])
            new[:old_rows, :, :old_capacity] = old
            return new

        self.keys = [grown(k) for k in self.keys]
        self.values = [grown(v) for v in self.values]
        self._free = list(range(rows - 1, old_rows - 1, -1)) + self._free


def _rounded(columns: int) -> int:
    return max(64, -(-columns // 64) * 64)


def croppable_dynamic(cache: Any) -> bool:
    """A cache the batched forward can take apart: none yet, or a plain DynamicCache."""
    from transformers import DynamicCache

    if cache is None:
        return True
    if type(cache) is not DynamicCache:
        return False
    layers = getattr(cache, "layers", None)
    return layers is None or all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def layer_kv(cache: Any) -> Layers:
    """Each layer's keys and values, [batch, heads, length, head_dim]."""
    if hasattr(cache, "layers"):  # transformers 5.x
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # 4.x


def cache_of(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):  # 4.x
        return DynamicCache.from_legacy_cache(tuple(layers))
    return DynamicCache(list(layers))
