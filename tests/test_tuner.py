"""The decoding loop against an in-process base (no server): equivalence with the paper's formula,
streaming, stop/eos/length, usage, and failures that keep the partial generation."""

import asyncio
import shutil

import pytest

from proxyclient import GenerationConfig, ModelLoadError, ProxyTuner
from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.errors import ServerError
from tests.support.local_base import LocalBase
from tests.support.reference import assert_same_tokens, next_logprobs, proxy_tuned_greedy

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]


@pytest.fixture(scope="module")
def tuner(tiny_models, hf_models):
    with ProxyTuner(
        LocalBase(hf_models["base"]),
        tiny_models["expert"],
        tiny_models["anti_expert"],
        device="cpu",
    ) as t:
        yield t


def reference(
    hf_models, tuner, prompt, *, alpha, n, k=None, unseen="restrict", expert="expert",
    anti="anti_expert",
):  # fmt: skip
    return proxy_tuned_greedy(
        hf_models["base"],
        hf_models[expert],
        hf_models[anti],
        tuner.tokenizer(prompt).input_ids,
        alpha=alpha,
        max_new_tokens=n,
        eos_ids=tuner.eos_ids,
        restrict_to_top_k=k,
        unseen=unseen,
    )


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_whole_vocabulary_equals_the_formula(tuner, hf_models, prompt, alpha):
    got = tuner.generate(prompt, max_new_tokens=12, alpha=alpha, base_k=-1)
    assert_same_tokens(
        got.token_ids, reference(hf_models, tuner, prompt, alpha=alpha, n=12), tuner.eos_ids
    )


@pytest.mark.parametrize("k", [1, 5])
def test_restrict_equals_the_formula_on_the_base_top_k(tuner, hf_models, k):
    got = tuner.generate(PROMPTS[1], max_new_tokens=12, alpha=1.5, unseen="restrict", base_k=k)
    assert_same_tokens(
        got.token_ids, reference(hf_models, tuner, PROMPTS[1], alpha=1.5, n=12, k=k), tuner.eos_ids
    )


POLICIES = ("restrict", "floor", "residual")


@pytest.mark.parametrize(
    ("prompt", "k", "alpha"), [("print(", 3, 2.0), (PROMPTS[0], 2, 1.0), (PROMPTS[0], 3, 0.5)]
)
def test_each_unseen_policy_equals_the_formula_extended_by_it(tuner, hf_models, prompt, k, alpha):
    """At a small k the three policies choose differently, and each as the formula says."""
    got = {
        unseen: tuner.generate(
            prompt, max_new_tokens=8, alpha=alpha, base_k=k, unseen=unseen, speculate="off"
        )
        for unseen in POLICIES
    }
    outputs = [tuple(got[unseen].token_ids) for unseen in POLICIES]
    assert len(set(outputs)) == 3, f"the policies should choose differently: {outputs}"
    for unseen in POLICIES:
        assert got[unseen].unseen_policy == unseen
        assert_same_tokens(
            got[unseen].token_ids,
            reference(hf_models, tuner, prompt, alpha=alpha, n=8, k=k, unseen=unseen),
            tuner.eos_ids,
        )


def test_steering_changes_the_output(tuner, hf_models):
    """Alpha 0 is the base's own greedy output, alpha 2 the formula's, and on this prompt the two
    differ (else the other checks here could pass with steering ignored)."""
    plain = tuner.generate(PROMPTS[0], max_new_tokens=12, alpha=0.0, base_k=-1)
    steered = tuner.generate(PROMPTS[0], max_new_tokens=12, alpha=2.0, base_k=-1)
    for got, alpha in ((plain, 0.0), (steered, 2.0)):
        expected = reference(hf_models, tuner, PROMPTS[0], alpha=alpha, n=12)
        assert_same_tokens(got.token_ids, expected, tuner.eos_ids)
    assert plain.token_ids != steered.token_ids


def test_expert_equal_to_anti_expert_gives_the_base_output(tiny_models, hf_models, tuner):
    same = ProxyTuner(
        LocalBase(hf_models["base"]),
        tiny_models["anti_expert"],
        tiny_models["anti_expert"],
        device="cpu",
    )
    got = same.generate(PROMPTS[0], max_new_tokens=12, alpha=2.0, base_k=-1)
    base_only = tuner.generate(PROMPTS[0], max_new_tokens=12, alpha=0.0, base_k=-1)
    assert got.token_ids == base_only.token_ids


