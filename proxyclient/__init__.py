"""proxyclient: proxy-tuning for base models behind a completion API.

    scores = base_logprob + alpha * (expert_logprob - anti_expert_logprob)

The base answers over HTTP with its top-k next-token logprobs; expert and anti-expert run locally.

    from proxyclient import ProxyTuner, GenerationConfig, connect

    base = connect("vllm", "http://127.0.0.1:8000/v1", "my-base-model")
    with ProxyTuner(base, expert="path/to/expert", anti_expert="path/to/anti") as tuner:
        print(tuner.generate("Hello", GenerationConfig(max_new_tokens=32)).text)
"""

from importlib import metadata

from proxyclient.adapters import RateLimits, connect
from proxyclient.chat import Chat
from proxyclient.config import GenerationConfig, UnseenPolicy, UntwinnedRule
from proxyclient.errors import (
    APIConnectionError,
    APIStatusError,
    BaseModelError,
    ConfigError,
    ContextLengthError,
    ModelLoadError,
    NotFoundError,
    ProxyClientError,
    TopKTooLargeError,
    UnsupportedError,
)
from proxyclient.result import Alternative, Choice, Generation, Timings, TokenTrace, Usage
from proxyclient.scoring import Score
from proxyclient.tuner import ProxyTuner

try:
    __version__ = metadata.version("proxyclient")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "Alternative",
    "BaseModelError",
    "Chat",
    "Choice",
    "ConfigError",
    "ContextLengthError",
    "Generation",
    "GenerationConfig",
    "ModelLoadError",
    "NotFoundError",
    "ProxyClientError",
    "ProxyTuner",
    "RateLimits",
    "Score",
    "Timings",
    "TokenTrace",
    "TopKTooLargeError",
    "UnseenPolicy",
    "UnsupportedError",
    "UntwinnedRule",
    "Usage",
    "connect",
]
