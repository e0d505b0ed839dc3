"""Speculation: several tokens per request to the base, the same output as one per request.

Greedy: token for token what `speculate="off"` gives (and so the paper's formula with the whole
vocabulary), in every mode, whatever the draft length; stop sequences, EOS and max_new_tokens act
as without speculation. Sampling: the standard acceptance rule keeps the distribution; a chi-square
test against the exact proxy-tuned distribution of two-token continuations checks it.
Against an in-process base (tests/support/local_base.py); tests/test_integration_vllm.py does the
same through a real vLLM server.
"""

import pytest
import torch

from proxyclient import ConfigError, GenerationConfig, ProxyTuner
from proxyclient.sampling import verify, warp
from tests.support.local_base import LocalBase
from tests.support.reference import (
    assert_same_tokens,
    assert_samples_follow,
    joint_distribution,
    next_logprobs,
    proxy_tuned_greedy,
)

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]
MODES = ["stream", "base", "expert", "auto"]


@pytest.fixture(scope="module")
def tuner(tiny_models, hf_models):
    with ProxyTuner(
        LocalBase(hf_models["base"], drafts=True),
        tiny_models["expert"],
        tiny_models["anti_expert"],
        device="cpu",
    ) as t:
        yield t


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_whole_vocabulary_equals_the_formula(tuner, hf_models, mode, alpha, prompt):
    got = tuner.generate(prompt, max_new_tokens=16, alpha=alpha, base_k=-1, speculate=mode)
    expected = proxy_tuned_greedy(
        hf_models["base"], hf_models["expert"], hf_models["anti_expert"],
        tuner.tokenizer(prompt).input_ids, alpha=alpha, max_new_tokens=16, eos_ids=tuner.eos_ids,
    )  # fmt: skip
    assert_same_tokens(got.token_ids, expected, tuner.eos_ids)
    # Never more round trips than tokens (each request yields its accepted draft plus one).
    assert got.usage.requests <= len(got.token_ids)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("draft_tokens", [1, 3, 8])
@pytest.mark.parametrize(("k", "unseen"), [(20, "residual"), (5, "restrict"), (5, "floor")])
def test_greedy_equals_off_under_every_policy(tuner, mode, draft_tokens, k, unseen):
    options = dict(max_new_tokens=20, alpha=1.5, base_k=k, unseen=unseen)
    off = tuner.generate(PROMPTS[1], speculate="off", **options)
    got = tuner.generate(PROMPTS[1], speculate=mode, draft_tokens=draft_tokens, **options)
    assert got.token_ids == off.token_ids
    assert got.text == off.text and got.finish_reason == off.finish_reason
    assert got.usage.completion_tokens == off.usage.completion_tokens == 20
    assert off.usage.requests == 20 and off.usage.accepted_draft_tokens == 0
    assert got.usage.requests <= off.usage.requests
    # Each request gives the accepted part of its draft plus one token of its own at most.
    assert got.usage.accepted_draft_tokens >= 20 - 2 * got.usage.requests
    assert got.usage.base_completion_tokens >= got.usage.accepted_draft_tokens


@pytest.mark.parametrize("draft_tokens", [2, 4, 8])
def test_base_drafts_cost_one_proxy_forward_per_request(tuner, draft_tokens):
    """After the prompt (read while the first request is out), the last step's correction is read
    in the forward that reads the draft: one forward per request, not one for the current
    position and one for the draft; the output stays that of one token per request."""
    options = dict(max_new_tokens=24, alpha=0.3, base_k=20)
    off = tuner.generate(PROMPTS[0], speculate="off", **options)
    tuner.proxies.batch_sizes.clear()
    got = tuner.generate(PROMPTS[0], speculate="base", draft_tokens=draft_tokens, **options)
    forwards = sum(tuner.proxies.batch_sizes.values())
    assert got.token_ids == off.token_ids
    assert got.usage.requests < len(got.token_ids)  # drafts were accepted
    # Draft-length-1 requests (after rejections) read the correction during the request: the
    # read of a one-token draft has nothing else to go with.
    assert forwards <= got.usage.requests + 1


