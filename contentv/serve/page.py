"""The server's own web page (GET /): a form that submits into the same durable queue through the same API, and
the queue's jobs with their videos, so jobs made from the page survive restarts like any other.

Plain HTML and one script (GET /page.js, so the page's Content-Security-Policy allows no inline script); the
script calls only the public API with the key typed into the page (kept in the tab's sessionStorage), and
shows every text it received as text (textContent), never as HTML.
"""

from __future__ import annotations

import html

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; media-src blob:; "
    "img-src blob:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ContentV video API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em auto; max-width: 980px; padding: 0 1em; }}
label {{ display: inline-block; margin: 0 1em .5em 0; }}
textarea {{ width: 100%; height: 4em; }} input[type=number] {{ width: 6em; }}
table {{ border-collapse: collapse; width: 100%; margin-top: 1em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: .3em; text-align: left; vertical-align: top; }}
#error {{ color: #b00; }} video {{ max-width: 320px; display: block; }}
</style></head><body>
<h1>ContentV video API</h1>
<p>Jobs go to the server's queue (<code>POST /v1/videos</code>): they survive restarts and appear to every API client.</p>
<form id="form">
<label id="keyrow"{key_hidden}>API key <input id="key" type="password" autocomplete="off"></label><br>
<label>Prompt<br><textarea id="prompt" maxlength="{max_prompt}" required></textarea></label><br>
<label>Model <select id="model">{models}</select></label>
<label>Size (WxH) <input id="size" placeholder="model default" size="10"></label>
<label>Seconds <input id="seconds" placeholder="model default" size="8"></label>
<label>Steps <input id="num_inference_steps" type="number" min="1"></label>
<label>Seed <input id="seed" type="number"></label>
<label>Guidance <input id="guidance_scale" type="number" step="0.1" min="0"></label>
<button id="submit" type="submit">Generate</button>
</form>
<p id="error" role="alert"></p>
<table><thead><tr><th>job</th><th>status</th><th>prompt</th><th>size, seconds</th><th>video</th><th></th></tr></thead>
<tbody id="jobs"></tbody></table>
<script src="/page.js"></script>
</body></html>
"""

SCRIPT = """"use strict";
const $ = (id) => document.getElementById(id);
const keyBox = $("key");
keyBox.value = sessionStorage.getItem("contentv-key") || "";
keyBox.addEventListener("change", () => sessionStorage.setItem("contentv-key", keyBox.value));
const shown = new Map();  // job id -> its table row

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (keyBox.value) h["Authorization"] = "Bearer " + keyBox.value;
  return h;
}

async function api(path, options) {
  const r = await fetch(path, Object.assign({}, options, {headers: headers((options || {}).headers)}));
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error.message; } catch (e) { /* not an error object */ }
    throw new Error(message);
  }
  return r;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

async function play(video, td) {
  const blob = await (await api("/v1/videos/" + encodeURIComponent(video.id) + "/content")).blob();
  const el = document.createElement("video");
  el.controls = true; el.loop = true; el.muted = true;
  el.src = URL.createObjectURL(blob);
  td.textContent = "";
  td.appendChild(el);
}

function render(video) {
  let row = shown.get(video.id);
  const state = video.status + (video.status === "in_progress" ? " " + video.progress + "%" : "");
  if (row && row.dataset.state === state) return;
  const fresh = document.createElement("tr");
  fresh.dataset.state = state;
  fresh.id = video.id;
  cell(fresh, video.id);
  cell(fresh, video.status === "failed" ? "failed: " + (video.error || {}).message : state);
  cell(fresh, video.prompt || "");
  cell(fresh, video.size + ", " + video.seconds + " s");
  const media = cell(fresh, "");
  if (video.status === "completed") {
    const button = document.createElement("button");
    button.textContent = "play";
    button.addEventListener("click", () => play(video, media).catch(showError));
    media.appendChild(button);
  }
  const del = document.createElement("button");
  del.textContent = "delete";
  del.addEventListener("click", () => api("/v1/videos/" + encodeURIComponent(video.id), {method: "DELETE"})
    .then(refresh).catch(showError));
  fresh.appendChild(document.createElement("td")).appendChild(del);
  if (row) row.replaceWith(fresh); else $("jobs").appendChild(fresh);
  shown.set(video.id, fresh);
}

function showError(e) { $("error").textContent = e.message; }

async function refresh() {
  try {
    const page = await (await api("/v1/videos?limit=50&order=desc")).json();
    const ids = new Set(page.data.map((v) => v.id));
    for (const [id, row] of shown) if (!ids.has(id)) { row.remove(); shown.delete(id); }
    const body = $("jobs");
    for (const v of page.data) { render(v); body.appendChild(shown.get(v.id)); }
  } catch (e) { showError(e); }
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = "";
  const body = {model: $("model").value, prompt: $("prompt").value};
  for (const id of ["size", "seconds", "num_inference_steps", "seed", "guidance_scale"]) {
    if ($(id).value !== "") body[id] = $(id).value;
  }
  try {
    await api("/v1/videos", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    await refresh();
  } catch (e) { showError(e); }
});

refresh();
setInterval(refresh, 1000);
"""


def page_html(models: list[str], max_prompt: int, keyed: bool) -> str:
    """The page, with the models this server offers (escaped) and the key field where the server needs one."""
    options = "".join(f'<option value="{html.escape(m)}">{html.escape(m)}</option>' for m in models)
    return PAGE.format(models=options, max_prompt=int(max_prompt), key_hidden="" if keyed else " hidden")