@pytest.mark.parametrize("unseen", ["floor", "residual"])
def test_padded_proxy_vocabularies_change_nothing(tiny_models, hf_models, tuner, unseen):
    padded = ProxyTuner(
        LocalBase(hf_models["base"]),
        tiny_models["expert_padded"],
        tiny_models["anti_expert_padded"],
        device="cpu",
    )
    assert padded.vocab_size == tuner.vocab_size
    options = dict(max_new_tokens=10, alpha=1.0, base_k=20, unseen=unseen)
    assert (
        padded.generate(PROMPTS[0], **options).token_ids
        == tuner.generate(PROMPTS[0], **options).token_ids
    )


def test_stream_sync_and_async_agree(tuner):
    config = GenerationConfig(max_new_tokens=10, base_k=20)
    whole = tuner.generate(PROMPTS[0], config)
    stream = tuner.stream(PROMPTS[0], config)
    pieces = list(stream)
    assert "".join(pieces) == whole.text == stream.generation.text
    assert len(pieces) > 1

    async def run_async():
        astream = tuner.astream(PROMPTS[0], config)
        return [p async for p in astream], await tuner.agenerate(PROMPTS[0], config)

    async_pieces, async_result = asyncio.run(run_async())
    assert async_pieces == pieces
    assert async_result.token_ids == whole.token_ids


def test_length_and_usage(tuner):
    prompt_len = len(tuner.tokenizer(PROMPTS[0]).input_ids)
    got = tuner.generate(PROMPTS[0], max_new_tokens=6, unseen="restrict", base_k=20)
    assert got.finish_reason == "length"
    assert len(got.token_ids) == got.usage.completion_tokens == 6
    assert got.usage.requests == 6
    assert got.usage.prompt_tokens == sum(prompt_len + i for i in range(6))
    assert got.text == tuner.tokenizer.decode(got.token_ids)


def test_stop_sequence_cuts_the_text(tuner):
    free = tuner.generate(PROMPTS[1], max_new_tokens=20, unseen="restrict", base_k=20).text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {free!r}"
    got = tuner.generate(PROMPTS[1], max_new_tokens=20, unseen="restrict", base_k=20, stop=[stop])
    assert got.finish_reason == "stop"
    assert got.text == free[: free.index(stop)]
    streamed = "".join(tuner.stream(PROMPTS[1], max_new_tokens=20, base_k=20, stop=[stop]))
    assert streamed == got.text


def test_sampling_is_reproducible_with_a_seed(tuner):
    options = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, base_k=20)
    first = tuner.generate(PROMPTS[0], seed=3, **options)
    assert tuner.generate(PROMPTS[0], seed=3, **options).token_ids == first.token_ids
    others = {tuple(tuner.generate(PROMPTS[0], seed=s, **options).token_ids) for s in range(4, 8)}
    assert others != {tuple(first.token_ids)}


def test_a_server_fault_keeps_what_was_generated(tiny_models, hf_models, tuner):
    failing = ProxyTuner(
        LocalBase(hf_models["base"], fail_at_request=5),
        tiny_models["expert"],
        tiny_models["anti_expert"],
        device="cpu",
    )
    with pytest.raises(ServerError, match="injected fault") as info:
        failing.generate(PROMPTS[0], max_new_tokens=10, unseen="restrict", base_k=20)
    partial = info.value.partial
    expected = tuner.generate(PROMPTS[0], max_new_tokens=4, unseen="restrict", base_k=20)
    assert partial.finish_reason == "error"
    assert partial.token_ids == expected.token_ids
    assert partial.text == expected.text
    assert "injected fault" in partial.error


class ScriptedBase:
    """Answers each request with the next scripted top-k list."""

    name = "scripted"
    capabilities = Capabilities(
        max_k=-1, token_id_prompts=True, ids_in_response=True, prompt_scoring=False, logprobs="raw"
    )

    def __init__(self, answers):
        self.answers = list(answers)

    async def top_logprobs(self, prompt, k):
        return self.answers.pop(0)

    async def aclose(self):
        pass


def test_eos_ends_the_generation_and_is_not_in_the_output(tiny_models, tuner):
    eos = next(iter(tuner.eos_ids))
    answers = [TopLogprobs((300, 301), (-0.1, -3.0)), TopLogprobs((eos, 300), (-0.1, -3.0))]
    scripted = ProxyTuner(
        ScriptedBase(answers), tiny_models["expert"], tiny_models["anti_expert"], device="cpu"
    )
    got = scripted.generate("x", max_new_tokens=10, alpha=0.0)
    assert got.finish_reason == "eos"
    assert got.token_ids == [300]


