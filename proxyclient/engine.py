"""Engine: generate, choose and score as one path through the steps.

Every call starts a ``Sequence`` (``start``: the prompt tokenized per side, the options applied and
k resolved against the base's cap) and observes it through a step: ``observe`` asks the base and
runs the proxies, ``candidates`` combines what they said. A generation repeats that until the
sequence finishes (``pieces``, with the step ``step_for`` chose, and ``replay`` to resume a failed
one); ``choose`` reads one position; ``score`` reads every position of a given continuation from
one scoring request. The usage each step returns is added to the generation here, and only here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from collections.abc import Sequence as Options
from typing import Any, cast

from proxyclient.adapters.base import BaseModel, DraftingBaseModel, Prompt
from proxyclient.chat import Chat
from proxyclient.combine import Candidates
from proxyclient.config import GenerationConfig, Speculate, default_base_k
from proxyclient.errors import ConfigError, ProxyClientError, UnsupportedError
from proxyclient.proxies import PairState, ProxyPair
from proxyclient.result import Choice, Generation
from proxyclient.scoring import Score, score_tokens
from proxyclient.sequence import Sequence
from proxyclient.steps import (
    BaseDraftStep,
    ExpertDraftStep,
    Observation,
    OneTokenStep,
    StreamedDraftStep,
    request_usage,
)
from proxyclient.tokens import TokenSpace


class Engine:
    """The loop over one base, one proxy pair and one tokenization."""

    def __init__(
        self, base: BaseModel, proxies: ProxyPair, tokens: TokenSpace, *, overlap: bool = True
    ) -> None:
        self.base = base
        self.tokens = tokens
        self.step = OneTokenStep(base, proxies, tokens, overlap=overlap)
        self._drafting = {
            Speculate.STREAM: StreamedDraftStep(base, proxies, tokens),
            Speculate.BASE: BaseDraftStep(base, proxies, tokens),
            Speculate.EXPERT: ExpertDraftStep(base, proxies, tokens),
        }

    # -- a sequence ---------------------------------------------------------------------------

    def start(
        self,
        prompt: str | Chat | list[dict[str, Any]],
        config: GenerationConfig | None,
        options: dict[str, Any],
    ) -> Sequence:
        """A new Sequence for ``prompt`` under ``config`` with ``options`` applied and k
        resolved against this base's cap."""
        if not isinstance(prompt, (str, Chat, list, tuple)):
            raise ConfigError(
                f"the prompt must be a string, a Chat or a list of chat messages, got "
                f"{type(prompt).__name__}"
            )
        if not prompt:
            raise ConfigError("the prompt is empty: give the text to continue")
        return Sequence.start(prompt, self.configure(config, options), self.tokens)

    def configure(
        self, config: GenerationConfig | None, options: dict[str, Any]
    ) -> GenerationConfig:
        """``config`` (the defaults when None) with ``options`` applied and k resolved against
        this base's cap where it does not say."""
        config = with_options(config, options)
        if config.base_k is not None:
            return config
        return dataclasses.replace(config, base_k=default_base_k(self.base.capabilities.max_k))

    # -- generate -----------------------------------------------------------------------------

    def speculation_modes(self) -> list[Speculate]:
        """The drafting modes this base supports, best first (``auto`` takes the first)."""
        capabilities = self.base.capabilities
        modes = []
        if capabilities.streams and hasattr(self.base, "stream_draft"):
            modes.append(Speculate.STREAM)
        if capabilities.drafts and hasattr(self.base, "generate"):
            modes.append(Speculate.BASE)
        if capabilities.prompt_scoring and hasattr(self.base, "score") and not self.tokens.bridged:
            modes.append(Speculate.EXPERT)
        return modes

    def step_for(self, speculate: Speculate) -> OneTokenStep:
        if speculate is Speculate.OFF:
            return self.step
        modes = self.speculation_modes()
        if speculate is Speculate.AUTO:
            return self._drafting[modes[0]] if modes else self.step
        if speculate not in modes:
            why = (
                "the expert drafts only for a base that shares the proxies' tokenizer"
                if speculate is Speculate.EXPERT and self.tokens.bridged
                else f"the {self.base.name!r} base cannot " + _CANNOT[speculate]
            )
            supported = ", ".join(m.value for m in [Speculate.OFF, *modes, Speculate.AUTO])
            raise ConfigError(f"speculate={speculate.value!r}: {why}; supported here: {supported}")
        return self._drafting[speculate]

    async def pieces(self, seq: Sequence, released: int = 0) -> AsyncIterator[str]:
        """Run ``seq`` to its end: the text as it becomes safe to show. ``released``: the
        characters a resumed sequence's replay released (its caller has them already)."""
        step = self.step_for(seq.config.speculate)
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
                if seq.grammar is not None and seq.grammar.finished(seq.token_ids):
                    seq.finish_reason = "eos"  # the constraint allows nothing but the end
                    break
                if seq.appended and not self.base.capabilities.multi_step:
                    raise ConfigError(
                        f"the {self.base.name!r} base can score only the first token after the "
                        f"prompt (a plain chat API cannot continue a partial answer); use "
                        f"max_new_tokens=1 or ProxyTuner.choose(), or a server that can continue"
                    )
                async with contextlib.aclosing(step.run(seq)) as chunks:
                    async for chosen in chunks:
                        seq.usage.add(chosen.usage)
                        for token, trace in zip(chosen.tokens, chosen.traces, strict=True):
                            piece = new(seq.accept(token, trace))
                            if piece:
                                yield piece
                            if seq.finished:
                                break
                        if seq.finished:
                            break
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

    def replay(self, seq: Sequence, partial: Generation) -> int:
        """Put a failed generation's tokens on ``seq`` as if it had chosen them, with its cost;
        the characters of text that released."""
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
        ids, vocab = partial.token_ids, self.tokens.bridge.base_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise ConfigError(f"resume: its token_ids are not all ids of the base's {vocab} tokens")
        traces: list[Any] = [None] * len(ids)
        if seq.config.trace is not None:
            if partial.steps is None or len(partial.steps) != len(ids):
                raise ConfigError(
                    "resume: the config asks for a trace but the failed generation has none "
                    "for its tokens; resume with the config it was generated with"
                )
            traces = list(partial.steps)
        released = 0
        for token, trace in zip(ids, traces, strict=True):
            if seq.finished:
                break
            released += len(seq.accept(token, trace))
        if seq.assembler.text != partial.text:
            raise ConfigError(
                "resume: its token ids do not spell its text after this prompt; resume with the "
                "prompt, config and tokenizers it was generated with"
            )
        seq.usage = dataclasses.replace(partial.usage)
        return released

    # -- choose -------------------------------------------------------------------------------

    async def choose(
        self, prompt: str, choices: Options[str], config: GenerationConfig | None, options: dict
    ) -> Choice:
        """The proxy-tuned choice among single-token ``choices`` after ``prompt``: one step."""
        option_ids = {choice: self.tokens.single_token(choice) for choice in choices}
        if not option_ids:
            raise ConfigError("choose() needs at least one choice")
        seq = self.start(prompt, config, {"max_new_tokens": 1, **options})
        await self.tokens.check_server(self.base, seq.prompt, seq.prompt_ids.base)
        observation, usage = await self.step.observe(seq)
        tuned = self.step.candidates(seq.config, observation)
        base = self.step.candidates(seq.config, observation, alpha=0.0)
        self.step.tally(usage, observation.top, tuned)
        probabilities = _option_probabilities(tuned, option_ids)
        present = {o: p for o, p in probabilities.items() if p is not None}
        returned = set(observation.top.token_ids)
        return Choice(
            option=max(present, key=present.__getitem__) if present else None,
            probabilities=probabilities,
            base_probabilities=_option_probabilities(base, option_ids),
            missing=[o for o, i in option_ids.items() if i not in returned],
            usage=usage,
            unseen_policy=seq.config.unseen.value,
        )

    # -- score --------------------------------------------------------------------------------

    async def score(
        self, prompt: str, continuation: str, config: GenerationConfig | None, options: dict
    ) -> Score:
        """``continuation``'s log-likelihood after ``prompt``: one scoring request, one forward
        of each proxy, each position combined as a generation's step combines it."""
        config = self.configure(config, options)
        if not isinstance(prompt, str) or not isinstance(continuation, str) or not continuation:
            raise ConfigError("score() takes a prompt string and a non-empty continuation string")
        if not self.base.capabilities.prompt_scoring:
            raise UnsupportedError(
                f"the {self.base.name!r} base cannot score a given text: its API returns no "
                f"log-probs for prompt tokens; use a server that does (vllm, sglang, fireworks)"
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
        prompt_ids = Prompt(tuple(context), len(context))
        scored = await cast(DraftingBaseModel, self.base).score(
            prompt_ids, tokens, cast(int, config.base_k)
        )
        local = await self.step.pair.logprobs(PairState(), whole, whole, positions=len(tokens) + 1)
        sent = Prompt(tuple(whole), len(context))  # the continuation goes with the prompt
        usage = request_usage(sent, scored.usage, len(tokens) + 1)
        traced = dataclasses.replace(config, trace=config.trace or 0)
        every, traces = [], []
        for i, token in enumerate(tokens):
            observation = Observation(scored.tops[i], local.expert[i], local.anti[i])
            candidates = self.step.candidates(config, observation)
            self.step.tally(usage, observation.top, candidates)
            every.append(candidates)
            traces.append(self.step.trace(traced, observation, candidates, token))
        result = score_tokens(tokens, every, traces)  # type: ignore[arg-type]
        result.usage = usage
        return result


_CANNOT = {
    Speculate.STREAM: "stream a continuation with its top-k",
    Speculate.BASE: "draft",
    Speculate.EXPERT: "score a continuation",
}


def with_options(config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    """``config`` (the defaults when None) with the fields ``options`` names replaced."""
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
