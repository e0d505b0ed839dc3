"""ProxyTuner.score: a continuation's log-likelihood under the proxy-tuned model, equal to the
paper's formula computed with all three models local over the whole vocabulary."""

from __future__ import annotations

import pytest
import torch

from proxyclient import ProxyTuner, UnsupportedError, connect
from tests.support.constants import BASE_NAME
from tests.support.local_base import LocalBase
from tests.support.reference import next_logprobs

PROMPT = "def add(a, b):\n"
ALPHA = 0.7


def reference(hf_models, prompt_ids: list[int], continuation: list[int]):
    """Each continuation token's log-prob under the formula, and whether all were the argmax."""
    ids, out, greedy = list(prompt_ids), [], True
    for token in continuation:
        base, expert, anti = (
            next_logprobs(hf_models[name], ids) for name in ("base", "expert", "anti_expert")
        )
        tuned = torch.log_softmax(base + ALPHA * (expert - anti), dim=-1)
        out.append(float(tuned[token]))
        greedy &= int(torch.argmax(tuned)) == token
        ids.append(token)
    return out, greedy


def check_score(tuner: ProxyTuner, hf_models) -> None:
    tokenizer = hf_models["tokenizer"]
    prompt_ids = tokenizer(PROMPT).input_ids
    greedy = tuner.generate(PROMPT, max_new_tokens=6, alpha=ALPHA, base_k=-1)
    # " naïve 😀": characters of several tokens each, every one of which reads as U+FFFD.
    for continuation in (greedy.text, " naïve 😀", " return a - b"):
        score = tuner.score(PROMPT, continuation, alpha=ALPHA, base_k=-1, unseen="restrict")
        assert score.tokens == tokenizer(PROMPT + continuation).input_ids[len(prompt_ids) :]
        expected, is_greedy = reference(hf_models, prompt_ids, score.tokens)
        assert score.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert score.logprob == pytest.approx(sum(expected), abs=1e-3)
        assert score.is_greedy == is_greedy
        if continuation.isascii():  # a token that is part of a character reads as U+FFFD
            assert "".join(score.token_texts) == continuation
        assert b"".join(bytes(s.token_bytes) for s in score.steps) == continuation.encode()
        assert score.usage.requests == 1
    assert not score.is_greedy  # " return a - b" is not what the tiny models would write


def test_score_is_the_formula_s_log_likelihood(tiny_models, hf_models):
    base = LocalBase(hf_models["base"], drafts=True)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as tuner:
        check_score(tuner, hf_models)


def test_a_base_that_cannot_score_says_so(tiny_models, hf_models):
    base = LocalBase(hf_models["base"])  # no prompt scoring
    tuner = ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")
    with tuner, pytest.raises(UnsupportedError, match="cannot score a given text"):
        tuner.score(PROMPT, " x")
    assert base.requests == []


@pytest.mark.integration
def test_score_against_real_vllm_prompt_logprobs(servers, tiny_models, hf_models):
    base = connect("vllm", servers["full"].base_url, BASE_NAME)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as tuner:
        check_score(tuner, hf_models)
