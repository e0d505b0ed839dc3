"""`proxyclient generate ...`: proxy-tuned text from the shell (`batch`: a JSONL file of prompts).

This module owns the flags and ``main``; what each subcommand does is in ``commands``. Text
streams to stdout; diagnostics go to stderr. Any problem we can name exits with code 2 and a
one-paragraph message, no traceback (``--debug`` shows it); what was generated before a failure
is still printed, and ``--json`` output of a failed run goes on with ``--resume FILE``. Anything
unforeseen exits with code 1, in one line too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import proxyclient
from proxyclient.batch import DEFAULT_CONCURRENCY
from proxyclient.errors import ProxyClientError
from proxyclient.flags import add_generation_flags, on_off

if TYPE_CHECKING:
    pass

from proxyclient.commands import API_KEY_ENV, EXIT_USAGE, fail


def _base_options(parser: argparse.ArgumentParser) -> None:
    from proxyclient.adapters import NOT_A_BASE, available

    dialects = list(available())

    def api(name: str) -> str:
        # A name that can be no base (mistral) is refused with the library's reason, not with
        # argparse's "invalid choice".
        if name not in dialects and name in NOT_A_BASE:
            raise argparse.ArgumentTypeError(f"{NOT_A_BASE[name]}; dialects: {', '.join(dialects)}")
        return name

    base = parser.add_argument_group("base model (remote)")
    base.add_argument(
        "--api",
        default="vllm",
        type=api,
        choices=dialects,
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
    base.add_argument(
        "--reasoning-effort",
        default=None,
        metavar="LEVEL",
        help="openai-chat: the reasoning_effort to send (none: a gpt-5.x without reasoning, "
        "which then gives logprobs)",
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
    expert.add_argument(
        "--pair",
        nargs=3,
        action="append",
        metavar=("EXPERT", "ANTI", "WEIGHT"),
        help="instead of --expert/--anti-expert, repeatable: a steering pair, scores = base + "
        "alpha * sum of WEIGHT * (EXPERT - ANTI); a negative WEIGHT steers away; a folder "
        "several pairs name is loaded once; all pairs share one tokenizer",
    )
    local.add_argument(
        "--anti-expert", help="folder of the untuned small model (with --expert/--expert-lora)"
    )
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
    parser.add_argument(
        "--version", action="version", version=f"proxyclient {proxyclient.__version__}"
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
    gen.add_argument(
        "--response-prefix",
        default="",
        metavar="TEXT",
        help="a chat: the text the answer starts with, on every side (--prompt becomes the user "
        "turn)",
    )
    gen.add_argument(
        "--base-chat-template",
        type=on_off,
        choices=[None, True, False],
        metavar="{auto,on,off}",
        default=None,
        help="a chat: the base reads its chat template (auto: when it has one) or plain text",
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
        "--html",
        dest="html_file",
        metavar="FILE",
        help="write a self-contained HTML page of the tokens, each shaded by how far steering "
        "moved it, with every model's log-probs on hover or focus (proxyclient view: the same "
        "from a saved trace)",
    )
    gen.add_argument(
        "--trace-top",
        type=int,
        default=5,
        metavar="N",
        help="alternatives per token in --trace and --html (0-20, default: 5)",
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

    view = commands.add_parser(
        "view",
        help="an HTML page of what the steering did to each token, from a saved trace",
        description="Reads a --trace FILE (one JSON line per token) or the --json output of a "
        "traced run (--trace or --html; it adds requests and billed tokens) and writes the page "
        "generate --html writes.",
    )
    view.add_argument("trace", metavar="TRACE", help="a --trace JSONL file or --json output")
    view.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default=None,
        help="where to write the page (default: TRACE with .html; - prints it)",
    )
    view.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    view.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)

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
    from proxyclient import commands

    run = {
        "generate": commands.generate,
        "choose": commands.choose,
        "inspect": commands.inspect,
        "batch": commands.batch,
        "serve": commands.serve,
        "view": commands.view,
    }
    try:
        return run[args.command](args)
    except ProxyClientError as exc:
        fail(str(exc), debug=args.debug)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, or a failure we did not foresee: one line, no traceback
        fail(f"{type(exc).__name__}: {exc} (--debug shows where)", debug=args.debug)
        return 1


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
