"""Proxy-tuning across two tokenizers, recomputed from scratch: the anchor for the bridged loop.

Deliberately independent of proxyclient (it imports nothing from it, in particular not its
``vocab``, ``bridge`` or ``combine``): every token's bytes are read off the tokenizers here
(GPT-2's byte map for byte-level BPE, Metaspace + ``<0xNN>`` byte fallback; either side may be
either),
twins are found by comparing those bytes in a dictionary built here, and every step runs full
forwards of all three models (no KV cache) and scores the candidates with plain tensor math.

What it is given: the base ids so far and the proxy ids the loop fed the proxies at that step
(recorded from the loop). ``proxy_bytes`` lets a test check independently that those proxy ids
spell the same bytes as the base's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tests.support.reference import assert_same_tokens

_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def gpt2_byte_map() -> dict[str, int]:
    """The printable stand-in character of each byte in byte-level BPE token strings -> byte."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    stand_in = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in stand_in:
            stand_in[b] = chr(256 + shifted)
            shifted += 1
    return {char: b for b, char in stand_in.items()}


def byte_level_bytes(tokenizer) -> list[bytes | None]:
    """Bytes of every id of a byte-level BPE tokenizer; None for special tokens."""
    byte_of = gpt2_byte_map()
    special = set(tokenizer.all_special_ids)
    strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [None if i in special else bytes(byte_of[c] for c in s) for i, s in enumerate(strings)]


def metaspace_bytes(tokenizer) -> tuple[list[bytes | None], set[int]]:
    """Bytes of every id of a Metaspace + byte-fallback tokenizer (None for special tokens), and
    the ids of its ``<0xNN>`` byte-fallback tokens."""
    special = set(tokenizer.all_special_ids)
    strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    table: list[bytes | None] = []
    fallback: set[int] = set()
    for i, s in enumerate(strings):
        match = _FALLBACK.match(s)
        if match:
            fallback.add(i)
            table.append(bytes([int(match.group(1), 16)]))
        elif i in special:
            table.append(None)
        else:
            table.append(s.replace("\u2581", " ").encode("utf-8"))
    return table, fallback


@dataclass
class BridgeMaps:
    """Base id -> proxy id, found by bytes. -1 where there is none."""

    base_bytes: list[bytes | None]
    proxy_bytes: list[bytes | None]
    twin: list[int]  # the proxy token with exactly the same bytes (EOS pairs with EOS)
    prefix: list[int]  # twin, else the longest proxy token the base token's bytes begin with


def token_bytes(tokenizer) -> tuple[list[bytes | None], set[int]]:
    """Bytes of every id (Metaspace + byte fallback when the tokenizer has ``<0x00>``, else
    byte-level BPE), and the ids of byte-fallback tokens (none for byte-level BPE)."""
    if "<0x00>" in tokenizer.get_vocab():
        return metaspace_bytes(tokenizer)
    return byte_level_bytes(tokenizer), set()


def bridge_maps(base_tokenizer, proxy_tokenizer) -> BridgeMaps:
    base_bytes, _ = token_bytes(base_tokenizer)
    proxy_bytes, fallback = token_bytes(proxy_tokenizer)
    # Where several proxy ids spell the same bytes, the one the tokenizer emits wins: a piece
    # over a byte-fallback token, then the lowest id.
    by_bytes: dict[bytes, int] = {}
    for i, data in enumerate(proxy_bytes):
        if data is not None and i not in fallback:
            by_bytes.setdefault(data, i)
    for i in sorted(fallback):
        by_bytes.setdefault(proxy_bytes[i], i)
    twin, prefix = [], []
    for data in base_bytes:
        if data is None:
            twin.append(-1)
            prefix.append(-1)
            continue
        twin.append(by_bytes.get(data, -1))
        start = next(
            (by_bytes[data[:n]] for n in range(len(data), 0, -1) if data[:n] in by_bytes), -1
        )
        prefix.append(start)
    base_eos, proxy_eos = base_tokenizer.eos_token_id, proxy_tokenizer.eos_token_id
    twin[base_eos] = prefix[base_eos] = proxy_eos
    return BridgeMaps(base_bytes, proxy_bytes, twin, prefix)


@torch.inference_mode()
def _last_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return torch.log_softmax(logits, dim=-1)


@dataclass
class BridgedStep:
    token: int  # the argmax, a base id
    scores: torch.Tensor  # [V_base] proxy-tuned scores, -inf where no candidate
    top_k: list[int]  # the base's top-k ids
    untwinned_chosen: bool  # the argmax has no proxy twin (scored through its prefix)


