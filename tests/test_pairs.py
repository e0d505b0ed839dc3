"""Several steering pairs: scores = base + alpha * sum_i w_i (expert_i - anti_i).

Greedy output equals the all-local formula (``proxy_tuned_greedy`` with ``pairs``) with the whole
vocabulary and at a finite k under ``residual``; a negative weight steers away; a model several
pairs name is loaded once and forwarded once per step; concurrent generations batch every
model's forward and equal one-by-one ones; drafts change nothing; the CLI's ``--pair`` is the
Python API's ``pairs``. Against an in-process base (tests/support/local_base.py).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from proxyclient import ConfigError, ProxyTuner, connect
from proxyclient.cli import _parser, main
from proxyclient.commands import _pairs
from proxyclient.local import LocalModel
from proxyclient.proxies import PairState
from tests.support.dialect_servers import DialectServer
from tests.support.local_base import LocalBase
from tests.support.reference import assert_same_tokens, next_logprobs, proxy_tuned_greedy

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]
MANY = [*PROMPTS, "for i in range(10):", "x = ", "while True:\n    if", "print("]
NOWHERE = "http://127.0.0.1:9/v1"  # nothing listens: the CLI's usage errors come before

# Each set of pairs by the tiny models' keys (tests/conftest.py). The base folder serves as a
# second "expert": it shares the tokenizer and has other weights.
PAIR_SETS = {
    "shared anti-expert": [("expert", "anti_expert", 1.0), ("base", "anti_expert", -0.5)],
    "a model on both sides": [("expert", "anti_expert", 1.0), ("anti_expert", "base", 0.5)],
    "padded vocabularies": [("expert", "anti_expert", 1.0), ("expert_padded", "base", 0.7)],
    "anti-expert weights cancel": [("expert", "anti_expert", 1.0), ("base", "anti_expert", -1.0)],
}


def folders(tiny_models, keys):
    return [(tiny_models[e], tiny_models[a], w) for e, a, w in keys]


def loaded(hf_models, keys):
    return [(hf_models[e], hf_models[a], w) for e, a, w in keys]


@pytest.fixture(scope="module")
def tuners(tiny_models, hf_models):
    """One tuner per set of pairs, made when first asked for."""
    made: dict[str, ProxyTuner] = {}

    def get(name: str) -> ProxyTuner:
        if name not in made:
            base = LocalBase(hf_models["base"], drafts=True)
            made[name] = ProxyTuner(base, pairs=folders(tiny_models, PAIR_SETS[name]), device="cpu")
        return made[name]

    yield get
    for tuner in made.values():
        tuner.close()


@pytest.fixture(scope="module")
def single(tiny_models, hf_models):
    base = LocalBase(hf_models["base"], drafts=True)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        yield t


def reference(tuner, hf_models, keys, prompt, **options):
    return proxy_tuned_greedy(
        hf_models["base"], None, None, tuner.tokenizer(prompt).input_ids,
        eos_ids=tuner.eos_ids, pairs=loaded(hf_models, keys), **options,
    )  # fmt: skip


# -- the formula ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("name", list(PAIR_SETS))
def test_whole_vocabulary_equals_the_formula(tuners, hf_models, name, prompt):
    tuner = tuners(name)
    got = tuner.generate(prompt, max_new_tokens=12, alpha=1.5, base_k=-1, speculate="off")
    expected = reference(tuner, hf_models, PAIR_SETS[name], prompt, alpha=1.5, max_new_tokens=12)
    assert_same_tokens(got.token_ids, expected, tuner.eos_ids)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_two_pairs_differ_from_the_first_alone(tuners, single, prompt):
    options = dict(max_new_tokens=12, alpha=1.5, base_k=-1, speculate="off")
    two = tuners("shared anti-expert").generate(prompt, **options)
    assert two.token_ids != single.generate(prompt, **options).token_ids


@pytest.mark.parametrize("k", [5, 20])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_finite_k_with_residual_equals_the_formula_extended_by_it(tuners, hf_models, prompt, k):
    name = "shared anti-expert"
    tuner = tuners(name)
    got = tuner.generate(prompt, max_new_tokens=12, alpha=1.0, base_k=k, unseen="residual")
    expected = reference(
        tuner, hf_models, PAIR_SETS[name], prompt, alpha=1.0, max_new_tokens=12,
        restrict_to_top_k=k, unseen="residual",
    )  # fmt: skip
    assert_same_tokens(got.token_ids, expected, tuner.eos_ids)


def test_every_expert_reads_the_expert_chat_template(tuners, hf_models):
    name = "shared anti-expert"
    tuner = tuners(name)
    prompt = PROMPTS[0]
    expert_ids = tuner.tokens.encode_prompt(prompt, expert_chat_template=True).expert
    assert expert_ids != tuner.tokenizer(prompt).input_ids
    got = tuner.generate(prompt, max_new_tokens=8, base_k=-1, expert_chat_template=True)
    expected = reference(
        tuner, hf_models, PAIR_SETS[name], prompt, alpha=1.0, max_new_tokens=8,
        expert_prompt_ids=expert_ids,
    )  # fmt: skip
    assert_same_tokens(got.token_ids, expected, tuner.eos_ids)


# -- negative weights -------------------------------------------------------------------------


def test_a_negative_weight_steers_away(tiny_models, hf_models, single):
    keys = [("expert", "anti_expert", -1.0)]
    base = LocalBase(hf_models["base"])
    with ProxyTuner(base, pairs=folders(tiny_models, keys), device="cpu") as away:
        for prompt in PROMPTS:
            got = away.generate(prompt, max_new_tokens=12, base_k=-1)
            expected = reference(away, hf_models, keys, prompt, alpha=1.0, max_new_tokens=12)
            assert_same_tokens(got.token_ids, expected, away.eos_ids)
            # The same as the one pair at alpha -1, and not what the pair at +1 gives.
            assert (
                got.token_ids
                == single.generate(prompt, max_new_tokens=12, base_k=-1, alpha=-1.0).token_ids
            )
            assert got.token_ids != single.generate(prompt, max_new_tokens=12, base_k=-1).token_ids


def test_flipping_a_pairs_sign_changes_the_output(tiny_models, hf_models, tuners):
    keys = [("expert", "anti_expert", 1.0), ("base", "anti_expert", 0.5)]
    base = LocalBase(hf_models["base"])
    with ProxyTuner(base, pairs=folders(tiny_models, keys), device="cpu") as toward:
        away = tuners("shared anti-expert")  # the same pairs with -0.5
        options = dict(max_new_tokens=12, base_k=-1, alpha=1.5)
        got = [toward.generate(p, **options).token_ids for p in PROMPTS]
        for prompt, ids in zip(PROMPTS, got, strict=True):
            expected = reference(toward, hf_models, keys, prompt, alpha=1.5, max_new_tokens=12)
            assert_same_tokens(ids, expected, toward.eos_ids)
        assert got != [away.generate(p, **options).token_ids for p in PROMPTS]


# -- one load, one forward --------------------------------------------------------------------


def forward_counter(model) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_a_shared_anti_expert_is_loaded_once_and_forwarded_once_per_step(
    tiny_models, hf_models, monkeypatch
):
    loads: list[str] = []
    load = LocalModel.load.__func__

    def counted(cls, path, **options):
        loads.append(str(path))
        return load(cls, path, **options)

    monkeypatch.setattr(LocalModel, "load", classmethod(counted))
    anti = tiny_models["anti_expert"]
    pairs = [
        (tiny_models["expert"], anti, 1.0),
        (str(tiny_models["base"]), f"{anti}/", -0.5),  # another spelling of the same folder
    ]
    with ProxyTuner(LocalBase(hf_models["base"]), pairs=pairs, device="cpu") as tuner:
        assert len(loads) == 3, loads
        (_, first_anti, _), (_, second_anti, _) = tuner.proxies.pairs
        assert first_anti is second_anti
        assert len(tuner.proxies.models) == 3
        counts = [forward_counter(m.model) for m in tuner.proxies.models]
        got = tuner.generate(PROMPTS[0], max_new_tokens=6, base_k=-1, speculate="off")
    steps = got.usage.requests
    assert steps == len(got.token_ids) + (got.finish_reason == "eos") >= 1
    assert [len(c) for c in counts] == [steps] * 3


class SlowBase(LocalBase):
    """Answers after a short network-like wait, so concurrent sequences overlap."""

    async def top_logprobs(self, prompt, k):
        await asyncio.sleep(0.002)
        return await super().top_logprobs(prompt, k)


@pytest.mark.parametrize("speculate", ["off", "base"])
def test_concurrent_generations_batch_every_model_and_equal_one_by_one(
    tiny_models, hf_models, tuners, speculate
):
    options = dict(max_new_tokens=10, base_k=20, alpha=1.5, speculate=speculate)
    alone = tuners("shared anti-expert")
    expected = [alone.generate(p, **options).token_ids for p in MANY]
    pairs = folders(tiny_models, PAIR_SETS["shared anti-expert"])
    base = SlowBase(hf_models["base"], drafts=True)
    with ProxyTuner(base, pairs=pairs, device="cpu") as tuner:
        counts = [forward_counter(m.model) for m in tuner.proxies.models]
        results = tuner.generate_many(MANY, concurrency=4, **options)
        sizes = tuner.proxies.batch_sizes
    assert [r.token_ids for r in results] == expected
    assert max(sizes) > 1, f"no forward held more than one sequence: {sizes}"
    # Each batch is one forward of each model, whatever the number of pairs naming it.
    assert [len(c) for c in counts] == [sum(sizes.values())] * 3


# -- speculation and traces -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["expert", "base", "stream", "auto"])
@pytest.mark.parametrize(("k", "unseen"), [(-1, "residual"), (5, "residual"), (5, "restrict")])
def test_drafts_with_several_pairs_equal_no_drafts(tuners, mode, k, unseen):
    tuner = tuners("shared anti-expert")
    options = dict(max_new_tokens=16, alpha=1.5, base_k=k, unseen=unseen)
    off = tuner.generate(PROMPTS[1], speculate="off", **options)
    got = tuner.generate(PROMPTS[1], speculate=mode, draft_tokens=4, **options)
    assert got.token_ids == off.token_ids and got.text == off.text
    assert got.usage.requests <= off.usage.requests


def test_expert_drafts_sample_reproducibly(tuners):
    tuner = tuners("a model on both sides")
    options = dict(max_new_tokens=10, base_k=20, temperature=1.0, seed=3, speculate="expert")
    first = tuner.generate(PROMPTS[0], **options)
    assert first.token_ids == tuner.generate(PROMPTS[0], **options).token_ids
    assert len(first.token_ids) == 10 or first.finish_reason == "eos"


def test_traces_hold_the_weighted_sums(tuners, hf_models):
    name = "shared anti-expert"
    tuner = tuners(name)
    got = tuner.generate(PROMPTS[0], max_new_tokens=1, base_k=-1, trace=0)
    (step,) = got.steps
    ids = tuner.tokenizer(PROMPTS[0]).input_ids
    token = step.token_id
    expert = sum(
        w * float(next_logprobs(e, ids)[token]) for e, _, w in loaded(hf_models, PAIR_SETS[name])
    )
    anti = sum(
        w * float(next_logprobs(a, ids)[token]) for _, a, w in loaded(hf_models, PAIR_SETS[name])
    )
    assert step.expert_logprob == pytest.approx(expert, abs=1e-4)
    assert step.anti_logprob == pytest.approx(anti, abs=1e-4)


# -- what is refused --------------------------------------------------------------------------


def test_pairs_with_another_vocabulary_are_refused_naming_the_pair(tiny_models, hf_models):
    pairs = [
        (tiny_models["expert"], tiny_models["anti_expert"], 1.0),
        (tiny_models["expert_sp"], tiny_models["anti_expert"], 0.5),
    ]
    with pytest.raises(ConfigError, match=r"pair 2's expert .* another vocabulary"):
        ProxyTuner(LocalBase(hf_models["base"]), pairs=pairs, device="cpu")


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        ({"expert": "E", "anti_expert": "A", "pairs": [("E", "A", 1.0)]}, "not both"),
        ({"pairs": []}, "pairs is empty"),
        ({"pairs": [("E", "A")]}, "pair 1 must be"),
        ({"pairs": [("E", "A", "1")]}, "weight must be a number"),
        ({"pairs": [("E", "A", 1.0), ("E", "A", float("nan"))]}, "pair 2's weight must be finite"),
        ({"pairs": [("E", "A", True)]}, "weight must be a number"),
        ({"pairs": [(None, "A", 1.0)]}, "pair 1's expert must be"),
        ({"pairs": [("E", "A", 1.0)], "expert_lora": "L"}, "not both"),
        ({"expert": "E"}, "give the anti-expert"),
    ],
)
def test_bad_pairs_are_named_before_anything_loads(hf_models, arguments, needle):
    with pytest.raises(ConfigError, match=needle):
        ProxyTuner(LocalBase(hf_models["base"]), **arguments)


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_server(tiny_models):
    server = DialectServer("openai", tiny_models["base"]).start()
    yield server
    server.stop()


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def generate_argv(url: str, *models: str) -> list[str]:
    return [
        "generate", "--api", "openai", "--base-url", url, "--base-model", "tiny-base",
        *models, "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--temperature", "0",
        "--alpha", "1.5", "--threads", "1", "--device", "cpu", "--max-retries", "0", "--json",
    ]  # fmt: skip


def pair_flags(tiny_models, keys) -> list[str]:
    return [
        flag
        for e, a, w in keys
        for flag in ("--pair", str(tiny_models[e]), str(tiny_models[a]), str(w))
    ]


def test_cli_pairs_equal_the_python_api(capsys, tiny_models, openai_server):
    keys = PAIR_SETS["shared anti-expert"]
    code, out, err = run(
        capsys, generate_argv(openai_server.base_url, *pair_flags(tiny_models, keys))
    )
    assert code == 0, err
    base = connect(
        "openai", openai_server.base_url, "tiny-base", tokenizer=str(tiny_models["anti_expert"])
    )
    with ProxyTuner(base, pairs=folders(tiny_models, keys), device="cpu") as tuner:
        expected = tuner.generate(PROMPTS[0], max_new_tokens=8, temperature=0, alpha=1.5)
        alone = tuner.generate(PROMPTS[0], max_new_tokens=8, temperature=0, alpha=0.0)
    assert json.loads(out)["token_ids"] == expected.token_ids
    assert expected.token_ids != alone.token_ids  # the pairs steer it


@pytest.mark.parametrize(
    ("models", "needle"),
    [
        (["--pair", "E", "A", "1", "--expert", "E"], "not allowed with"),
        (["--pair", "E", "A", "1", "--anti-expert", "A"], "--anti-expert goes with"),
        (["--pair", "E", "A", "x"], "WEIGHT must be a finite number"),
        (["--pair", "E", "A", "1", "--pair", "E", "A", "inf"], "--pair 2"),
        (["--expert", "E"], "--anti-expert is required"),
        ([], "one of the arguments --expert --expert-lora --pair is required"),
    ],
)
def test_cli_pair_usage_errors_exit_2(capsys, models, needle):
    code, _, err = run(capsys, generate_argv(NOWHERE, *models))
    assert code == 2, err
    assert needle in err and "Traceback" not in err


def test_serve_takes_the_pairs_as_its_defaults(tiny_models):
    args = _parser().parse_args(
        ["serve", "--api", "vllm", "--base-url", NOWHERE, "--base-model", "tiny-base",
         "--pair", "E1", "A", "1", "--pair", "E2", "A", "-0.5"]
    )  # fmt: skip
    assert _pairs(args) == [("E1", "A", 1.0), ("E2", "A", -0.5)]


def test_a_negative_weight_parses_on_the_command_line(capsys, tiny_models, openai_server):
    keys = [("expert", "anti_expert", -1.0)]
    code, out, err = run(
        capsys, generate_argv(openai_server.base_url, *pair_flags(tiny_models, keys))
    )
    assert code == 0, err
    base = connect(
        "openai", openai_server.base_url, "tiny-base", tokenizer=str(tiny_models["anti_expert"])
    )
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        expected = t.generate(PROMPTS[0], max_new_tokens=8, temperature=0, alpha=-1.5)
    assert json.loads(out)["token_ids"] == expected.token_ids


def test_weighted_rows_cover_only_the_ids_every_model_scores(tuners):
    proxies = tuners("padded vocabularies").proxies
    widths = {m.output_size for m in proxies.models}
    assert len(widths) == 2  # the padded expert has more logits than the others
    ids = [1, 50, 60]
    out = proxies.logprobs_now(PairState(), ids, ids)
    assert out.expert.shape == out.anti.shape == (1, min(widths))
    assert torch.isfinite(out.expert).all() and torch.isfinite(out.anti).all()
    assert [m.name for m in proxies.models] == [
        "pair 1 expert",
        "pair 1 anti-expert",
        "pair 2 expert",
        "pair 2 anti-expert",
    ]
