"""Speculation when the base and the proxies tokenize differently: the same output as one token
per request, under every unseen policy and untwinned rule.

Three tokenizer pairs whose token boundaries differ (base -> proxies):

- ``bpe->sp``: the byte-level BPE base, proxies on a Metaspace + byte-fallback tokenizer;
- ``bpe->fine``: the same base, proxies on a Metaspace tokenizer with almost no merges, so one
  base token is spelled by several proxy tokens;
- ``fine->bpe``: the reverse, a base with about one token per character and byte-level proxies,
  so several base tokens make up what the proxies' own tokenizer would spell as one.

Greedy base drafts must give ``off``'s tokens, and read the proxies at every drafted position
exactly where the one-token loop reads them; ``off`` itself is checked against the independent
bridged reference (tests/support/reference_bridged.py). tests/test_integration_tokenizers.py does
the same through a real vLLM server.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from proxyclient import ConfigError, ProxyTuner
from proxyclient.config import Speculate
from proxyclient.sampling import warp
from proxyclient.tokenizer import BaseTokenizer
from tests.support.local_base import LocalBase
from tests.support.reference import assert_samples_follow, joint_distribution
from tests.support.reference_bridged import BridgedWorld, bridged_step, spelled
from tests.support.speculation_checks import (
    DRAFT_TOKENS,
    UNSEEN,
    UNTWINNED,
    assert_drafts_give_off_tokens,
    property_settings,
)

PAIRS = {  # name: (base, expert, anti-expert), keys of the tiny models
    "bpe->sp": ("base", "expert_sp", "anti_expert_sp"),
    "bpe->fine": ("base", "expert_fine", "anti_expert_fine"),
    "fine->bpe": ("base_fine", "expert", "anti_expert"),
}
N = 16
# Prompt pieces: code, prose, multi-byte characters (a base token may end inside one).
# fmt: off
FRAGMENTS = ["def ", "main", "():", "\n    ", "import os", " class", "The licensee", " shall",
             "You may", " convey", " return", "x = '", "日本", "🙂", "é", " #", "0", ", "]
# fmt: on


def bridged_tuner(tiny_models, hf_models, pair: str, **options) -> tuple[ProxyTuner, BridgedWorld]:
    base_key, expert_key, anti_key = PAIRS[pair]
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_models[base_key])
    world = BridgedWorld(
        hf_models[base_key], hf_models[expert_key], hf_models[anti_key], base_tokenizer,
        AutoTokenizer.from_pretrained(tiny_models[anti_key]),
    )  # fmt: skip
    tuner = ProxyTuner(
        LocalBase(hf_models[base_key], drafts=True), tiny_models[expert_key],
        tiny_models[anti_key], base_tokenizer=BaseTokenizer(base_tokenizer), device="cpu",
        **options,
    )  # fmt: skip
    return tuner, world


@pytest.fixture(scope="module", params=list(PAIRS))
def bridged(request, tiny_models, hf_models):
    tuner, world = bridged_tuner(tiny_models, hf_models, request.param)
    with tuner:
        yield tuner, world


def test_the_pairs_split_text_differently(bridged):
    """The premise: base tokens and the proxy tokens that spell them are not one to one, or the
    proxies read the text in other pieces than their own tokenizer would cut it."""
    tuner, world = bridged
    text = " import os\nclass Foo(object):\n    def main(self): return 1"
    base_ids = world.base_tokenizer(text, add_special_tokens=False).input_ids
    realigner = tuner.tokens.realigner()
    spellings = [realigner.feed(t) for t in base_ids]
    proxy_ids = [i for ids in spellings for i in ids]
    assert spelled(world.maps.proxy_bytes, proxy_ids) == spelled(world.maps.base_bytes, base_ids)
    own = world.proxy_tokenizer(text, add_special_tokens=False).input_ids
    several = sum(len(ids) > 1 for ids in spellings)
    assert several >= len(base_ids) // 4 or len(own) < len(proxy_ids) // 2, spellings


@pytest.mark.slow  # 25 examples of several generations each, per pair: ~20 s a pair
@property_settings(max_examples=25)
@given(
    prompt=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=5).map("".join),
    alpha=st.sampled_from([0.5, 1.0, 1.5, 2.0]),
    draft_tokens=DRAFT_TOKENS,
    k=st.sampled_from([5, 20]),
    unseen=UNSEEN,
    untwinned=UNTWINNED,
    mode=st.sampled_from(["base", "stream"]),
)
def test_base_drafts_give_off_tokens(
    bridged, prompt, alpha, draft_tokens, k, unseen, untwinned, mode
):
    tuner, world = bridged
    assert_drafts_give_off_tokens(
        tuner,
        world,
        prompt,
        draft_tokens=draft_tokens,
        mode=mode,
        max_new_tokens=N,
        alpha=alpha,
        base_k=k,
        unseen=unseen,
        untwinned=untwinned,
    )


def test_auto_streams_base_drafts_work_and_expert_drafts_are_refused(bridged):
    tuner, _ = bridged
    assert tuner.speculation_modes() == [Speculate.STREAM, Speculate.BASE]
    options = dict(max_new_tokens=N, alpha=1.0, base_k=20)
    off = tuner.generate("The licensee shall", speculate="off", **options)
    for mode in ("auto", "stream", "base"):
        got = tuner.generate("The licensee shall", speculate=mode, **options)
        assert got.token_ids == off.token_ids, mode
        assert got.usage.requests < off.usage.requests, mode  # it did draft
    with pytest.raises(ConfigError, match="expert drafts only for a base that shares"):
        tuner.generate("The licensee shall", speculate="expert", **options)


def exact_bridged_distribution(tuner, world: BridgedWorld, prompt: str, *, top_k: int, length: int):
    """The bridged proxy-tuned sampling distribution of the next ``length`` tokens (alpha 1,
    whole vocabulary, `prefix`), from the reference's full-forward scores. The proxy ids after
    each prefix are the loop's own spelling, checked byte for byte."""
    base_prompt = world.base_tokenizer(prompt).input_ids
    proxy_prompt = world.proxy_tokenizer(prompt).input_ids
    size = len(world.maps.twin)

    def q(prefix: tuple[int, ...]):
        realigner = tuner.tokens.realigner()
        spelling = [i for token in prefix for i in realigner.feed(token)]
        assert spelled(world.maps.proxy_bytes, spelling) == spelled(world.maps.base_bytes, prefix)
        step = bridged_step(
            world.base, world.expert, world.anti, [*base_prompt, *prefix], proxy_prompt + spelling,
            world.maps, k=size, alpha=1.0, unseen="restrict", untwinned="prefix",
        )  # fmt: skip
        return warp(step.scores, temperature=1.0, top_k=top_k, top_p=1.0).softmax(dim=0)

    return joint_distribution(q, length)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off", "base"])
def test_sampling_with_base_drafts_keeps_the_bridged_distribution(tiny_models, hf_models, mode):
    """Chi-square of 1500 three-token samples against the exact bridged distribution (top-k 3 at
    temperature 1: 27 outcomes; three tokens, so that a draft's third position is read after two
    drafted tokens). "off" is the control."""
    tuner, world = bridged_tuner(tiny_models, hf_models, "bpe->sp")
    prompt = "The licensee shall"
    with tuner:
        exact = exact_bridged_distribution(tuner, world, prompt, top_k=3, length=3)
        assert_samples_follow(
            tuner, prompt, exact, n=1500, temperature=1.0, top_k=3, base_k=-1,
            untwinned="prefix", speculate=mode, draft_tokens=3,
        )  # fmt: skip
