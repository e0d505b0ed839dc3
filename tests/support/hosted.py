"""Helpers the tests of hosted dialects share (test_deepseek.py, test_gemini.py), and streamed
answers for the fixture servers (test_streamed_drafts_hosted.py).

Streamed answers: a fixture route answers a streamed request with ``event_stream(events)``.
``DialectServer``'s handler writes whole bodies, so there the events (all of them, made at once)
go as one text body, which an SSE reader reads all the same. A ``StreamingServer`` sends each
event as it is made (HTTP/1.1 chunked transfer encoding) and makes the next only after the last
was written (``decode_steps`` decodes one token per step), so a client that closes the stream
stops the generation; ``break_next_stream(after=n)`` drops the connection mid-stream, and
``streams`` records what each stream sent and how it ended. The openai-chat fixture answers
``stream: true`` with ``stream_chat`` (chat completion chunks, as a vLLM chat server sends).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import json
import os
import random
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList

from tests.support.dialect_servers import (
    CHAT_PARAMS,
    VLLM_CHAT_TEMPLATE_PARAMS,
    DialectServer,
    Json,
    Step,
    _Core,
    _Handler,
    _OpenAIChat,
)


def ids_of(tokenizer, *texts: str) -> list[int]:
    """Ids from the HF tokenizer's own token strings (byte-level: a space is "Ġ")."""
    ids = [tokenizer.inner.convert_tokens_to_ids(t) for t in texts]
    assert None not in ids and tokenizer.inner.unk_token_id not in ids, texts
    return ids


def run_step(base, prompt, k: int = 5):
    """One ``top_logprobs`` step of adapter ``base``, which is closed afterwards."""
    import asyncio

    async def go():
        try:
            return await base.top_logprobs(prompt, k)
        finally:
            await base.aclose()

    return asyncio.run(go())


@contextlib.contextmanager
def connected(api: str, server, tokenizer, model: str, **options):
    """An adapter of dialect ``api`` on ``server`` (a DialectServer), closed on leaving."""
    import asyncio

    from proxyclient import connect

    base = connect(api, server.base_url, model, tokenizer=tokenizer, **options)
    try:
        yield base
    finally:
        asyncio.run(base.aclose())


def dialect_tuner(api: str, server, tiny_models, tokenizer, model: str, **options):
    """A CPU ProxyTuner, the tiny expert and anti-expert steering dialect ``api`` on ``server``."""
    from proxyclient import ProxyTuner, connect

    base = connect(api, server.base_url, model, tokenizer=tokenizer, **options)
    return ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")


def dialect_cli(api: str, key_env: str, key: str, tiny_models, *args: str):
    """``python -m proxyclient.cli ARGS --api API`` (the tiny base's tokenizer) with only the
    key in ``key_env``."""
    env = dict(os.environ, **{key_env: key})
    env.pop("PROXYCLIENT_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "proxyclient.cli", *args, "--api", api,
         "--base-tokenizer", str(tiny_models["base"])],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def assert_one_clear_error(run, expected: str) -> str:
    """The CLI run exited 2 with one ``proxyclient: error:`` line, holding ``expected``, and no
    traceback; returns that line."""
    assert run.returncode == 2, run.stdout
    lines = [line for line in run.stderr.splitlines() if line.startswith("proxyclient: error:")]
    assert len(lines) == 1 and expected in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]


def alpha_0_text(tuner, prompt: str, n: int, k: int, speculate: str) -> str:
    """What ``tuner`` (closed afterwards) generates greedily at alpha 0, the base alone, with
    top-k ``k`` and `restrict`."""
    with tuner:
        return tuner.generate(
            prompt, max_new_tokens=n, alpha=0.0, unseen="restrict", base_k=k,
            speculate=speculate,
        ).text  # fmt: skip


def headers_sent(server, tuner, prompt: str, k: int) -> list[dict]:
    """The headers of each request ``server`` (a DialectServer) gets while ``tuner`` (closed
    afterwards) generates two tokens."""
    server.requests.clear()
    with tuner:
        tuner.generate(prompt, max_new_tokens=2, base_k=k)
    return [h for _, h, _ in server.requests]


# -- streamed answers ---------------------------------------------------------------------------

_handling = threading.local()  # in a StreamingServer's handler thread: the stream a route made


