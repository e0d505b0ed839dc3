"""The vocabulary bridge of a tokenizer pair, built once and kept on disk.

Keyed by a digest of both byte vocabularies, so a changed tokenizer never reuses a stale bridge.
The folder is ``$PROXYCLIENT_CACHE_DIR`` or ``~/.cache/proxyclient``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from proxyclient.bridge import VocabBridge, pair_fingerprint
from proxyclient.tokenizer import BaseTokenizer
from proxyclient.vocab import ByteVocab

logger = logging.getLogger(__name__)

FORMAT = 3  # of the cached file; a new format never reads an old file


def cache_dir() -> Path:
    return Path(os.environ.get("PROXYCLIENT_CACHE_DIR", Path.home() / ".cache" / "proxyclient"))


def cached_bridge(
    base: BaseTokenizer, proxy: ByteVocab, proxy_eos: frozenset[int], proxy_size: int
) -> VocabBridge:
    """The bridge from ``base`` ids to proxy ids below ``proxy_size`` (what the proxies score)."""
    started = time.perf_counter()
    path = cache_dir() / "bridges" / f"{pair_fingerprint(base.vocab, proxy)}-v{FORMAT}.pt"
    maps = _load(path)
    source = "loaded"
    if maps is None:
        specials = {}
        if base.eos_token_id is not None and proxy_eos:
            specials[base.eos_token_id] = min(proxy_eos)
        built = VocabBridge.build(base.vocab, proxy, specials)
        maps = {"twin": built.twin, "prefix": built.prefix}
        _save(maps, path)
        source = "built"
    unscored = torch.tensor(-1)  # proxy ids past what the proxies score
    twin = torch.where(maps["twin"] < proxy_size, maps["twin"], unscored)
    prefix = torch.where(maps["prefix"] < proxy_size, maps["prefix"], unscored)
    bridge = VocabBridge(twin, prefix, len(base.vocab), proxy_size)
    logger.info(
        "vocabulary bridge %s in %.3f s: %d of %d base tokens have a proxy twin (%s)",
        source, time.perf_counter() - started, bridge.shared, bridge.base_size, path,
    )  # fmt: skip
    return bridge


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        maps = torch.load(path, weights_only=True)
    except Exception:  # any unreadable file (missing, truncated, garbage) is a cache miss
        return None
    return maps if isinstance(maps, dict) and {"twin", "prefix"} <= maps.keys() else None


def _save(maps: dict[str, torch.Tensor], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            torch.save(maps, f)
        os.replace(f.name, path)
    except OSError as exc:  # a read-only home is no reason to fail: the bridge is rebuilt next time
        logger.warning("could not cache the vocabulary bridge at %s: %s", path, exc)
