"""`proxyclient generate ...`: proxy-tuned text from the shell (`batch`: a JSONL file of prompts).

Text streams to stdout; diagnostics go to stderr. Any problem we can name exits with code 2 and a
one-paragraph message, no traceback (``--debug`` shows it); what was generated before a failure is
still printed, and ``--json`` output of a failed run goes on with ``--resume FILE``. Anything
unforeseen exits with code 1, in one line too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from proxyclient.batch import DEFAULT_CONCURRENCY
from proxyclient.config import GenerationConfig, default_base_k
from proxyclient.errors import ConfigError, ProxyClientError
from proxyclient.flags import add_generation_flags, as_flags, config_from_flags, generation_options
from proxyclient.result import Generation

if TYPE_CHECKING:
    from proxyclient.adapters.base import BaseModel
    from proxyclient.batch import BatchItem, BatchStats, Progress, ResultWriter
    from proxyclient.tuner import ProxyTuner

API_KEY_ENV = "PROXYCLIENT_API_KEY"
EXIT_USAGE = 2


def _base_options(parser: argparse.ArgumentParser) -> None:
    from proxyclient.adapters import available

    base = parser.add_argument_group("base model (remote)")
    base.add_argument(
        "--api",
        default="vllm",
        choices=list(available()),
        help="server dialect: %(choices)s (default: %(default)s)",
    )
    base.add_argument(
        "--base-url",
        default=None,
        help="e.g. http://127.0.0.1:8000/v1 (tgi, llamacpp: no /v1); hosted providers' "
        "dialects default to their public endpoint",
    )
    base.add_argument("--base-model", required=True, help="model name the server serves")
    base.add_argument(
        "--base-tokenizer",
        default=None,
        help="the base's tokenizer for text dialects: a local HF tokenizer folder or "
        "tiktoken:ENCODING (default: the anti-expert's; OpenAI models: their encoding)",
    )
    base.add_argument(
        "--base-api-key",
        default=None,
        metavar="KEY",
        help=f"the base's key; default: ${API_KEY_ENV}, else the provider's usual variable "
        "($OPENAI_API_KEY, ...)",
    )
    from proxyclient.adapters.http import (
        DEFAULT_MAX_RETRIES,
        DEFAULT_MAX_RETRY_TIME_S,
        DEFAULT_TIMEOUT,
    )

    base.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT.read, help="seconds per read"
    )
    base.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_TIMEOUT.connect,
        help="seconds to connect",
    )
    base.add_argument(
        "--max-retries", type=int, default=DEFAULT_MAX_RETRIES, help="attempts after the first"
    )
    base.add_argument(
        "--max-retry-time",
        type=float,
        default=DEFAULT_MAX_RETRY_TIME_S,
        metavar="S",
        help="seconds all attempts of one request may take, waits included (default: %(default)s)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="log everything, and show tracebacks of errors"
    )
    limits = parser.add_argument_group("client-side limits for the base (default: none)")
    limits.add_argument("--max-concurrency", type=_at_least_one, default=None, metavar="N")
    limits.add_argument("--requests-per-minute", type=float, default=None, metavar="N")
    limits.add_argument(
        "--tokens-per-minute",
        type=float,
        default=None,
        metavar="N",
        help="prompt tokens plus the tokens each request asks for",
    )
    base.add_argument(
        "--chat-continue",
        action="store_true",
        help="openai-chat: the server can continue a partial answer (vLLM), so generate freely",
    )


def _proxy_and_decoding_options(parser: argparse.ArgumentParser, *, one_step: bool = False) -> None:
    """The local models' flags and the generation options' (``one_step``: those of a one-step
    choice, with a required --prompt)."""
    local = parser.add_argument_group("expert and anti-expert (local)")
    expert = local.add_mutually_exclusive_group(required=True)
    expert.add_argument("--expert", help="folder of the tuned small model")
    expert.add_argument(
        "--expert-lora",
        metavar="DIR",
        help="instead: a PEFT LoRA adapter folder; the expert is the anti-expert with it "
        "(one model in memory; needs peft: pip install 'proxyclient[lora]')",
    )
    local.add_argument("--anti-expert", required=True, help="folder of the untuned small model")
    local.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda:0 ...")
    local.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 else), fp32 ...")
    local.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; use 1 when a server shares this machine's few cores",
    )
    decoding = parser.add_argument_group("decoding")
    if one_step:
        decoding.add_argument("--prompt", required=True, help="the prompt; - reads it from stdin")
    add_generation_flags(decoding, one_step=one_step)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, not the whole usage (subcommands' parsers are of this class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="proxyclient",
        description="Proxy-tuning: a remote base model steered by a local expert and anti-expert.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate",
        help="generate proxy-tuned text",
        description="scores = base + alpha * (expert - anti_expert), token by token.",
    )
    _base_options(gen)
    _proxy_and_decoding_options(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt; - reads it from stdin")
    source.add_argument(
        "--messages",
        metavar="FILE",
        help='a chat: a JSON array of {"role": "system"|"user"|"assistant", "content": ...} '
        "(- reads stdin)",
    )
    source.add_argument(
        "--resume",
        metavar="FILE",
        help="go on with a failed run: FILE holds its --json output (its prompt and decoding "
        "options are used; the text printed is the whole text)",
    )
    gen.add_argument(
        "--system", metavar="TEXT", help="a system message; --prompt becomes the user turn"
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    gen.add_argument(
        "--trace",
        dest="trace_file",
        metavar="FILE",
        help="write one JSON line per output token: its tuned, base, expert and anti-expert "
        "log-probs and the best alternatives",
    )
    gen.add_argument(
        "--trace-top",
        type=int,
        default=5,
        metavar="N",
        help="alternatives per token in --trace (0-20, default: 5)",
    )

    batch = commands.add_parser(
        "batch",
        help="generate for every prompt of a JSONL file; resumable",
        description='Each input line is {"custom_id": ..., "prompt": ...} plus any '
        'generation fields that override the flags (e.g. "max_new_tokens": 16). Each result '
        "is appended to --output as one JSON line when it finishes: custom_id, text, token_ids, "
        "finish_reason, usage, error. Rerun the same command to skip the ids done and retry the "
        "failed ones. Exit status: 0 all done, 1 some failed or malformed lines, 2 usage error.",
    )
    _base_options(batch)
    _proxy_and_decoding_options(batch)
    jobs = batch.add_argument_group("batch")
    jobs.add_argument("--input", required=True, help="JSONL file of prompts")
    jobs.add_argument("--output", required=True, help="JSONL file of results (appended to)")
    jobs.add_argument(
        "--concurrency",
        type=_at_least_one,
        default=DEFAULT_CONCURRENCY,
        help=f"generations in flight at once (default: {DEFAULT_CONCURRENCY}; with --ray: "
        "per worker)",
    )
    ray = batch.add_argument_group("past one machine: Ray (pip install 'proxyclient[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="run the generations on Ray actors, each holding the local models once",
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="a running Ray cluster (auto, ray://HEAD:10001); default: start Ray locally",
    )
    ray.add_argument(
        "--workers", type=_at_least_one, default=None, metavar="N", help="Ray actors (default: 1)"
    )
    ray.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs Ray gives each actor (default: 0; fractions share a GPU)",
    )

    choose = commands.add_parser(
        "choose",
        help="the proxy-tuned choice among single-token options (one step; any API)",
        description="Prints JSON: the choice and each option's probability, tuned and base.",
    )
    _base_options(choose)
    _proxy_and_decoding_options(choose, one_step=True)
    choose.add_argument("--choices", required=True, help='comma-separated, e.g. "A,B,C,D"')

    inspect = commands.add_parser(
        "inspect",
        help="what a base server can do (probes it with one or two tiny requests)",
    )
    _base_options(inspect)
    inspect.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")

    from proxyclient.server.main import add_server_options

    serve = commands.add_parser(
        "serve",
        help="serve the proxy-tuned model behind an OpenAI-compatible API (needs [serve])",
        description="POST /v1/completions and /v1/chat/completions (streaming or not), GET "
        "/v1/models, /health, /metrics. The decoding flags are every request's defaults.",
    )
    _base_options(serve)
    _proxy_and_decoding_options(serve)
    add_server_options(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="proxyclient: %(levelname)s: %(message)s")
    commands = {
        "generate": _generate,
        "choose": _choose,
        "inspect": _inspect,
        "batch": _batch,
        "serve": _serve,
    }
    try:
        return commands[args.command](args)
    except ProxyClientError as exc:
        _fail(str(exc), debug=args.debug)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, or a failure we did not foresee: one line, no traceback
        _fail(f"{type(exc).__name__}: {exc} (--debug shows where)", debug=args.debug)
        return 1


def _connect(args: argparse.Namespace) -> BaseModel:
    from proxyclient.adapters import RateLimits, connect

    # --base-tokenizer goes to the adapter, which the tuner then adopts it from; without it,
    # connect() takes what the model name implies and ProxyTuner lends a text dialect the
    # proxies' (the Python API's defaults, by the same code).
    tokenizer = args.base_tokenizer
    options = {"continue_final_message": True} if args.chat_continue else {}
    return connect(
        args.api,
        args.base_url,
        args.base_model,
        api_key=args.base_api_key or os.environ.get(API_KEY_ENV),
        tokenizer=tokenizer,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        max_retries=args.max_retries,
        max_retry_time=args.max_retry_time,
        limits=RateLimits(args.max_concurrency, args.requests_per_minute, args.tokens_per_minute),
        **options,
    )


def _tuner(args: argparse.Namespace) -> ProxyTuner:
    # Imported here so that `--help` and argument errors answer at once.
    from transformers.utils import logging as hf_logging

    from proxyclient.tuner import ProxyTuner

    if not args.verbose:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    # The adapter carries the base's tokenizer (given, or implied by the model name); the tuner
    # adopts it from there.
    return ProxyTuner(
        _connect(args),
        expert=args.expert,
        anti_expert=args.anti_expert,
        expert_lora=args.expert_lora,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
    )


def _prompt(args: argparse.Namespace) -> str | list[dict[str, Any]]:
    """The prompt the flags give: text, or chat messages (--messages, or --system with --prompt,
    or --response-prefix / --base-chat-template on with --prompt)."""
    if getattr(args, "messages", None) is not None:
        source = args.messages
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
            messages = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(
                f"--messages {source}: cannot read a JSON array of messages from it ({exc})"
            ) from None
        if args.system is not None:
            messages = [{"role": "system", "content": args.system}, *messages]
        return messages
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    chat = getattr(args, "system", None) is not None or _chat_options_given(args)
    if not chat:
        return prompt
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return [*system, {"role": "user", "content": prompt}]


def _chat_options_given(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "response_prefix", "")) or getattr(args, "base_chat_template", None)


def _config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig that the flags describe (--trace FILE asks for --trace-top
    alternatives per token)."""
    trace = args.trace_top if getattr(args, "trace_file", None) else None
    return config_from_flags(args, trace=trace)


