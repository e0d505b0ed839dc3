import pytest

from proxyclient import ConfigError, GenerationConfig, UnseenPolicy
from proxyclient.config import default_base_k


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
        ({"max_new_tokens": -3}, "max_new_tokens must be a positive integer"),
        ({"base_k": 0}, "base_k must be a positive integer, or -1"),
        ({"base_k": -2}, "base_k must be a positive integer, or -1"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"unseen": "bogus"}, "unseen must be one of restrict, floor, residual"),
        ({"stop": ("",)}, "stop sequences must be non-empty"),
    ],
)
def test_bad_values_name_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**options)


def test_defaults_and_normalisation():
    config = GenerationConfig(stop="\n\n", unseen="floor")
    assert config.stop == ("\n\n",)
    assert config.unseen is UnseenPolicy.FLOOR
    assert GenerationConfig().unseen is UnseenPolicy.RESIDUAL  # README, "Does it work?"
    assert GenerationConfig().alpha == 1.0
    assert GenerationConfig(base_k=-1).base_k == -1
    assert GenerationConfig().base_k is None  # the adapter's default


@pytest.mark.parametrize(
    ("server_max", "expected"), [(None, 20), (-1, 20), (5, 5), (20, 20), (50, 20), (1, 1)]
)
def test_the_default_k_is_20_or_the_servers_cap_where_lower(server_max, expected):
    assert default_base_k(server_max) == expected
