"""The per-token view: what the steering did to each token, as one self-contained HTML page.

Data in, HTML string out: no network, no files written (the CLI's ``generate --html`` and
``view`` write what ``render`` returns; the server's playground renders the same view in the
browser from its logprobs fields). The page's CSS and JavaScript are package assets
(``proxyclient/view_assets``), shared with the playground, so both draw tokens the same way.

Per token the view shows the proxy-tuned log-prob (``TokenTrace.logprob``), the base's,
the expert's and the anti-expert's, the best alternatives, and a shade: the tuned minus the base
log-prob of the chosen token (how far steering moved it; a token outside the base's top-k gets the
strongest shade). A token is *changed* where the tuned choice is not the base's own top-1 choice
after the same prefix. A trace says so for sure where it records the base's top-1
(``base_top``) or where the token is outside the base's top-k; otherwise only a base probability
above 1/2 proves the token was the base's top-1, and the rest is counted as unknown.
"""

from __future__ import annotations

import functools
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from importlib import resources
from typing import Any

# Log-probs at or below this are JSON's stand-in for -inf (the server's SENTINEL_LOGPROB).
NEG_INF = -1e3
_HALF = math.log(0.5)


def token_record(step: Any) -> dict[str, Any]:
    """One token of the view from a ``TokenTrace`` (or its ``asdict``, a ``--trace`` line)."""
    data = _as_mapping(step)
    base_top = data.get("base_top")
    if base_top is not None:
        top = _as_mapping(base_top)
        base_top = {
            "text": top.get("text", ""),
            "token_id": top.get("token_id"),
            "logprob": _number(top.get("logprob")),
        }
    return {
        "text": data.get("text", ""),
        "token_id": data.get("token_id"),
        "logprob": _number(data.get("logprob")),
        "base": _number(data.get("base_logprob")),
        "expert": _number(data.get("expert_logprob")),
        "anti": _number(data.get("anti_logprob")),
        "top": [
            [_as_mapping(a).get("text", ""), _number(_as_mapping(a).get("logprob"))]
            for a in data.get("top") or []
        ],
        "base_top": base_top,
    }


def changed(token: Mapping[str, Any]) -> bool | None:
    """Whether the tuned choice is not the base's own top-1 (None: the record cannot tell)."""
    base_top = token.get("base_top")
    if base_top is not None:
        if base_top.get("token_id") is not None and token.get("token_id") is not None:
            return base_top["token_id"] != token["token_id"]
        return base_top.get("text") != token.get("text")
    base = token.get("base")
    if base is None or base <= NEG_INF:
        return True  # outside the base's top-k: certainly not its top-1
    if base > _HALF:
        return False  # more than half the base's mass: nothing else can rank above it
    return None


def shift(token: Mapping[str, Any]) -> float | None:
    """Tuned minus base log-prob of the chosen token (None: the base did not return it)."""
    tuned, base = token.get("logprob"), token.get("base")
    if tuned is None or base is None or base <= NEG_INF:
        return None
    return tuned - base