def bridged_step(
    base,
    expert,
    anti_expert,
    base_ids: list[int],
    proxy_ids: list[int],
    maps: BridgeMaps,
    *,
    k: int,
    alpha: float,
    unseen: str,
    untwinned: str,
) -> BridgedStep:
    """One greedy step: ``unseen`` is "restrict" or "residual", ``untwinned`` "prefix" or
    "drop"; the proxies read ``proxy_ids`` (expert prompt = anti-expert prompt)."""
    base_lp = _last_logprobs(base, base_ids)
    expert_lp = _last_logprobs(expert, proxy_ids)
    anti_lp = _last_logprobs(anti_expert, proxy_ids)
    size = len(maps.twin)
    to_proxy = maps.prefix if untwinned == "prefix" else maps.twin
    top = torch.topk(base_lp, k)
    top_ids = top.indices.tolist()
    base_score = torch.full((size,), -math.inf, dtype=torch.float64)
    for token, lp in zip(top_ids, top.values.tolist(), strict=True):
        if token < size and to_proxy[token] >= 0:
            base_score[token] = lp
    if unseen == "residual":
        shared = [t for t in range(size) if to_proxy[t] >= 0]
        seen = {t for t in top_ids if t < size and to_proxy[t] >= 0}
        leftover = 1.0 - sum(math.exp(v) for v in top.values.tolist())
        n_unseen = len(shared) - len(seen)
        unseen_lp = math.log(leftover / n_unseen) if leftover > 0 and n_unseen else -math.inf
        for t in shared:
            if t not in seen:
                base_score[t] = unseen_lp
    elif unseen != "restrict":
        raise ValueError(unseen)
    scores = torch.full((size,), -math.inf, dtype=torch.float64)
    for t in torch.nonzero(base_score > -math.inf).flatten().tolist():
        p = to_proxy[t]
        scores[t] = base_score[t] + alpha * (float(expert_lp[p]) - float(anti_lp[p]))
    token = int(torch.argmax(scores))
    return BridgedStep(token, scores, top_ids, maps.twin[token] < 0)


def spelled(table: list[bytes | None], ids: list[int]) -> bytes:
    """The bytes of ``ids`` (special tokens spell nothing)."""
    return b"".join(table[i] or b"" for i in ids)


# -- checking the loop against it ----------------------------------------------------------------


@dataclass
class BridgedWorld:
    """Three models on two tokenizers, loaded with transformers (fp32, CPU), and their maps."""

    base: object
    expert: object
    anti: object
    base_tokenizer: object
    proxy_tokenizer: object

    def __post_init__(self) -> None:
        self.maps = bridge_maps(self.base_tokenizer, self.proxy_tokenizer)


@contextmanager
def recording_proxy_ids(pair) -> Iterator[list[tuple[list[int], list[int]]]]:
    """While open, every (expert ids, anti ids) that ``pair`` (the loop's ProxyPair) is asked
    to read, in order."""
    fed: list[tuple[list[int], list[int]]] = []
    real = pair.logprobs

    async def recording(state, expert_ids, anti_ids, positions=1):
        fed.append((list(expert_ids), list(anti_ids)))
        return await real(state, expert_ids, anti_ids, positions)

    pair.logprobs = recording
    try:
        yield fed
    finally:
        del pair.logprobs


def check_one_token_loop(
    tuner, world: BridgedWorld, prompt: str, *, n: int, k: int, alpha: float, unseen: str,
    untwinned: str,
):  # fmt: skip
    """``tuner``'s greedy generation with one request per token equals the reference, step by
    step: the proxy ids it fed spell exactly the base's bytes, and the reference recomputes each
    step's scores from them with full forwards. Returns (generation, reference steps)."""
    maps = world.maps
    with recording_proxy_ids(tuner.proxies) as fed:
        got = tuner.generate(
            prompt, max_new_tokens=n, base_k=k, speculate="off", alpha=alpha,
            unseen=unseen, untwinned=untwinned,
        )  # fmt: skip
    assert got.error is None
    base_prompt = world.base_tokenizer(prompt).input_ids
    proxy_prompt = world.proxy_tokenizer(prompt).input_ids
    # One forward per step (speculate off), the EOS step included.
    assert len(fed) == len(got.token_ids) + (got.finish_reason == "eos")
    steps = []
    for i, (expert_ids, anti_ids) in enumerate(fed):
        assert expert_ids == anti_ids  # no chat template: one prompt for both
        assert anti_ids[: len(proxy_prompt)] == proxy_prompt
        # Independently of the realigner: the proxies read exactly the bytes the base produced.
        generated = got.token_ids[:i]
        assert spelled(maps.proxy_bytes, anti_ids[len(proxy_prompt) :]) == spelled(
            maps.base_bytes, generated
        ), f"step {i}: proxy ids {anti_ids} spell other bytes than base ids {generated}"
        steps.append(
            bridged_step(
                world.base,
                world.expert,
                world.anti,
                base_prompt + generated,
                anti_ids,
                maps,
                k=k,
                alpha=alpha,
                unseen=unseen,
                untwinned=untwinned,
            )
        )
    assert_same_tokens(got.token_ids, steps, frozenset({world.base_tokenizer.eos_token_id}))
    return got, steps
