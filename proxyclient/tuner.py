"""The decoding loop. One step:

1. ask the base for its top-k after the current ids (HTTP, in flight) and, meanwhile, feed the new
   token(s) to expert and anti-expert (worker thread, KV caches kept);
2. combine: base + alpha * (expert - anti) over the candidates, under the unseen-token policy;
3. choose (greedy or sampled) and append the token to every sequence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from proxyclient.adapters.base import BaseModel, Prompt, TopLogprobs
from proxyclient.bridge import Realigner, VocabBridge
from proxyclient.bridge_cache import cached_bridge
from proxyclient.combine import Candidates, combine
from proxyclient.config import GenerationConfig, UntwinnedRule, default_top_logprobs
from proxyclient.detokenize import TextAssembler
from proxyclient.errors import ConfigError, ProxyClientError, ResponseFormatError
from proxyclient.local import (
    KVState,
    LocalModel,
    check_same_vocabulary,
    eos_ids_of,
    load_local,
    load_tokenizer,
)
from proxyclient.result import Choice, FinishReason, Generation, Timings, Usage
from proxyclient.sampling import choose
from proxyclient.stream import AsyncGenerationStream, GenerationStream
from proxyclient.tokenizer import load_base_tokenizer
from proxyclient.vocab import ByteVocab, from_hf

logger = logging.getLogger(__name__)


@dataclass
class _Run:
    """The state of one generation; what it holds is returned even when a step fails."""

    config: GenerationConfig
    assembler: TextAssembler
    token_ids: list[int] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    finish_reason: FinishReason | None = None
    error: str | None = None

    def result(self) -> Generation:
        return Generation(
            text=self.assembler.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason or "error",
            usage=dataclasses.replace(self.usage),
            unseen_policy=self.config.unseen.value,
            timings=dataclasses.replace(self.timings),
            error=self.error,
        )


class ProxyTuner:
    """A remote base model steered by a local expert and anti-expert.

    ``expert`` and ``anti_expert`` are model folders (or loaded :class:`LocalModel` objects, then
    ``tokenizer`` is required). ``base_tokenizer`` is the base's tokenizer when it differs from
    the proxies' (a folder, ``tiktoken:ENCODING``, or a tokenizer object); the two are then
    combined on their shared byte vocabulary. Left out, base and proxies share the anti-expert's.
    ``threads`` sets torch's CPU threads: with a server on the same small machine use 1.
    ``overlap=False`` runs the base request and the local forwards one after the other
    (for measuring what the overlap saves).
    """

    def __init__(
        self,
        base: BaseModel,
        expert: str | Path | LocalModel,
        anti_expert: str | Path | LocalModel,
        *,
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
        self.overlap = overlap
        self.expert = load_local(expert, "expert", device, dtype)
        self.anti_expert = load_local(anti_expert, "anti-expert", device, dtype)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(anti_expert)
        self.expert_tokenizer = (
            load_tokenizer(expert) if isinstance(expert, str | Path) else self.tokenizer
        )
        check_same_vocabulary(self.expert_tokenizer, self.tokenizer)
        # Ids both proxies score and the tokenizer knows; padded logits beyond it are ignored.
        self.vocab_size = min(
            len(self.tokenizer), self.expert.output_size, self.anti_expert.output_size
        )
        proxy_eos = eos_ids_of(self.tokenizer, self.expert.model, self.anti_expert.model)
        self.base_tokenizer = (
            load_base_tokenizer(base_tokenizer) if base_tokenizer is not None else None
        )
        if self.base_tokenizer is None:
            self.bridge = VocabBridge.identity(self.vocab_size)
            self.eos_ids = proxy_eos
            self._proxy_vocab: ByteVocab | None = None
        else:
            self._proxy_vocab = from_hf(self.tokenizer)
            self.bridge = cached_bridge(
                self.base_tokenizer, self._proxy_vocab, proxy_eos, self.vocab_size
            )
            base_eos = self.base_tokenizer.eos_token_id
            self.eos_ids = frozenset({base_eos} if base_eos is not None else set())
        self._base_tokenizer_checked = self.base_tokenizer is not None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proxyclient-local")
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"ProxyTuner(base={self.base!r}, vocab_size={self.vocab_size})"

    # -- public API ---------------------------------------------------------------------------

    def generate(
        self, prompt: str, config: GenerationConfig | None = None, **options: Any
    ) -> Generation:
        """Generate from ``prompt``. ``options`` override fields of ``config``."""
        return self._sync_loop().run_until_complete(self.agenerate(prompt, config, **options))

    async def agenerate(
        self, prompt: str, config: GenerationConfig | None = None, **options: Any
    ) -> Generation:
        stream = self.astream(prompt, config, **options)
        async for _ in stream:
            pass
        return stream.generation

    def stream(
        self, prompt: str, config: GenerationConfig | None = None, **options: Any
    ) -> GenerationStream:
        """Text pieces as tokens are chosen; ``.generation`` holds the result afterwards."""
        loop = self._sync_loop()
        return GenerationStream(self.astream(prompt, config, **options), loop)

    def astream(
        self, prompt: str, config: GenerationConfig | None = None, **options: Any
    ) -> AsyncGenerationStream:
        config = self._run_config(config, options)
        prompt_ids = self._encode(prompt)
        base_ids = self._encode_base(prompt, prompt_ids)
        expert_ids = self._encode_for_expert(prompt) if config.expert_chat_template else prompt_ids
        run = _Run(config, TextAssembler(self._decode, base_ids, config.stop))
        return AsyncGenerationStream(
            self._pieces(run, prompt, base_ids, prompt_ids, expert_ids), run.result
        )

    def _run_config(
        self, config: GenerationConfig | None, options: dict[str, Any]
    ) -> GenerationConfig:
        """``config`` with ``options`` applied and k resolved against this base's cap."""
        config = _with_options(config, options)
        if config.top_logprobs is None:
            k = default_top_logprobs(self.base.capabilities.max_k)
            config = dataclasses.replace(config, top_logprobs=k)
        return config

    def choose(
        self,
        prompt: str,
        options: Sequence[str],
        config: GenerationConfig | None = None,
        **settings: Any,
    ) -> Choice:
        """The proxy-tuned choice among single-token ``options`` after ``prompt``: one step."""
        return self._sync_loop().run_until_complete(
            self.achoose(prompt, options, config, **settings)
        )

    async def achoose(
        self,
        prompt: str,
        options: Sequence[str],
        config: GenerationConfig | None = None,
        **settings: Any,
    ) -> Choice:
        config = self._run_config(config, {"max_new_tokens": 1, **settings})
        option_ids = {option: self._single_token(option) for option in options}
        if not option_ids:
            raise ConfigError("choose() needs at least one option")
        prompt_ids = self._encode(prompt)
        base_ids = self._encode_base(prompt, prompt_ids)
        expert_ids = self._encode_for_expert(prompt) if config.expert_chat_template else prompt_ids
        run = _Run(config, TextAssembler(self._decode, base_ids))
        top, expert_lp, anti_lp = await self._step(
            run,
            Prompt(tuple(base_ids), len(base_ids)),
            (KVState(), KVState()),
            (expert_ids, prompt_ids),
            use_proxies=config.alpha != 0,
        )
        tuned = self._combine(run, top, expert_lp, anti_lp)
        base = self._combine(run, top, None, None, alpha=0.0, count=False)
        probabilities = _option_probabilities(tuned, option_ids)
        present = {o: p for o, p in probabilities.items() if p is not None}
        returned = set(top.token_ids)
        return Choice(
            option=max(present, key=present.__getitem__) if present else None,
            probabilities=probabilities,
            base_probabilities=_option_probabilities(base, option_ids),
            missing=[o for o, i in option_ids.items() if i not in returned],
            usage=dataclasses.replace(run.usage),
            unseen_policy=config.unseen.value,
        )

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self.base.aclose())
            self._loop.close()
        self._executor.shutdown(wait=False)

    async def aclose(self) -> None:
        await self.base.aclose()
        self._executor.shutdown(wait=False)

    def __enter__(self) -> ProxyTuner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ProxyTuner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the loop -----------------------------------------------------------------------------

    async def _pieces(
        self,
        run: _Run,
        prompt: str,
        base_prompt_ids: list[int],
        prompt_ids: list[int],
        expert_ids: list[int],
    ) -> AsyncIterator[str]:
        config = run.config
        generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        base_ids = list(base_prompt_ids)
        states = (KVState(), KVState())
        new_for_proxies = (expert_ids, prompt_ids)
        realigner = self._realigner()
        started = time.perf_counter()
        multi_step = self.base.capabilities.multi_step
        try:
            await self._check_base_tokenizer(prompt, base_prompt_ids)
            for step in range(config.max_new_tokens):
                if step == 1 and not multi_step:
                    raise ConfigError(
                        f"the {self.base.name!r} base can score only the first token after the "
                        f"prompt (a plain chat API cannot continue a partial answer); use "
                        f"max_new_tokens=1 or ProxyTuner.choose(), or a server that can continue"
                    )
                top, expert_lp, anti_lp = await self._step(
                    run,
                    Prompt(tuple(base_ids), len(base_prompt_ids)),
                    states,
                    new_for_proxies,
                    use_proxies=config.alpha != 0,
                )
                if step == 0:
                    self._check_unresolved(top)
                token = self._pick(run, top, expert_lp, anti_lp, generator)
                base_ids.append(token)
                if token in self.eos_ids:
                    run.finish_reason = "eos"
                    break
                proxy_ids = realigner.feed(token) if realigner else [token]
                new_for_proxies = (proxy_ids, proxy_ids)
                run.token_ids.append(token)
                run.usage.completion_tokens += 1
                piece = run.assembler.add(token)
                if piece:
                    yield piece
                if run.assembler.stopped:
                    run.finish_reason = "stop"
                    break
            else:
                run.finish_reason = "length"
        except ProxyClientError as exc:
            run.error = str(exc)
            exc.partial = run.result()
            raise
        finally:
            run.timings.wall_s = time.perf_counter() - started
        piece = run.assembler.finish()
        if piece:
            yield piece

    async def _step(
        self,
        run: _Run,
        prompt: Prompt,
        states: tuple[KVState, KVState],
        new_for_proxies: tuple[Sequence[int], Sequence[int]],
        *,
        use_proxies: bool,
    ) -> tuple[TopLogprobs, torch.Tensor | None, torch.Tensor | None]:
        k = run.config.top_logprobs
        run.usage.requests += 1
        run.usage.prompt_tokens += len(prompt.ids)
        run.timings.steps += 1

        async def ask_base() -> TopLogprobs:
            start = time.perf_counter()
            try:
                return await self.base.top_logprobs(prompt, k)
            finally:
                run.timings.base_s += time.perf_counter() - start

        def run_proxies() -> tuple[torch.Tensor, torch.Tensor]:
            start = time.perf_counter()
            try:
                return (
                    self.expert.feed(states[0], new_for_proxies[0]),
                    self.anti_expert.feed(states[1], new_for_proxies[1]),
                )
            finally:
                run.timings.local_s += time.perf_counter() - start

        if not use_proxies:
            return await ask_base(), None, None
        loop = asyncio.get_running_loop()
        if not self.overlap:
            top = await ask_base()
            expert_lp, anti_lp = await loop.run_in_executor(self._executor, run_proxies)
            return top, expert_lp, anti_lp
        # Both must finish before we go on (the proxies' KV caches are shared state), so wait for
        # both even when one fails, then raise the first failure.
        outcome = await asyncio.gather(
            ask_base(), loop.run_in_executor(self._executor, run_proxies), return_exceptions=True
        )
        for result in outcome:
            if isinstance(result, BaseException):
                raise result
        top, (expert_lp, anti_lp) = outcome
        return top, expert_lp, anti_lp

    def _pick(
        self,
        run: _Run,
        top: TopLogprobs,
        expert_lp: torch.Tensor | None,
        anti_lp: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> int:
        config = run.config
        candidates = self._combine(run, top, expert_lp, anti_lp)
        index = choose(
            candidates.scores,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            generator=generator,
        )
        return int(candidates.ids[index])

    def _combine(
        self,
        run: _Run,
        top: TopLogprobs,
        expert_lp: torch.Tensor | None,
        anti_lp: torch.Tensor | None,
        *,
        alpha: float | None = None,
        count: bool = True,
    ) -> Candidates:
        base_ids = torch.tensor(top.token_ids, dtype=torch.int64)  # [k]
        base_lp = torch.tensor(top.logprobs, dtype=torch.float64)  # [k]
        if expert_lp is None or anti_lp is None:  # alpha == 0: no proxy forward was run
            expert_lp = anti_lp = torch.zeros(self.vocab_size)
        candidates = combine(
            base_ids,
            base_lp,
            expert_lp,
            anti_lp,
            alpha=run.config.alpha if alpha is None else alpha,
            policy=run.config.unseen,
            twin=self.bridge.prefix
            if run.config.untwinned is UntwinnedRule.PREFIX
            else self.bridge.twin,
        )
        if count:
            returned = base_ids[base_ids < self.bridge.base_size]
            run.usage.untwinned_candidates += int((self.bridge.twin[returned] < 0).sum())
            run.usage.candidates += len(top) + top.unresolved
            run.usage.dropped_candidates += candidates.dropped + top.unresolved
            run.usage.retokenized_steps += top.retokenized
        if candidates.ids.numel() == 0:
            raise ResponseFormatError(
                f"none of the base's {len(top)} candidates is in the vocabulary it shares with "
                f"the proxies ({self.bridge.shared} tokens): is --base-tokenizer right?"
            )
        return candidates

    # -- helpers ------------------------------------------------------------------------------

    def _realigner(self) -> Realigner | None:
        if self.base_tokenizer is None or self._proxy_vocab is None:
            return None
        return Realigner(
            self.base_tokenizer.vocab,
            self._proxy_vocab,
            lambda text: self.tokenizer(text, add_special_tokens=False).input_ids,
        )

    def _decode(self, ids: Sequence[int]) -> str:
        if self.base_tokenizer is not None:
            return self.base_tokenizer.decode(list(ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _encode_base(self, prompt: str, proxy_ids: list[int]) -> list[int]:
        if self.base_tokenizer is None:
            return proxy_ids
        return self.base_tokenizer.encode(prompt)

    async def _check_base_tokenizer(self, prompt: str, base_ids: list[int]) -> None:
        """Once: without --base-tokenizer, the server must tokenize as the proxies do."""
        if self._base_tokenizer_checked:
            return
        self._base_tokenizer_checked = True
        tokenize = getattr(self.base, "tokenize", None)
        server_ids = await tokenize(prompt) if tokenize is not None else None
        if server_ids is not None and list(server_ids) != list(base_ids):
            raise ConfigError(
                f"the base tokenizes the prompt differently from the proxies ({len(server_ids)} "
                f"vs {len(base_ids)} tokens): pass the base's tokenizer with --base-tokenizer "
                f"(base_tokenizer=...) so that the two are bridged"
            )

    def _check_unresolved(self, top: TopLogprobs) -> None:
        if self.base_tokenizer is None and top.unresolved > len(top):
            raise ConfigError(
                f"{top.unresolved} of the base's {top.unresolved + len(top)} candidates are not "
                f"tokens of the proxies' tokenizer: the base tokenizes differently; pass its "
                f"tokenizer with --base-tokenizer (base_tokenizer=...)"
            )

    def _single_token(self, option: str) -> int:
        if self.base_tokenizer is not None:
            ids = self.base_tokenizer.encode(option, add_special_tokens=False)
        else:
            ids = self.tokenizer(option, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ConfigError(
                f"option {option!r} is {len(ids)} tokens {ids}; choose() compares single-token "
                f"options (try a shorter label, or one with a leading space such as ' A')"
            )
        return int(ids[0])

    def _encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = list(self.tokenizer(prompt).input_ids)
        if not ids:
            raise ConfigError("the prompt is empty and the tokenizer adds no BOS token")
        return ids

    def _encode_for_expert(self, prompt: str) -> list[int]:
        tokenizer = self.expert_tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "expert_chat_template=True but the expert's tokenizer has no chat_template; "
                "drop the option or use an expert whose tokenizer_config.json defines one"
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        bos = tokenizer.bos_token
        has_bos = bool(bos) and text.startswith(bos)
        return list(tokenizer(text, add_special_tokens=not has_bos).input_ids)

    def _sync_loop(self) -> asyncio.AbstractEventLoop:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise ConfigError(
                "the synchronous API cannot run inside a running event loop (an async app, "
                "Jupyter): use `await tuner.agenerate(...)` or `tuner.astream(...)`"
            )
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop


def _with_options(config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    config = config or GenerationConfig()
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
