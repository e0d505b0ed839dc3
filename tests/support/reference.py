"""The paper's formula with all three models loaded locally: the correctness anchor.

Deliberately independent of proxyclient's loop: full forward over the whole sequence every step
(no KV cache), the whole vocabulary, plain argmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from tests.support.constants import BASE_NAME

TIE_TOLERANCE = 1e-5


@torch.inference_mode()
def next_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return torch.log_softmax(logits, dim=-1)


@dataclass
class ReferenceStep:
    token: int
    scores: torch.Tensor  # [V] proxy-tuned scores, -inf outside the allowed candidates


def proxy_tuned_greedy(
    base,
    expert,
    anti_expert,
    prompt_ids: list[int],
    *,
    alpha: float,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    restrict_to_top_k: int | None = None,
    expert_prompt_ids: list[int] | None = None,
    base_ids_for: Callable[[list[int]], list[int]] | None = None,
    unidentifiable: frozenset[int] = frozenset(),
    unseen: str = "restrict",
    allowed: Callable[[list[int]], torch.Tensor] | None = None,
    pairs: list[tuple[object, object, float]] | None = None,
) -> list[ReferenceStep]:
    """Greedy proxy-tuned decoding; with ``restrict_to_top_k`` the base reveals only its top-k.

    ``unseen`` says what the base scores outside that top-k are: ``restrict`` (none: only the
    top-k compete), ``floor`` (every token competes; an unseen one gets the k-th logprob) or
    ``residual`` (every token competes; the unseen share the leftover mass 1 - sum(top-k probs)
    evenly, each log(leftover / n_unseen)).

    ``base_ids_for(generated)`` gives what the base sees when a dialect sends it something other
    than our ids (a chat template, text it tokenizes again); ``unidentifiable`` are tokens a
    dialect cannot name (partial UTF-8 keyed by string): they hold their rank in the top-k but
    cannot be chosen. ``allowed(generated)``: [V] bool, the tokens a constraint allows next
    (structured outputs); the others get -inf.

    ``pairs`` (with ``expert`` and ``anti_expert`` None): several steering pairs, (expert,
    anti-expert, weight) each; the correction is ``alpha * sum_i weight_i (expert_i - anti_i)``.
    """
    if pairs is None:
        pairs = [(expert, anti_expert, 1.0)]
    else:
        assert expert is None and anti_expert is None, "give pairs or expert/anti_expert"
    ids = list(prompt_ids)
    expert_ids = list(expert_prompt_ids or prompt_ids)
    steps: list[ReferenceStep] = []
    for _ in range(max_new_tokens):
        generated = ids[len(prompt_ids) :]
        base_lp = next_logprobs(base, base_ids_for(generated) if base_ids_for else ids)
        rows = [
            (next_logprobs(e, expert_ids), next_logprobs(a, ids), weight) for e, a, weight in pairs
        ]
        vocab = min(base_lp.numel(), *(lp.numel() for e, a, _ in rows for lp in (e, a)))
        steer = sum(weight * (e[:vocab] - a[:vocab]) for e, a, weight in rows)
        scores = base_lp[:vocab] + alpha * steer
        if restrict_to_top_k is not None:
            top = torch.topk(base_lp[:vocab], restrict_to_top_k)
            if unseen == "restrict":
                unseen_lp = -torch.inf
            elif unseen == "floor":
                unseen_lp = float(top.values[-1])
            elif unseen == "residual":
                leftover = 1.0 - float(top.values.exp().sum())
                n_unseen = vocab - restrict_to_top_k
                unseen_lp = math.log(leftover / n_unseen) if leftover > 0 else -torch.inf
            else:
                raise ValueError(f"unknown unseen policy {unseen!r}")
            seen = base_lp[:vocab].clone()
            base_lp = torch.full_like(seen, unseen_lp)
            base_lp[top.indices] = seen[top.indices]
            scores = base_lp + alpha * steer
        if unidentifiable:
            scores[list(unidentifiable)] = -torch.inf
        if allowed is not None:
            mask = allowed(generated)
            scores[~mask[: scores.numel()]] = -torch.inf
        token = int(torch.argmax(scores))
        steps.append(ReferenceStep(token, scores))
        if token in eos_ids:
            break
        ids.append(token)
        expert_ids.append(token)
    return steps


def assert_same_tokens(
    got: list[int],
    reference: list[ReferenceStep],
    eos_ids: frozenset[int],
    tolerance: float = TIE_TOLERANCE,
) -> None:
    """Token for token equal (the loop leaves EOS out of its ids); a divergence is accepted only
    at a tie within ``tolerance``, after which the sequences legitimately differ."""
    expected = [s.token for s in reference]
    for i, step in enumerate(reference):
        if step.token in eos_ids:
            assert len(got) == i, f"reference ends with EOS after {i} tokens: {expected}; got {got}"
            return
        assert i < len(got), f"output ends after {len(got)} tokens; reference {expected}"
        if got[i] != step.token:
            gap = float(step.scores[step.token] - step.scores[got[i]])
            assert gap <= tolerance, (
                f"diverged at step {i}: got {got[i]}, reference {step.token} "
                f"(score gap {gap:.3g}); got {got}, expected {expected}"
            )
            return
    assert len(got) == len(reference), f"got {got}, expected {expected}"


def chat_server_sees(
    hf_tokenizer, prompt: str | list[dict[str, str]], response_prefix: str = ""
) -> Callable[[list[int]], list[int]]:
    """``base_ids_for`` of a chat server that continues a partial answer (a trailing assistant
    or model turn): the ids it conditions on, the chat template with the answer so far.

    ``prompt``: text (one user turn) or the conversation's messages, rendered with their roles;
    a conversation's answer starts with ``response_prefix``."""
    conversation = (
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    )

    def ids(generated: list[int]) -> list[int]:
        messages = list(conversation)
        answer = response_prefix + (hf_tokenizer.decode(generated) if generated else "")
        continuing = bool(generated) or bool(response_prefix)
        if continuing:
            messages.append({"role": "assistant", "content": answer})
        text = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not continuing,
            continue_final_message=continuing,
        )  # fmt: skip
        return hf_tokenizer(text, add_special_tokens=False).input_ids

    return ids


