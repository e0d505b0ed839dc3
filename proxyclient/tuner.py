"""ProxyTuner: the public face (generate, stream, choose, score; sync and async twins).

It wires the parts together and owns their lifetimes: the remote base (an adapter), the local
pair (``proxies.ProxyPair``), the tokenization (``tokens.TokenSpace``) and the ``engine.Engine``
that runs every call through them; sync calls run on a private event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from collections.abc import Sequence as Options
from pathlib import Path
from typing import Any

import torch

from proxyclient.adapters.base import BaseModel
from proxyclient.chat import Chat
from proxyclient.config import GenerationConfig, Speculate
from proxyclient.engine import Engine, with_options
from proxyclient.errors import ConfigError, ProxyClientError
from proxyclient.loading import (
    PairSpec,
    eos_ids_of,
    freeze_loaded_heap,
    load_lora_pair,
    load_pairs,
    load_tokenizer,
    pair_tokenizers,
    thaw_heap,
)
from proxyclient.local import LocalModel
from proxyclient.loop_thread import LoopThread
from proxyclient.proxies import ProxyPair
from proxyclient.result import Choice, Generation
from proxyclient.scoring import Score
from proxyclient.stream import AsyncGenerationStream, GenerationStream
from proxyclient.tokenizer import BaseTokenizer, load_base_tokenizer
from proxyclient.tokens import TokenSpace

logger = logging.getLogger(__name__)

# Text, or a conversation: a Chat, or its messages (a Chat with the defaults).
Prompt = str | Chat | list[dict[str, Any]]

# Generations in flight at once in generate_many: enough to fill a batched forward of small
# proxies while each waits for its round trip.
DEFAULT_CONCURRENCY = 8


class ProxyTuner:
    """A remote base model steered by a local expert and anti-expert.

    ``expert`` and ``anti_expert`` are model folders (or loaded :class:`LocalModel` objects, then
    ``tokenizer`` is required). ``expert_lora`` (with ``expert=None``) makes the expert a PEFT LoRA
    adapter on the anti-expert's weights: one model in memory, the adapter on for the expert and
    off for the anti-expert. ``pairs`` (instead of ``expert`` and ``anti_expert``) steers with
    several pairs, ``[(expert, anti_expert, weight), ...]``: scores = base + alpha * sum_i
    weight_i * (expert_i - anti_i); a negative weight steers away from that expert, and a model
    several pairs name (a shared anti-expert) is loaded and forwarded once. Every pair's models
    share one tokenizer; every expert reads the prompt in the first pair's expert's chat
    template. The positional form is one pair of weight 1. The base's tokenizer comes with the
    adapter when it has one
    (``connect(..., tokenizer=...)``; OpenAI model names imply theirs); ``base_tokenizer`` names it
    otherwise (a folder, ``tiktoken:ENCODING``, or a tokenizer object). Base and proxies that
    tokenize differently are combined on their shared byte vocabulary; left out, the base is
    taken to tokenize as the anti-expert does (checked against the server where it can tell).
    ``threads`` sets torch's CPU threads: with a server on the same small machine use 1.
    ``overlap=False`` runs the base request and the local forwards one after the other
    (for measuring what the overlap saves).
    """

    def __init__(
        self,
        base: BaseModel,
        expert: str | Path | LocalModel | None = None,
        anti_expert: str | Path | LocalModel | None = None,
        *,
        pairs: Options[PairSpec] | None = None,
        expert_lora: str | Path | None = None,
        tokenizer: Any = None,
        base_tokenizer: Any = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        threads: int | None = None,
        overlap: bool = True,
    ) -> None:
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self.base = base
        specs = _pair_specs(expert, anti_expert, pairs, expert_lora)
        if expert_lora is not None:
            if not isinstance(anti_expert, str | Path):
                raise ConfigError("expert_lora needs anti_expert as a model folder")
            expert_model, anti_model = load_lora_pair(anti_expert, expert_lora, device, dtype)
            models = [(expert_model, anti_model, 1.0)]
        else:
            models = load_pairs(specs, device, dtype)
        given = tokenizer is not None
        tokenizer = tokenizer if given else load_tokenizer(specs[0][1])
        if expert_lora is not None:  # the adapter rides on the anti-expert: one tokenizer
            expert_tokenizer = tokenizer
        else:
            expert_tokenizer = pair_tokenizers(specs, tokenizer, None if given else specs[0][1])
        self.proxies = ProxyPair(pairs=models)
        locals_ = self.proxies.models
        # Ids every proxy scores and the tokenizer knows; padded logits beyond it are ignored.
        vocab_size = min(len(tokenizer), *(local.output_size for local in locals_))
        if base_tokenizer is not None:  # loaded once: the adapter and TokenSpace share it
            base_tokenizer = load_base_tokenizer(base_tokenizer)
        _lend_tokenizer(base, base_tokenizer, tokenizer)
        self.tokens = TokenSpace(
            base,
            tokenizer,
            expert_tokenizer,
            base_tokenizer=base_tokenizer,
            vocab_size=vocab_size,
            proxy_eos=eos_ids_of(tokenizer, *(local.model for local in locals_)),
        )
        self.engine = Engine(base, self.proxies, self.tokens, overlap=overlap)
        # Every sync call runs on this private loop, also inside a running loop (Jupyter). The
        # base's requests run on it too, where its transport takes a lent loop.
        self._runner = LoopThread()
        host_on = getattr(getattr(base, "transport", None), "host_on", None)
        if host_on is not None:
            host_on(self._runner)
        freeze_loaded_heap()

    def __repr__(self) -> str:
        return f"ProxyTuner(base={self.base!r}, tokens={self.tokens!r})"

    # Shortcuts to what users and tests look at most.
    @property
    def tokenizer(self) -> Any:
        return self.tokens.tokenizer

    @property
    def expert_tokenizer(self) -> Any:
        return self.tokens.expert_tokenizer

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.tokens.eos_ids

    @property
    def vocab_size(self) -> int:
        return self.tokens.vocab_size

    @property
    def context_length(self) -> int | None:
        """The shortest context of the local models (their max_position_embeddings)."""
        lengths = []
        for local in self.proxies.models:
            length = getattr(local.model.config, "max_position_embeddings", None)
            if isinstance(length, int):
                lengths.append(length)
        return min(lengths) if lengths else None

    # What the OpenAI-compatible server reads of the base (``server.served.ServedTuner``).
    @property
    def base_name(self) -> str | None:
        """The base model's name at its API (None where the adapter has none)."""
        for name in ("model", "name"):
            value = getattr(self.base, name, None)
            if isinstance(value, str):
                return value
        return None

    @property
    def base_text_tokenizer(self) -> BaseTokenizer:
        """The tokenizer the base reads prompts in."""
        return self.tokens.base_text_tokenizer

    @property
    def base_vocab_size(self) -> int:
        return self.tokens.bridge.base_size

    def count_base_tokens(self, prompt: Prompt, config: GenerationConfig) -> int:
        """The tokens the base reads for ``prompt`` (a chat rendered as a generation renders it)."""
        return len(self.tokens.encode(prompt, config)[1].base)

    def redact(self, text: str) -> str:
        """``text`` with the base's secrets (its API key) blanked."""
        redact = getattr(getattr(self.base, "transport", None), "redact", None)
        return redact(text) if callable(redact) else text

    # -- generate -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        resume: Generation | None = None,
        **options: Any,
    ) -> Generation:
        """Generate from ``prompt`` (text, or a ``Chat``: a conversation and how it is read).
        ``options`` override fields of ``config``. ``resume``: the
        ``partial`` of an error a generation of this prompt and config raised; it goes on from
        there (greedy: exactly as if it had never failed) and returns the whole generation."""
        return self._runner.run(self.agenerate(prompt, config, resume=resume, **options))

    async def agenerate(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        resume: Generation | None = None,
        **options: Any,
    ) -> Generation:
        stream = self.astream(prompt, config, resume=resume, **options)
        async for _ in stream:
            pass
        return stream.generation

    def generate_many(
        self,
        prompts: Iterable[str],
        config: GenerationConfig | None = None,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        **options: Any,
    ) -> list[Generation]:
        """``generate`` for many prompts at once; see ``agenerate_many``."""
        return self._runner.run(
            self.agenerate_many(prompts, config, concurrency=concurrency, **options)
        )

    async def agenerate_many(
        self,
        prompts: Iterable[str],
        config: GenerationConfig | None = None,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        **options: Any,
    ) -> list[Generation]:
        """One Generation per prompt, in input order. At most ``concurrency`` generations are in
        flight: their base requests overlap, and their local forwards run as batches. A failed
        generation does not stop the others: its result has ``finish_reason == "error"``, the
        ``error`` and what was generated before it."""
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        config = with_options(config, options)  # bad options fail once, before any request
        slots = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> Generation:
            async with slots:
                try:
                    return await self.agenerate(prompt, config)
                except ProxyClientError as exc:
                    if exc.partial is not None:
                        return exc.partial
                    return Generation("", [], "error", error=str(exc))

        return list(await asyncio.gather(*(one(prompt) for prompt in prompts)))

    def stream(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        resume: Generation | None = None,
        **options: Any,
    ) -> GenerationStream:
        """Text pieces as tokens are chosen; ``.generation`` holds the result afterwards. On an
        error every piece of ``error.partial.text`` has been yielded before it is raised. With
        ``resume`` (see ``generate``) only the text after the partial's is yielded."""
        return GenerationStream(
            self.astream(prompt, config, resume=resume, **options), self._runner
        )

    def astream(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        resume: Generation | None = None,
        **options: Any,
    ) -> AsyncGenerationStream:
        seq = self.engine.start(prompt, config, options)
        released = self.engine.replay(seq, resume) if resume is not None else 0
        return AsyncGenerationStream(self.engine.pieces(seq, released), seq.result)

    def speculation_modes(self) -> list[Speculate]:
        """The drafting modes this base supports, best first (``auto`` takes the first)."""
        return self.engine.speculation_modes()

    # -- choose -------------------------------------------------------------------------------

    def choose(
        self,
        prompt: Prompt,
        choices: Options[str],
        config: GenerationConfig | None = None,
        **options: Any,
    ) -> Choice:
        """The proxy-tuned choice among single-token ``choices`` after ``prompt``: one step.
        ``options`` override ``config``'s fields, as in ``generate``."""
        return self._runner.run(self.achoose(prompt, choices, config, **options))

    async def achoose(
        self,
        prompt: Prompt,
        choices: Options[str],
        config: GenerationConfig | None = None,
        **options: Any,
    ) -> Choice:
        return await self.engine.choose(prompt, choices, config, options)

    # -- score ---------------------------------------------------------------------------------

    def score(
        self, prompt: str, continuation: str, config: GenerationConfig | None = None, **options: Any
    ) -> Score:
        """The log-likelihood of ``continuation`` after ``prompt`` under the proxy-tuned model
        (multiple-choice evaluation): one scoring request to the base, one forward of each
        proxy. Needs a base that scores given text (``Capabilities.prompt_scoring``: vllm) and
        base and proxies that share a tokenizer."""
        return self._runner.run(self.ascore(prompt, continuation, config, **options))

    async def ascore(
        self, prompt: str, continuation: str, config: GenerationConfig | None = None, **options: Any
    ) -> Score:
        return await self.engine.score(prompt, continuation, config, options)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        self._runner.close(self.base.aclose())
        self.proxies.close()
        thaw_heap()

    async def aclose(self) -> None:
        await self.base.aclose()
        self.proxies.close()
        thaw_heap()

    def __enter__(self) -> ProxyTuner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ProxyTuner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _lend_tokenizer(base: BaseModel, base_tokenizer: Any, proxy_tokenizer: Any) -> None:
    """A dialect that names tokens by text and was connected without the base's tokenizer gets
    ``base_tokenizer``, else the proxies' (base and proxies share a tokenizer unless told
    otherwise; the first answers are checked against that). The CLI connects with the same
    ``connect()`` and this tuner, so its default is the same."""
    if getattr(base, "tokenizer", None) is not None or not getattr(base, "needs_tokenizer", False):
        return
    lent = base_tokenizer if base_tokenizer is not None else proxy_tokenizer
    base.tokenizer = load_base_tokenizer(lent)  # type: ignore[attr-defined]
    logger.info("the %r base names tokens by text; its tokenizer: %r", base.name, base.tokenizer)


