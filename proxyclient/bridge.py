"""The bridge between a base and proxies that tokenize differently. Pure: no I/O, no models.

The shared vocabulary is the set of byte strings that are single tokens on both sides (special
tokens pair up by role: EOS with EOS). ``VocabBridge.twin[base_id]`` is the proxy id of the same
bytes, or -1. For a base token without a twin, ``prefix[base_id]`` is the longest proxy token its
bytes begin with: the first step of spelling it on the proxy side, whose expert/anti-expert
difference stands in for the whole token's under the ``prefix`` rule. Both are built once per
tokenizer pair (and cached on disk by ``bridge_cache``).

``Realigner`` keeps the two token sequences spelling the same bytes: each chosen base token is
turned into the proxy tokens that continue the proxy sequence with exactly its bytes.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch

from proxyclient.errors import ConfigError
from proxyclient.vocab import ByteVocab


@dataclass(frozen=True)
class VocabBridge:
    twin: torch.Tensor  # [V_base] int64: proxy id with the same bytes, -1 where there is none
    prefix: torch.Tensor  # [V_base] int64: twin, else the longest proxy token the bytes start with
    base_size: int
    proxy_size: int

    @property
    def shared(self) -> int:
        """Number of base tokens with a proxy twin."""
        return int((self.twin >= 0).sum())

    @functools.cached_property
    def untwinned(self) -> frozenset[int]:
        """The base ids without a proxy twin (read per position: a set, not a tensor lookup)."""
        return frozenset(torch.nonzero(self.twin < 0).flatten().tolist())

    @classmethod
    def identity(cls, size: int) -> VocabBridge:
        """Base and proxies share a tokenizer: every id is its own twin."""
        return cls(torch.arange(size), torch.arange(size), size, size)

    @classmethod
    def build(
        cls,
        base: ByteVocab,
        proxy: ByteVocab,
        special_pairs: dict[int, int] | None = None,
    ) -> VocabBridge:
        """Twins by exact bytes; ``special_pairs`` maps base special ids to proxy ones (EOS...)."""
        twin = [-1] * len(base)
        prefix = [-1] * len(base)
        longest = max((len(b) for b in proxy.token_bytes if b), default=0)
        for base_id, data in enumerate(base.token_bytes):
            if data is None:
                continue
            for length in range(min(len(data), longest), 0, -1):
                proxy_id = proxy.id_of(data[:length])
                if proxy_id is not None:
                    prefix[base_id] = proxy_id
                    if length == len(data):
                        twin[base_id] = proxy_id
                    break
        for base_id, proxy_id in (special_pairs or {}).items():
            twin[base_id] = prefix[base_id] = proxy_id
        as_tensor = lambda ids: torch.tensor(ids, dtype=torch.int64)  # noqa: E731
        return cls(as_tensor(twin), as_tensor(prefix), len(base), len(proxy))


def pair_fingerprint(base: ByteVocab, proxy: ByteVocab) -> str:
    """A digest of both byte vocabularies: the key of a cached bridge."""
    digest = hashlib.sha256()
    for vocab in (base, proxy):
        for data in vocab.token_bytes:
            digest.update(
                b"\x00" if data is None else b"\x01" + len(data).to_bytes(2, "big") + data
            )
        digest.update(b"\xff" + ",".join(map(str, sorted(vocab.special_ids))).encode())
        digest.update(b"\xfe" + ",".join(map(str, sorted(vocab.fallback_ids))).encode())
    return digest.hexdigest()[:32]


@dataclass
class Realigner:
    """Turns chosen base tokens into proxy tokens so that both sequences spell the same bytes.

    ``encode`` is the proxies' own tokenizer (text -> ids, no special tokens); its split is used
    when it spells the bytes exactly, else the longest proxy tokens that do (byte-level and
    byte-fallback vocabularies can spell any bytes). Bytes of an incomplete UTF-8 character wait
    for the next token when the proxy vocabulary has no single-byte tokens.
    """

    base: ByteVocab
    proxy: ByteVocab
    encode: object  # Callable[[str], list[int]]
    base_bytes: bytearray = field(default_factory=bytearray)  # generated so far, base side
    proxy_bytes: bytearray = field(default_factory=bytearray)  # generated so far, proxy side
    _longest: int = field(init=False, default=1)

    def __post_init__(self) -> None:
        self._longest = max((len(b) for b in self.proxy.token_bytes if b), default=1)

    def feed(self, base_id: int) -> list[int]:
        """The proxy ids that follow the base token ``base_id`` (maybe none, maybe several)."""
        data = self.base.token_bytes[base_id] if base_id < len(self.base) else None
        if data is None:
            raise ConfigError(
                f"base token {base_id} has no bytes (a special token) and no proxy twin"
            )
        self.base_bytes += data
        pending = bytes(self.base_bytes[len(self.proxy_bytes) :])
        ids = self._spell(pending)
        self.proxy_bytes += self.proxy.bytes_of(ids)
        return ids

    def can_feed(self, base_id: int) -> bool:
        """Whether ``base_id`` has bytes to spell (special tokens have none)."""
        return base_id < len(self.base) and self.base.token_bytes[base_id] is not None

    def rewind(self, base_len: int, proxy_len: int) -> None:
        """Back to when ``base_len`` / ``proxy_len`` bytes had been generated on each side."""
        del self.base_bytes[base_len:]
        del self.proxy_bytes[proxy_len:]

    @property
    def aligned(self) -> bool:
        return self.base_bytes == self.proxy_bytes

    def _spell(self, pending: bytes) -> list[int]:
        complete, rest = _complete_utf8(pending)
        ids: list[int] = []
        if complete:
            text = complete.decode("utf-8")
            canonical = list(self.encode(text))  # type: ignore[operator]
            exact = self.proxy.bytes_of(canonical) == complete
            ids = canonical if exact else self._longest_match(complete)
        if rest:
            tail = self._longest_match(rest, partial_ok=True)
            ids += tail
        return ids

    def _longest_match(self, data: bytes, *, partial_ok: bool = False) -> list[int]:
        ids: list[int] = []
        i = 0
        while i < len(data):
            for length in range(min(self._longest, len(data) - i), 0, -1):
                token_id = self.proxy.id_of(data[i : i + length])
                if token_id is not None:
                    ids.append(token_id)
                    i += length
                    break
            else:
                if partial_ok:  # no single-byte token: wait for the rest of the character
                    return ids
                raise ConfigError(
                    f"the proxies' vocabulary cannot spell the bytes {data[i : i + 8]!r}: proxy "
                    f"tokenizers need byte-level BPE or byte fallback for a different base"
                )
        return ids


def _complete_utf8(data: bytes) -> tuple[bytes, bytes]:
    """``data`` split into its longest valid UTF-8 prefix-with-complete-characters and the rest.

    Bytes that can never be UTF-8 stay in the first part only if decodable; otherwise everything
    from the first undecodable byte goes to the second part (spelled byte by byte).
    """
    try:
        data.decode("utf-8")
        return data, b""
    except UnicodeDecodeError as exc:
        return data[: exc.start], data[exc.start :]