def _generate(args: argparse.Namespace) -> int:
    if args.resume is not None:
        prompt, config, partial, prompt_ids = _read_resume(args.resume)
    else:
        prompt, config, partial, prompt_ids = _prompt(args), _config(args), None, None
    with _tuner(args) as tuner:

        def encoded() -> list[int]:
            return list(tuner.tokens.encode(prompt, config)[1].base)

        if prompt_ids is not None and prompt_ids != encoded():
            raise ConfigError(
                f"--resume {args.resume}: this base tokenizer splits the prompt differently from "
                f"the failed run's; resume with the same models and --base-tokenizer"
            )
        stream = tuner.stream(prompt, config, resume=partial)
        try:
            if partial is not None and not args.json:
                sys.stdout.write(partial.text)
            for piece in stream:
                if not args.json:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except ProxyClientError as exc:
            # What `--resume` needs to go on: the prompt (and its ids, to check), the options.
            state = {"prompt": prompt, "prompt_token_ids": encoded(), "config": config.to_dict()}
            _print_result(args, stream.generation.to_dict() | {"error": str(exc), "resume": state})
            _write_trace(args, stream.generation)
            _fail(str(exc), debug=args.debug)
            return EXIT_USAGE
        finally:
            if args.verbose:
                print(f"proxyclient: {cost_summary(stream.generation)}", file=sys.stderr)
        _print_result(args, stream.generation.to_dict())
        _write_trace(args, stream.generation)
    return 0


