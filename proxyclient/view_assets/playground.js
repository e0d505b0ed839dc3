/* The server's playground: streams the steered answer (and, on request, the base alone at
 * alpha 0) from this server's own API, then draws the per-token view (view.js). The API key, where
 * the server needs one, lives in this tab's sessionStorage only. */
"use strict";
(function () {
  var settings = JSON.parse(document.getElementById("pg-settings").textContent);
  var KEY_SLOT = "proxyclient-playground-key";
  function $(id) { return document.getElementById(id); }
  var running = [];

  $("pg-alpha").value = settings.alpha;
  if (settings.base_k !== null) $("pg-k").value = settings.base_k;
  $("pg-unseen").value = settings.unseen;
  $("pg-temperature").value = settings.temperature;
  $("pg-max-tokens").value = settings.max_tokens;
  try {
    $("pg-key").value = window.sessionStorage.getItem(KEY_SLOT) || "";
  } catch (e) { /* storage off: the key lives in the field only */ }
  $("pg-key").addEventListener("input", function () {
    try { window.sessionStorage.setItem(KEY_SLOT, $("pg-key").value); } catch (e) { /* off */ }
  });

  function mode() {
    return document.querySelector("input[name=mode]:checked").value;
  }
  document.querySelectorAll("input[name=mode]").forEach(function (radio) {
    radio.addEventListener("change", function () {
      var chat = mode() === "chat";
      $("pg-prompt-label").textContent = chat ? "Messages" : "Prompt";
      $("pg-chat-hint").hidden = !chat;
    });
  });

  function status(text, error, state) {
    $("pg-status").textContent = text;
    $("pg-status").className = error ? "pg-error" : "";
    $("pg-status").setAttribute("data-state", state || (error ? "error" : "running"));
  }

  function numberOf(id, what) {
    var raw = $(id).value.trim();
    if (raw === "") return null;
    var value = Number(raw);
    if (!Number.isFinite(value)) throw new Error(what + " must be a number");
    return value;
  }

  function messages(text) {
    var trimmed = text.trim();
    if (trimmed.charAt(0) === "[") {
      var parsed;
      try { parsed = JSON.parse(trimmed); } catch (e) {
        throw new Error("messages: not a JSON array (" + e.message + ")");
      }
      return parsed;
    }
    return [{ role: "user", content: text }];
  }

  function body(alpha) {
    var chat = mode() === "chat";
    var text = $("pg-prompt").value;
    var request = {
      model: settings.model,
      stream: true,
      stream_options: { include_usage: true },
      alpha: alpha,
      unseen: $("pg-unseen").value
    };
    var k = numberOf("pg-k", "k");
    if (k !== null) request.base_k = k;
    var temperature = numberOf("pg-temperature", "temperature");
    if (temperature !== null) request.temperature = temperature;
    var maxTokens = numberOf("pg-max-tokens", "max tokens");
    if (maxTokens !== null) request.max_tokens = maxTokens;
    if (chat) {
      request.messages = messages(text);
      request.logprobs = true;
      request.top_logprobs = settings.top_logprobs;
    } else {
      request.prompt = text;
      request.logprobs = settings.top_logprobs;
    }
    return request;
  }

  async function failure(response) {
    var message = "HTTP " + response.status;
    try {
      var error = (await response.json()).error;
      if (error && error.message) message += ": " + error.message;
    } catch (e) { /* not JSON */ }
    if (response.status === 401) {
      document.querySelector(".pg-key").hidden = false;
      $("pg-key").focus();
    }
    return new Error(message);
  }

  // POST ``request`` as a stream, appending its text to ``target``; resolves to the answer's
  // text, logprobs and usage.
  async function streamed(request, target, signal) {
    var chat = Array.isArray(request.messages);
    var headers = { "Content-Type": "application/json" };
    var key = $("pg-key").value;
    if (key) headers.Authorization = "Bearer " + key;
    var response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: headers, body: JSON.stringify(request), signal: signal
    });
    if (!response.ok) throw await failure(response);
    var answer = { chat: chat, text: "", usage: null,
      logprobs: chat ? [] : ProxyView.emptyCompletionLogprobs() };
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    var done = false;
    function event(block) {
      var data = block.split(/\r?\n/).filter(function (line) {
        return line.indexOf("data:") === 0;
      }).map(function (line) { return line.slice(5).replace(/^ /, ""); }).join("\n");
      if (!data) return;
      if (data === "[DONE]") { done = true; return; }
      var chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server failed mid-stream");
      if (chunk.usage) answer.usage = chunk.usage;
      (chunk.choices || []).forEach(function (choice) {
        var piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        answer.text += piece;
        target.textContent += piece;
        if (choice.logprobs) {
          if (chat) answer.logprobs = answer.logprobs.concat(choice.logprobs.content || []);
          else ProxyView.appendCompletionLogprobs(answer.logprobs, choice.logprobs);
        }
      });
    }
    while (!done) {
      var read = await reader.read();
      if (read.done) break;
      buffer += decoder.decode(read.value, { stream: true });
      var blocks = buffer.split(/\r?\n\r?\n/);
      buffer = blocks.pop();
      blocks.forEach(event);
    }
    if (buffer.trim()) event(buffer);
    return answer;
  }

  function stop() {
    running.forEach(function (controller) { controller.abort(); });
    running = [];
  }

  async function generate() {
    stop();
    var compare = $("pg-compare").checked;
    var requests;
    try {
      var alpha = numberOf("pg-alpha", "alpha");
      requests = [body(alpha === null ? settings.alpha : alpha)];
      if (compare) requests.push(body(0));
    } catch (e) {
      status(e.message, true, "error");
      return;
    }
    $("pg-steered-text").textContent = "";
    $("pg-base-text").textContent = "";
    $("pg-view").textContent = "";
    $("pg-base").hidden = !compare;
    $("pg-results").classList.toggle("pg-two", compare);
    $("pg-steered-label").textContent = "(alpha " + requests[0].alpha + ")";
    $("pg-generate").disabled = true;
    $("pg-stop").disabled = false;
    status("generating\u2026");
    var targets = [$("pg-steered-text"), $("pg-base-text")];
    var calls = requests.map(function (request, i) {
      var controller = new AbortController();
      running.push(controller);
      return streamed(request, targets[i], controller.signal);
    });
    try {
      var answers = await Promise.all(calls);
      var steered = answers[0];
      var extra = { settings: { alpha: requests[0].alpha,
        k: requests[0].base_k === undefined ? "server default" : requests[0].base_k,
        unseen: requests[0].unseen } };
      var data = steered.chat ? ProxyView.fromChat(steered.logprobs, steered.usage, extra)
        : ProxyView.fromCompletion(steered.logprobs, steered.usage, extra);
      ProxyView.render($("pg-view"), data);
      var line = "done: " + ProxyView.summaryLine(data);
      if (compare) {
        line += answers[1].text === steered.text ? "; the base alone says the same"
          : "; the base alone says something else";
      }
      status(line, false, "done");
    } catch (e) {
      stop();
      var aborted = e.name === "AbortError";
      status(aborted ? "stopped" : e.message, !aborted, aborted ? "stopped" : "error");
    } finally {
      running = [];
      $("pg-generate").disabled = false;
      $("pg-stop").disabled = true;
    }
  }

  $("pg-form").addEventListener("submit", function (e) {
    e.preventDefault();
    generate();
  });
  $("pg-stop").addEventListener("click", stop);
})();
