"""report.html: one self-contained page of a run's statistics, for the people who curate the data.

Self-contained means it opens offline and makes no request: styles are inline, figures are SVG
and thumbnails JPEG as ``data:`` URIs, there is no script, and a Content-Security-Policy that
allows only ``data:`` images and inline styles makes the browser refuse anything else.

Every value that came from the data (captions, URLs, sample ids, error texts) is escaped:
they are untrusted web text. A URL becomes a link only when it is plain ``http(s)``.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dedup._io import atomic_write_text
from dedup.report.thumbs import data_uri

__all__ = ["link_html", "render", "write_report_html"]

_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

_CSS = """
:root{--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--soft:#f6f7f9;--blue:#2f6db5;--orange:#d9782d;--red:#b42318}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);margin:0;background:#fff}
main{max-width:1180px;margin:0 auto;padding:28px 32px 60px}
h1{font-size:28px;margin:0 0 4px}
h2{font-size:19px;margin:36px 0 10px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:0 0 8px}
p{margin:6px 0}
.sub,.note{color:var(--muted)}
.note{font-size:13px}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin-top:18px}
@media (max-width:760px){.cards{grid-template-columns:repeat(2,1fr)}}
.card{background:var(--soft);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .v{font-size:24px;font-weight:650;line-height:1.2}
.card .k{font-size:12.5px;color:var(--muted)}
.card.hi{border-color:#f3c69f;background:#fff7ef}
.card.hi .v{color:var(--orange)}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px}
.figs img{width:100%;height:auto;border:1px solid var(--line);border-radius:8px}
.two{display:grid;grid-template-columns:1fr 1fr;gap:0 40px}
@media (max-width:760px){.two{grid-template-columns:1fr}}
table{border-collapse:collapse;margin:6px 0 4px;font-size:14px}
th,td{padding:5px 12px 5px 0;text-align:left;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:var(--muted);font-size:12.5px;text-transform:uppercase;letter-spacing:.03em}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:9px;background:var(--orange);border-radius:2px;vertical-align:middle;margin-left:8px}
.paper{background:var(--soft);border-left:4px solid var(--blue);padding:10px 14px;border-radius:4px;margin:8px 0 12px}
.cluster{border:1px solid var(--line);border-radius:10px;padding:12px 14px;margin:12px 0}
.cluster h3 span{font-weight:400;color:var(--muted)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(128px,1fr));gap:10px}
figure{margin:0;font-size:12px;min-width:0}
figure .img{height:100px;display:flex;align-items:center;justify-content:center;background:var(--soft);border-radius:6px;overflow:hidden}
figure img{max-width:100%;max-height:100px}
figure .none{color:var(--muted);font-size:11px}
figcaption{margin-top:4px}
.badge{display:inline-block;font-size:10.5px;padding:0 6px;border-radius:9px;background:#e8f0fb;color:var(--blue);font-weight:600}
.badge.dup{background:#fdebdc;color:var(--orange)}
.cap{margin:3px 0 2px;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden;overflow-wrap:anywhere}
.url,.sid{display:block;color:var(--muted);white-space:nowrap;overflow:hidden;text-overflow:ellipsis;font-size:11px}
a{color:var(--blue)}
code{font-size:12px}
footer{margin-top:40px;color:var(--muted);font-size:12px}
"""

_PAPER = (
    "Somepalli et al. (<i>Diffusion Art or Digital Forgery?</i>, 2022) found that the training "
    "images Stable Diffusion replicated had <b>34.1</b> duplicates on average, against <b>11.6</b> "
    "for random training images: the more copies of an image a model sees, the likelier it is "
    "to reproduce it. SSCD similarity &ge; 0.95 is their duplicate level, &ge; 0.5 their copy level."
)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _num(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and digits == 0 else f"{value:,.{digits}f}"
    return _e(value)


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], numeric: Iterable[int] = ()) -> str:
    """Cells are HTML already (escape before)."""
    num = set(numeric)
    th = "".join(f'<th class="n">{h}</th>' if i in num else f"<th>{h}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def link_html(url: str | None) -> str:
    """A link for plain http(s) URLs, escaped text for anything else (javascript:, data:, ...)."""
    if not url:
        return '<span class="url">no URL</span>'
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        parts = None
    label = _e(url)
    if parts is not None and parts.scheme.lower() in ("http", "https") and parts.netloc:
        return f'<a class="url" href="{_e(url.strip())}" title="{label}" rel="noopener noreferrer nofollow">{label}</a>'
    return f'<span class="url" title="{label}">{label}</span>'


def _card(value: str, label: str, *, hi: bool = False) -> str:
    return f'<div class="card{" hi" if hi else ""}"><div class="v">{value}</div><div class="k">{label}</div></div>'


def _cards(report: dict[str, Any]) -> str:
    s = report["summary"]
    dist = report.get("duplicate_count", {})
    d_all = dist.get("all_samples", {})
    d_dup = dist.get("samples_with_duplicates", {})
    levels = report.get("embedding_pairs_at", {})
    model = report.get("thresholds", {}).get("embedding_model", "embedding")
    cards = [
        _card(_num(s["samples"]), "samples"),
        _card(_num(s["duplicate_clusters"]), f"duplicate clusters ({_num(s['samples_in_duplicate_clusters'])} samples)"),
        _card(f"{_num(s['dropped'])} <small>({s['share_removable']:.1%})</small>", "removable duplicates", hi=True),
        _card(_num(s["largest_cluster"]), "largest cluster"),
        _card(_num(float(d_all.get("mean", 0.0))), "mean duplicate count, all samples"),
        _card(_num(float(d_dup.get("mean", 0.0))), "mean duplicate count, samples with duplicates", hi=True),
    ]
    if "0.95" in levels:
        cards.append(_card(_num(levels["0.95"]["pairs"]), f"pairs at {_e(model)} &ge; 0.95"))
    cards.append(_card(_num(s["failed"]), "failed samples"))
    return f'<div class="cards">{"".join(cards)}</div>'


def _figures(report: dict[str, Any]) -> str:
    from dedup.report.plots import duplication_figures

    figs = duplication_figures(report)
    if not figs:
        return '<p class="note">No decoded samples: nothing to plot.</p>'
    alts = {
        "histogram": "Histogram of samples by duplicate count, log-log axes",
        "ccdf": "Complementary CDF of the duplicate count, log-log axes",
    }
    imgs = "".join(f'<img src="{uri}" alt="{alts[k]}">' for k, uri in figs.items())
    return (
        f'<div class="figs">{imgs}</div><p class="note">A sample\'s duplicate count is the number of '
        "other samples in its cluster. The x axis shows it plus one (the copies of that image in the "
        "set), so samples without a duplicate appear at 1. A straight tail on log-log axes is a "
        "power law: a few images copied very many times.</p>"
    )


def _paper(report: dict[str, Any]) -> str:
    dist = report.get("duplicate_count", {})
    model = report.get("thresholds", {}).get("embedding_model", "embedding")
    rows: list[list[str]] = []
    for key, label in (("all_samples", "all samples"), ("samples_with_duplicates", "samples in flagged clusters (two or more)")):
        d = dist.get(key)
        if d:
            rows.append([label, _num(d["n"]), _num(float(d["mean"])), _num(float(d["median"]), 1),
                         _num(float(d["p99"]), 1), _num(d["max"])])
    dup_table = _table(["duplicate count of", "samples", "mean", "median", "p99", "max"], rows, numeric=range(1, 6))
    levels = report.get("embedding_pairs_at", {})
    by_level = sorted(levels.items(), key=lambda kv: -_float(kv[0]))  # json sorted the keys as text
    level_rows = [[f"{_e(model)} &ge; {_e(t)}", _num(v["pairs"]), _num(v["samples"])] for t, v in by_level]
    level_table = (
        _table(["similarity", "pairs", "samples in a pair"], level_rows, numeric=(1, 2))
        if level_rows
        else '<p class="note">No embedding model in this run: no similarity levels.</p>'
    )
    return f'<div class="paper">{_PAPER}</div><div class="two"><div>{dup_table}</div><div>{level_table}</div></div>'


def _clusters(report: dict[str, Any], thumbs: Mapping[str, bytes]) -> str:
    clusters = report.get("largest_clusters")
    if clusters is None:
        return '<p class="note">This report predates cluster thumbnails; run again to see them.</p>'
    if not clusters:
        return '<p class="note">No duplicate clusters.</p>'
    out = []
    for c in clusters:
        signals = ", ".join(f"{_e(k)} {_num(v)}" for k, v in c.get("signals", {}).items())
        more = c["size"] - len(c["samples"])
        figures = []
        for smp in c["samples"]:
            jpeg = thumbs.get(smp["sample_id"])
            img = (
                f'<img src="{data_uri(jpeg)}" alt="{_e(smp["caption"] or smp["sample_id"])}">'
                if jpeg
                else '<span class="none">image not available</span>'
            )
            if smp["reason"] == "duplicate":
                how = f"{_e(smp['signal'])} {smp['similarity']:.3f}" if smp.get("similarity") is not None else _e(smp["signal"])
                badge = f'<span class="badge dup" title="dropped as a duplicate; signal and similarity of its link">{how}</span>'
            else:
                badge = '<span class="badge" title="the sample kept for this cluster">kept</span>'
            figures.append(
                f'<figure><div class="img">{img}</div><figcaption>{badge}'
                f'<p class="cap" title="{_e(smp["caption"])}">{_e(smp["caption"]) or "<i>no caption</i>"}</p>'
                f'{link_html(smp["url"])}<code class="sid" title="{_e(smp["sample_id"])}">{_e(smp["sample_id"])}</code>'
                "</figcaption></figure>"
            )
        tail = f'<p class="note">and {_num(more)} more in the manifest (cluster_id {c["cluster_id"]})</p>' if more > 0 else ""
        out.append(
            f'<section class="cluster"><h3>Cluster {c["cluster_id"]} <span>&middot; {_num(c["size"])} samples'
            f'{" &middot; linked by " + signals if signals else ""}</span></h3>'
            f'<div class="grid">{"".join(figures)}</div>{tail}</section>'
        )
    return "".join(out)


def _phrases(report: dict[str, Any]) -> str:
    sec = report.get("caption_phrases")
    if not sec:
        return '<p class="note">This report predates caption phrases; run again to see them.</p>'
    rule = (
        f"Phrases of 1 to {sec['max_words']} words, counted once per sample, in at least "
        f"{sec['min_support']} duplicate samples spread over {sec['min_clusters']} or more clusters. "
        f"Lift = share of the {_num(sec['duplicate_samples'])} duplicate samples whose caption has the phrase "
        f"&divide; share of all {_num(sec['samples'])} samples."
    )
    sample = sec.get("sample")
    if sample:
        rule += (
            f" Counted on uniform samples of {_num(sample['duplicate_captions'])} duplicate and "
            f"{_num(sample['other_captions'])} other captions: support and counts are estimates for the "
            "whole set, clusters those seen in the sample."
        )
    phrases = sec.get("phrases", [])
    if not phrases:
        return f'<p>No caption phrase is over-represented in duplicate clusters.</p><p class="note">{rule}</p>'
    top = max(p["lift"] for p in phrases)
    rows = [
        [
            f"<b>{_e(p['phrase'])}</b>",
            f'{p["lift"]:.2f}<span class="bar" style="width:{max(2, round(90 * p["lift"] / top))}px"></span>',
            _num(p["support"]),
            _num(p["clusters"]),
            _num(p["count"]),
        ]
        for p in phrases
    ]
    table = _table(["phrase", "lift", "duplicate samples", "clusters", "all samples"], rows, numeric=(2, 3, 4))
    return f'{table}<p class="note">{rule}</p>'


def _settings(report: dict[str, Any]) -> str:
    t = report.get("thresholds", {})

    def dist(v: Any) -> str:
        return "off" if v is None or (isinstance(v, int) and v < 0) else f"&le; {_e(v)} bits"

    th_rows = [
        ["embedding model", f"<code>{_e(t.get('embedding_model'))}</code>"],
        ["embedding similarity", f"&ge; {_e(t.get('embedding_similarity'))}"],
        ["PDQ Hamming distance", dist(t.get("pdq_distance"))],
        ["pHash Hamming distance", dist(t.get("phash_distance"))],
        ["exact bytes / pixels", "on" if t.get("exact") else "off"],
    ]
    links = sorted(report.get("links_per_signal", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    link_rows = [[f"<code>{_e(k)}</code>", _num(v)] for k, v in links] or [["none", "0"]]
    sizes = [[_num(a), _num(b)] for a, b in report.get("cluster_size_histogram", [])]
    fails = [[_e(k), _num(v)] for k, v in sorted(report.get("failures", {}).items())] or [["none", "0"]]
    return (
        '<div class="two">'
        f"<div><h3>Thresholds used</h3>{_table(['setting', 'value'], th_rows)}</div>"
        f"<div><h3>Links per signal</h3>{_table(['signal', 'links'], link_rows, numeric=(1,))}"
        '<p class="note">A link joins two samples; the signal that made it is in the manifest\'s '
        "<code>signal</code> column.</p></div>"
        f"<div><h3>Cluster sizes</h3>{_table(['cluster size', 'clusters'], sizes, numeric=(0, 1))}</div>"
        f"<div><h3>Failures</h3>{_table(['reason', 'samples'], fails, numeric=(1,))}</div>"
        "</div>"
    )


def _contamination(report: dict[str, Any]) -> str:
    """A section per evaluation set a run was decontaminated against (``--against``)."""
    sets = report.get("contamination") or {}
    if not sets:
        return ""
    parts = ["<h2>Evaluation sets (decontamination)</h2>",
             '<p class="note">Training samples that copy an image of an evaluation set are dropped, whatever '
             "the keep policy, with the reason <code>contaminates:&lt;set&gt;</code>; their cluster mates too "
             "(copies of a copy).</p>"]
    for name, sec in sorted(sets.items()):
        hist = sec.get("similarity_histogram", {})
        edges, counts = hist.get("edges", []), hist.get("counts", [])
        bins = [[f"{_e(a)}&ndash;{_e(b)}", _num(c)] for a, b, c in zip(edges, edges[1:], counts)]
        examples = [
            [f"<code>{_e(x['sample_id'])}</code>", f"<code>{_e(x['eval_sample_id'])}</code>",
             f"<code>{_e(x['signal'])}</code>", _num(x["similarity"], 3)]
            for x in sec.get("examples", [])
        ] or [["none", "", "", ""]]
        signals = [[f"<code>{_e(k)}</code>", _num(v)] for k, v in sorted(sec.get("by_signal", {}).items())] or [["none", "0"]]
        parts.append(
            f"<h3><code>{_e(name)}</code>: {_num(sec.get('dropped', 0))} training samples dropped "
            f"({_num(sec.get('direct', 0))} direct, {_num(sec.get('via_cluster', 0))} through their cluster)</h3>"
            '<div class="two">'
            f"<div>{_table(['training sample', 'evaluation sample', 'signal', 'similarity'], examples, numeric=(3,))}</div>"
            f"<div>{_table(['similarity', 'direct links'], bins, numeric=(1,))}"
            f"{_table(['signal', 'samples'], signals, numeric=(1,))}</div>"
            "</div>"
        )
    return "\n".join(parts)


def _review(report: dict[str, Any]) -> str:
    """The curator's decisions (``dedup review``) and the precision the sample measured."""
    section = report.get("review")
    if not section:
        return ""
    c = section.get("decisions", {})
    out = [
        "<h2>Reviewed links</h2>",
        f'<p class="note">{_num(c.get("same", 0))} pairs marked same, {_num(c.get("different", 0))} different, '
        f"{_num(c.get('skip', 0))} skipped in <code>dedup review</code> (OUT/decisions.parquet); the next run "
        "into this folder honours them.</p>",
    ]
    table = section.get("precision")
    if table:
        def pct(v: Any) -> str:
            return "&ndash;" if v is None else f"{100 * v:.0f}%"

        rows = [
            [_e(b["signal"]), _e(b["band"]), _num(b["sampled"]), _num(b["decided"]), pct(b["precision"]),
             "&ndash;" if b["ci_low"] is None else f"{pct(b['ci_low'])}&ndash;{pct(b['ci_high'])}",
             "yes" if b["proves_target"] else ("estimate only" if b["meets_target"] else ("no" if b["decided"] else "&ndash;"))]
            for b in table.get("bands", [])
        ]  # fmt: skip
        supports = [
            [_e(sig), "&ndash;" if v["supported_threshold"] is None else _num(v["supported_threshold"]),
             "&ndash;" if v["confident_threshold"] is None else _num(v["confident_threshold"])]
            for sig, v in sorted(table.get("signals", {}).items())
        ]  # fmt: skip
        target = pct(table.get("target"))
        out.append(
            f"<h3>Measured precision (a stratified sample, per signal and similarity band)</h3>"
            f'<p class="note">precision = same / (same + different) among the sampled links of a band, '
            f"with its Wilson 95% interval; a band meets the target when its precision is at least {target}, "
            "and proves it when the interval's lower end is.</p>"
            + _table(["signal", "band", "sampled", "decided", "precision", "95% interval", f"reaches {target}"], rows, numeric=(2, 3, 4))
            + f'<p class="note">The threshold each signal\'s bands support: the lowest band floor from which every '
            f"decided band above reaches {target} (by the estimate, and proven by the interval).</p>"
            + _table(["signal", "supported threshold", "proven threshold"], supports, numeric=(1, 2))
        )
    return "\n".join(out)


def render(report: dict[str, Any], *, thumbnails: Mapping[str, bytes] | None = None) -> str:
    """The whole page for a ``report.json`` dict (and the thumbnails of its largest clusters)."""
    s = report["summary"]
    model = report.get("thresholds", {}).get("embedding_model", "")
    sub = (
        f"{_num(s['samples'])} samples, {_num(s['ok'] if 'ok' in s else s['samples'] - s['failed'])} decoded &middot; "
        f"model <code>{_e(model)}</code> &middot; dedup {_e(report.get('dedup_version', ''))}"
    )
    n_top = len(report.get("largest_clusters") or [])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>dedup report</title><style>{_CSS}</style></head><body><main>
<h1>dedup report</h1>
<p class="sub">{sub}</p>
{_cards(report)}
<h2>How duplicated is the set?</h2>
{_figures(report)}
<h2>The paper's statistics</h2>
{_paper(report)}
<h2>Caption phrases over-represented in duplicates</h2>
{_phrases(report)}
<h2>Largest clusters{f" (top {n_top})" if n_top else ""}</h2>
<p class="note">Each cluster's kept sample first; a duplicate's badge names the signal and similarity
of its strongest link. Captions and URLs are as the data has them.</p>
{_clusters(report, thumbnails or {})}
{_contamination(report)}


{_review(report)}
<h2>Signals and settings</h2>
{_settings(report)}
<footer>Written by dedup {_e(report.get("dedup_version", ""))}. Machine-readable numbers: report.json;
one row per sample: manifest.parquet. Re-render with <code>dedup report OUT</code>.</footer>
</main></body></html>
"""


def write_report_html(report: dict[str, Any], path: Path, *, thumbnails: Mapping[str, bytes] | None = None) -> None:
    atomic_write_text(path, render(report, thumbnails=thumbnails))