def _write_trace(args: argparse.Namespace, generation: Generation) -> None:
    """--trace FILE: one JSON line per output token."""
    if not args.trace_file or generation.steps is None:
        return
    try:
        with open(args.trace_file, "w", encoding="utf-8") as file:
            for step in generation.steps:
                file.write(json.dumps(asdict(step), ensure_ascii=False) + "\n")
    except OSError as exc:
        raise ConfigError(
            f"--trace {args.trace_file}: cannot write it ({exc.strerror or exc})"
        ) from None


def cost_summary(generation: Generation) -> str:
    """One line: what the generation cost the base."""
    usage, tokens = generation.usage, max(1, generation.usage.completion_tokens)
    cached = (
        f", {usage.cached_prompt_tokens} of them cached"
        if usage.cached_prompt_tokens is not None
        else ""
    )
    drafted = (
        f"; drafts: {usage.accepted_draft_tokens} of {usage.base_completion_tokens} base "
        f"tokens accepted"
        if usage.accepted_draft_tokens
        else ""
    )
    return (
        f"{usage.completion_tokens} tokens in {usage.requests} requests "
        f"({usage.requests / tokens:.2f} per token), {usage.prompt_tokens} prompt tokens sent"
        f"{cached}, {usage.base_completion_tokens} base completion tokens{drafted}, "
        f"{generation.timings.wall_s:.2f} s"
    )


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _batch(args: argparse.Namespace) -> int:
    """Resume rules and output format: proxyclient/batch.py's docstring."""

    from proxyclient import batch

    config = _config(args)
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise ConfigError("--input and --output are the same file; write the results elsewhere")
    ray_options = {
        "--workers": args.workers,
        "--gpus-per-worker": args.gpus_per_worker,
        "--ray-address": args.ray_address,
    }
    if given := [flag for flag, value in ray_options.items() if value is not None and not args.ray]:
        raise ConfigError(f"{', '.join(given)} only work with --ray; add --ray or drop them")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    items, malformed = batch.read_input(args.input, config)
    for bad in malformed:
        print(f"proxyclient: {args.input} {bad}; skipped", file=sys.stderr)
    plan = batch.resume(args.output, [item.custom_id for item in items])
    pending = [item for item in items if item.custom_id not in plan.done]
    stats = batch.BatchStats()
    if pending:
        with batch.ResultWriter(args.output) as output:
            progress = batch.Progress(len(pending))
            try:
                run = _run_on_ray if args.ray else _run_here
                stats = run(args, pending, config, output, progress)
            except KeyboardInterrupt:
                print("batch: interrupted; rerun the same command to go on", file=sys.stderr)
                raise
            finally:
                progress.close()
    stats.skipped = len(items) - len(pending)
    stats.malformed = len(malformed)
    print(stats.summary(), file=sys.stderr)
    return 1 if stats.failed or stats.malformed else 0


