"""``GET /``: the playground, one page that calls this server's own ``/v1/completions`` or
``/v1/chat/completions``: a prompt or messages, alpha, k, the unseen policy, temperature and max
tokens; the steered answer streamed, the base alone (alpha 0) beside it on request, then the
per-token view (proxyclient/view.py's CSS and JS, drawn in the browser from the logprobs fields).

The page holds no secret: where the server has an API key the page asks for it and keeps it in
the tab's ``sessionStorage`` (gone with the tab), sending it as the API's Bearer header.
"""

from __future__ import annotations

import functools
import html
from importlib import resources

from proxyclient import view
from proxyclient.config import GenerationConfig
from proxyclient.server.protocol import MAX_COMPLETION_LOGPROBS


def page(*, model: str, needs_key: bool, defaults: GenerationConfig) -> str:
    """The playground for ``model``; ``defaults`` fill the form (the server's own defaults)."""
    settings = {
        "model": model,
        "needs_key": needs_key,
        "alpha": defaults.alpha,
        "base_k": defaults.base_k,
        "temperature": defaults.temperature,
        "max_tokens": defaults.max_new_tokens,
        "unseen": defaults.unseen.value,
        "top_logprobs": MAX_COMPLETION_LOGPROBS,  # alternatives per token, both endpoints
    }
    return _TEMPLATE.format(
        title=html.escape(f"proxyclient playground: {model}"),
        model=html.escape(model),
        css=view.stylesheet() + _asset("playground.css"),
        settings=view.script_json(settings),
        view_js=view.script(),
        playground_js=_asset("playground.js"),
        key_hidden="" if needs_key else " hidden",
    )


@functools.cache
def _asset(name: str) -> str:
    return resources.files("proxyclient").joinpath("view_assets", name).read_text("utf-8")


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main class="pv-page">
<h1>proxyclient playground <small>{model}</small></h1>
<form id="pg-form" class="pg-form">
  <fieldset class="pg-mode">
    <legend>Request</legend>
    <label><input type="radio" name="mode" value="completion" checked> completion (prompt)</label>
    <label><input type="radio" name="mode" value="chat"> chat (messages)</label>
  </fieldset>
  <label for="pg-prompt" id="pg-prompt-label">Prompt</label>
  <textarea id="pg-prompt" rows="5" spellcheck="false"></textarea>
  <p class="pv-hint" id="pg-chat-hint" hidden>Chat: plain text is one user message; or a JSON
    array of {{"role": ..., "content": ...}} messages.</p>
  <div class="pg-numbers">
    <label>alpha <input id="pg-alpha" type="number" step="0.05" min="0"></label>
    <label>k <input id="pg-k" type="number" step="1" min="-1" placeholder="server default"></label>
    <label>unseen <select id="pg-unseen">
      <option value="residual">residual</option><option value="floor">floor</option>
      <option value="restrict">restrict</option></select></label>
    <label>temperature <input id="pg-temperature" type="number" step="0.1" min="0"></label>
    <label>max tokens <input id="pg-max-tokens" type="number" step="1" min="1"></label>
  </div>
  <label class="pg-check"><input id="pg-compare" type="checkbox"> the base alone (alpha 0)
    beside it</label>
  <div class="pg-key"{key_hidden}>
    <label for="pg-key">API key <span class="pv-hint">(this server asks for one; kept in this
      tab only)</span></label>
    <input id="pg-key" type="password" autocomplete="off" spellcheck="false">
  </div>
  <div class="pg-actions">
    <button id="pg-generate" type="submit">Generate</button>
    <button id="pg-stop" type="button" disabled>Stop</button>
    <span id="pg-status" role="status" aria-live="polite"></span>
  </div>
</form>
<section class="pg-results" id="pg-results" aria-label="answers">
  <article class="pg-answer" id="pg-steered">
    <h2>Steered <span class="pg-alpha-label" id="pg-steered-label"></span></h2>
    <pre class="pg-text" id="pg-steered-text" aria-live="polite"></pre>
  </article>
  <article class="pg-answer" id="pg-base" hidden>
    <h2>Base alone <span class="pg-alpha-label">(alpha 0)</span></h2>
    <pre class="pg-text" id="pg-base-text" aria-live="polite"></pre>
  </article>
</section>
<section id="pg-view" class="pv-root" aria-label="per-token view of the steered answer"></section>
</main>
<script type="application/json" id="pg-settings">{settings}</script>
<script>{view_js}</script>
<script>{playground_js}</script>
</body>
</html>
"""
