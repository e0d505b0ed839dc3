"""Many generations at once: results in input order, failures kept apart, and local forwards of
concurrent sequences batched — batched must equal unbatched, token for token (greedy, float32)."""

import asyncio

import pytest

from proxyclient import ConfigError, ProxyTuner
from proxyclient.errors import ServerError
from proxyclient.kvcache import KVState
from proxyclient.local import LocalModel
from tests.support.local_base import LocalBase

PROMPTS = [
    "def main():",
    "import os\nclass Foo(object):\n    ",
    "for i in range(10):",
    "x = ",
    "while True:\n    if",
    "print(",
]


class SlowBase(LocalBase):
    """Answers after a short network-like wait, so concurrent sequences overlap; fails the
    request that continues ``fail_prompt`` after ``fail_after`` generated tokens."""

    def __init__(self, model, *, fail_prompt=None, fail_after=3, **options):
        super().__init__(model, **options)
        self.fail_prompt, self.fail_after = fail_prompt, fail_after

    async def top_logprobs(self, prompt, k):
        await asyncio.sleep(0.002)
        failing = self.fail_prompt is not None and list(prompt.ids) == [
            *self.fail_prompt,
            *prompt.ids[len(self.fail_prompt) :],
        ]
        if failing and len(prompt.ids) == len(self.fail_prompt) + self.fail_after:
            raise ServerError("HTTP 503: injected fault", status_code=503, body=None)
        return await super().top_logprobs(prompt, k)


@pytest.fixture(scope="module")
def sequential(tiny_models, hf_models):
    with ProxyTuner(
        LocalBase(hf_models["base"]), tiny_models["expert"], tiny_models["anti_expert"]
    ) as tuner:
        yield {p: tuner.generate(p, max_new_tokens=12, base_k=20) for p in PROMPTS}


@pytest.mark.parametrize("speculate", ["off", "stream", "base"])
def test_concurrent_batched_generations_equal_sequential_ones(
    tiny_models, hf_models, sequential, speculate
):
    base = SlowBase(hf_models["base"], drafts=True)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"]) as tuner:
        results = tuner.generate_many(
            PROMPTS, max_new_tokens=12, base_k=20, speculate=speculate, concurrency=4
        )
        sizes = tuner.proxies.batch_sizes
    assert [r.token_ids for r in results] == [sequential[p].token_ids for p in PROMPTS]
    assert [r.text for r in results] == [sequential[p].text for p in PROMPTS]
    assert max(sizes) > 1, f"no forward held more than one sequence: {sizes}"
    assert max(sizes) <= 4


def test_one_failure_does_not_sink_the_others(tiny_models, hf_models, sequential):
    failing = PROMPTS[2]
    base = SlowBase(hf_models["base"], fail_prompt=hf_models["tokenizer"](failing).input_ids)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"]) as tuner:
        results = tuner.generate_many(PROMPTS, max_new_tokens=12, base_k=20, speculate="off")
    for prompt, result in zip(PROMPTS, results, strict=True):
        if prompt == failing:
            assert result.finish_reason == "error" and "injected fault" in result.error
            assert result.token_ids == sequential[prompt].token_ids[:3]  # what came before
        else:
            assert result.token_ids == sequential[prompt].token_ids and result.error is None


def test_bad_options_fail_once_before_any_request(tiny_models, hf_models):
    base = LocalBase(hf_models["base"])
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"]) as tuner:
        with pytest.raises(ConfigError, match="unknown generation option"):
            tuner.generate_many(PROMPTS, max_tokens=3)
        with pytest.raises(ConfigError, match="concurrency must be an integer >= 1"):
            tuner.generate_many(PROMPTS, concurrency=0)
    assert base.requests == []


def test_feed_many_equals_one_sequence_at_a_time(tiny_models):
    model = LocalModel.load(tiny_models["expert"], device="cpu")
    prefixes = [[0, 5, 9, 11, 300], [0, 44], [], [0, 7, 8, 9, 10, 11, 12, 13]]
    new = [[21, 22], [23], [0, 24, 25, 26], [27, 28]]
    one = [KVState() for _ in prefixes]
    many = [KVState() for _ in prefixes]
    for prefix, a, b in zip(prefixes, one, many, strict=True):
        if prefix:
            model.feed(a, prefix)
            model.feed(b, prefix)
    for step in range(4):
        # New tokens of different lengths with log-probs at a different number of positions in
        # each row (speculation's verify steps), then one token each; then a rollback.
        tokens = new if step == 0 else [[100 + step]] * len(prefixes)
        positions = [2, 1, 3, 1] if step == 0 else [1] * len(prefixes)
        if step == 3:
            for a, b in zip(one, many, strict=True):
                model.crop(a, a.length - 2)
                model.crop(b, b.length - 2)
        expected = [model.feed(s, t, n) for s, t, n in zip(one, tokens, positions, strict=True)]
        got = model.feed_many(many, tokens, positions)
        for e, g in zip(expected, got, strict=True):
            assert e.shape == g.shape
            assert (e - g).abs().max() < 1e-4
        assert [s.length for s in many] == [s.length for s in one]
    # A batched forward's rows rolled back, then fed alone (a Cache built from the cropped rows).
    model.crop(one[0], one[0].length - 3)
    model.crop(many[0], many[0].length - 3)
    assert many[0].length == one[0].length
    expected, got = model.feed(one[0], [31, 32], 2), model.feed(many[0], [31, 32], 2)
    assert (expected - got).abs().max() < 1e-4


def test_pooled_sequences_grow_share_rows_and_give_them_back(tiny_models):
    """Batched forwards keep every sequence in the model's pool: past its first capacity, in
    batches of changing membership, each row as fed alone; collected states free their rows,
    and with none left the pool holds no memory."""
    import gc

    model = LocalModel.load(tiny_models["expert"], device="cpu")
    one = [KVState() for _ in range(10)]
    many = [KVState() for _ in range(10)]
    for step in range(40):  # 3 tokens a step: 120 columns, past the first 64
        members = [i for i in range(10) if (i + step) % 3]  # a different batch each step
        tokens = [[(7 * i + step) % 500 + 1, 2, 3] for i in members]
        expected = [model.feed(one[i], t, 2) for i, t in zip(members, tokens, strict=True)]
        got = model.feed_many([many[i] for i in members], tokens, 2)
        for e, g in zip(expected, got, strict=True):
            assert (e - g).abs().max() < 1e-4
        if step % 7 == 6:
            for i in members:
                model.crop(one[i], one[i].length - 1)
                model.crop(many[i], many[i].length - 1)
    assert model.pool.capacity >= max(s.length for s in many) > 64
    assert sorted(s.slot for s in many) == list(range(10))
    del many[3:]
    gc.collect()
    fresh = [KVState() for _ in range(7)]
    model.feed_many(fresh, [[5]] * 7)
    assert sorted(s.slot for s in many + fresh) == list(range(10))  # freed rows taken again
    assert model.pool.rows <= 16
    del many, fresh
    gc.collect()
    assert model.pool.keys == [] and model.pool.rows == 0
