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


def cache_dir() -> Path:
    return Path(os.environ.get("PROXYCLIENT_CACHE_DIR", Path.home() / ".cache" / "proxyclient"))


def cached_bridge(
    base: BaseTokenizer, proxy: ByteVocab, proxy_eos: frozenset[int], proxy_size: int
) -> VocabBridge:
    """The bridge from ``base`` ids to proxy ids below ``proxy_size`` (what the proxies score)."""
    started = time.perf_counter()
    path = cache_dir() / "bridges" / f"{pair_fingerprint(base.vocab, proxy)}.pt"
    if path.exists():
        twin = torch.load(path, weights_only=True)
        source = "loaded"
    else:
        specials = {}
        if base.eos_token_id is not None and proxy_eos:
            specials[base.eos_token_id] = min(proxy_eos)
        twin = VocabBridge.build(base.vocab, proxy, specials).twin
        _save(twin, path)
        source = "built"
    twin = torch.where(twin < proxy_size, twin, torch.tensor(-1))
    bridge = VocabBridge(twin, len(base.vocab), proxy_size)
    logger.info(
        "vocabulary bridge %s in %.3f s: %d of %d base tokens have a proxy twin (%s)",
        source, time.perf_counter() - started, bridge.shared, bridge.base_size, path,
    )  # fmt: skip
    return bridge


def _save(twin: torch.Tensor, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            torch.save(twin, f)
        os.replace(f.name, path)
    except OSError as exc:  # a read-only home is no reason to fail: the bridge is rebuilt next time
        logger.warning("could not cache the vocabulary bridge at %s: %s", path, exc)