class EventStream:
    """A streamed answer: ``events`` (made as they are read) as ``data:`` lines, then ``done``
    (None: the stream just ends, as Gemini's and TGI's do)."""

    def __init__(self, events: Iterator[Json], done: str | None = "[DONE]") -> None:
        self.events = events
        self.done = done

    def lines(self) -> Iterator[tuple[bytes, bool]]:
        """Each server-sent event's bytes, and whether it is an event (not the ``done`` line)."""
        for event in self.events:
            yield f"data: {json.dumps(event, allow_nan=False)}\n\n".encode(), True
        if self.done is not None:
            yield f"data: {self.done}\n\n".encode(), False

    def close(self) -> None:
        """Stop making events (a generator's ``finally`` closes what it reads)."""
        close = getattr(self.events, "close", None)
        if close is not None:
            close()


def event_stream(events: Iterator[Json], *, done: str | None = "[DONE]") -> Any:
    """What a fixture route answers for a streamed request (see the module's docstring)."""
    stream = EventStream(events, done)
    if getattr(_handling, "incremental", False):
        _handling.stream = stream
        return {}  # the StreamingServer sends the stream in its place
    try:
        return "".join(line.decode() for line, _ in stream.lines())
    finally:
        stream.close()


@torch.inference_mode()
def _forward(core: _Core, ids: list[int], out: Any) -> Any:
    model = core.model
    with model._lock:
        if out is None:
            return model.model(input_ids=torch.tensor([ids]), use_cache=True)
        cache = {model._cache_name: getattr(out, model._cache_name)}
        return model.model(input_ids=torch.tensor([[ids[-1]]]), use_cache=True, **cache)