def test_retokenized_steps_counts_the_answers_a_text_server_split_again(tiny_models):
    # A text-only server (TGI, chat) marks an answer whose prompt it split differently.
    answers = [
        TopLogprobs((300, 301), (-0.1, -3.0)),
        TopLogprobs((301, 300), (-0.1, -3.0), retokenized=True),
        TopLogprobs((302, 300), (-0.1, -3.0)),
        TopLogprobs((303, 300), (-0.1, -3.0), retokenized=True),
    ]
    scripted = ProxyTuner(
        ScriptedBase(answers), tiny_models["expert"], tiny_models["anti_expert"], device="cpu"
    )
    got = scripted.generate("x", max_new_tokens=4, alpha=0.0)
    assert got.token_ids == [300, 301, 302, 303]
    assert got.usage.retokenized_steps == 2


def test_expert_chat_template_feeds_the_expert_a_chat_prompt(tuner, hf_models):
    got = tuner.generate(PROMPTS[0], max_new_tokens=8, base_k=-1, expert_chat_template=True)
    tokenizer = tuner.expert_tokenizer
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=False
    )
    # Built without the code under test: the template's text, tokenized as written, with the
    # model's BOS in front unless the template already writes one. Exactly one BOS either way.
    bos = tokenizer.bos_token_id
    assert bos is not None and tokenizer(PROMPTS[0]).input_ids[0] == bos
    expert_ids = tokenizer(chat, add_special_tokens=False).input_ids
    if not chat.startswith(tokenizer.bos_token):
        expert_ids = [bos, *expert_ids]
    assert expert_ids.count(bos) == 1 and expert_ids[0] == bos
    assert tuner.tokens.encode_prompt(PROMPTS[0], expert_chat_template=True).expert == expert_ids
    expected = proxy_tuned_greedy(
        hf_models["base"],
        hf_models["expert"],
        hf_models["anti_expert"],
        tuner.tokenizer(PROMPTS[0]).input_ids,
        alpha=1.0,
        max_new_tokens=8,
        eos_ids=tuner.eos_ids,
        expert_prompt_ids=expert_ids,
    )
    assert_same_tokens(got.token_ids, expected, tuner.eos_ids)
    plain = tuner.generate(PROMPTS[0], max_new_tokens=8, base_k=-1)
    assert plain.token_ids != got.token_ids


