/* proxyclient's per-token view: ProxyView.render(element, data) draws the tokens of ``data``
 * (proxyclient/view.py's view_data, or ProxyView.fromCompletion / fromChat of the server's
 * logprobs fields) shaded by tuned minus base log-prob, with each token's numbers on hover or
 * focus. Used by `proxyclient generate --html`, `proxyclient view` and the server's playground. */
"use strict";
(function (global) {
  var NEG_INF = -1e3; // log-probs at or below this stand for -inf (the server's sentinel)
  var HALF = Math.log(0.5);
  var SCALE = 3; // |tuned - base| in nats at which the shade is strongest

  function num(value) {
    return value === undefined || value === null || Number.isNaN(value) ? null : Number(value);
  }

  function changed(token) {
    var top = token.base_top;
    if (top) {
      if (top.token_id !== undefined && top.token_id !== null &&
          token.token_id !== undefined && token.token_id !== null) {
        return top.token_id !== token.token_id;
      }
      return top.text !== token.text;
    }
    if (token.base === null || token.base <= NEG_INF) return true;
    if (token.base > HALF) return false;
    return null;
  }

  function shift(token) {
    if (token.logprob === null || token.base === null || token.base <= NEG_INF) return null;
    return token.logprob - token.base;
  }

  function summary(data) {
    var known = 0, count = 0, unknown = 0;
    data.tokens.forEach(function (token) {
      var flag = changed(token);
      if (flag === null) unknown += 1; else { known += 1; if (flag) count += 1; }
    });
    var usage = data.usage || null;
    return {
      tokens: data.tokens.length,
      changed: count,
      unknown: unknown,
      share_changed: known ? count / known : null,
      requests: usage ? usage.requests : null,
      billed_tokens: usage ? usage.billed_tokens : null
    };
  }

  // The same line as view.py's summary_line.
  function summaryLine(data) {
    var s = summary(data);
    var parts = [s.tokens + " tokens"];
    if (s.share_changed === null) parts.push("changed: unknown");
    else parts.push(s.changed + " changed (" + Math.floor(100 * s.share_changed + 0.5) + "%)");
    if (s.unknown) parts.push(s.unknown + " undetermined (no base top-1 in the trace)");
    if (s.requests !== null && s.requests !== undefined) {
      parts.push(s.requests + " requests");
      parts.push(s.billed_tokens + " billed tokens");
    }
    return parts.join(" \u00b7 ");
  }

  function serverUsage(usage) {
    // The server's usage.base: what the base was asked for (billed: prompt + completion).
    if (!usage || !usage.base) return null;
    var base = usage.base;
    return {
      requests: base.requests,
      prompt_tokens: base.prompt_tokens,
      base_completion_tokens: base.completion_tokens,
      billed_tokens: base.prompt_tokens + base.completion_tokens
    };
  }

  function emptyCompletionLogprobs() {
    return { tokens: [], token_logprobs: [], top_logprobs: [], base_token_logprobs: [],
      expert_token_logprobs: [], anti_expert_token_logprobs: [] };
  }

  // Streamed chunks each carry their tokens' entries: append ``block``'s lists to ``into``.
  function appendCompletionLogprobs(into, block) {
    if (!block) return into;
    Object.keys(block).forEach(function (key) {
      if (Array.isArray(block[key])) into[key] = (into[key] || []).concat(block[key]);
    });
    return into;
  }

  function fromCompletion(logprobs, usage, extra) {
    var tokens = (logprobs.tokens || []).map(function (text, i) {
      var top = (logprobs.top_logprobs || [])[i] || {};
      var baseTop = logprobs.base_top_tokens && logprobs.base_top_tokens[i] !== undefined &&
        logprobs.base_top_tokens[i] !== null
        ? { text: logprobs.base_top_tokens[i],
            logprob: num((logprobs.base_top_logprobs || [])[i]) }
        : null;
      return {
        text: text,
        token_id: null,
        logprob: num(logprobs.token_logprobs[i]),
        base: num((logprobs.base_token_logprobs || [])[i]),
        expert: num((logprobs.expert_token_logprobs || [])[i]),
        anti: num((logprobs.anti_expert_token_logprobs || [])[i]),
        top: Object.keys(top).map(function (k) { return [k, num(top[k])]; })
          .sort(function (a, b) { return b[1] - a[1]; }),
        base_top: baseTop
      };
    });
    return withSummary(tokens, usage, extra);
  }

  function fromChat(content, usage, extra) {
    var tokens = (content || []).map(function (entry) {
      return {
        text: entry.token,
        token_id: null,
        logprob: num(entry.logprob),
        base: num(entry.base_logprob),
        expert: num(entry.expert_logprob),
        anti: num(entry.anti_expert_logprob),
        top: (entry.top_logprobs || []).map(function (a) { return [a.token, num(a.logprob)]; }),
        base_top: entry.base_top ? { text: entry.base_top.token,
          logprob: num(entry.base_top.logprob) } : null
      };
    });
    return withSummary(tokens, usage, extra);
  }

  function withSummary(tokens, usage, extra) {
    var data = { title: "", prompt: null, settings: {}, tokens: tokens, usage: serverUsage(usage) };
    Object.keys(extra || {}).forEach(function (k) { data[k] = extra[k]; });
    data.summary = summary(data);
    return data;
  }

  function fmt(lp) {
    if (lp === null || lp === undefined) return "\u2014";
    if (lp <= NEG_INF) return "\u2212\u221e (0%)";
    var p = Math.exp(lp) * 100;
    var pct = p >= 10 ? p.toFixed(1) : p >= 0.1 ? p.toFixed(2) : p.toExponential(1);
    return lp.toFixed(3) + " (" + pct + "%)";
  }

  function signed(x) {
    return (x >= 0 ? "+" : "\u2212") + Math.abs(x).toFixed(3);
  }

  function shade(token) {
    var s = shift(token);
    if (s === null) return "rgba(var(--pv-up), 0.6)";
    var m = Math.min(1, Math.abs(s) / SCALE) * 0.6;
    return "rgba(var(" + (s >= 0 ? "--pv-up" : "--pv-down") + "), " + m.toFixed(3) + ")";
  }

  function visible(text) {
    // Whitespace a reader can see in the details panel.
    return JSON.stringify(text).slice(1, -1).replace(/ /g, "\u2423");
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "className") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c) node.appendChild(c); });
    return node;
  }

  function details(panel, data, i) {
    var t = data.tokens[i];
    var flag = changed(t);
    var s = shift(t);
    panel.textContent = "";
    panel.appendChild(el("h2", { text: "Token " + (i + 1) + " of " + data.tokens.length +
      ": \u201c" + visible(t.text) + "\u201d" }));
    var rows = [
      ["tuned", fmt(t.logprob)],
      ["base", t.base === null || t.base <= NEG_INF ? "outside the base's top-k" : fmt(t.base)],
      ["expert", fmt(t.expert)],
      ["anti-expert", fmt(t.anti)],
      ["tuned \u2212 base", s === null ? "\u2014 (base: not in its top-k)" : signed(s)],
      ["expert \u2212 anti", t.expert !== null && t.anti !== null ? signed(t.expert - t.anti)
        : "\u2014"],
      ["base's top-1", flag === true ? "another token: steering changed this one"
        : flag === false ? "this token" : "not known from this trace"]
    ];
    if (t.base_top) {
      rows.push(["base's choice", "\u201c" + visible(t.base_top.text) + "\u201d " +
        fmt(t.base_top.logprob)]);
    }
    var names = ["tuned", "base", "expert", "anti", "shift", "proxy", "changed", "base-top"];
    var dl = el("dl");
    rows.forEach(function (row, j) {
      dl.appendChild(el("dt", { text: row[0] }));
      dl.appendChild(el("dd", { text: row[1], "data-field": names[j] }));
    });
    panel.appendChild(dl);
    if (t.top.length) {
      var body = el("tbody");
      t.top.forEach(function (alt) {
        var tr = el("tr", { className: alt[0] === t.text ? "pv-chosen" : "" }, [
          el("td", {}, [el("code", { text: visible(alt[0]) })]),
          el("td", { text: fmt(alt[1]) })
        ]);
        body.appendChild(tr);
      });
      panel.appendChild(el("table", { "aria-label": "best alternatives, tuned log-probs" }, [
        el("caption", { text: "Best alternatives (tuned)" }),
        el("thead", {}, [el("tr", {}, [el("th", { text: "token" }), el("th", { text: "log-prob" })])]),
        body
      ]));
    }
  }

  function render(root, data) {
    root.textContent = "";
    data.summary = summary(data);
    root.appendChild(el("p", { className: "pv-summary", "data-role": "summary",
      text: summaryLine(data) }));
    var settings = data.settings || {};
    var shown = Object.keys(settings).filter(function (k) {
      return settings[k] !== null && settings[k] !== undefined;
    });
    if (shown.length) {
      root.appendChild(el("p", { className: "pv-settings", text: shown.map(function (k) {
        return k + " " + settings[k];
      }).join(", ") }));
    }
    root.appendChild(el("p", { className: "pv-legend" }, [
      document.createTextNode("Shade: tuned minus base log-prob of each token: "),
      el("span", { style: "background: rgba(var(--pv-up), 0.6)", text: "raised" }),
      document.createTextNode(" "),
      el("span", { style: "background: rgba(var(--pv-down), 0.6)", text: "lowered" }),
      document.createTextNode(" (strongest at \u00b1" + SCALE + " or outside the base's top-k); "),
      el("span", { className: "pv-mark", text: "underlined\u2022" }),
      document.createTextNode(": not the base's own top-1.")
    ]));
    root.appendChild(el("p", { className: "pv-hint",
      text: "Hover a token, or Tab to the text and move with the arrow keys, Home and End." }));
    var text = el("div", { className: "pv-text", role: "group",
      "aria-label": "steered text, one focusable token at a time" });
    var panel = el("aside", { className: "pv-details", "aria-live": "polite",
      "data-role": "details" });
    panel.appendChild(el("p", { text: "Hover or focus a token to see its numbers." }));
    var spans = data.tokens.map(function (t, i) {
      var flag = changed(t);
      var s = shift(t);
      var span = el("span", {
        className: "pv-tok" + (flag === true ? " pv-changed" : ""),
        tabindex: i === 0 ? "0" : "-1",
        "data-i": String(i),
        "data-shift": s === null ? "outside" : s.toFixed(4),
        "data-changed": flag === null ? "unknown" : String(flag),
        "aria-label": visible(t.text) + (flag === true ? ", changed by steering" : "")
      });
      span.style.background = shade(t);
      var parts = t.text.split("\n");
      parts.forEach(function (part, j) {
        if (j > 0) {
          span.appendChild(el("span", { className: "pv-nl", "aria-hidden": "true",
            text: "\u21b5" }));
          span.appendChild(document.createTextNode("\n"));
        }
        if (part) span.appendChild(document.createTextNode(part));
      });
      if (!t.text) span.appendChild(el("span", { className: "pv-nl", text: "\u2205" }));
      text.appendChild(span);
      return span;
    });
    var current = 0;
    function show(i, focus) {
      if (i < 0 || i >= spans.length) return;
      spans[current].classList.remove("pv-current");
      spans[current].setAttribute("tabindex", "-1");
      current = i;
      spans[i].setAttribute("tabindex", "0");
      spans[i].classList.add("pv-current");
      details(panel, data, i);
      if (focus) spans[i].focus();
    }
    // Hovering shows a token's numbers; only focus moves the text's one tab stop.
    text.addEventListener("mouseover", function (e) {
      var i = e.target.closest && e.target.closest(".pv-tok");
      if (i) details(panel, data, Number(i.getAttribute("data-i")));
    });
    text.addEventListener("focusin", function (e) {
      var i = e.target.closest && e.target.closest(".pv-tok");
      if (i) show(Number(i.getAttribute("data-i")), false);
    });
    text.addEventListener("keydown", function (e) {
      var moves = { ArrowRight: current + 1, ArrowDown: current + 1, ArrowLeft: current - 1,
        ArrowUp: current - 1, Home: 0, End: spans.length - 1 };
      if (e.key in moves) {
        e.preventDefault();
        show(Math.max(0, Math.min(spans.length - 1, moves[e.key])), true);
      }
    });
    root.appendChild(el("div", { className: "pv-layout" }, [text, panel]));
    return { show: show };
  }

  global.ProxyView = {
    render: render,
    summary: summary,
    summaryLine: summaryLine,
    changed: changed,
    shift: shift,
    fromCompletion: fromCompletion,
    fromChat: fromChat,
    emptyCompletionLogprobs: emptyCompletionLogprobs,
    appendCompletionLogprobs: appendCompletionLogprobs
  };
})(window);