def decode_steps(
    core: _Core,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    processors: LogitsProcessorList,
    sample: bool,
    generator: torch.Generator,
) -> Iterator[Step]:
    """The fixture model's decoding (``_Model.generate``'s, the same numbers), one step per
    ``next``, so that a stream closed early stops it; the model's lock is held per forward, not
    across steps."""
    ids, out = list(prompt_ids), None
    while max_new_tokens > 0:
        out = _forward(core, ids, out)
        with torch.inference_mode():
            logits = out.logits[0, -1:].float()
            scores = processors(torch.tensor([ids]), logits.clone())
            if sample:
                probs = torch.softmax(scores[0].double(), dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(torch.argmax(scores[0]))
            raw = torch.log_softmax(logits[0].double(), dim=-1)
            processed = torch.log_softmax(scores[0].double(), dim=-1)
        yield Step(token, raw, processed)
        ids.append(token)
        max_new_tokens -= 1
        if token in core.model.stop_ids:
            return


def text_pieces(core: _Core) -> Callable[[int], str]:
    """Each token's text as a stream shows it: a partial character held back until it
    completes; special tokens none."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(token_id: int) -> str:
        if token_id in core.special_ids:
            return ""
        return decoder.decode(core.token_bytes(token_id))

    return piece


def chat_chunks(
    handler: _OpenAIChat,
    steps: Iterator[Step],
    k: int | None,
    *,
    model: str,
    prompt_tokens: int,
    include_usage: bool,
    reasoning: str | None = None,
    shape: Callable[[Json], Json] = lambda entry: entry,
    usage_extra: Callable[[], Json] = dict,
) -> Iterator[Json]:
    """OpenAI's chat completion chunks (``object: chat.completion.chunk``,
    https://platform.openai.com/docs/api-reference/chat-streaming): the role, then one chunk per
    token with its ``logprobs.content`` entry (``k`` top logprobs; None: no logprobs; the stop
    token left out, as in the whole answer), the finish, and with ``include_usage`` a last chunk
    of ``usage`` and no choices. ``reasoning``: a thinking model's text, streamed as
    ``delta.reasoning_content`` first; ``shape`` rewrites each logprobs entry."""
    head = {
        "id": "chatcmpl-" + "".join(random.choices(string.ascii_letters + string.digits, k=24)),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def chunk(delta: Json, logprobs: Any = None, finish: str | None = None) -> Json:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return head | {"choices": [choice]}

    yield chunk({"role": "assistant", "content": ""})
    if reasoning is not None:
        yield chunk({"reasoning_content": reasoning, "content": None})
    piece, generated, finish = text_pieces(handler.core), 0, "length"
    for step in steps:
        generated += 1
        if step.token_id in handler.core.model.stop_ids:
            finish = "stop"
            break
        logprobs = None
        if k is not None:
            entry = handler.entry(step.token_id, float(step.raw[step.token_id]))
            entry["top_logprobs"] = [handler.entry(t, lp) for t, lp in handler.top(step.raw, k)]
            logprobs = {"content": [shape(entry)], "refusal": None}
        yield chunk({"content": piece(step.token_id)}, logprobs)
    yield chunk({}, None, finish)
    if include_usage:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
        }
        yield head | {"choices": [], "usage": usage | usage_extra()}


def stream_chat(server: _OpenAIChat, body: Json) -> Any:
    """The openai-chat fixture's answer to ``stream: true``: chat completion chunks as
    server-sent events ending with ``data: [DONE]``, as vLLM's chat does."""
    extensions = VLLM_CHAT_TEMPLATE_PARAMS if server.settings.continue_final_message else set()
    server.check_request(body, CHAT_PARAMS | extensions)
    ids = server.prompt_ids(body.get("messages"), server.template_options(body))
    want_logprobs, k = bool(body.get("logprobs")), body.get("top_logprobs")
    if want_logprobs:
        server.check_logprobs_allowed()
    k = 0 if k is None else server.check_range("top_logprobs", k, server.settings.max_k)
    room = server.settings.max_context - len(ids)
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = room if requested is None else min(int(requested), room)
    processors, sample, generator = server.sampling(body)
    steps = decode_steps(
        server.core, ids, max_tokens, processors=processors, sample=sample, generator=generator
    )
    chunks = chat_chunks(
        server,
        steps,
        k if want_logprobs else None,
        model=server.settings.served_name,
        prompt_tokens=len(ids),
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
    )
    return event_stream(chunks)


@dataclass
class StreamRecord:
    """One stream a StreamingServer sent: its path (query included), the events it wrote, and
    how it ended: "done", "closed" (by the client) or "broken" (``break_next_stream``)."""

    path: str
    sent: int = 0
    ended: str = ""


class _StreamingHandler(_Handler):
    server: Any

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        path = self.path.split("?", 1)[0]
        _handling.incremental, _handling.stream = True, None
        try:
            status, extra_headers, payload = self.server.owner._dispatch(method, path, headers, raw)
            stream = _handling.stream
        finally:
            _handling.incremental, _handling.stream = False, None
        if stream is not None and status == 200:
            self.server.owner.send_stream(self, stream)
            return
        self.send_response(status)
        for name, value in extra_headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class StreamingServer(DialectServer):
    """A DialectServer whose streamed answers go out event by event (see the module's
    docstring)."""

    def __init__(self, dialect: str, model_dir: Any, **options: Any) -> None:
        super().__init__(dialect, model_dir, **options)
        self.streams: list[StreamRecord] = []
        self._breaks: collections.deque[int] = collections.deque()
        self._streams_lock = threading.Lock()

    def start(self) -> StreamingServer:
        super().start()
        assert self._httpd is not None
        self._httpd.RequestHandlerClass = _StreamingHandler
        return self

    def break_next_stream(self, after: int) -> None:
        """Drop the connection of the next stream after ``after`` events (its chunked body left
        incomplete, so the client sees the connection break)."""
        with self._streams_lock:
            self._breaks.append(after)

    def wait_for_streams(self, count: int, timeout: float = 30.0) -> list[StreamRecord]:
        """``streams`` once ``count`` streams have ended (or ``timeout`` seconds have passed)."""
        deadline = time.monotonic() + timeout
        while len(self.streams) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.streams)

    def send_stream(self, handler: _StreamingHandler, stream: EventStream) -> None:
        """Write ``stream`` through ``handler``, one chunk per event, made as it is written."""
        with self._streams_lock:
            after = self._breaks.popleft() if self._breaks else None
        record = StreamRecord(handler.path)
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("cache-control", "no-cache")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        try:
            for line, is_event in stream.lines():
                if after is not None and record.sent == after:
                    record.ended, handler.close_connection = "broken", True
                    return
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                record.sent += is_event
            handler.wfile.write(b"0\r\n\r\n")
            record.ended = "done"
        except (BrokenPipeError, ConnectionResetError):
            record.ended, handler.close_connection = "closed", True
        finally:
            stream.close()
            with self._streams_lock:
                self.streams.append(record)
