"""Sequence: everything about one generation, in one object.

The ids on both sides (the base's, and the proxies' that spell the same bytes), the proxies' KV
caches, the realigner between the two tokenizations, the sampling RNG, the text assembler, usage,
timings and the finish reason. Steps read and grow it; it is what a failure hands back as the
partial result.

Two layers: ``append`` puts tokens on both sides (what the models condition on next), ``emit``
makes an appended token output (text, stop/EOS/length). Appended tokens that were never
emitted — a speculative draft — can be taken back with ``rollback(appended)``, on both
sides at once: the base ids, the proxy ids, the realigner's bytes and the KV caches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Ids
from dataclasses import dataclass, field
from typing import Any

import torch

from proxyclient.adapters.base import Prompt
from proxyclient.bridge import Realigner
from proxyclient.chat import Chat
from proxyclient.config import GenerationConfig
from proxyclient.detokenize import TextAssembler
from proxyclient.masking import GrammarState
from proxyclient.proxies import PairState, ProxyLogprobs, ProxyPair
from proxyclient.result import FinishReason, Generation, Timings, TokenTrace, Usage
from proxyclient.tokens import PromptIds, TokenSpace


@dataclass(frozen=True)
class _Mark:
    """Where the proxy side stood before one base token was appended."""

    proxy_len: int
    realigned: tuple[int, int]  # the realigner's byte counts (base side, proxy side)


@dataclass
class Sequence:
    """One generation. Build it with :meth:`start`."""

    config: GenerationConfig
    prompt: str
    prompt_ids: PromptIds
    eos_ids: frozenset[int]
    assembler: TextAssembler
    realigner: Realigner | None
    generator: torch.Generator | None
    base_ids: list[int] = field(default_factory=list)  # prompt + appended, the base's ids
    proxy_generated: list[int] = field(default_factory=list)  # appended, the proxies' ids
    proxies: PairState = field(default_factory=PairState)
    token_ids: list[int] = field(default_factory=list)  # emitted output, base ids
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    finish_reason: FinishReason | None = None
    error: str | None = None
    draft_length: int = 0  # the next speculative draft's length (adapted by the step)
    traces: list[TokenTrace] = field(default_factory=list)  # one per output token (config.trace)
    grammar: GrammarState | None = None  # config.constraint's, over the base's ids
    _marks: list[_Mark] = field(default_factory=list)

    @classmethod
    def start(
        cls, prompt: str | Chat | list[dict[str, Any]], config: GenerationConfig, tokens: TokenSpace
    ) -> Sequence:
        """A new generation of ``prompt``: a string, or a chat (rendered per side)."""
        prompt, ids = tokens.encode(prompt, config)
        seed = config.seed
        return cls(
            config=config,
            prompt=prompt,
            prompt_ids=ids,
            eos_ids=tokens.eos_ids,
            assembler=TextAssembler(tokens.decode, ids.base, config.stop),
            realigner=tokens.realigner(),
            generator=torch.Generator().manual_seed(seed) if seed is not None else None,
            base_ids=list(ids.base),
            grammar=tokens.grammar_state(config.constraint) if config.constraint else None,
        )

    # -- what the models see ------------------------------------------------------------------

    @property
    def base_prompt(self) -> Prompt:
        """What the base continues now (with a chat prompt's messages, for chat dialects)."""
        ids = self.prompt_ids
        return Prompt(
            tuple(self.base_ids),
            len(ids.base),
            messages=ids.messages,
            response_prefix=ids.response_prefix,
        )

    @property
    def expert_ids(self) -> list[int]:
        return self.prompt_ids.expert + self.proxy_generated

    @property
    def anti_ids(self) -> list[int]:
        return self.prompt_ids.proxy + self.proxy_generated

    @property
    def appended(self) -> int:
        """Base tokens appended after the prompt (emitted ones and drafts)."""
        return len(self._marks)

    def can_append(self, token: int) -> bool:
        """Whether ``token`` can be put on both sides (a special token other than EOS has no
        bytes for the proxies to spell)."""
        return self.realigner is None or self.realigner.can_feed(token)

    def append(self, tokens: Ids[int]) -> None:
        """Put base tokens on both sides: the base's ids, and the proxy ids that spell them."""
        for token in tokens:
            realigned = (
                (len(self.realigner.base_bytes), len(self.realigner.proxy_bytes))
                if self.realigner is not None
                else (0, 0)
            )
            self._marks.append(_Mark(len(self.proxy_generated), realigned))
            self.base_ids.append(token)
            self.proxy_generated += self.realigner.feed(token) if self.realigner else [token]

    @property
    def unread(self) -> int:
        """Ids the proxies have not read yet, on the side that has fewer."""
        generated = len(self.proxy_generated)
        ids = self.prompt_ids
        return self.proxies.unseen(len(ids.expert) + generated, len(ids.proxy) + generated)

    async def proxy_logprobs(self, pair: ProxyPair, positions: int = 1) -> ProxyLogprobs:
        """The proxies' log-probs at the last ``positions`` positions; time counted."""
        out = await pair.logprobs(self.proxies, self.expert_ids, self.anti_ids, positions)
        self.timings.local_s += out.seconds
        return out

    def allowed(self, then: Ids[int] = ()) -> torch.Tensor | None:
        """[V_base] bool: the base ids the constraint allows after the output and ``then``
        (tokens a step chose but the sequence has not accepted yet); None: no constraint."""
        if self.grammar is None:
            return None
        return self.grammar.allowed([*self.token_ids, *then])

    # -- speculation's undo -------------------------------------------------------------------

    def rollback(self, checkpoint: int) -> None:
        """Take back every token appended after ``checkpoint``, on both sides (the proxies' KV
        caches are cropped to match before their next forward). Emitted tokens stay."""
        if not len(self.token_ids) <= checkpoint <= self.appended:
            raise ValueError(
                f"cannot roll back to {checkpoint}: {self.appended} tokens appended, "
                f"{len(self.token_ids)} of them emitted"
            )
        if checkpoint == self.appended:
            return
        mark = self._marks[checkpoint]
        del self._marks[checkpoint:]
        del self.base_ids[len(self.prompt_ids.base) + checkpoint :]
        del self.proxy_generated[mark.proxy_len :]
        if self.realigner is not None:
            self.realigner.rewind(*mark.realigned)
        self.proxies.truncate(len(self.expert_ids), len(self.anti_ids))

    # -- output -------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int, trace: TokenTrace | None = None) -> str:
        """The chosen ``token`` becomes output (with its ``trace``); the text that became safe
        to show. A draft that put it next on both sides already is kept (the step took back any
        other). EOS ends the generation and is neither appended nor output."""
        if token in self.eos_ids:
            self.finish_reason = "eos"
            return ""
        emitted = len(self.token_ids)
        if self.appended == emitted:
            self.append([token])
        elif self.base_ids[len(self.prompt_ids.base) + emitted] != token:
            raise ValueError(f"accept({token}): another token is appended there; roll it back")
        if trace is not None:
            self.traces.append(trace)
        return self.emit()

    def emit(self) -> str:
        """The next appended-but-not-emitted token becomes output."""
        if len(self.token_ids) >= self.appended:
            raise ValueError("emit() needs an appended token that is not output yet")
        token = self.base_ids[len(self.prompt_ids.base) + len(self.token_ids)]
        self.token_ids.append(token)
        piece = self.assembler.add(token)
        if self.assembler.stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.config.max_new_tokens:
            self.finish_reason = "length"
        return piece

    def release(self) -> None:
        """Free the proxies' KV caches: the generation is over (finished or failed)."""
        self.proxies = PairState()

    def fail(self, message: str) -> Generation:
        self.error = message
        return self.result()

    def result(self) -> Generation:
        """The generation so far (final once ``finished``); copies, safe to keep."""
        return Generation(
            text=self.assembler.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason or "error",
            usage=dataclasses.replace(self.usage, completion_tokens=len(self.token_ids)),
            unseen_policy=self.config.unseen.value,
            timings=dataclasses.replace(self.timings),
            error=self.error,
            steps=list(self.traces) if self.config.trace is not None else None,
        )
