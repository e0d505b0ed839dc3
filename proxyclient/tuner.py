"""ProxyTuner: the public face of the engine (generate, stream, choose; sync and async twins).

It wires the parts together and owns their lifetimes: the remote base (an adapter), the local
pair (``proxies.ProxyPair``), the tokenization (``tokens.TokenSpace``) and a step strategy
(``steps``). Each call builds a ``sequence.Sequence`` and hands it to the step until it finishes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterable
from collections.abc import Sequence as Options
from pathlib import Path
from typing import Any, cast

import torch

from proxyclient.adapters.base import BaseModel, DraftingBaseModel, Prompt
from proxyclient.combine import Candidates
from proxyclient.config import GenerationConfig, Speculate, default_base_k
from proxyclient.errors import ConfigError, ProxyClientError, UnsupportedError
from proxyclient.loading import (
    check_same_vocabulary,
    eos_ids_of,
    load_local,
    load_lora_pair,
    load_tokenizer,
)
from proxyclient.local import LocalModel
from proxyclient.loop_thread import LoopThread
from proxyclient.proxies import PairState, ProxyPair
from proxyclient.result import Choice, Generation, Usage
from proxyclient.scoring import Score, score_tokens
from proxyclient.sequence import Sequence
from proxyclient.steps import BaseDraftStep, ExpertDraftStep, OneTokenStep
from proxyclient.stream import AsyncGenerationStream, GenerationStream
from proxyclient.tokenizer import load_base_tokenizer
from proxyclient.tokens import TokenSpace

logger = logging.getLogger(__name__)

# Generations in flight at once in generate_many: enough to fill a batched forward of small
# proxies while each waits for its round trip.
DEFAULT_CONCURRENCY = 8


class ProxyTuner:
    """A remote base model steered by a local expert and anti-expert.

    ``expert`` and ``anti_expert`` are model folders (or loaded :class:`LocalModel` objects, then
    ``tokenizer`` is required). ``expert_lora`` (with ``expert=None``) makes the expert a PEFT LoRA
    adapter on the anti-expert's weights: one model in memory, the adapter on for the expert and
    off for the anti-expert. The base's tokenizer comes with the adapter when it has one
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
        expert: str | Path | LocalModel | None,
        anti_expert: str | Path | LocalModel,
        *,
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
        if (expert is None) == (expert_lora is None):
            raise ConfigError(
                "give the expert either as a model (expert=DIR) or as a LoRA adapter on the "
                "anti-expert (expert=None, expert_lora=DIR), not both or neither"
            )
        if expert_lora is not None:
            if not isinstance(anti_expert, str | Path):
                raise ConfigError("expert_lora needs anti_expert as a model folder")
            expert_model, anti_model = load_lora_pair(anti_expert, expert_lora, device, dtype)
        else:
            expert_model = load_local(expert, "expert", device, dtype)
            anti_model = load_local(anti_expert, "anti-expert", device, dtype)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(anti_expert)
        expert_tokenizer = load_tokenizer(expert) if isinstance(expert, str | Path) else tokenizer
        check_same_vocabulary(expert_tokenizer, tokenizer)
        # Ids both proxies score and the tokenizer knows; padded logits beyond it are ignored.
        vocab_size = min(len(tokenizer), expert_model.output_size, anti_model.output_size)
        if base_tokenizer is not None:  # loaded once: the adapter and TokenSpace share it
            base_tokenizer = load_base_tokenizer(base_tokenizer)
        _lend_tokenizer(base, base_tokenizer, tokenizer)
        self.tokens = TokenSpace(
            base,
            tokenizer,
            expert_tokenizer,
            base_tokenizer=base_tokenizer,
            vocab_size=vocab_size,
            proxy_eos=eos_ids_of(tokenizer, expert_model.model, anti_model.model),
        )
        self.proxies = ProxyPair(expert_model, anti_model)
        self.step = OneTokenStep(base, self.proxies, self.tokens, overlap=overlap)
        self._drafting = {
            Speculate.BASE: BaseDraftStep(base, self.proxies, self.tokens),
            Speculate.EXPERT: ExpertDraftStep(base, self.proxies, self.tokens),
        }
        # Every sync call runs on this private loop, also inside a running loop (Jupyter).
        self._runner = LoopThread()

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
        for local in (self.proxies.expert, self.proxies.anti_expert):
            length = getattr(local.model.config, "max_position_embeddings", None)
            if isinstance(length, int):
                lengths.append(length)
        return min(lengths) if lengths else None

    # -- generate -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        config: GenerationConfig | None = None,
        *,
        resume: Generation | None = None,
        **options: Any,
    ) -> Generation:
        """Generate from ``prompt``. ``options`` override fields of ``config``. ``resume``: the
        ``partial`` of an error a generation of this prompt and config raised; it goes on from
        there (greedy: exactly as if it had never failed) and returns the whole generation."""
        return self._runner.run(self.agenerate(prompt, config, resume=resume, **options))

    async def agenerate(
        self,
        prompt: str,
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
        config = _with_options(config, options)  # bad options fail once, before any request
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
        prompt: str,
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
        prompt: str,
        config: GenerationConfig | None = None,
        *,
        resume: Generation | None = None,
        **options: Any,
    ) -> AsyncGenerationStream:
        seq = self._start(prompt, config, options)
        released = _replay(seq, resume, self.tokens.bridge.base_size) if resume is not None else 0
        step = self._step_for(seq.config.speculate)
        return AsyncGenerationStream(self._pieces(seq, step, released), seq.result)

    async def _pieces(
        self, seq: Sequence, step: OneTokenStep, released: int = 0
    ) -> AsyncIterator[str]:
        # ``released``: characters of the text the assembler has handed out; ``delivered``: those
        # the caller has (a resumed generation's caller has its partial's text already).
        delivered = len(seq.assembler.text) if seq.appended else 0

        def new(piece: str) -> str:
            nonlocal released, delivered
            fresh = piece[max(0, delivered - released) :]
            released += len(piece)
            delivered += len(fresh)
            return fresh

        started = time.perf_counter()
        try:
            await self.tokens.check_server(self.base, seq.prompt, seq.prompt_ids.base)
            while not seq.finished:
                if seq.appended and not self.base.capabilities.multi_step:
                    raise ConfigError(
                        f"the {self.base.name!r} base can score only the first token after the "
                        f"prompt (a plain chat API cannot continue a partial answer); use "
                        f"max_new_tokens=1 or ProxyTuner.choose(), or a server that can continue"
                    )
                for token in await step(seq):
                    piece = new(seq.accept(token))
                    if piece:
                        yield piece
                    if seq.finished:
                        break
                else:
                    seq.rollback(len(seq.token_ids))  # drafted tokens that were not accepted
        except ProxyClientError as exc:
            exc.partial = seq.fail(str(exc))
            rest = exc.partial.text[delivered:]  # held back for a stop sequence that may follow
            if rest:
                yield rest
            raise
        finally:
            seq.timings.wall_s = time.perf_counter() - started
            seq.release()
        piece = new(seq.assembler.finish())
        if piece:
            yield piece

    def speculation_modes(self) -> list[Speculate]:
        """The drafting modes this base supports, best first (``auto`` takes the first)."""
        capabilities = self.base.capabilities
        modes = []
        if capabilities.drafts and hasattr(self.base, "generate"):
            modes.append(Speculate.BASE)
        if capabilities.prompt_scoring and hasattr(self.base, "score") and not self.tokens.bridged:
            modes.append(Speculate.EXPERT)
        return modes

    def _step_for(self, speculate: Speculate) -> OneTokenStep:
        if speculate is Speculate.OFF:
            return self.step
        modes = self.speculation_modes()
        if speculate is Speculate.AUTO:
            return self._drafting[modes[0]] if modes else self.step
        if speculate not in modes:
            why = (
                "the expert drafts only for a base that shares the proxies' tokenizer"
                if speculate is Speculate.EXPERT and self.tokens.bridged
                else f"the {self.base.name!r} base cannot "
                + ("score a continuation" if speculate is Speculate.EXPERT else "draft")
            )
            supported = ", ".join(m.value for m in [Speculate.OFF, *modes, Speculate.AUTO])
            raise ConfigError(f"speculate={speculate.value!r}: {why}; supported here: {supported}")
        return self._drafting[speculate]

    # -- choose -------------------------------------------------------------------------------

    def choose(
        self,
        prompt: str,
        choices: Options[str],
        config: GenerationConfig | None = None,
        **options: Any,
    ) -> Choice:
        """The proxy-tuned choice among single-token ``choices`` after ``prompt``: one step.
        ``options`` override ``config``'s fields, as in ``generate``."""
        return self._runner.run(self.achoose(prompt, choices, config, **options))

    async def achoose(
        self,
        prompt: str,
        choices: Options[str],
        config: GenerationConfig | None = None,
        **options: Any,
    ) -> Choice:
        option_ids = {choice: self.tokens.single_token(choice) for choice in choices}
        if not option_ids:
            raise ConfigError("choose() needs at least one choice")
        seq = self._start(prompt, config, {"max_new_tokens": 1, **options})
        await self.tokens.check_server(self.base, seq.prompt, seq.prompt_ids.base)
        observation = await self.step.observe(seq)
        tuned = self.step.candidates(seq, observation)
        base = self.step.candidates(seq, observation, alpha=0.0, count=False)
        probabilities = _option_probabilities(tuned, option_ids)
        present = {o: p for o, p in probabilities.items() if p is not None}
        returned = set(observation.top.token_ids)
        return Choice(
            option=max(present, key=present.__getitem__) if present else None,
            probabilities=probabilities,
            base_probabilities=_option_probabilities(base, option_ids),
            missing=[o for o, i in option_ids.items() if i not in returned],
            usage=dataclasses.replace(seq.usage),
            unseen_policy=seq.config.unseen.value,
        )

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
        config = self._with_k(_with_options(config, options))
        if not isinstance(prompt, str) or not isinstance(continuation, str) or not continuation:
            raise ConfigError("score() takes a prompt string and a non-empty continuation string")
        if not self.base.capabilities.prompt_scoring:
            raise UnsupportedError(
                f"the base ({type(self.base).__name__}) cannot score a given text: its API "
                f"returns no log-probs for prompt tokens; use a vLLM server (--api vllm)"
            )
        if self.tokens.bridged:
            raise UnsupportedError(
                "score() needs the base and the proxies to share a tokenizer: a continuation "
                "split differently on each side has no common token positions to score"
            )
        head = self.tokens.encode_prompt(prompt) if prompt else None
        whole = self.tokens.encode_prompt(prompt + continuation).base
        context = head.base if head is not None else whole[:1]
        if whole[: len(context)] != context:  # the boundary falls inside a token: split there
            whole = (
                context + self.tokens.tokenizer(continuation, add_special_tokens=False).input_ids
            )
        tokens = whole[len(context) :]
        scored = await cast(DraftingBaseModel, self.base).score(
            Prompt(tuple(context), len(context)), tokens, cast(int, config.base_k)
        )
        state = PairState()
        local = await self.proxies.logprobs(state, whole, whole, positions=len(tokens) + 1)
        result = score_tokens(
            tokens,
            scored.tops,
            local.expert,
            local.anti,
            config,
            self.step.twin(config),
            self.tokens.token_text,
            self.tokens.token_bytes,
        )
        result.usage = Usage(
            requests=1,
            prompt_tokens=len(context) + len(tokens),
            base_completion_tokens=len(tokens) + 1,
            cached_prompt_tokens=scored.usage.cached_prompt_tokens,
        )
        return result

    # -- shared -------------------------------------------------------------------------------

    def _start(
        self, prompt: str, config: GenerationConfig | None, options: dict[str, Any]
    ) -> Sequence:
        """A new Sequence for ``prompt`` under ``config`` with ``options`` applied and k
        resolved against this base's cap."""
        if not isinstance(prompt, (str, list, tuple)):
            raise ConfigError(
                f"the prompt must be a string or a list of chat messages, got "
                f"{type(prompt).__name__}"
            )
        if not prompt:
            raise ConfigError("the prompt is empty: give the text to continue")
        return Sequence.start(prompt, self._with_k(_with_options(config, options)), self.tokens)

    def _with_k(self, config: GenerationConfig) -> GenerationConfig:
        """``config`` with k resolved against this base's cap where it does not say."""
        if config.base_k is not None:
            return config
        k = default_base_k(self.base.capabilities.max_k)
        return dataclasses.replace(config, base_k=k)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        self._runner.close(self.base.aclose())
        self.proxies.close()

    async def aclose(self) -> None:
        await self.base.aclose()
        self.proxies.close()

    def __enter__(self) -> ProxyTuner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ProxyTuner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _replay(seq: Sequence, partial: Generation, vocab: int) -> int:
    """Put a failed generation's tokens on ``seq`` as if it had chosen them; the characters of
    text that released."""
    if not isinstance(partial, Generation):
        raise ConfigError(
            f"resume takes the Generation a failed generation left (error.partial), "
            f"got {type(partial).__name__}"
        )
    if partial.finish_reason != "error":
        raise ConfigError(
            f"resume takes a failed generation (finish_reason 'error'); this one finished "
            f"({partial.finish_reason!r}) and has nothing left to do"
        )
    ids = partial.token_ids
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise ConfigError(f"resume: its token_ids are not all ids of the base's {vocab} tokens")
    released = 0
    for token in ids:
        if seq.finished:
            break
        released += len(seq.accept(token))
    if seq.assembler.text != partial.text:
        raise ConfigError(
            "resume: its token ids do not spell its text after this prompt; resume with the "
            "prompt, config and tokenizers it was generated with"
        )
    seq.usage = dataclasses.replace(partial.usage, completion_tokens=seq.usage.completion_tokens)
    if seq.config.trace is not None:
        if partial.steps is None or len(partial.steps) != len(ids):
            raise ConfigError(
                "resume: the config asks for a trace but the failed generation has none for "
                "its tokens; resume with the config it was generated with"
            )
        seq.traces = list(partial.steps)
    return released


def _with_options(config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    config = GenerationConfig() if config is None else config
    if not isinstance(config, GenerationConfig):
        raise ConfigError(
            f"config must be a GenerationConfig (options go as keywords), got "
            f"{type(config).__name__}"
        )
    if not options:
        return config
    unknown = set(options) - {f.name for f in dataclasses.fields(GenerationConfig)}
    if unknown:
        raise ConfigError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(config, **options)


def _option_probabilities(
    candidates: Candidates, option_ids: dict[str, int]
) -> dict[str, float | None]:
    """Each option's probability among the options that are candidates; None for the others."""
    probs = dict(
        zip(candidates.ids.tolist(), candidates.scores.softmax(dim=0).tolist(), strict=True)
    )
    mass = sum(probs.get(i, 0.0) for i in set(option_ids.values()))
    return {
        option: (probs[i] / mass if mass > 0 else 0.0) if i in probs else None
        for option, i in option_ids.items()
    }


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
