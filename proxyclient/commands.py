"""What each `proxyclient` subcommand does, once cli.py has parsed its flags: connect the base,
load the tuner, run, print. Text streams to stdout, diagnostics to stderr; errors are raised for
``cli.main`` to report in one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxyclient.chat import Chat
from proxyclient.config import GenerationConfig, default_base_k
from proxyclient.errors import ConfigError, ProxyClientError
from proxyclient.flags import as_flags, config_from_flags, generation_options
from proxyclient.result import Generation

if TYPE_CHECKING:
    from proxyclient.adapters.base import BaseModel
    from proxyclient.batch import BatchItem, BatchStats, Progress, ResultWriter
    from proxyclient.tuner import ProxyTuner

API_KEY_ENV = "PROXYCLIENT_API_KEY"
EXIT_USAGE = 2


def _connect(args: argparse.Namespace) -> BaseModel:
    from proxyclient.adapters import RateLimits, connect

    # --base-tokenizer goes to the adapter, which the tuner then adopts it from; without it,
    # connect() takes what the model name implies and ProxyTuner lends a text dialect the
    # proxies' (the Python API's defaults, by the same code).
    tokenizer = args.base_tokenizer
    options: dict[str, Any] = {"continue_final_message": True} if args.chat_continue else {}
    if args.reasoning_effort is not None:
        if args.api != "openai-chat":
            raise ConfigError(
                f"--reasoning-effort is an option of --api openai-chat, not of --api {args.api}"
            )
        options["reasoning_effort"] = args.reasoning_effort
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


def _pairs(args: argparse.Namespace) -> list[tuple[str, str, float]] | None:
    """The --pair flags as (expert, anti-expert, weight); None without any. Checked before
    anything is loaded or connected."""
    if args.pair is None:
        if args.anti_expert is None:
            raise ConfigError(
                "--anti-expert is required with --expert or --expert-lora (or give the steering "
                "pairs as --pair EXPERT ANTI WEIGHT, repeatable)"
            )
        return None
    if args.anti_expert is not None:
        raise ConfigError(
            "--anti-expert goes with --expert or --expert-lora; with --pair each pair names its "
            "own anti-expert (--pair EXPERT ANTI WEIGHT)"
        )
    import math

    pairs = []
    for number, (expert, anti, weight) in enumerate(args.pair, 1):
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(
                f"--pair {number} ({expert} {anti} {weight}): WEIGHT must be a finite number, "
                f"e.g. 1.0 or -0.5"
            )
        pairs.append((expert, anti, value))
    return pairs


def _tuner(args: argparse.Namespace) -> ProxyTuner:
    pairs = _pairs(args)
    # Imported here so that `--help` and argument errors answer at once.
    from transformers.utils import logging as hf_logging

    from proxyclient.tuner import ProxyTuner

    if not args.verbose:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    # The adapter carries the base's tokenizer (given, or implied by the model name); the tuner
    # adopts it from there.
    models: dict[str, Any] = (
        {"pairs": pairs}
        if pairs is not None
        else {
            "expert": args.expert,
            "anti_expert": args.anti_expert,
            "expert_lora": args.expert_lora,
        }
    )
    return ProxyTuner(
        _connect(args),
        **models,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
    )


def _prompt(args: argparse.Namespace) -> str | Chat:
    """The prompt the flags give: text, or a chat (--messages, or --prompt as the user turn with
    --system, --response-prefix or --base-chat-template)."""
    if getattr(args, "messages", None) is not None:
        source = args.messages
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
            messages = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(
                f"--messages {source}: cannot read a JSON array of messages from it ({exc})"
            ) from None
    system = getattr(args, "system", None)
    response_prefix = getattr(args, "response_prefix", "")
    base_template = getattr(args, "base_chat_template", None)
    if getattr(args, "messages", None) is None:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if system is None and not response_prefix and base_template is None:
            return prompt
        messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return Chat(messages, response_prefix, base_template)


def _config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig that the flags describe (--trace FILE and --html FILE ask for
    --trace-top alternatives per token)."""
    traced = getattr(args, "trace_file", None) or getattr(args, "html_file", None)
    trace = args.trace_top if traced else None
    return config_from_flags(args, trace=trace)


