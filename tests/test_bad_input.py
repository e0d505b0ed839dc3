"""Bad input, tried as a new user would: every mistake gets one clear line and exit code 2 from the
CLI (no traceback unless --debug), and a ConfigError / ModelLoadError naming it from the API.

The CLI rows run ``proxyclient.cli.main`` in-process (the same code path as the console script,
without a Python start-up per row); rows that need a real server are integration tests.
"""

from __future__ import annotations

import math

import httpx
import pytest

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.cli import main
from proxyclient.errors import ConfigError, ModelLoadError, ProxyClientError
from proxyclient.result import Generation
from tests.support.constants import API_KEY, BASE_NAME
from tests.support.local_base import LocalBase

NOWHERE = "http://127.0.0.1:9/v1"  # nothing listens: rows that get this far fail to connect


@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory, tiny_models):
    """A folder with the anti-expert's tokenizer and nothing else."""
    folder = tmp_path_factory.mktemp("tokenizer-only")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_models["anti_expert"] / name).read_bytes())
    return folder


def cli(capsys, tiny_models, *extra, base_url=NOWHERE, expert=None, anti=None, prompt="x = 1"):
    """Run `proxyclient generate` with the tiny models and ``extra`` flags; (code, stdout, err)."""
    args = [
        "generate", "--api", "vllm", "--base-url", base_url, "--base-model", BASE_NAME,
        "--expert", str(expert or tiny_models["expert"]),
        "--anti-expert", str(anti or tiny_models["anti_expert"]),
        "--max-retries", "0", "--threads", "1", "--max-new-tokens", "4",
    ]  # fmt: skip
    if prompt is not None and "--resume" not in extra:
        args += ["--prompt", prompt]
    try:
        code = main([*args, *extra])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_clear_line(code, err, needle, lines_at_most=1):
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) <= lines_at_most, err
    assert lines[0].startswith("proxyclient"), err
    assert needle in lines[0], err


