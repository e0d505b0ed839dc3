"""A LoRA expert: the anti-expert's weights with a PEFT adapter, on for the expert and off for the
anti-expert — one model in memory, the same output as the merged expert (within fp32 noise)."""

import contextlib
import shutil

import pytest
import torch

from proxyclient import ConfigError, ProxyTuner
from proxyclient.proxies import PairState, _Job
from tests.support.local_base import LocalBase

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]


@pytest.fixture(scope="module")
def lora_and_merged(tiny_models, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights on the tiny anti-expert, and the expert it
    makes once merged into the weights (a plain model folder)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    anti = AutoModelForCausalLM.from_pretrained(tiny_models["anti_expert"], dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    get_peft_model(anti, config).save_pretrained(root / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_models["anti_expert"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(fresh, root / "adapter").merge_and_unload()
    merged.save_pretrained(root / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = tiny_models["anti_expert"] / name
        if source.exists():
            shutil.copy(source, root / "merged" / name)
    return root / "adapter", root / "merged"


@contextlib.contextmanager
def lora_and_plain(tiny_models, hf_models, lora_and_merged):
    """Two tuners on one in-process base: the expert as a LoRA on the anti-expert, and merged."""
    adapter, merged = lora_and_merged
    base = LocalBase(hf_models["base"])
    with (
        ProxyTuner(
            base, None, tiny_models["anti_expert"], expert_lora=adapter, device="cpu"
        ) as lora,
        ProxyTuner(base, merged, tiny_models["anti_expert"], device="cpu") as plain,
    ):
        yield lora, plain


def test_a_lora_expert_equals_the_merged_expert(tiny_models, hf_models, lora_and_merged):
    with lora_and_plain(tiny_models, hf_models, lora_and_merged) as (lora, plain):
        assert lora.proxies.expert.model is lora.proxies.anti_expert.model  # one model in memory
        for prompt in PROMPTS:
            ids = lora.tokenizer(prompt).input_ids
            got = lora.proxies.logprobs_now(PairState(), ids, ids)
            want = plain.proxies.logprobs_now(PairState(), ids, ids)
            torch.testing.assert_close(got.expert, want.expert, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got.anti, want.anti, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(got.expert, got.anti, atol=1e-2)  # the adapter matters
            options = dict(max_new_tokens=12, alpha=2.0, base_k=-1, speculate="off")
            assert (
                lora.generate(prompt, **options).token_ids
                == plain.generate(prompt, **options).token_ids
            )
        # Concurrent sequences through the batched forward, adapter on and off in turn.
        many = lora.generate_many(PROMPTS, max_new_tokens=8, alpha=2.0, concurrency=2)
        assert [g.token_ids for g in many] == [
            plain.generate(p, max_new_tokens=8, alpha=2.0).token_ids for p in PROMPTS
        ]


def test_expert_and_expert_lora_are_exclusive(tiny_models, hf_models, lora_and_merged):
    adapter, merged = lora_and_merged
    with pytest.raises(ConfigError, match="not both or neither"):
        ProxyTuner(LocalBase(hf_models["base"]), merged, tiny_models["anti_expert"],
                   expert_lora=adapter)  # fmt: skip
    with pytest.raises(ConfigError, match="not both or neither"):
        ProxyTuner(LocalBase(hf_models["base"]), None, tiny_models["anti_expert"])


@pytest.mark.subprocess
def test_cli_expert_lora_matches_the_python_api(tiny_models, hf_models, lora_and_merged):
    import json
    import os
    import subprocess
    import sys

    from proxyclient import connect
    from tests.support.dialect_servers import DialectServer

    adapter, _merged = lora_and_merged
    with DialectServer("openai", tiny_models["base"]) as server:
        run = subprocess.run(
            [sys.executable, "-m", "proxyclient", "generate", "--api", "openai",
             "--base-url", server.base_url, "--base-model", "tiny-base",
             "--expert-lora", str(adapter), "--anti-expert", str(tiny_models["anti_expert"]),
             "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--alpha", "2", "--threads", "1",
             "--json"],
            capture_output=True, text=True, timeout=300, env=dict(os.environ),
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        base = connect("openai", server.base_url, "tiny-base", tokenizer=hf_models["tokenizer"])
        with ProxyTuner(
            base, None, tiny_models["anti_expert"], expert_lora=adapter, device="cpu"
        ) as tuner:
            expected = tuner.generate(PROMPTS[0], max_new_tokens=8, alpha=2.0)
    assert json.loads(run.stdout)["token_ids"] == expected.token_ids


def test_a_lora_pair_reads_several_sequences_in_one_forward(
    tiny_models, hf_models, lora_and_merged
):
    with lora_and_plain(tiny_models, hf_models, lora_and_merged) as (lora, plain):
        forwards = []
        lora.proxies.expert.model.register_forward_hook(lambda *_: forwards.append(1))
        prompts = [*PROMPTS, "x = 1"]
        ids = [lora.tokenizer(p).input_ids for p in prompts]
        states = [PairState() for _ in prompts]
        for step in range(2):  # the prompts (different lengths), then one more token each
            jobs = [
                _Job(state, i + [5] * step, i + [5] * step, 1)
                for state, i in zip(states, ids, strict=True)
            ]
            forwards.clear()
            got = lora.proxies._run(jobs)
            assert len(forwards) == 1  # expert rows (adapter on) and anti rows (off) together
            for job, out in zip(jobs, got, strict=True):
                want = plain.proxies.logprobs_now(PairState(), job.expert_ids, job.anti_ids)
                torch.testing.assert_close(out.expert, want.expert, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(out.anti, want.anti, atol=1e-5, rtol=1e-5)