def generate(args: argparse.Namespace) -> int:
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
            state = {
                "prompt": prompt.to_dict() if isinstance(prompt, Chat) else prompt,
                "prompt_token_ids": encoded(),
                "config": config.to_dict(),
            }
            _print_result(args, stream.generation.to_dict() | {"error": str(exc), "resume": state})
            _write_trace(args, stream.generation)
            _write_html(args, stream.generation, prompt, config)
            fail(str(exc), debug=args.debug)
            return EXIT_USAGE
        finally:
            if args.verbose:
                print(f"proxyclient: {cost_summary(stream.generation)}", file=sys.stderr)
        _print_result(args, stream.generation.to_dict())
        _write_trace(args, stream.generation)
        _write_html(args, stream.generation, prompt, config)
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


def _write_html(
    args: argparse.Namespace, generation: Generation, prompt: str | Chat, config: GenerationConfig
) -> None:
    """--html FILE: the per-token view of the generation (proxyclient/view.py)."""
    if not getattr(args, "html_file", None) or generation.steps is None:
        return
    from proxyclient import view as pages

    settings = {
        "alpha": config.alpha,
        "k": config.base_k if config.base_k is not None else "default",
    }
    data = pages.from_generation(generation, prompt=_prompt_text(prompt), settings=settings)
    _write_page(args.html_file, pages.render(data), "--html")


def _prompt_text(prompt: str | Chat) -> str:
    if isinstance(prompt, Chat):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt.messages)
    return prompt


def _write_page(path: str, page: str, what: str, *, dash_is_stdout: bool = False) -> None:
    if dash_is_stdout and path == "-":
        sys.stdout.write(page)
        return
    try:
        Path(path).write_text(page, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot write it ({exc.strerror or exc})") from None


def view(args: argparse.Namespace) -> int:
    """`proxyclient view TRACE`: the page `generate --html` writes, from a --trace file (one
    TokenTrace per line) or from a traced run's --json output (which adds its usage)."""
    from proxyclient import view as pages

    try:
        lines = Path(args.trace).read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"view {args.trace}: cannot read it ({exc})") from None
    except ValueError as exc:
        raise ConfigError(f"view {args.trace}: not JSON lines ({exc})") from None
    title = f"proxyclient: what the steering did ({Path(args.trace).name})"
    what = f"view {args.trace}: neither a --trace file nor the --json output of a traced run"
    if len(records) == 1 and isinstance(records[0], dict) and "steps" in records[0]:
        if records[0]["steps"] is None:
            raise ConfigError(
                f"view {args.trace}: that run has no per-token trace; generate it with --trace "
                f"FILE or --html FILE"
            )
        try:
            data = pages.from_generation(records[0], title=title)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(what) from None
    else:
        if not all(isinstance(r, dict) and {"text", "logprob"} <= set(r) for r in records):
            raise ConfigError(what)
        try:
            data = pages.view_data(records, title=title)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(what) from None
    output = args.output or str(Path(args.trace).with_suffix(".html"))
    if Path(output).resolve() == Path(args.trace).resolve():
        raise ConfigError(f"view: -o {output} is the trace itself; write the page elsewhere")
    _write_page(output, pages.render(data), "view -o", dash_is_stdout=True)
    if output != "-":
        print(f"proxyclient: wrote {output} ({pages.summary_line(data)})", file=sys.stderr)
    return 0


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


def batch(args: argparse.Namespace) -> int:
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


def serve(args: argparse.Namespace) -> int:
    from proxyclient.server.main import serve

    return serve(args, _tuner, _config(args))


def choose(args: argparse.Namespace) -> int:
    choices = [c for c in args.choices.split(",") if c]
    prompt = _prompt(args)
    with _tuner(args) as tuner:
        choice = tuner.choose(prompt, choices, **generation_options(args))
    print(json.dumps(choice.to_dict(), ensure_ascii=False))
    return 0


def inspect(args: argparse.Namespace) -> int:
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


def _read_resume(path: str) -> tuple[str | Chat, GenerationConfig, Generation, list[int]]:
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
        saved = state["prompt"]
        prompt = Chat(**saved) if isinstance(saved, dict) else str(saved)
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


def fail(message: str, *, debug: bool = False) -> None:
    """One line on stderr, Python parameters spelled as flags (the traceback with --debug)."""
    if debug:
        traceback.print_exc()
    print(f"proxyclient: error: {as_flags(message)}", file=sys.stderr)
