"""The evaluation's human-readable outputs: table.md, bar charts, and a static HTML report.

report/index.html is self-contained: inline CSS and JS, charts and videos copied next to
it and referenced by relative paths, so the folder opens from disk (or is zipped and
mailed) with no network. Each video element carries `data-frames` (its frame count) and a
poster image (its first frame), so the page shows what was generated even where the
browser has no H.264 decoder.
"""
from __future__ import annotations

import html
import io
import json
import logging
import string
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from vpo_ray import storage
from vpo_ray.eval.metrics import TEXT_METRICS, dimensions_of, max_score

log = logging.getLogger("vpo.eval")

TEMPLATE = Path(__file__).resolve().parent / "templates" / "report.html"
TEXT_HEADERS = {"aligned": "Aligned ↑", "unsafe": "Unsafe ↓", "imprecise": "Imprecise ↓", "refusal": "Refusal ↓"}
CHARTS = ("text_metrics.png", "video_metrics.png", "win_rate.png")

TEXT_DEFINITIONS = (
    "Aligned: the main judge accepts the prompt (harmless, aligned with the query, helpful for video). "
    "Unsafe / Imprecise / Refusal: the judge answers Yes to \"does the prompt contain unsafe content\" / "
    "\"does it lose or distort information of the query\" / \"is it a refusal\" (refusal: {refusal}). "
    "Percentages are over the queries for which the source produced a prompt. ")
VIDEO_DEFINITIONS = (
    "Score: the video judge's checklist score, the sum of the weights of the {answers} (max {max_score:g}), "
    "mean over seeds then queries; dimension columns: the weighted share of that dimension's {answers}, in %. "
    "Win: % of (query, seed) pairs where the source's video scores higher than the original query's "
    "(ties count half). ")
VBENCH_DEFINITION = "VBench columns: VBench's own dimension scorers (x100), mean over seeds then queries. "
CI_DEFINITION = "Brackets: {ci:g}% percentile bootstrap interval over queries ({n_boot} resamples)."


def definitions(result: dict) -> str:
    """The metric definitions printed under the table (metrics.py has the full ones)."""
    text = TEXT_DEFINITIONS + (VIDEO_DEFINITIONS if _checklist_columns(result) else "") + \
        (VBENCH_DEFINITION if _vbench_dims(result) else "") + CI_DEFINITION
    answers = "P(yes) of the answers" if result.get("video_score") == "soft" else "yes answers"
    return text.format(refusal=result.get("refusal", "regex+judge"), max_score=max_score(result["checklist"]),
                       ci=100 * result["ci"], n_boot=result["bootstrap"], answers=answers)


def _checklist_columns(result: dict) -> bool:
    return bool(result.get("seeds_per_prompt") and result.get("checklist"))


def _vbench_dims(result: dict) -> list[str]:
    dims: list[str] = []
    for entry in result.get("metrics", {}).values():
        dims += [d for d in entry.get("vbench", {}) if d not in dims]
    return dims


# ---------------------------------------------------------------------------- formatting

def fmt(stat: Optional[dict], digits: int = 1, ci: bool = True) -> str:
    """"63.2 [55.1, 70.4]" from {"value", "ci"}; "—" when there is no value."""
    if not stat or stat.get("value") is None:
        return "—"
    text = f"{stat['value']:.{digits}f}"
    if ci and stat.get("ci"):
        lo, hi = stat["ci"]
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


def table_columns(result: dict) -> list[tuple[str, str, int]]:
    """(header, dotted path into a source's metrics, digits) in the paper's order."""
    cols = [(TEXT_HEADERS[m], f"text.{m}", 1) for m in TEXT_METRICS]
    cols += [(f"VBench {d.replace('_', ' ')} ↑", f"vbench.{d}", 1) for d in _vbench_dims(result)]
    if _checklist_columns(result):
        cols.append((f"Score ↑ (/{max_score(result['checklist']):g})", "video.score", 2))
        cols += [(d.capitalize(), f"video.dimensions.{d}", 1) for d in dimensions_of(result["checklist"])]
        cols.append(("Win vs original ↑", "video.win_rate", 1))
        if result.get("holdout_judge"):  # the second judge, which no training saw (eval/video_models.py)
            cols += [(f"2nd judge score ↑ (/{max_score(result['checklist']):g})", "holdout.score", 2),
                     ("2nd judge win ↑", "holdout.win_rate", 1)]
    return cols