def test_base_drafts_at_alpha_zero_are_accepted_whole(tuner):
    got = tuner.generate(PROMPTS[0], max_new_tokens=24, alpha=0.0, speculate="base",
                         draft_tokens=8)  # fmt: skip
    # 8, then 8, then 8 (the last request asks only for what is left)
    assert got.usage.requests == 3
    assert got.usage.accepted_draft_tokens == got.usage.base_completion_tokens == 24


@pytest.mark.parametrize("mode", MODES)
def test_stop_sequences_and_streaming_act_as_without_speculation(tuner, mode):
    free = tuner.generate(PROMPTS[1], max_new_tokens=20, speculate="off").text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {free!r}"
    options = dict(max_new_tokens=20, stop=[stop])
    off = tuner.generate(PROMPTS[1], speculate="off", **options)
    got = tuner.generate(PROMPTS[1], speculate=mode, **options)
    assert got.finish_reason == off.finish_reason == "stop"
    assert got.text == off.text and got.token_ids == off.token_ids
    pieces = list(tuner.stream(PROMPTS[1], speculate=mode, **options))
    assert pieces == list(tuner.stream(PROMPTS[1], speculate="off", **options))


class EndingBase(LocalBase):
    """The base after a few tokens of its own: EOS ranked first."""

    def __init__(self, model, eos, after):
        super().__init__(model, drafts=True)
        self.eos, self.after = eos, after

    def _logprobs(self, ids):
        rows = super()._logprobs(ids).clone()  # row j: after the first j + 1 ids
        late = torch.arange(len(ids)) + 1 >= self.after
        rows[late, self.eos] = rows[late].max(dim=-1).values + 5.0
        return torch.log_softmax(rows, dim=-1)


@pytest.mark.parametrize("mode", MODES)
def test_eos_inside_a_draft_ends_the_generation(tiny_models, hf_models, tuner, mode):
    eos = min(tuner.eos_ids)
    prompt_len = len(tuner.tokenizer(PROMPTS[0]).input_ids)
    base = EndingBase(hf_models["base"], eos, prompt_len + 5)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        off = t.generate(PROMPTS[0], max_new_tokens=20, alpha=0.5, speculate="off")
        got = t.generate(PROMPTS[0], max_new_tokens=20, alpha=0.5, speculate=mode)
    assert off.finish_reason == got.finish_reason == "eos"
    assert got.token_ids == off.token_ids and len(got.token_ids) == 5


def test_auto_prefers_a_stream_then_base_drafts_then_expert_drafts(tuner):
    assert [m.value for m in tuner.speculation_modes()] == ["stream", "base", "expert"]


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_a_stream_is_closed_at_the_first_disagreement(tiny_models, hf_models, alpha):
    base = LocalBase(hf_models["base"], drafts=True)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        off = t.generate(PROMPTS[1], max_new_tokens=24, alpha=alpha, speculate="off")
        base.requests.clear()
        base.streamed.clear()
        got = t.generate(
            PROMPTS[1], max_new_tokens=24, alpha=alpha, speculate="stream", stream_tokens=32
        )
    assert got.token_ids == off.token_ids and got.text == off.text
    assert got.usage.requests == len(base.requests) == len(base.streamed)
    # What the base generated for us is billed, read or not.
    assert got.usage.base_completion_tokens == sum(base.streamed)
    if alpha == 0:  # the base's own text: one request for all of it
        assert got.usage.requests == 1 and got.usage.accepted_draft_tokens == 24
        assert base.streamed == [24]
    else:  # one request per disagreement, each closed there unless it had delivered all
        assert got.usage.requests == 24 - got.usage.accepted_draft_tokens
        ends = zip(base.closed_early, base.streamed, base.asked, strict=True)
        assert all(closed or streamed == asked for closed, streamed, asked in ends)
        assert any(base.closed_early)
    assert base.open_streams == 0  # every stream was closed when its step ended