# (what a user typed wrong, the flags, what the one line must say)
CLI_ROWS = [
    ("negative k", ["--base-k", "-5"], "--base-k must be a positive integer, or -1"),
    ("k zero", ["--base-k", "0"], "--base-k must be a positive integer"),
    ("k not a number", ["--base-k", "many"], "argument --base-k: invalid int value"),
    ("alpha NaN", ["--alpha", "nan"], "alpha must be a finite number, got nan"),
    ("alpha infinite", ["--alpha", "inf"], "alpha must be a finite number, got inf"),
    ("alpha not a number", ["--alpha", "strong"], "argument --alpha: invalid float value"),
    ("temperature < 0", ["--temperature", "-0.5"], "temperature must be >= 0"),
    ("temperature NaN", ["--temperature", "nan"], "temperature must be >= 0"),
    ("top_p 0", ["--top-p", "0"], "--top-p must be in (0, 1]"),
    ("top_p > 1", ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ("top_p NaN", ["--top-p", "nan"], "--top-p must be in (0, 1]"),
    ("top_k < 0", ["--top-k", "-1"], "--top-k must be >= 0"),
    ("max_new_tokens 0", ["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    ("max_new_tokens text", ["--max-new-tokens", "ten"], "invalid int value: 'ten'"),
    ("seed text", ["--seed", "lucky"], "argument --seed: invalid int value"),
    ("seed < 0", ["--seed", "-1"], "seed must be >= 0"),
    ("empty stop", ["--stop", ""], "stop sequences must be non-empty strings"),
    ("draft tokens 0", ["--draft-tokens", "0"], "--draft-tokens must be an integer >= 1"),
    ("unknown --api", ["--api", "vllm2"], "argument --api: invalid choice: 'vllm2'"),
    ("unknown --unseen", ["--unseen", "guess"], "argument --unseen: invalid choice"),
    ("unknown --speculate", ["--speculate", "maybe"], "argument --speculate: invalid choice"),
    ("timeout 0", ["--timeout", "0"], "timeout must be a number of seconds > 0, got 0.0"),
    ("timeout NaN", ["--timeout", "nan"], "timeout must be a number of seconds > 0, got nan"),
    ("connect timeout < 0", ["--connect-timeout", "-1"], "--connect-timeout must be a number"),
    ("retries < 0", ["--max-retries", "-1"], "--max-retries must be an integer >= 0"),
    ("retry time 0", ["--max-retry-time", "0"], "--max-retry-time must be a number of seconds > 0"),
    ("requests/min 0", ["--requests-per-minute", "0"], "--requests-per-minute must be > 0"),
    ("tokens/min NaN", ["--tokens-per-minute", "nan"], "--tokens-per-minute must be > 0"),
    ("concurrency 0", ["--max-concurrency", "0"], "argument --max-concurrency: must be an integer"),
    ("threads 0", ["--threads", "0"], "threads must be >= 1, got 0"),
    ("unknown device", ["--device", "gpu9"], "device 'gpu9' is not a torch device"),
    ("unknown dtype", ["--dtype", "int3"], "dtype must be auto or one of"),
    ("URL without scheme", ["--base-url", "localhost:8000/v1"], "must start with http://"),
    ("unknown tokenizer dir", ["--base-tokenizer", "/no/such"], "neither tiktoken:ENCODING nor"),
    ("expert twice", ["--expert-lora", "/tmp"], "argument --expert-lora: not allowed with"),
    ("speculate expert, text API", ["--api", "openai", "--speculate", "expert"], "cannot score"),
    ("resume a missing file", ["--resume", "/no/such.json"], "--resume /no/such.json: cannot read"),
    ("resume and prompt", ["--resume", "f.json", "--prompt", "x"], "not allowed with argument"),
    ("unreachable server", [], "could not connect after 1 attempt"),
]


@pytest.mark.parametrize(
    ("flags", "needle"), [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS]
)
def test_cli_bad_flags(capsys, tiny_models, flags, needle):
    code, _, err = cli(capsys, tiny_models, *flags)
    assert_one_clear_line(code, err, needle)


def test_cli_prompt_missing_or_empty(capsys, tiny_models):
    code, _, err = cli(capsys, tiny_models, prompt=None)
    assert_one_clear_line(
        code, err, "one of the arguments --prompt --messages --resume is required"
    )
    code, _, err = cli(capsys, tiny_models, prompt="")
    assert_one_clear_line(code, err, "the prompt is empty")


def test_cli_bad_model_folders(capsys, tiny_models, tokenizer_only):
    code, _, err = cli(capsys, tiny_models, expert="/no/such/expert")
    assert_one_clear_line(code, err, "expert model '/no/such/expert' is not a directory")
    code, _, err = cli(capsys, tiny_models, expert=tokenizer_only)
    assert_one_clear_line(code, err, "has no config.json (a tokenizer alone?)")
    code, _, err = cli(capsys, tiny_models, anti=tokenizer_only)
    assert_one_clear_line(code, err, "anti-expert model")
    code, _, err = cli(capsys, tiny_models, expert=tiny_models["expert_sp"])
    assert_one_clear_line(code, err, "expert and anti-expert have different vocabularies")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "not the --json output of a failed `proxyclient generate` run"),
        ("hello", "not the --json output"),
        ('{"text": "x", "token_ids": [1], "finish_reason": "length"}', "that run finished"),
        ('{"text": "x", "token_ids": [1], "finish_reason": "error"}', "it needs text, token_ids"),
        (
            '{"text": "", "token_ids": [], "finish_reason": "error", "usage": {}, '
            '"resume": {"prompt": "x", "prompt_token_ids": [], "config": {"alpha": "big"}}}',
            "alpha must be a number",
        ),
    ],
)
def test_cli_resume_of_a_file_that_is_no_failed_run(capsys, tiny_models, tmp_path, content, needle):
    path = tmp_path / "run.json"
    path.write_text(content)
    code, _, err = cli(capsys, tiny_models, "--resume", str(path))
    assert_one_clear_line(code, err, needle)


def test_debug_shows_the_traceback(capsys, tiny_models):
    code, _, err = cli(capsys, tiny_models, "--alpha", "nan", "--debug")
    assert code == 2
    assert "Traceback" in err and "alpha must be a finite number" in err