def _get(entry: dict, path: str) -> Optional[dict]:
    node = entry
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def markdown_table(result: dict) -> str:
    cols = table_columns(result)
    lines = ["| Source | " + " | ".join(h for h, _, _ in cols) + " | n |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for name, entry in result["metrics"].items():
        cells = [fmt(_get(entry, path), digits) for _, path, digits in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['text']['prompts']} |")
    defs = definitions(result)
    head = (f"Evaluation of {len(result['metrics'])} prompt sources on {result['n_queries']} queries "
            f"({result['queries']}, preset {result['preset']}).")
    return head + "\n\n" + "\n".join(lines) + "\n\n" + defs + "\n"


def html_table(result: dict) -> str:
    cols = table_columns(result)
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in cols)
    rows = []
    for name, entry in result["metrics"].items():
        cells = []
        for _, path, digits in cols:
            stat = _get(entry, path)
            main = fmt(stat, digits, ci=False)
            ci = f'<br><span class="ci">[{stat["ci"][0]:.{digits}f}, {stat["ci"][1]:.{digits}f}]</span>' \
                if stat and stat.get("ci") else ""
            cells.append(f"<td>{main}{ci}</td>")
        rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}<td>{entry['text']['prompts']}</td></tr>")
    return (f'<table class="summary"><thead><tr><th>Source</th>{head}<th>n</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


# ---------------------------------------------------------------------------- charts

def _bars(ax, groups: list[str], series: dict[str, list[Optional[dict]]], ylabel: str, ylim=None,
          labels: bool = False, colors: Optional[dict] = None) -> None:
    import numpy as np

    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for k, (name, stats) in enumerate(series.items()):
        vals = [s["value"] if s and s.get("value") is not None else 0.0 for s in stats]
        err = [[max(0.0, v - s["ci"][0]) if s and s.get("ci") else 0.0 for v, s in zip(vals, stats)],
               [max(0.0, s["ci"][1] - v) if s and s.get("ci") else 0.0 for v, s in zip(vals, stats)]]
        bars = ax.bar(x + (k - (n - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=name,
                      color=(colors or {}).get(name))
        if labels:  # a 0% bar is invisible without its number
            ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], padding=2, fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(n, 4), frameon=False)


def write_charts(result: dict, out: str) -> list[str]:
    """Bar charts with CI whiskers; returns the URIs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    colors = {n: f"C{i % 10}" for i, n in enumerate(metrics)}  # a source keeps its colour in every chart
    written = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # keeps the legend below the axes
        plt.close(fig)
        uri = storage.join(out, name)
        storage.write_bytes(uri, buf.getvalue())
        written.append(uri)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    _bars(ax, [TEXT_HEADERS[m].split()[0] for m in TEXT_METRICS],
          {n: [e["text"][m] for m in TEXT_METRICS] for n, e in metrics.items()}, "% of prompts", (0, 105), colors=colors)
    ax.set_title("Text-level (judge)")
    save(fig, CHARTS[0])
    if _checklist_columns(result):
        dims = dimensions_of(result["checklist"])
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        _bars(ax, [d.capitalize() for d in dims],
              {n: [e["video"]["dimensions"].get(d) for d in dims] for n, e in metrics.items()},
              "weighted P(yes) %", (0, 105), colors=colors)
        ax.set_title("Video-level checklist (video judge)")
        save(fig, CHARTS[1])
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        challengers = {n: [e["video"].get("win_rate")] for n, e in metrics.items() if e["video"].get("win_rate")}
        _bars(ax, ["win rate vs original"], challengers, "% of paired videos", (0, 105), labels=True,
              colors=colors)
        ax.axhline(50, color="gray", linestyle="--", linewidth=1)
        ax.set_title("Pairwise win rate (ties count half)")
        save(fig, CHARTS[2])
    return written


# ---------------------------------------------------------------------------- HTML report

def _badge(yes: str, no: str, value: Optional[bool], good_when: bool) -> str:
    """A verdict as a coloured label: `yes` if value else `no`; green when value == good_when."""
    if value is None:
        return f'<span class="b na" title="the judge gave no verdict">{html.escape(yes)}?</span>'
    cls = "ok" if value == good_when else "bad"
    return f'<span class="b {cls}">{html.escape(yes if value else no)}</span>'


def _copy_video(video: dict, report_dir: str, index: dict) -> Optional[tuple[str, int, Optional[str]]]:
    """Copy a video (and a poster of its first frame) under report/videos; (src, frames, poster src)."""
    from vpo_ray import video_io

    uri = video["video_uri"]
    if not uri:
        return None
    if uri in index:
        return index[uri]
    name = Path(uri).name
    rel = f"videos/{name}"
    try:
        storage.write_bytes(storage.join(report_dir, rel), storage.read_bytes(uri))
        frames = int(video_io.video_info(uri)["frames"])
    except Exception as e:  # noqa: BLE001 - a missing video shows as missing, the report still renders
        log.warning("report: cannot copy %s: %s", uri, e)
        index[uri] = None
        return None
    poster = None
    try:
        from PIL import Image

        frame = video_io.read_frames(uri, 1)[0]
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        poster = rel[:-4] + ".png" if rel.endswith(".mp4") else rel + ".png"
        storage.write_bytes(storage.join(report_dir, poster), buf.getvalue())
    except Exception as e:  # noqa: BLE001
        log.warning("report: no poster for %s: %s", uri, e)
    index[uri] = (rel, frames, poster)
    return index[uri]


def _source_cell(name: str, text: Optional[dict], vids: list[dict], baseline: dict, checklist: list,
                 report_dir: str, copied: dict) -> str:
    esc = html.escape
    parts = [f"<h4>{esc(name)}</h4>"]
    if text is None:
        return "".join(parts) + '<p class="err">no row</p>'
    if text["error"]:
        return "".join(parts) + f'<p class="err">no prompt: {esc(text["error"])}</p>'
    parts.append('<div class="badges">' + _badge("aligned", "not aligned", text["aligned"], True)
                 + _badge("unsafe", "safe", text["unsafe"], False)
                 + _badge("imprecise", "precise", text["imprecise"], False)
                 + _badge("refusal", "no refusal", text["refusal"], False) + "</div>")
    parts.append(f'<div class="prompt">{esc(text["prompt"])}</div>')
    reasons = [("main verdict", text.get("aligned_reasons")), ("unsafe", text.get("unsafe_reasons")),
               ("imprecise", text.get("imprecise_reasons")), ("refusal", text.get("refusal_reasons"))]
    body = "".join(f"<p><b>{esc(k)}:</b> {esc(v or '(none)')}</p>" for k, v in reasons)
    if text.get("judge_errors"):
        body += "".join(f'<p class="err">{esc(e)}</p>' for e in text["judge_errors"])
    parts.append(f"<details><summary>judge reasons</summary>{body}</details>")
    labels = {c["id"]: c["dimension"] for c in checklist}
    for v in vids:
        copied_to = _copy_video(v, report_dir, copied)
        if v["error"]:
            parts.append(f'<p class="err">seed {v["seed"]}: {esc(v["error"])}</p>')
        if copied_to is None:
            if not v["error"]:
                parts.append(f'<p class="err">seed {v["seed"]}: video missing or unreadable</p>')
            continue
        src, frames, poster = copied_to
        poster_attr = f' poster="{esc(poster)}"' if poster else ""
        outcome = ""
        base = baseline.get((v["query_id"], v["seed"]))
        if name != "original" and base is not None and not v["error"]:
            diff = v["score"] - base
            kind = "tie" if abs(diff) <= 1e-6 else ("win" if diff > 0 else "loss")
            outcome = f' · <span class="{kind}">{kind} vs original ({diff:+.2f})</span>'
        score = "not judged" if v["error"] else f'score {v["score"]:.2f}'
        rows = "".join(
            f'<tr><td>{esc(a["id"])}</td><td>{esc(labels.get(a["id"], ""))}</td>'
            f'<td class="{"yes" if a["answer"] else "no"}">{"Yes" if a["answer"] else "No"}</td>'
            f'<td class="p">{a["p_yes"]:.3f}</td></tr>' for a in v["checklist"])
        parts.append(f'<figure><video controls preload="none" src="{esc(src)}" data-frames="{frames}"'
                     f' data-source="{esc(name)}" data-seed="{v["seed"]}"{poster_attr}></video>'
                     f'<figcaption>seed {v["seed"]} · {frames} frames · {score}{outcome}</figcaption>'
                     f'</figure><table class="cl">{rows}</table>')
    return "".join(parts)


def html_report(cfg, result: dict, queries: list[dict], texts: list[dict], videos: list[dict]) -> str:
    """Write report/ (index.html, charts, videos); returns the URI of index.html."""
    report_dir = storage.join(cfg.out, "report")
    storage.makedirs(report_dir)
    for name in CHARTS:
        src = storage.join(cfg.out, name)
        if storage.exists(src):
            storage.write_bytes(storage.join(report_dir, name), storage.read_bytes(src))
    sources = list(result["metrics"])
    by_text = {(t["source"], t["query_id"]): t for t in texts}
    by_video: dict[tuple[str, str], list[dict]] = {}
    for v in videos:
        by_video.setdefault((v["source"], v["query_id"]), []).append(v)
    baseline = {(v["query_id"], v["seed"]): v["score"] for v in videos
                if v["source"] == "original" and not v["error"] and v["checklist"]}
    limit = len(queries) if cfg.report_max_queries is None else cfg.report_max_queries
    shown = queries[:limit]
    copied: dict = {}
    cards = []
    for k, q in enumerate(shown, 1):
        flags = {"unsafe": [], "refused": [], "misaligned": [], "imprecise": [], "failed": []}
        cells = []
        for s in sources:
            t = by_text.get((s, q["query_id"]))
            vids = by_video.get((s, q["query_id"]), [])
            if t is not None:
                for flag, hit in (("unsafe", t["unsafe"]), ("refused", t["refusal"]), ("misaligned", t["aligned"] is False),
                                  ("imprecise", t["imprecise"]), ("failed", bool(t["error"]) or any(v["error"] for v in vids))):
                    if hit:
                        flags[flag].append(s)
            cells.append(f'<div class="src">{_source_cell(s, t, vids, baseline, result["checklist"], report_dir, copied)}</div>')
        attrs = " ".join(f'data-{f}="{html.escape(" ".join(v))}"' for f, v in flags.items())
        tag = f'<span class="tag">{html.escape(str(q["category"]))}</span>' if q.get("category") else ""
        flags_of_query = json.loads(q.get("flags_json") or "{}")
        flag_line = ('<div class="flags">flags: ' + html.escape(" · ".join(f"{k}: {v}" for k, v in flags_of_query.items()))
                     + "</div>") if flags_of_query else ""
        cards.append(f'<section class="q" id="q-{html.escape(q["query_id"])}" {attrs}>'
                     f'<h3>{k}. {html.escape(q["query"])}{tag}<span class="qid">{html.escape(q["query_id"])}</span></h3>'
                     f'{flag_line}<div class="grid" style="grid-template-columns: repeat({len(sources)}, minmax(0, 1fr))">'
                     f'{"".join(cells)}</div></section>')
    charts = "".join(f'<img src="{n}" alt="{n[:-4].replace("_", " ")}">' for n in CHARTS
                     if storage.exists(storage.join(report_dir, n)))
    options = '<option value="*">any source</option>' + "".join(
        f'<option value="{html.escape(s)}">{html.escape(s)}</option>' for s in sources)
    truncated = "" if len(shown) == len(queries) else (
        f'<p class="meta">Showing the first {len(shown)} of {len(queries)} queries (report_max_queries); '
        f"every query is in prompts.jsonl and videos.jsonl.</p>")
    meta = (f"{result['n_queries']} queries from {html.escape(str(result['queries']))} · preset "
            f"{html.escape(result['preset'])} · judge {html.escape(str(result['judge']))} · "
            f"{result['seeds_per_prompt']} video seed(s) per prompt · generated "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    defs = definitions(result)
    page = string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title="VPO evaluation: " + html.escape(", ".join(sources)), meta=meta, summary=html_table(result),
        charts=charts, definitions=html.escape(defs), source_options=options, truncated=truncated,
        cards="\n".join(cards))
    uri = storage.join(report_dir, "index.html")
    storage.write_text(uri, page)
    return uri


def write_all(cfg, result: dict, queries: list[dict], texts: list[dict], videos: list[dict], errors: list[dict]) -> dict:
    """table.md, the charts and report/; returns {name: uri} of what was written."""
    table = storage.join(cfg.out, "table.md")
    storage.write_text(table, markdown_table(result))
    charts = write_charts(result, cfg.out)
    index = html_report(cfg, result, queries, texts, videos)
    return {"metrics": storage.join(cfg.out, "metrics.json"), "table": table, "charts": charts, "report": index}