def test_expert_and_anti_expert_with_different_vocabularies_are_refused(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "anti"
    shutil.copytree(tiny_models["anti_expert"], other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ModelLoadError, match="different vocabularies"):
        ProxyTuner(ScriptedBase([]), tiny_models["expert"], other, device="cpu")


def test_unknown_generation_option_is_named(tuner):
    from proxyclient import ConfigError

    with pytest.raises(ConfigError, match=r"unknown generation option.*max_tokens"):
        tuner.generate("x", max_tokens=3)


def test_choose_gives_the_formulas_probabilities_over_the_options(tuner, hf_models):
    prompt = PROMPTS[0]
    options = ["(", ":", " return", "def"]
    option_ids = [tuner.tokenizer(o, add_special_tokens=False).input_ids[0] for o in options]
    steps = reference(hf_models, tuner, prompt, alpha=1.0, n=1)
    expected = steps[0].scores[option_ids].softmax(dim=0).tolist()
    got = tuner.choose(prompt, options, alpha=1.0, base_k=-1)
    assert [got.probabilities[o] for o in options] == pytest.approx(expected, abs=1e-6)
    assert got.option == options[max(range(4), key=expected.__getitem__)]
    assert got.missing == [] and got.usage.requests == 1


def test_choose_reports_options_outside_the_base_top_k(tuner):
    # The base's top 3 after PROMPTS[0] are " U", a partial UTF-8 byte and "di": two options are
    # among them, four are not.
    options = [" U", "(", ":", "di", " return", "def"]
    got = tuner.choose(PROMPTS[0], options, base_k=3, unseen="restrict")
    assert got.missing == ["(", ":", " return", "def"]
    assert all(got.probabilities[o] is None for o in got.missing)
    present = {o: p for o, p in got.probabilities.items() if p is not None}
    assert set(present) == {" U", "di"}
    assert sum(present.values()) == pytest.approx(1.0)
    assert got.option in present
    floor = tuner.choose(PROMPTS[0], options, base_k=3, unseen="floor")
    assert floor.missing == got.missing
    assert all(p is not None for p in floor.probabilities.values())


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_choose_gives_the_bases_own_probabilities_over_the_options(tuner, hf_models, alpha):
    options = ["(", ":", " return", "def"]
    option_ids = [tuner.tokenizer(o, add_special_tokens=False).input_ids[0] for o in options]
    base_lp = next_logprobs(hf_models["base"], tuner.tokenizer(PROMPTS[0]).input_ids)
    expected = base_lp[option_ids].softmax(dim=0).tolist()
    got = tuner.choose(PROMPTS[0], options, alpha=alpha, base_k=-1)
    assert [got.base_probabilities[o] for o in options] == pytest.approx(expected, abs=1e-6)
    tuned = [got.probabilities[o] for o in options]
    assert tuned != pytest.approx(expected, abs=1e-3), "steering should move the options"


def test_choose_needs_single_token_options(tuner):
    from proxyclient import ConfigError

    with pytest.raises(ConfigError, match=r"option .def main. is 3 tokens"):
        tuner.choose(PROMPTS[0], ["(", "def main"])


def test_a_text_dialect_without_a_tokenizer_is_lent_the_proxies_one(tiny_models, hf_models):
    """One door for the base tokenizer: connect() without one, then ProxyTuner, as the CLI does
    without --base-tokenizer: the adapter names tokens with the proxies' tokenizer, and the
    tokens are those of an adapter given that tokenizer explicitly."""
    from proxyclient import connect
    from proxyclient.tokenizer import BaseTokenizer
    from tests.support.dialect_servers import DialectServer

    options = dict(max_new_tokens=6, alpha=1.0, base_k=5, unseen="restrict")
    with DialectServer("openai", tiny_models["base"]) as server:
        got = []
        for tokenizer in (None, BaseTokenizer(hf_models["tokenizer"])):
            base = connect("openai", server.base_url, "tiny-base", tokenizer=tokenizer)
            assert (base.tokenizer is None) == (tokenizer is None)
            with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"]) as tuner:
                got.append(tuner.generate("def main():", **options))
                assert base.tokenizer is not None and not tuner.tokens.bridged
    lent, explicit = got
    assert lent.token_ids == explicit.token_ids and len(lent.token_ids) == 6
    assert lent.text == explicit.text


def test_a_text_dialect_lent_an_explicit_base_tokenizer(tiny_models):
    """base_tokenizer= reaches an adapter that had none (the CLI's --base-tokenizer, too)."""
    from proxyclient import connect

    base = connect("openai", "http://127.0.0.1:9/v1", "tiny-base")
    with ProxyTuner(
        base, tiny_models["expert_sp"], tiny_models["anti_expert_sp"],
        base_tokenizer=tiny_models["base"],
    ) as tuner:  # fmt: skip
        assert tuner.tokens.bridged
        assert base.tokenizer.vocab.token_bytes == tuner.tokens.base_tokenizer.vocab.token_bytes


def test_the_base_requests_run_on_the_tuners_loop_and_outlive_it(tiny_models, hf_models):
    """The tuner lends its private loop to the base's transport (no hand-over between threads
    per request); once the tuner is closed the adapter still works, on a loop of its own, and
    the garbage collector has the tuner's objects back."""
    import gc

    from proxyclient import connect
    from tests.support.dialect_servers import DialectServer

    options = dict(max_new_tokens=4, base_k=5)
    with DialectServer("openai", tiny_models["base"]) as server:
        base = connect("openai", server.base_url, "tiny-base")
        with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"]) as tuner:
            assert gc.get_freeze_count() > 0
            first = tuner.generate("def main():", **options)
            home = base.transport._home
            assert not home.owns_thread and home.thread is tuner._runner
        assert gc.get_freeze_count() == 0
        assert home.client is None and base.transport._home is None
        with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"]) as again:
            assert again.generate("def main():", **options).token_ids == first.token_ids
            assert base.transport._home.thread is again._runner
        top = asyncio.run(base.top_logprobs(Prompt(tuple(first.token_ids[:2]), 0), 5))
        assert len(top) == 5 and base.transport._home.owns_thread
        asyncio.run(base.aclose())