def _pair_specs(
    expert: str | Path | LocalModel | None,
    anti_expert: str | Path | LocalModel | None,
    pairs: Options[PairSpec] | None,
    expert_lora: str | Path | None,
) -> list[PairSpec]:
    """The steering pairs the arguments name (the positional form: one of weight 1; a LoRA
    expert's pair has no expert source)."""
    if pairs is not None:
        if expert is not None or anti_expert is not None or expert_lora is not None:
            raise ConfigError(
                "give either expert and anti_expert (one pair), or pairs=[(expert, "
                "anti_expert, weight), ...], not both"
            )
        if isinstance(pairs, str | bytes) or not isinstance(pairs, Options):
            raise ConfigError(
                f"pairs must be a list of (expert, anti_expert, weight), got {pairs!r}"
            )
        specs = []
        for number, pair in enumerate(pairs, 1):
            if not isinstance(pair, tuple | list) or len(pair) != 3:
                raise ConfigError(
                    f"pair {number} must be (expert, anti_expert, weight), got {pair!r}"
                )
            pair_expert, pair_anti, weight = pair
            for model, role in ((pair_expert, "expert"), (pair_anti, "anti-expert")):
                if not isinstance(model, str | Path | LocalModel):
                    raise ConfigError(
                        f"pair {number}'s {role} must be a model folder or a LocalModel, got "
                        f"{type(model).__name__}"
                    )
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ConfigError(f"pair {number}'s weight must be a number, got {weight!r}")
            if not math.isfinite(weight):
                raise ConfigError(f"pair {number}'s weight must be finite, got {weight!r}")
            specs.append((pair_expert, pair_anti, float(weight)))
        if not specs:
            raise ConfigError("pairs is empty: give at least one (expert, anti_expert, weight)")
        return specs
    if anti_expert is None:
        raise ConfigError(
            "give the anti-expert (anti_expert=DIR) with the expert, or several steering pairs "
            "as pairs=[(expert, anti_expert, weight), ...]"
        )
    if (expert is None) == (expert_lora is None):
        raise ConfigError(
            "give the expert either as a model (expert=DIR) or as a LoRA adapter on the "
            "anti-expert (expert=None, expert_lora=DIR), not both or neither"
        )
    return [(expert if expert is not None else anti_expert, anti_expert, 1.0)]
