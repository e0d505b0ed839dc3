"""Generation.steps: each output token's tuned, base, expert and anti-expert log-probs.

Checked against the paper's formula computed with all three models local over the whole
vocabulary (tests/support/reference.py's next_logprobs), with and without speculation.
"""

from __future__ import annotations

import math

import pytest
import torch

from proxyclient import GenerationConfig, ProxyTuner
from proxyclient.errors import ConfigError
from tests.support.local_base import LocalBase
from tests.support.reference import next_logprobs

PROMPT = "def add(a, b):"
ALPHA = 0.8


@pytest.mark.parametrize("speculate", ["off", "stream", "base", "expert"])
def test_each_step_holds_what_the_three_models_say(local_tuner, hf_models, speculate):
    config = GenerationConfig(
        max_new_tokens=10, alpha=ALPHA, base_k=-1, unseen="restrict", trace=3,
        speculate=speculate,
    )  # fmt: skip
    generation = local_tuner.generate(PROMPT, config)
    assert generation.steps is not None
    assert [s.token_id for s in generation.steps] == generation.token_ids
    assert "".join(s.text for s in generation.steps) == generation.text
    # The tiny models write bytes that are not UTF-8: the text shows them as U+FFFD, the bytes keep
    # them.
    generated = b"".join(bytes(s.token_bytes) for s in generation.steps)
    assert generated.decode(errors="replace") == generation.text
    ids = hf_models["tokenizer"](PROMPT).input_ids
    for step in generation.steps:
        base = next_logprobs(hf_models["base"], ids)
        expert = next_logprobs(hf_models["expert"], ids)
        anti = next_logprobs(hf_models["anti_expert"], ids)
        tuned = torch.log_softmax(base + ALPHA * (expert - anti), dim=-1)
        token = step.token_id
        assert step.logprob == pytest.approx(float(tuned[token]), abs=1e-4)
        assert step.base_logprob == pytest.approx(float(base[token]), abs=1e-4)
        assert step.expert_logprob == pytest.approx(float(expert[token]), abs=1e-4)
        assert step.anti_logprob == pytest.approx(float(anti[token]), abs=1e-4)
        best = torch.topk(tuned, 3)
        assert [a.token_id for a in step.top] == best.indices.tolist()
        assert all(a.token_bytes for a in step.top)
        assert [a.logprob for a in step.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert step.top[0].token_id == token  # greedy
        assert step.base_top is not None  # the base's own choice, and its log-prob
        assert step.base_top.token_id == int(torch.argmax(base))
        assert step.base_top.logprob == pytest.approx(float(base.max()), abs=1e-4)
        ids.append(token)
    # Steering moved some choices off the base's own: the trace tells which.
    assert any(s.base_top.token_id != s.token_id for s in generation.steps)


def test_no_trace_unless_asked_and_alternatives_are_bounded(local_tuner):
    assert local_tuner.generate(PROMPT, max_new_tokens=2).steps is None
    steps = local_tuner.generate(PROMPT, max_new_tokens=2, trace=0).steps
    assert steps is not None and len(steps) == 2 and all(s.top == [] for s in steps)
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(ConfigError, match="trace must be None"):
            GenerationConfig(trace=bad)


def test_a_restricted_step_normalizes_over_the_candidates(local_tuner):
    config = GenerationConfig(max_new_tokens=4, base_k=5, unseen="restrict", trace=5)
    generation = local_tuner.generate(PROMPT, config)
    for step in generation.steps:
        assert len(step.top) == 5
        assert math.fsum(math.exp(a.logprob) for a in step.top) == pytest.approx(1.0, abs=1e-9)


def test_a_resumed_generation_keeps_one_trace_per_token(tiny_models, hf_models, local_tuner):
    from proxyclient import ProxyClientError

    config = GenerationConfig(max_new_tokens=8, trace=2, speculate="off")
    whole = local_tuner.generate(PROMPT, config)
    failing = LocalBase(hf_models["base"], fail_at_request=4)
    with ProxyTuner(failing, tiny_models["expert"], tiny_models["anti_expert"]) as flaky:
        with pytest.raises(ProxyClientError) as failure:
            flaky.generate(PROMPT, config)
        partial = failure.value.partial
        assert partial.steps is not None and len(partial.steps) == len(partial.token_ids) == 3
        resumed = flaky.generate(PROMPT, config, resume=partial)
    assert resumed.token_ids == whole.token_ids
    assert [s.token_id for s in resumed.steps] == whole.token_ids
    want = [s.logprob for s in whole.steps]
    assert [s.logprob for s in resumed.steps] == pytest.approx(want, abs=1e-5)  # fp32 forwards
