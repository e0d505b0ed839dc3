"""The CLI flags of the generation options, derived from their declaration in config.py.

Each option's flag, type, choices, default and help come from its GenerationConfig field, so the
CLI and Python share defaults by construction. Library errors name Python parameters
(``base_k=5``); :func:`as_flags` rewrites them for a CLI user (``--base-k 5``).
"""

from __future__ import annotations

import argparse
import enum
import re
import typing
from pathlib import Path
from typing import Any

from proxyclient.config import OPTIONS, GenerationConfig, Option
from proxyclient.constraints import Constraint
from proxyclient.errors import ConfigError

_ON_OFF = {"auto": None, "on": True, "off": False}


def add_generation_flags(group: Any, *, one_step: bool = False) -> None:
    """Add every option that has a flag to ``group`` (a parser or an argument group);
    ``one_step``: only those of a one-step choice (``proxyclient choose``)."""
    for option in OPTIONS:
        edges = option.edges
        if edges.flag is None or (one_step and not edges.one_step):
            continue
        group.add_argument(edges.flag, dest=option.name, **_argparse_kwargs(option))
    if not one_step:
        _add_constraint_flags(group)


def _add_constraint_flags(group: Any) -> None:
    """``constraint``'s four flags; at most one may be given (``generation_options``)."""
    group.add_argument(
        "--json-schema",
        type=_json_schema,
        metavar="FILE|JSON",
        help="structured output: the text is JSON valid against this schema (a file, or the "
        "schema itself); {} for any JSON",
    )
    group.add_argument(
        "--regex", type=_constraint(Constraint.regex), help="the text matches this regex whole"
    )
    group.add_argument(
        "--choice",
        action="append",
        metavar="TEXT",
        help="the text is exactly one of these (repeat the flag for each)",
    )
    group.add_argument(
        "--grammar",
        type=_grammar_file,
        metavar="FILE",
        help="the text follows this context-free grammar (Lark, or GBNF: root ::= ...)",
    )


def _constraint(build: Any) -> Any:
    def parse(text: str) -> Constraint:
        try:
            return build(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _json_schema(text: str) -> Constraint:
    if not text.lstrip().startswith(("{", "[", "true", "false")):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                f"cannot read the schema file {text!r} ({exc.strerror}); give a file or the "
                f"schema's JSON"
            ) from None
    return _constraint(Constraint.json_schema)(text)


def _grammar_file(path: str) -> Constraint:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot read the grammar file {path!r} ({exc.strerror})"
        ) from None
    return _constraint(Constraint.grammar)(text)


def _given_constraint(args: argparse.Namespace) -> Constraint | None:
    given = {
        flag: value
        for flag, value in (
            ("--json-schema", getattr(args, "json_schema", None)),
            ("--regex", getattr(args, "regex", None)),
            ("--choice", getattr(args, "choice", None)),
            ("--grammar", getattr(args, "grammar", None)),
        )
        if value is not None
    }
    if len(given) > 1:
        raise ConfigError(
            f"{' and '.join(given)} both constrain the output: give one of --json-schema, "
            f"--regex, --choice, --grammar"
        )
    if "--choice" in given:
        return Constraint.choice(given["--choice"])
    return next(iter(given.values()), None)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The GenerationConfig keyword arguments the parsed flags give (defaults included)."""
    options = {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}
    if hasattr(args, "json_schema"):
        options["constraint"] = _given_constraint(args)
    return options


def as_flags(message: str) -> str:
    """A library message with its Python parameters (``base_k=5``, ``base_tokenizer=...``)
    spelled as the CLI's flags (``--base-k 5``)."""

    def flag(match: re.Match[str]) -> str:
        name, assigned = match.group(1), match.group(2)
        if name not in PARAMETER_FLAGS:
            return match.group(0)
        return PARAMETER_FLAGS[name] + (" " if assigned else "")

    # "base_k=5" -> "--base-k 5"; "draft_tokens must be ..." -> "--draft-tokens must be ..."
    return re.sub(r"(?<![\w-])([a-z][a-z_]*)(?:(=)(?!=)|(?= must ))", flag, message)


# Library parameters that are not generation options, and their flags.
_OTHER_FLAGS = {
    "base_tokenizer": "--base-tokenizer",
    "tokenizer": "--base-tokenizer",  # connect()'s name for it
    "base_url": "--base-url",
    "api_key": "--base-api-key",
    "max_retries": "--max-retries",
    "max_retry_time": "--max-retry-time",
    "timeout": "--timeout",
    "connect_timeout": "--connect-timeout",
    "max_concurrency": "--max-concurrency",
    "requests_per_minute": "--requests-per-minute",
    "tokens_per_minute": "--tokens-per-minute",
    "threads": "--threads",
}
PARAMETER_FLAGS: dict[str, str] = {
    **{o.name: o.edges.flag for o in OPTIONS if o.edges.flag is not None},
    **_OTHER_FLAGS,
}


def _argparse_kwargs(option: Option) -> dict[str, Any]:
    hint = option.value_type
    default, help = option.default, option.edges.help
    kwargs: dict[str, Any] = {"default": default}
    if option.edges.metavar:
        kwargs["metavar"] = option.edges.metavar
    if hint is bool:
        return {"action": "store_true", "default": default, "help": help}
    if typing.get_origin(hint) is tuple:
        return kwargs | {"action": "append", "default": [], "help": help}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        kwargs.update(choices=[m.value for m in hint], default=default.value)
        return kwargs | {"help": f"{help} (default: %(default)s)"}
    kwargs["type"] = hint
    shown = "" if default in (None, "") else " (default: %(default)s)"
    return kwargs | {"help": help + shown}


def on_off(text: str) -> bool | None:
    """An auto/on/off flag's value: None, True or False."""
    if text not in _ON_OFF:
        raise argparse.ArgumentTypeError(f"must be auto, on or off, got {text!r}")
    return _ON_OFF[text]


def config_from_flags(args: argparse.Namespace, **extra: Any) -> GenerationConfig:
    """The GenerationConfig that the parsed flags (and ``extra``) describe."""
    return GenerationConfig(**(generation_options(args) | extra))