@pytest.mark.parametrize("stream_tokens", [1, 3])
def test_stream_tokens_caps_each_request(tuner, stream_tokens):
    options = dict(max_new_tokens=12, alpha=0.0)
    off = tuner.generate(PROMPTS[0], speculate="off", **options)
    got = tuner.generate(PROMPTS[0], speculate="stream", stream_tokens=stream_tokens, **options)
    assert got.token_ids == off.token_ids
    assert got.usage.requests == -(-12 // stream_tokens)


def test_a_stream_that_breaks_keeps_what_was_verified(tiny_models, hf_models):
    base = LocalBase(hf_models["base"], drafts=True, break_stream=(1, 5))
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        off = t.generate(PROMPTS[0], max_new_tokens=16, alpha=0.0, speculate="off")
        base.requests.clear()
        base.streamed.clear()
        got = t.generate(PROMPTS[0], max_new_tokens=16, alpha=0.0, speculate="stream")
    assert got.token_ids == off.token_ids and got.error is None
    assert base.streamed == [5, 11]  # dropped after 5; the next request went on from there
    assert base.requests[1] == base.requests[0] + off.token_ids[:5]


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_stream_tokens_below_one_is_refused(bad):
    with pytest.raises(ConfigError, match="stream_tokens must be an integer >= 1"):
        GenerationConfig(stream_tokens=bad)


def test_an_unsupported_mode_names_the_supported_ones(tiny_models, hf_models):
    plain = LocalBase(hf_models["base"])  # neither drafts nor scores
    with ProxyTuner(plain, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        with pytest.raises(ConfigError, match=r"speculate='expert'.*supported here: off, auto"):
            t.generate(PROMPTS[0], speculate="expert")
        assert t.generate(PROMPTS[0], max_new_tokens=3, speculate="auto").usage.requests == 3


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_draft_tokens_below_one_is_refused(bad):
    with pytest.raises(ConfigError, match="draft_tokens must be an integer >= 1"):
        GenerationConfig(draft_tokens=bad)


# -- sampling ----------------------------------------------------------------------------------


def test_verify_keeps_the_target_distribution():
    """x ~ p, then verify: the emitted index is distributed as q (total variation < 0.015)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0], dtype=torch.float64)
    p = torch.tensor([0.1, 0.4, 0.1, 0.1, 0.1, 0.2], dtype=torch.float64)
    n = 40_000
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(n):
        x = int(torch.multinomial(p, 1, generator=generator))
        index, _ = verify(q, p, x, float(p[x]), generator)
        counts[index] += 1
    assert 0.5 * float((counts / n - q).abs().sum()) < 0.015  # ~0.004 expected at this n


def exact_two_token_distribution(hf_models, prompt_ids, alpha, top_k):
    """The proxy-tuned sampling distribution of the next two tokens, from full forwards."""

    def q(ids):
        scores = sum(
            weight * next_logprobs(hf_models[name], ids)
            for name, weight in (("base", 1.0), ("expert", alpha), ("anti_expert", -alpha))
        )
        return warp(scores, temperature=1.0, top_k=top_k, top_p=1.0).softmax(dim=0)

    return joint_distribution(lambda prefix: q([*prompt_ids, *prefix]), 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off", "stream", "base", "expert"])
def test_sampling_with_drafts_keeps_the_distribution(tuner, hf_models, mode):
    """Chi-square of 1500 two-token samples against the exact distribution (top-k 4 at
    temperature 1: 16 outcomes). A p-value under 1e-4 fails; seeds are fixed, so the verdict is
    reproducible. "off" is the control: the same test on the plain sampler."""
    prompt_ids = tuner.tokenizer(PROMPTS[0]).input_ids
    exact = exact_two_token_distribution(hf_models, prompt_ids, alpha=1.0, top_k=4)
    assert_samples_follow(
        tuner, PROMPTS[0], exact, n=1500, temperature=1.0, top_k=4, base_k=-1,
        speculate=mode, draft_tokens=2,
    )  # fmt: skip
