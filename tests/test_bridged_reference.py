"""The bridged loop (base and proxies on different tokenizers, alpha != 0) against a reference
written from scratch (tests/reference_bridged.py: no vocab.py, bridge.py or combine.py).

The base is the tiny byte-level BPE model served in-process (LocalBase); the proxies are
expert_sp / anti_expert_sp, on a Metaspace + byte-fallback tokenizer. The loop's proxy ids are
recorded at each step; the reference checks that they spell the base's bytes, then recomputes
every step's candidates and scores with full forwards of all three models.
"""

from __future__ import annotations

import pytest
from local_base import LocalBase
from reference import assert_same_tokens
from reference_bridged import bridge_maps, bridged_step, spelled
from transformers import AutoTokenizer

from proxyclient import ProxyTuner
from proxyclient.tokenizer import BaseTokenizer

N = 12
K = 8
# Chosen so that, under `prefix`, base tokens without a proxy twin are chosen (checked below).
PROMPTS = ["def main():", "import os\nclass Foo(object):\n    ", "x = '日本' # 🙂"]


@pytest.fixture(scope="module")
def world(tiny_models, hf_models):
    proxy_tokenizer = AutoTokenizer.from_pretrained(tiny_models["anti_expert_sp"])
    maps = bridge_maps(hf_models["tokenizer"], proxy_tokenizer)
    with ProxyTuner(
        LocalBase(hf_models["base"]), tiny_models["expert_sp"], tiny_models["anti_expert_sp"],
        base_tokenizer=BaseTokenizer(hf_models["tokenizer"]), device="cpu",
    ) as tuner:  # fmt: skip
        yield {
            "tuner": tuner,
            "maps": maps,
            "proxy_tokenizer": proxy_tokenizer,
            "base": hf_models["base"],
            "expert": hf_models["expert_sp"],
            "anti": hf_models["anti_expert_sp"],
            "base_tokenizer": hf_models["tokenizer"],
        }


def _generate_recording(tuner, monkeypatch, prompt, **settings):
    """The loop's generation, and the proxy ids (expert, anti) it fed at each step."""
    fed: list[tuple[list[int], list[int]]] = []
    pair = tuner.proxies
    real = type(pair).logprobs

    async def recording(state, expert_ids, anti_ids, positions=1):
        fed.append((list(expert_ids), list(anti_ids)))
        return await real(pair, state, expert_ids, anti_ids, positions)

    with monkeypatch.context() as patch:
        patch.setattr(pair, "logprobs", recording)
        got = tuner.generate(prompt, max_new_tokens=N, top_logprobs=K, speculate="off", **settings)
    return got, fed


def _check(world, monkeypatch, prompt, *, alpha, unseen, untwinned):
    """Runs the loop and the reference; the reference's steps."""
    maps = world["maps"]
    got, fed = _generate_recording(
        world["tuner"], monkeypatch, prompt, alpha=alpha, unseen=unseen, untwinned=untwinned
    )
    assert got.error is None
    base_prompt = world["base_tokenizer"](prompt).input_ids
    proxy_prompt = world["proxy_tokenizer"](prompt).input_ids
    # One forward per step (speculate off), the EOS step included.
    assert len(fed) == len(got.token_ids) + (got.finish_reason == "eos")
    steps, untwinned_seen, dropped = [], 0, 0
    for i, (expert_ids, anti_ids) in enumerate(fed):
        assert expert_ids == anti_ids  # no chat template: one prompt for both
        assert anti_ids[: len(proxy_prompt)] == proxy_prompt
        # Independently of the realigner: the proxies read exactly the bytes the base produced.
        generated = got.token_ids[:i]
        assert spelled(maps.proxy_bytes, anti_ids[len(proxy_prompt) :]) == spelled(
            maps.base_bytes, generated
        ), f"step {i}: proxy ids {anti_ids} spell other bytes than base ids {generated}"
        step = bridged_step(
            world["base"], world["expert"], world["anti"], base_prompt + generated, anti_ids,
            maps, k=K, alpha=alpha, unseen=unseen, untwinned=untwinned,
        )  # fmt: skip
        untwinned_seen += sum(maps.twin[t] < 0 for t in step.top_k)
        to_proxy = maps.prefix if untwinned == "prefix" else maps.twin
        dropped += sum(to_proxy[t] < 0 for t in step.top_k)
        steps.append(step)
    eos = frozenset({world["base_tokenizer"].eos_token_id})
    assert_same_tokens(got.token_ids, steps, eos)
    if [s.token for s in steps][: len(got.token_ids)] == got.token_ids:  # no tie taken apart
        assert got.usage.untwinned_candidates == untwinned_seen
        assert got.usage.dropped_candidates == dropped
    return got, steps


@pytest.mark.parametrize("unseen", ["restrict", "residual"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_twins_only_matches_the_reference(world, monkeypatch, alpha, unseen):
    for prompt in PROMPTS:
        _check(world, monkeypatch, prompt, alpha=alpha, unseen=unseen, untwinned="drop")


@pytest.mark.parametrize("unseen", ["restrict", "residual"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_untwinned_candidates_under_prefix_match_the_reference(world, monkeypatch, alpha, unseen):
    chosen_untwinned = 0
    for prompt in PROMPTS:
        got, steps = _check(
            world, monkeypatch, prompt, alpha=alpha, unseen=unseen, untwinned="prefix"
        )
        assert got.usage.untwinned_candidates > 0
        chosen_untwinned += sum(
            s.untwinned_chosen and s.token == t for s, t in zip(steps, got.token_ids, strict=False)
        )
    # The prefix rule decided something: tokens without a twin were chosen, and matched.
    assert chosen_untwinned > 0
