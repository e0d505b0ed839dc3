import pytest
import torch

from proxyclient.devices import resolve_device, resolve_dtype
from proxyclient.errors import ConfigError, ModelLoadError
from proxyclient.kvcache import KVState
from proxyclient.local import LocalModel
from tests.support.reference import next_logprobs


def test_kv_cached_feeds_match_full_forwards(tiny_models, hf_models):
    model = LocalModel.load(tiny_models["expert"], device="cpu")
    ids = hf_models["tokenizer"]("def main():\n    return").input_ids
    state = KVState()
    got = [model.feed(state, ids[:3])[0]] + [model.feed(state, [t])[0] for t in ids[3:]]
    for n, logprobs in enumerate(got, start=3):
        expected = next_logprobs(hf_models["expert"], ids[:n]).float()
        torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
    assert state.length == len(ids)


def test_each_sequence_has_its_own_cache(tiny_models):
    model = LocalModel.load(tiny_models["anti_expert"], device="cpu")
    first, second = KVState(), KVState()
    a = model.feed(first, [1, 50, 60])
    model.feed(second, [1, 70])
    b = model.feed(second, [80])
    again = model.feed(KVState(), [1, 50, 60])
    torch.testing.assert_close(a, again)
    assert not torch.allclose(a, b)


def test_padded_vocabulary_is_visible(tiny_models, hf_models):
    padded = LocalModel.load(tiny_models["expert_padded"], device="cpu")
    assert padded.output_size == len(hf_models["tokenizer"]) + 8


def test_missing_model_path_says_what_to_pass(tmp_path):
    with pytest.raises(ModelLoadError, match=r"expert model '.*nope' is not a directory"):
        LocalModel.load(tmp_path / "nope", role="expert")


def test_a_folder_without_a_model_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"has no config.json \(a tokenizer alone\?\)"):
        LocalModel.load(tmp_path, role="expert")


def test_device_and_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert resolve_device("auto").type == "cuda"
    elif not torch.backends.mps.is_available():
        assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="dtype must be auto or one of"):
        resolve_dtype("float8", torch.device("cpu"))