def test_an_unforeseen_failure_is_one_line_too(capsys, tiny_models, monkeypatch):
    import proxyclient.commands

    def broken(args):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(proxyclient.commands, "generate", broken)
    code, _, err = cli(capsys, tiny_models)
    assert code == 1
    assert err.strip().splitlines() == [
        "proxyclient: error: RuntimeError: something nobody expected (--debug shows where)"
    ]


# -- the same mistakes through the Python API ---------------------------------------------------

CONFIG_ROWS = [
    ({"base_k": -5}, "base_k must be a positive integer"),
    ({"base_k": 1.5}, "base_k must be an integer"),
    ({"base_k": "5"}, "base_k must be an integer"),
    ({"alpha": math.nan}, "alpha must be a finite number"),
    ({"alpha": "1"}, "alpha must be a number, got '1'"),
    ({"alpha": None}, "alpha must be a number, got None"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"temperature": "0"}, "temperature must be a number"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.01}, "top_p must be in (0, 1]"),
    ({"top_p": "x"}, "top_p must be a number"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"top_k": "3"}, "top_k must be an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer, got True"),
    ({"max_new_tokens": 2.0}, "max_new_tokens must be a positive integer, got 2.0"),
    ({"draft_tokens": 1.5}, "draft_tokens must be an integer >= 1"),
    ({"seed": "x"}, "seed must be an integer"),
    ({"seed": 2**70}, "seed must be >= 0 and < 2**63"),
    ({"stop": 5}, "stop must be a string or a list of strings"),
    ({"stop": [""]}, "stop sequences must be non-empty strings"),
    ({"stop": [b"\n"]}, "stop sequences must be strings"),
    ({"unseen": "guess"}, "unseen must be one of restrict, floor, residual"),
    ({"speculate": None}, "speculate must be one of off, stream, base, expert, auto"),
    ({"expert_chat_template": "yes"}, "expert_chat_template must be True or False"),
    ({"draft_tokens": 0}, "draft_tokens must be an integer >= 1"),
]


@pytest.mark.parametrize(("options", "needle"), CONFIG_ROWS, ids=[str(r[0]) for r in CONFIG_ROWS])
def test_generation_config_names_the_bad_option(options, needle):
    with pytest.raises(ConfigError) as info:
        GenerationConfig(**options)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)  # what code that catches ValueError expects


CONNECT_ROWS = [
    (("vllm2", NOWHERE, "m"), {}, "unknown api 'vllm2'; available:"),
    (("vllm", "localhost:8000", "m"), {}, "base_url must start with http:// or https://"),
    (("vllm", None, "m"), {}, "the vllm dialect has no public endpoint"),
    (("vllm", NOWHERE, "m"), {"timeout": 0}, "timeout must be a number of seconds > 0"),
    (("vllm", NOWHERE, "m"), {"timeout": None}, "timeout must be a number of seconds > 0"),
    (("vllm", NOWHERE, "m"), {"timeout": httpx.Timeout(None)}, "timeout.connect must be"),
    (("vllm", NOWHERE, "m"), {"connect_timeout": math.inf}, "connect_timeout must be"),
    (("vllm", NOWHERE, "m"), {"max_retries": -1}, "max_retries must be an integer >= 0"),
    (("vllm", NOWHERE, "m"), {"max_retries": 2.5}, "max_retries must be an integer >= 0"),
    (("vllm", NOWHERE, "m"), {"max_retry_time": -3}, "max_retry_time must be a number"),
]


@pytest.mark.parametrize(
    ("args", "options", "needle"), CONNECT_ROWS, ids=[r[2].split(":")[0] for r in CONNECT_ROWS]
)
def test_connect_names_the_bad_argument(args, options, needle):
    with pytest.raises(ConfigError, match=None) as info:
        connect(*args, **options)
    assert needle in str(info.value)


def test_trailing_slash_in_the_base_url_is_fine():
    base = connect("vllm", NOWHERE + "/", "m")
    assert base.transport.base_url == NOWHERE


