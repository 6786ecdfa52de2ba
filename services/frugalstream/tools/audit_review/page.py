"""The review page: static HTML, CSS and JS served by the app (no build step).

Answers are untrusted text: the page never builds HTML from data. The script fetches each audit as JSON and
sets it with `textContent`; the app's Content-Security-Policy allows only its own script and style, so even a
mistake here could not run an inline script or load anything from elsewhere.

The per-run token is never in the HTML: the script reads it from the page's own URL (`?token=`, which the app
checks before serving the page), so the page, like the API, gives nothing to a client without it.
"""

from __future__ import annotations

import html

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d1d1f; }
header { display: flex; gap: 1.5rem; align-items: baseline; }
#progress { font-weight: 600; }
#meta { color: #555; margin: .5rem 0; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
pre { white-space: pre-wrap; word-wrap: break-word; background: #f5f5f7; padding: .75rem; border-radius: 6px;
      max-height: 60vh; overflow: auto; margin: 0; }
h2 { font-size: 1rem; margin: 1rem 0 .4rem; }
.keys { margin-top: 1rem; display: flex; gap: .75rem; }
button { font-size: 1rem; padding: .4rem 1rem; }
#status { color: #b00020; margin-top: .75rem; min-height: 1.2em; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .3rem; }
"""

JS = """
"use strict";
const token = new URLSearchParams(window.location.search).get("token") || "";
const KEYS = {a: "accept", r: "reject", s: "skip"};
let current = null;
let busy = false;

function put(id, value) { document.getElementById(id).textContent = value == null ? "" : String(value); }

function render(state) {
  const p = state.progress;
  put("progress", p.reviewed + " reviewed of " + p.total + (p.skipped ? ", " + p.skipped + " skipped" : ""));
  current = state.item;
  document.getElementById("card").hidden = !current;
  document.getElementById("done").hidden = !!current;
  if (!current) return;
  put("meta", current.kind + " \\u00b7 " + (current.task_type || "no task type") + " \\u00b7 tier "
      + (current.tier || "?") + " \\u00b7 " + current.audit_id);
  put("question", current.question);
  put("served", current.served);
  put("served-model", current.served_model || "");
  put("baseline", current.baseline);
  put("baseline-model", current.baseline_model || "");
}

async function call(method, path, body) {
  const response = await fetch(path, {method: method, headers: {"X-Review-Token": token,
    "Content-Type": "application/json"}, body: body ? JSON.stringify(body) : undefined});
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

async function decide(verdict) {
  if (busy || !current) return;
  busy = true;
  document.body.dataset.busy = "1";
  try {
    render(await call("POST", "api/verdict", {audit_id: current.audit_id, verdict: verdict,
                                              answers_sha256: current.answers_sha256}));
    put("status", "");
  } catch (err) {
    put("status", "not saved: " + err.message);
  } finally {
    busy = false;
    delete document.body.dataset.busy;
  }
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const verdict = KEYS[event.key.toLowerCase()];
  if (verdict) { event.preventDefault(); decide(verdict); }
});
for (const button of document.querySelectorAll("button[data-verdict]")) {
  button.addEventListener("click", () => decide(button.dataset.verdict));
}
call("GET", "api/state").then(render, (err) => put("status", "could not load: " + err.message));
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>frugalstream audit review: {tenant}</title>
<link rel="stylesheet" href="app.css"></head>
<body>
<header><h1>audit review: {tenant}</h1><span id="progress">loading</span></header>
<main id="card" hidden>
<div id="meta"></div>
<h2>Request</h2><pre id="question"></pre>
<div class="pair">
<section><h2>Served answer <small id="served-model"></small></h2><pre id="served"></pre></section>
<section><h2>Baseline answer <small id="baseline-model"></small></h2><pre id="baseline"></pre></section>
</div>
<div class="keys">
<button data-verdict="accept"><kbd>a</kbd> accept</button>
<button data-verdict="reject"><kbd>r</kbd> reject</button>
<button data-verdict="skip"><kbd>s</kbd> skip</button>
</div>
</main>
<p id="done" hidden>Nothing left to review with these filters.</p>
<p id="status" role="status"></p>
<script src="app.js"></script>
</body></html>
"""


FORBIDDEN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>frugalstream audit review</title></head>
<body><p>Open the address printed by <code>frugalstream audit review</code>: it carries this run's token.</p>
</body></html>
"""


def page(tenant: str) -> str:
    return _PAGE.format(tenant=html.escape(tenant))