def _run_here(
    args: argparse.Namespace,
    items: list[BatchItem],
    config: GenerationConfig,
    output: ResultWriter,
    progress: Progress,
) -> BatchStats:
    import asyncio

    from proxyclient.batch import run_batch

    tuner = _tuner(args)

    async def run() -> BatchStats:
        try:
            return await run_batch(
                tuner,
                items,
                config,
                concurrency=args.concurrency,
                output=output,
                progress=progress,
            )
        finally:
            await tuner.aclose()

    return asyncio.run(run())


def _run_on_ray(
    args: argparse.Namespace,
    items: list[BatchItem],
    config: GenerationConfig,
    output: ResultWriter,
    progress: Progress,
) -> BatchStats:
    import functools

    from proxyclient.ray_batch import run_on_ray

    return run_on_ray(
        functools.partial(_tuner, args),
        items,
        config,
        output=output,
        workers=args.workers or 1,
        concurrency=args.concurrency,
        gpus_per_worker=args.gpus_per_worker or 0.0,
        address=args.ray_address,
        progress=progress,
        verbose=args.verbose,
    )


def _serve(args: argparse.Namespace) -> int:
    from proxyclient.server.main import serve

    return serve(args, _tuner, _config(args))


def _choose(args: argparse.Namespace) -> int:
    choices = [c for c in args.choices.split(",") if c]
    prompt = _prompt(args)
    with _tuner(args) as tuner:
        choice = tuner.choose(prompt, choices, **generation_options(args))
    print(json.dumps(choice.to_dict(), ensure_ascii=False))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses

    from proxyclient.adapters.base import Prompt
    from proxyclient.adapters.discovery import probe, steering_summary

    base = _connect(args)
    tokenizer = getattr(base, "tokenizer", None)
    ids = tuple(tokenizer.encode("Hello")) if tokenizer is not None else (1,)

    async def run() -> dict:
        try:
            found = await probe(base, Prompt(ids, len(ids)))
        finally:
            await base.aclose()
        return {**dataclasses.asdict(found), "steering": steering_summary(found)}

    capabilities = asyncio.run(run())
    default_k = default_base_k(capabilities["max_k"])
    print(
        json.dumps(
            {"api": args.api, "model": args.base_model, **capabilities, "default_k": default_k}
        )
    )
    return 0


def _print_result(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif result["text"] and not result["text"].endswith("\n"):
        print()


def _read_resume(path: str) -> tuple[str, GenerationConfig, Generation, list[int]]:
    """What `--resume FILE` goes on with: the failed run's prompt, options, partial generation and
    prompt ids, from its --json output (the last line of FILE; - reads stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--resume {path}: cannot read it ({exc})") from None
    what = f"--resume {path}: not the --json output of a failed `proxyclient generate` run"
    try:
        record = json.loads(text.strip().splitlines()[-1])
        if record.get("finish_reason") != "error":
            raise ConfigError(
                f"--resume {path}: that run finished ({record.get('finish_reason')!r}); there is "
                f"nothing to resume"
            )
        state = record["resume"]
        partial = Generation.from_dict(record)
        prompt = state["prompt"] if isinstance(state["prompt"], list) else str(state["prompt"])
        prompt_ids = list(state["prompt_token_ids"])
        options = dict(state["config"])
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ConfigError(f"{what} (it needs text, token_ids, usage and resume)") from None
    try:
        return prompt, GenerationConfig.from_dict(options), partial, prompt_ids
    except ConfigError as exc:
        raise ConfigError(f"{what}: its options do not fit ({exc})") from None


def _fail(message: str, *, debug: bool = False) -> None:
    if debug:
        traceback.print_exc()
    print(f"proxyclient: error: {as_flags(message)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
