"""The review page: one static document; every piece of data arrives as JSON from ``api/items``
and is put on the page with ``textContent`` (never ``innerHTML``), so a caption, URL or file
name is text whatever it holds. Script and style run only under the response's nonce (CSP)."""

from __future__ import annotations

import html

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<title>dedup review: {title}</title>
<style nonce="{nonce}">
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #f5f5f4; color: #1c1917; }}
header {{ background: #1c1917; color: #fafaf9; padding: 10px 18px; display: flex; gap: 18px; align-items: baseline; }}
header h1 {{ font-size: 17px; margin: 0; }}
#progress {{ color: #d6d3d1; }}
main {{ padding: 14px 18px; }}
#why {{ font-weight: 600; margin-bottom: 4px; }}
#link {{ color: #44403c; margin-bottom: 10px; }}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }}
.side {{ background: #fff; border: 1px solid #d6d3d1; border-radius: 6px; padding: 10px; min-width: 0; }}
.side img {{ display: block; max-width: 100%; max-height: 420px; margin: 0 auto 8px; background: #e7e5e4; }}
.meta {{ font-size: 13px; overflow-wrap: anywhere; }}
.meta .k {{ color: #78716c; }}
.buttons {{ margin: 14px 0; display: flex; gap: 10px; }}
button {{ font: inherit; padding: 8px 16px; border-radius: 6px; border: 1px solid #a8a29e; background: #fff; cursor: pointer; }}
button#same {{ background: #dcfce7; }} button#different {{ background: #fee2e2; }}
kbd {{ border: 1px solid #a8a29e; border-radius: 3px; padding: 0 4px; font-size: 12px; }}
#status {{ color: #57534e; min-height: 1.4em; }}
#done {{ display: none; font-size: 18px; padding: 30px 0; }}
</style></head>
<body>
<header><h1>dedup review</h1><span id="progress">loading…</span></header>
<main>
<div id="card">
<div id="why"></div>
<div id="link"></div>
<div class="pair">
  <div class="side" id="side-a"><img id="img-a" alt="first sample"><div class="meta" id="meta-a"></div></div>
  <div class="side" id="side-b"><img id="img-b" alt="second sample"><div class="meta" id="meta-b"></div></div>
</div>
<div class="buttons">
  <button id="same" type="button">Same <kbd>s</kbd></button>
  <button id="different" type="button">Different <kbd>d</kbd></button>
  <button id="skip" type="button">Skip <kbd>k</kbd></button>
</div>
</div>
<div id="done">Nothing left to review. Decisions are in <code id="where"></code>; the next
<code>dedup run</code> into this folder honours them.</div>
<div id="status"></div>
</main>
<script nonce="{nonce}">
"use strict";
let items = [];
let pos = 0;
let decided = 0;
let busy = false;
const $ = (id) => document.getElementById(id);

function text(parent, cls, value) {{
  const span = document.createElement("span");
  if (cls) span.className = cls;
  span.textContent = value;
  parent.appendChild(span);
}}

function describe(box, side) {{
  box.replaceChildren();
  const rows = [["id", side.id], ["caption", side.caption], ["url", side.url],
                ["size", side.width && side.height ? side.width + " × " + side.height : null]];
  for (const [k, v] of rows) {{
    if (v === null || v === undefined || v === "") continue;
    const line = document.createElement("div");
    text(line, "k", k + ": ");
    text(line, "v", String(v));
    box.appendChild(line);
  }}
}}

function show() {{
  $("progress").textContent = decided + " decided · " + Math.max(0, items.length - pos) + " to go";
  if (pos >= items.length) {{
    $("card").style.display = "none";
    $("done").style.display = "block";
    return;
  }}
  const it = items[pos];
  $("why").textContent = it.why;
  const sim = it.similarity === null ? "" : " · similarity " + it.similarity.toFixed(3);
  const size = it.cluster_size ? " · cluster of " + it.cluster_size : "";
  const region = it.signal === "partial" ? " · red outline: where one image lies inside the other (when found)" : "";
  $("link").textContent = "signal: " + (it.signal || "none") + sim + size + region;
  $("img-a").src = "img/" + it.index + "/a.jpg";
  $("img-b").src = "img/" + it.index + "/b.jpg";
  describe($("meta-a"), it.a);
  describe($("meta-b"), it.b);
}}

async function decide(verdict) {{
  if (busy || pos >= items.length) return;
  busy = true;
  const it = items[pos];
  try {{
    const r = await fetch("api/decide", {{
      method: "POST", headers: {{"Content-Type": "application/json"}},
      body: JSON.stringify({{item: it.index, decision: verdict}}),
    }});
    if (!r.ok) throw new Error("HTTP " + r.status);
    const d = await r.json();
    decided = d.decided;
    $("status").textContent = "saved: " + verdict;
    pos += 1;
    show();
  }} catch (err) {{
    $("status").textContent = "not saved (" + err.message + "): try again";
  }} finally {{
    busy = false;
  }}
}}

async function load() {{
  const r = await fetch("api/items");
  const d = await r.json();
  items = d.items;
  decided = d.decided;
  $("where").textContent = d.decisions_file;
  show();
}}

$("same").addEventListener("click", () => decide("same"));
$("different").addEventListener("click", () => decide("different"));
$("skip").addEventListener("click", () => decide("skip"));
document.addEventListener("keydown", (e) => {{
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const verdict = {{s: "same", d: "different", k: "skip"}}[e.key];
  if (verdict) {{ e.preventDefault(); decide(verdict); }}
}});
load().catch((err) => {{ $("status").textContent = "cannot load the pairs: " + err.message; }});
</script>
</body></html>
"""


def render_page(*, title: str, nonce: str) -> str:
    """The page, with ``title`` (an output folder's name: escaped) and the CSP ``nonce``."""
    return PAGE.format(title=html.escape(title), nonce=html.escape(nonce))
