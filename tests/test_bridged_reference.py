"""The bridged loop (base and proxies on different tokenizers, alpha != 0) against a reference
written from scratch (tests/support/reference_bridged.py: no vocab.py, bridge.py or combine.py).

The base is the tiny byte-level BPE model served in-process (LocalBase); the proxies are
expert_sp / anti_expert_sp, on a Metaspace + byte-fallback tokenizer. The loop's proxy ids are
recorded at each step; the reference checks that they spell the base's bytes, then recomputes
every step's candidates and scores with full forwards of all three models.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from proxyclient import ProxyTuner
from proxyclient.tokenizer import BaseTokenizer
from tests.support.local_base import LocalBase
from tests.support.reference_bridged import BridgedWorld, check_one_token_loop

N = 12
K = 8
# Chosen so that, under `prefix`, base tokens without a proxy twin are chosen (checked below).
PROMPTS = ["def main():", "import os\nclass Foo(object):\n    ", "x = '日本' # 🙂"]


@pytest.fixture(scope="module")
def world(tiny_models, hf_models):
    proxy_tokenizer = AutoTokenizer.from_pretrained(tiny_models["anti_expert_sp"])
    with ProxyTuner(
        LocalBase(hf_models["base"]), tiny_models["expert_sp"], tiny_models["anti_expert_sp"],
        base_tokenizer=BaseTokenizer(hf_models["tokenizer"]), device="cpu",
    ) as tuner:  # fmt: skip
        yield tuner, BridgedWorld(
            hf_models["base"], hf_models["expert_sp"], hf_models["anti_expert_sp"],
            hf_models["tokenizer"], proxy_tokenizer,
        )  # fmt: skip


def _check(world, prompt, *, alpha, unseen, untwinned):
    """Runs the loop and the reference; the reference's steps."""
    tuner, reference = world
    maps = reference.maps
    got, steps = check_one_token_loop(
        tuner, reference, prompt, n=N, k=K, alpha=alpha, unseen=unseen, untwinned=untwinned
    )
    to_proxy = maps.prefix if untwinned == "prefix" else maps.twin
    if [s.token for s in steps][: len(got.token_ids)] == got.token_ids:  # no tie taken apart
        assert got.usage.untwinned_candidates == sum(
            maps.twin[t] < 0 for s in steps for t in s.top_k
        )
        assert got.usage.dropped_candidates == sum(to_proxy[t] < 0 for s in steps for t in s.top_k)
    return got, steps


@pytest.mark.parametrize("unseen", ["restrict", "residual"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_twins_only_matches_the_reference(world, alpha, unseen):
    for prompt in PROMPTS:
        _check(world, prompt, alpha=alpha, unseen=unseen, untwinned="drop")


@pytest.mark.parametrize("unseen", ["restrict", "residual"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_untwinned_candidates_under_prefix_match_the_reference(world, alpha, unseen):
    chosen_untwinned = 0
    for prompt in PROMPTS:
        got, steps = _check(world, prompt, alpha=alpha, unseen=unseen, untwinned="prefix")
        assert got.usage.untwinned_candidates > 0
        chosen_untwinned += sum(
            s.untwinned_chosen and s.token == t for s, t in zip(steps, got.token_ids, strict=False)
        )
    # The prefix rule decided something: tokens without a twin were chosen, and matched.
    assert chosen_untwinned > 0
