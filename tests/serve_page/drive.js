// Drives the server page's script (GET /page.js) in Node against a live server, with a minimal DOM stand-in
// (no browser here): submit the form, wait for the job to complete in the table, press "play".
// Usage: node drive.js <server url> <prompt>; prints one JSON line with what the table showed.
"use strict";
const [base, prompt] = process.argv.slice(2);

class Element {
  constructor(tag, id) {
    Object.assign(this, {tag, id, children: [], parent: null, dataset: {}, listeners: {}, value: "", _text: ""});
  }
  get textContent() { return this._text + this.children.map((c) => c.textContent).join(""); }
  set textContent(t) { this._text = String(t); this.children.forEach((c) => (c.parent = null)); this.children = []; }
  appendChild(c) { if (c.parent) c.remove(); c.parent = this; this.children.push(c); return c; }
  remove() { if (this.parent) this.parent.children = this.parent.children.filter((c) => c !== this); this.parent = null; }
  replaceWith(n) {
    const p = this.parent, i = p.children.indexOf(this);
    if (n.parent) n.remove();
    p.children[i] = n; n.parent = p; this.parent = null;
  }
  addEventListener(kind, f) { this.listeners[kind] = f; }
  find(pred) {
    for (const c of this.children) { if (pred(c)) return c; const f = c.find(pred); if (f) return f; }
    return null;
  }
}
const ids = {};
for (const id of ["key", "form", "prompt", "model", "size", "seconds", "num_inference_steps", "seed",
                  "guidance_scale", "error", "jobs"]) ids[id] = new Element("x", id);
globalThis.document = {getElementById: (id) => ids[id], createElement: (tag) => new Element(tag)};
const store = {};
globalThis.sessionStorage = {getItem: (k) => store[k] ?? null, setItem: (k, v) => (store[k] = v)};
const realFetch = fetch;
globalThis.fetch = (path, options) => realFetch(base + path, options);

async function main() {
  const script = await (await realFetch(base + "/page.js")).text();
  new Function(script)();  // the page's own refresh runs every second (its setInterval)
  ids.prompt.value = prompt; ids.model.value = "tiny_contentv";
  ids.size.value = "48x32"; ids.seconds.value = "0.5"; ids.num_inference_steps.value = "1";
  await ids.form.listeners.submit({preventDefault() {}});
  const mine = () => ids.jobs.find((r) => r.tag === "tr" && r.children[2] && r.children[2].textContent === prompt);
  let row = mine();
  const queued = row ? row.dataset.state : null;  // shown right after the submit
  for (let i = 0; i < 600 && !(row && row.dataset.state === "completed"); i++) {
    await new Promise((r) => setTimeout(r, 200));
    row = mine();
  }
  const play = row.find((c) => c.tag === "button" && c.textContent === "play");
  play.listeners.click();
  let video = null;
  for (let i = 0; i < 100 && !video; i++) {
    await new Promise((r) => setTimeout(r, 100));
    video = mine().find((c) => c.tag === "video");
  }
  console.log(JSON.stringify({id: row.id, queued, state: row.dataset.state,
                              cells: row.children.map((c) => c.textContent), video: video ? video.src : null,
                              error: ids.error.textContent}));
  process.exit(0);
}
main().catch((e) => { console.log(JSON.stringify({error: String(e.stack || e)})); process.exit(1); });