def view_data(
    steps: Iterable[Any],
    *,
    usage: Any = None,
    title: str = "proxyclient: what the steering did",
    prompt: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the page draws: ``steps`` (TokenTraces or their dicts), ``usage`` (a ``Usage`` or its
    dict: requests and billed tokens), the ``prompt`` and the ``settings`` (alpha, k, policy)."""
    tokens = [token_record(step) for step in steps]
    data: dict[str, Any] = {
        "title": title,
        "prompt": prompt,
        "settings": dict(settings or {}),
        "tokens": tokens,
        "usage": _usage(usage),
    }
    data["summary"] = summary(data)
    return data


def from_generation(
    generation: Any,
    *,
    prompt: str | None = None,
    settings: Mapping[str, Any] | None = None,
    title: str = "proxyclient: what the steering did",
) -> dict[str, Any]:
    """``view_data`` of a traced ``Generation`` (or its ``to_dict``)."""
    data = _as_mapping(generation)
    return view_data(
        data.get("steps") or [],
        usage=data.get("usage"),
        title=title,
        prompt=prompt,
        settings={**(settings or {}), "unseen": data.get("unseen_policy")},
    )


def summary(data: Mapping[str, Any]) -> dict[str, Any]:
    """Tokens, changed ones (and those the trace cannot tell), requests and billed tokens."""
    flags = [changed(token) for token in data["tokens"]]
    known = [flag for flag in flags if flag is not None]
    usage = data.get("usage")
    return {
        "tokens": len(flags),
        "changed": sum(known),
        "unknown": len(flags) - len(known),
        "share_changed": sum(known) / len(known) if known else None,
        "requests": usage["requests"] if usage else None,
        "billed_tokens": usage["billed_tokens"] if usage else None,
    }


def summary_line(data: Mapping[str, Any]) -> str:
    """The summary as one line of text (the page shows the same line: view.js ``summaryLine``)."""
    s = summary(data)
    parts = [f"{s['tokens']} tokens"]
    if s["share_changed"] is None:
        parts.append("changed: unknown")
    else:
        # floor(x + 0.5), as view.js rounds: the two summaries agree at exact halves too
        percent = math.floor(100 * s["share_changed"] + 0.5)
        parts.append(f"{s['changed']} changed ({percent}%)")
    if s["unknown"]:
        parts.append(f"{s['unknown']} undetermined (no base top-1 in the trace)")
    if s["requests"] is not None:
        parts.append(f"{s['requests']} requests")
        parts.append(f"{s['billed_tokens']} billed tokens")
    return " · ".join(parts)


def render(data: Mapping[str, Any]) -> str:
    """The whole page for ``data`` (``view_data``): inline CSS and JS, nothing fetched."""
    text = "".join(token["text"] for token in data["tokens"])
    prompt = data.get("prompt")
    prompt_block = (
        f'<details class="pv-prompt"><summary>Prompt</summary><pre>{html.escape(prompt)}</pre>'
        "</details>"
        if prompt
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(data["title"])}</title>
<style>{stylesheet()}</style>
</head>
<body>
<main class="pv-page">
<h1>{html.escape(data["title"])}</h1>
{prompt_block}
<div id="proxyview" class="pv-root" data-summary="{html.escape(summary_line(data))}">
<noscript><p class="pv-summary">{html.escape(summary_line(data))}</p>
<pre class="pv-plain">{html.escape(text)}</pre></noscript>
</div>
</main>
<script type="application/json" id="proxyview-data">{script_json(data)}</script>
<script>{script()}</script>
<script>ProxyView.render(document.getElementById("proxyview"),
  JSON.parse(document.getElementById("proxyview-data").textContent));</script>
</body>
</html>
"""


def script_json(data: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>`` or ``<!--`` can appear)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@functools.cache
def stylesheet() -> str:
    """The view's CSS (shared with the playground)."""
    return _asset("view.css")


@functools.cache
def script() -> str:
    """The view's JavaScript: ``ProxyView.render(element, data)`` and the converters from the
    server's logprobs fields (shared with the playground)."""
    return _asset("view.js")


def _asset(name: str) -> str:
    return resources.files("proxyclient").joinpath("view_assets", name).read_text("utf-8")


def _usage(usage: Any) -> dict[str, Any] | None:
    if usage is None:
        return None
    data = _as_mapping(usage)
    prompt = int(data.get("prompt_tokens") or 0)
    completion = int(data.get("base_completion_tokens") or 0)
    return {
        "requests": int(data.get("requests") or 0),
        "prompt_tokens": prompt,
        "base_completion_tokens": completion,
        "billed_tokens": prompt + completion,
    }


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    if math.isnan(number):
        return None
    return number if math.isfinite(number) else max(NEG_INF, min(-NEG_INF, number))


def _as_mapping(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return vars(value)


__all__: Sequence[str] = (
    "changed",
    "from_generation",
    "render",
    "script",
    "script_json",
    "shift",
    "stylesheet",
    "summary",
    "summary_line",
    "token_record",
    "view_data",
)