def assert_chat_tuner_equals_the_formula(
    tuner,
    hf_models,
    prompt: str,
    *,
    max_new_tokens: int,
    k: int,
    eos_ids: frozenset[int],
    unidentifiable: frozenset[int] = frozenset(),
):
    """``tuner``'s greedy output with top-k ``k`` and `restrict`, its base a chat dialect that
    continues a trailing turn (``chat_server_sees``), equals ``proxy_tuned_greedy`` restricted to
    that top-k; returns the generation."""
    got = tuner.generate(prompt, max_new_tokens=max_new_tokens, unseen="restrict", base_k=k)
    reference = proxy_tuned_greedy(
        hf_models["base"], hf_models["expert"], hf_models["anti_expert"],
        tuner.tokenizer(prompt).input_ids, alpha=1.0, max_new_tokens=max_new_tokens,
        eos_ids=eos_ids, restrict_to_top_k=k,
        base_ids_for=chat_server_sees(hf_models["tokenizer"], prompt),
        unidentifiable=unidentifiable,
    )  # fmt: skip
    assert_same_tokens(got.token_ids, reference, eos_ids)
    return got


def assert_greedy_drafts(
    got,
    model,
    context: list[int],
    *,
    n: int,
    k: int,
    eos_ids: frozenset[int],
    partial: frozenset[int] = frozenset(),
) -> None:
    """``got``, an adapter's greedy draft of ``n`` tokens with each position's top-``k``, is
    ``model``'s own greedy continuation of ``context`` (full forward each step) with its top-k.

    ``partial`` are tokens the dialect cannot name (part of a character): left out of a top-k but
    counted as unresolved, and a chosen one is None."""
    expected: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([context + expected])).logits[0, -1]
            logprobs = torch.log_softmax(logits.double(), -1)
            expected.append(int(logprobs.argmax()))
            if expected[-1] in eos_ids:
                expected.pop()  # the stop token is no position of the answer
                break
            top = torch.topk(logprobs, k)
            pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
            named = [(t, lp) for t, lp in pairs if t not in partial]
            position = got.tops[len(expected) - 1]
            assert list(position.token_ids) == [t for t, _ in named]
            assert position.logprobs == pytest.approx([lp for _, lp in named], abs=5e-5)
            assert position.unresolved == k - len(named)
    assert list(got.tokens) == [None if t in partial else t for t in expected]


def valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def not_utf8_alone(base_tokenizer) -> frozenset[int]:
    """Tokens a text dialect spells U+FFFD (or ""): they keep their rank but cannot be chosen."""
    table = base_tokenizer.vocab.token_bytes
    return frozenset(i for i, data in enumerate(table) if data is not None and not valid_utf8(data))


def chi_square_p_value(chi2: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty approximation)."""
    z = ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def joint_distribution(
    q: Callable[[tuple[int, ...]], torch.Tensor], length: int
) -> dict[tuple[int, ...], float]:
    """P(t_1..t_length) = q(())[t_1] * q((t_1,))[t_2] * ..., over the outcomes of non-zero
    probability; ``q(prefix)`` is the next token's distribution after ``prefix``."""
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, p in joint.items():
            row = q(prefix)
            for token in torch.nonzero(row).flatten().tolist():
                grown[(*prefix, token)] = p * float(row[token])
        joint = grown
    return joint


def assert_samples_follow(
    tuner, prompt: str, exact: dict[tuple[int, ...], float], *, n: int, **options
) -> None:
    """``n`` samples of ``tuner`` (seeds 0..n-1, so the verdict is reproducible), each as many
    tokens as ``exact``'s outcomes, pass a chi-square test against ``exact`` (a p-value under
    1e-4 fails)."""
    length = len(next(iter(exact)))
    counts = dict.fromkeys(exact, 0)
    for seed in range(n):
        got = tuner.generate(prompt, max_new_tokens=length, seed=seed, **options)
        outcome = tuple(got.token_ids)
        assert outcome in exact, f"{outcome} has probability 0 (seed {seed})"
        counts[outcome] += 1
    chi2 = sum((counts[o] - n * p) ** 2 / (n * p) for o, p in exact.items())
    dof = len(exact) - 1
    assert chi_square_p_value(chi2, dof) > 1e-4, f"chi2 {chi2:.1f} with {dof} dof; counts {counts}"


def server_greedy(server, prompt_ids: list[int], n: int) -> list[int]:
    """The base's own greedy continuation of ``prompt_ids``, generated by the vLLM server."""
    import httpx

    answer = httpx.post(
        f"{server.base_url}/completions",
        json={
            "model": BASE_NAME,
            "prompt": prompt_ids,
            "max_tokens": n,
            "temperature": 0,
            "return_token_ids": True,
        },
        timeout=60,
    ).json()
    return answer["choices"][0]["token_ids"]
