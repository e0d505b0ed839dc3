"""The `openai` and `openai-chat` adapters against vLLM's real OpenAI-compatible server.

Greedy output with k = 20 (the capped server's maximum) and `restrict` equals the local reference
restricted to the base's top-20, given what each dialect lets us see:
- openai: top logprobs keyed by token text; tokens that are not valid UTF-8 alone come back as
  "" or U+FFFD and cannot be identified: they keep their rank but cannot be chosen;
- openai-chat: the base sees the prompt in its chat template and continues the assistant's partial
  answer (vLLM's continue_final_message), which it tokenizes again from text; vLLM gives the bytes
  of U+FFFD for tokens that are not valid UTF-8 alone, so those are unidentifiable here too.
"""

from __future__ import annotations

import pytest

from proxyclient import ConfigError, ProxyTuner, connect
from proxyclient.tokenizer import BaseTokenizer
from tests.support.constants import API_KEY, BASE_NAME
from tests.support.reference import assert_same_tokens, not_utf8_alone, proxy_tuned_greedy

pytestmark = pytest.mark.integration

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]
N_TOKENS = 12
K = 20


@pytest.fixture(scope="module")
def base_tokenizer(hf_models):
    return BaseTokenizer(hf_models["tokenizer"])


def tuner_for(servers, tiny_models, base_tokenizer, api, **options):
    base = connect(
        api, servers["capped"].base_url, BASE_NAME, api_key=API_KEY, tokenizer=base_tokenizer,
        **options,
    )  # fmt: skip
    return ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_openai_adapter_equals_the_formula_on_the_top_k(
    servers, tiny_models, hf_models, base_tokenizer, prompt
):
    with tuner_for(servers, tiny_models, base_tokenizer, "openai", max_k=K) as tuner:
        got = tuner.generate(prompt, max_new_tokens=N_TOKENS, unseen="restrict", base_k=K)
        expected = proxy_tuned_greedy(
            hf_models["base"], hf_models["expert"], hf_models["anti_expert"],
            tuner.tokenizer(prompt).input_ids, alpha=1.0, max_new_tokens=N_TOKENS,
            eos_ids=tuner.eos_ids, restrict_to_top_k=K,
            unidentifiable=not_utf8_alone(base_tokenizer),
        )  # fmt: skip
    assert_same_tokens(got.token_ids, expected, tuner.eos_ids)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_adapter_continuing_on_vllm_equals_the_formula(
    servers, tiny_models, hf_models, base_tokenizer, prompt
):
    tokenizer = hf_models["tokenizer"]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )

    def base_sees(generated: list[int]) -> list[int]:
        text = chat + base_tokenizer.decode(generated)
        return tokenizer(text, add_special_tokens=False).input_ids

    with tuner_for(
        servers, tiny_models, base_tokenizer, "openai-chat", continue_final_message=True
    ) as tuner:
        got = tuner.generate(prompt, max_new_tokens=N_TOKENS, unseen="restrict", base_k=K)
        expected = proxy_tuned_greedy(
            hf_models["base"], hf_models["expert"], hf_models["anti_expert"],
            tuner.tokenizer(prompt).input_ids, alpha=1.0, max_new_tokens=N_TOKENS,
            eos_ids=tuner.eos_ids, restrict_to_top_k=K, base_ids_for=base_sees,
            unidentifiable=not_utf8_alone(base_tokenizer),
        )  # fmt: skip
    assert_same_tokens(got.token_ids, expected, tuner.eos_ids)


def test_plain_chat_allows_one_step_and_choose(servers, tiny_models, base_tokenizer):
    with tuner_for(servers, tiny_models, base_tokenizer, "openai-chat") as tuner:
        with pytest.raises(ConfigError, match="can score only the first token") as info:
            tuner.generate(PROMPTS[0], max_new_tokens=5)
        assert len(info.value.partial.token_ids) == 1
        assert len(tuner.generate(PROMPTS[0], max_new_tokens=1).token_ids) == 1
        choice = tuner.choose(PROMPTS[0], ["(", ":", "def"], base_k=K)
        assert choice.option in ("(", ":", "def") or choice.option is None
        assert set(choice.probabilities) == {"(", ":", "def"}