@pytest.fixture(scope="module")
def local(tiny_models, hf_models):
    base = LocalBase(hf_models["base"])
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        yield t


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda t: t.generate(""), "the prompt is empty"),
        (
            lambda t: t.generate(123),
            "the prompt must be a string, a Chat or a list of chat messages",
        ),
        (lambda t: t.generate(["a", "b"]), "messages[0] must be an object with role and content"),
        (lambda t: t.generate("x", {"max_new_tokens": 3}), "config must be a GenerationConfig"),
        (lambda t: t.generate("x", max_tokens=3), "unknown generation option(s): max_tokens"),
        (lambda t: t.generate("x", top_p=2), "top_p must be in (0, 1]"),
        (lambda t: t.generate_many(["x"], concurrency=0), "concurrency must be an integer >= 1"),
        (lambda t: t.choose("x", []), "choose() needs at least one choice"),
        (lambda t: t.generate("x", resume="x"), "resume takes the Generation"),
        (lambda t: t.generate("x", resume=Generation("", [], "eos")), "has nothing left to do"),
        (lambda t: t.generate("x", speculate="expert"), "speculate='expert'"),
    ],
)
def test_the_tuner_names_the_bad_argument(local, call, needle):
    with pytest.raises(ConfigError) as info:
        call(local)
    assert needle in str(info.value)


def test_bad_model_folders_through_the_api(tiny_models, hf_models, tokenizer_only):
    base = LocalBase(hf_models["base"])
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        ProxyTuner(base, tokenizer_only, tiny_models["anti_expert"])
    with pytest.raises(ModelLoadError, match="different vocabularies"):
        ProxyTuner(base, tiny_models["expert_sp"], tiny_models["anti_expert"])
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], threads=0)
    with pytest.raises(ConfigError, match="not both or neither"):
        ProxyTuner(base, None, tiny_models["anti_expert"])


# -- mistakes that only a server can reveal ----------------------------------------------------


@pytest.mark.integration
def test_a_base_url_without_v1_says_where_the_api_is(capsys, servers, tiny_models):
    root = servers["full"].root_url
    code, _, err = cli(capsys, tiny_models, base_url=root)
    assert_one_clear_line(code, err, f"the API is under /v1 there: pass --base-url {root}/v1")


@pytest.mark.integration
def test_a_trailing_slash_works(capsys, servers, tiny_models):
    code, out, err = cli(capsys, tiny_models, base_url=servers["full"].base_url + "/")
    assert code == 0, err
    assert out.strip()


@pytest.mark.integration
def test_a_prompt_longer_than_the_context(capsys, servers, tiny_models):
    code, _, err = cli(
        capsys,
        tiny_models,
        "--base-api-key",
        API_KEY,
        base_url=servers["capped"].base_url,
        prompt="x = 1\n" * 400,
    )
    # The server's words, then on a line of their own what to do about them.
    assert_one_clear_line(code, err, "maximum context length is 256", lines_at_most=2)
    assert "shorten the prompt or lower max_new_tokens" in err
    assert API_KEY not in err


@pytest.mark.integration
def test_a_wrong_model_name_lists_the_served_ones(capsys, servers, tiny_models):
    code, _, err = cli(
        capsys, tiny_models, "--base-model", "nope", base_url=servers["full"].base_url
    )
    assert_one_clear_line(code, err, "the server serves ['tiny-base']")


def test_one_except_catches_every_error_the_package_raises():
    """Every exception class of proxyclient.errors (what the API and the adapters raise) is a
    ProxyClientError, so one ``except ProxyClientError`` catches them all; a new class that forgot
    the base would escape it. ConfigError stays a ValueError for callers that catch that."""
    import inspect

    from proxyclient import errors

    defined = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == errors.__name__
    ]
    assert len(defined) > 10, defined  # the module's own classes, not an empty scan
    assert [c.__name__ for c in defined if not issubclass(c, ProxyClientError)] == []
    assert issubclass(ConfigError, ValueError)


def test_inspect_of_a_text_dialect_without_a_tokenizer_says_what_to_pass(capsys):
    code = main(["inspect", "--api", "openai", "--base-url", NOWHERE, "--base-model", "my-model"])
    err = capsys.readouterr().err
    assert_one_clear_line(code, err, "names tokens by text, so probing it needs the base's")
    assert "--base-tokenizer" in err  # the CLI's name for tokenizer=


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"proxyclient {version('proxyclient')}"
