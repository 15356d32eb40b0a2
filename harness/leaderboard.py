"""The leaderboard: one row per method and task, Pareto frontiers, and a self-contained HTML page.

- ``leaderboard_frame``: every (method, task) run with its score, metrics, trainable parameters,
  peak memory, throughput and *relative step time* (its step time over the reference method's on
  the same task and profile in the same records, so that machine speed cancels out).
- ``pareto_front``: the runs no other run beats on both score (higher) and cost (lower).
- ``write_leaderboard``: ``leaderboard.md`` and ``leaderboard.csv``; with ``html``, also
  ``leaderboard.html``: one file, no network at view time (inline CSS, inline script for sorting,
  plots as inline SVG), with the per-method summary, the per-run table, Pareto plots of score
  against trainable parameters and against peak memory (frontier marked), every run's details
  (config, versions, host, status) and the records that could not be read.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import numbers
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from harness.report import (MeanSd, _metric_label, aggregate_seeds, memory_chart_html,
                            runs_frame, summary_frame, to_markdown, unscaled)

def default_reference() -> str:
    """The method whose step time the others' is divided by: ``reference_method`` in
    harness/configs/compare.yaml (configuration, so that no method is named in the core)."""
    import yaml

    from harness.config import CONFIG_DIR

    return str(yaml.safe_load((CONFIG_DIR / "compare.yaml").read_text())["reference_method"])


DEFAULT_REFERENCE = default_reference()
GOOD = ("ok", "merge_mismatch")  # measured runs: a merge mismatch still trained and evaluated


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def relative_step_time(runs: pd.DataFrame, reference: str = DEFAULT_REFERENCE) -> pd.Series:
    """Each run's step time divided by the reference method's on the same task and profile (same
    records, so normally the same machine and session); NaN where either is missing or not ok."""
    if runs.empty:
        return pd.Series(dtype=float)
    ok = runs["status"].isin(GOOD)
    ref = runs[ok & (runs["method"] == reference)].set_index(["task", "profile"])["step_time_ms"]
    ref = ref[~ref.index.duplicated(keep="last")]
    out = []
    for r in runs.itertuples():
        base = ref.get((r.task, r.profile)) if r.status in GOOD else None
        cur = _num(r.step_time_ms)
        base = _num(base)
        out.append(cur / base if cur is not None and base else float("nan"))
    return pd.Series(out, index=runs.index, dtype=float)


def _metric_text(row: pd.Series) -> str:
    parts = []
    for c in row.index:
        if c.startswith("metric:") and _num(row[c]) is not None:
            name = c[7:]
            scale = 1 if unscaled(name) else 100
            sd = _num(row.get(f"sd:{c}"))
            parts.append(f"{_metric_label(row['task'], name)} {float(row[c]) * scale:.2f}"
                         + (f" ± {sd * scale:.2f}" if sd is not None else ""))
    return ", ".join(parts)


def leaderboard_frame(runs: pd.DataFrame, reference: str = DEFAULT_REFERENCE) -> pd.DataFrame:
    """One row per method, task and profile (its newest configuration), task by task, best score
    first. Over several seeds (`harness.report.aggregate_seeds`) the figures are means, and four
    columns say how far to trust the order: ``± sd`` (the score's sample standard deviation over
    seeds), ``seeds`` (measured / run), ``rank`` (1 + the number of methods with a higher mean on
    the task) and ``within spread of``: the methods whose mean score differs from this one's by no
    more than the larger of the two standard deviations (both measured on at least two seeds), so
    that their order is not told apart by these seeds (`within_spread`)."""
    cols = ["method", "task", "profile", "status", "score", "metrics", "method params",
            "trainable %", "peak mem MiB", "memory kind", "samples/s", "tokens/s", "step ms",
            f"step time x {reference}", "merge max |diff|", "run_id"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    runs = aggregate_seeds(runs)
    seeded = bool((runs["seeds_run"] > 1).any())
    if seeded:
        cols[5:5] = ["± sd", "seeds", "rank", "within spread of"]
    rel = relative_step_time(runs, reference)
    rows = []
    for i, r in runs.iterrows():
        good = r["seeds"] > 0

        def val(x: Any, nd: int, scale: float = 1.0) -> float | None:
            v = _num(x)
            return round(v * scale, nd) if good and v is not None else None

        params = _num(r["method_params"])
        rows.append({
            "method": r["method"], "task": r["task"], "profile": r["profile"],
            "status": r["status"],
            "score": val(r["score"], 2, 100),
            "± sd": val(r.get("sd:score"), 2, 100),
            "seeds": f"{int(r['seeds'])}/{int(r['seeds_run'])}" if r["seeds"] < r["seeds_run"]
            else str(int(r["seeds"])),
            "metrics": _metric_text(r) if good else (r.get("reason") or ""),
            "method params": int(params) if params is not None else None,
            "trainable %": val(r["trainable_share"], 3, 100),
            "peak mem MiB": val(r["peak_mem_mib"], 1),
            "memory kind": r.get("memory_kind") if good else None,
            "samples/s": val(r["samples_per_s"], 1),
            "tokens/s": val(r["tokens_per_s"], 0),
            "step ms": val(r["step_time_ms"], 1),
            f"step time x {reference}": val(rel[i], 2),
            "merge max |diff|": val(r["merge_max_abs_diff"], 12),
            "run_id": r["run_ids"] if seeded else r["run_id"],
        })
    df = pd.DataFrame(rows, columns=cols)
    if seeded:
        ranks, spread = [], []
        for _, r in df.iterrows():
            same = df[(df["task"] == r["task"]) & (df["profile"] == r["profile"]) & df["score"].notna()]
            if _num(r["score"]) is None:
                ranks.append(None)
                spread.append("")
                continue
            ranks.append(int((same["score"] > r["score"]).sum()) + 1)
            spread.append(", ".join(o["method"] for _, o in same.iterrows()
                                    if o["method"] != r["method"] and within_spread(r, o)))
        df["rank"], df["within spread of"] = pd.array(ranks, dtype="Int64"), spread
    order = {t: i for i, t in enumerate(dict.fromkeys(runs["task"]))}
    df = df.assign(_t=df["task"].map(order), _s=df["score"].fillna(-1e9))
    return df.sort_values(["_t", "profile", "_s"], ascending=[True, True, False], kind="stable") \
        .drop(columns=["_t", "_s"]).reset_index(drop=True)


SEEDS_NOTE = ("Over several seeds: score and metrics are means over the seeds measured, ± their "
              "sample standard deviation; seeds: measured (/ run, when some failed); rank: 1 + the "
              "number of methods with a higher mean score on the task; within spread of: the methods "
              "whose mean score differs from this one's by no more than the larger of the two "
              "standard deviations, so these seeds do not tell their order apart (both need two "
              "seeds or more).")


def within_spread(a: pd.Series, b: pd.Series) -> bool:
    """Two leaderboard rows' mean scores differ by no more than the larger of their standard
    deviations over seeds (each measured on two seeds or more): these seeds cannot order them."""
    sa, sb, ma, mb = _num(a.get("± sd")), _num(b.get("± sd")), _num(a["score"]), _num(b["score"])
    if None in (sa, sb, ma, mb):
        return False
    return abs(ma - mb) <= max(sa, sb) + 1e-9


def pareto_front(points: Iterable[tuple[float, float]]) -> list[int]:
    """Indices of the points on the frontier: no other point has a cost (x) at most as large and
    a score (y) at least as large with one of them strictly better. Ties: the first one counts."""
    pts = list(points)
    front = []
    for i, (x, y) in enumerate(pts):
        dominated = any((x2 <= x and y2 >= y and (x2 < x or y2 > y)) or
                        (x2 == x and y2 == y and j < i)
                        for j, (x2, y2) in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return front


def _panels(lb: pd.DataFrame, cost: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(title, points) per task, and a mean-over-tasks panel for methods measured on every task."""
    ok = lb[lb["status"].isin(GOOD) & lb["score"].notna() & lb[cost].notna()]
    profiles = list(dict.fromkeys(lb["profile"]))
    panels = []
    for (task, profile), sub in ok.groupby(["task", "profile"], sort=False):
        title = task + (f" ({profile})" if len(profiles) > 1 else "")
        if cost == "peak mem MiB" and sub["memory kind"].nunique() > 1:  # not comparable: said
            title += " - mixed memory measures: " + ", ".join(sorted(sub["memory kind"].dropna().unique()))
        panels.append((title, [{"method": r["method"], "x": float(r[cost]), "y": float(r["score"])}
                               for _, r in sub.iterrows()]))
    for profile in profiles:
        sub_all = lb[lb["profile"] == profile]
        tasks = list(dict.fromkeys(sub_all["task"]))
        if len(tasks) < 2:
            continue
        pts = []
        for method, sub in ok[ok["profile"] == profile].groupby("method", sort=False):
            if set(sub["task"]) == set(tasks):
                # Cost of serving all tasks with this method: the largest of its runs.
                pts.append({"method": method, "x": float(sub[cost].max()), "y": float(sub["score"].mean())})
        if pts:
            title = f"mean over {len(tasks)} tasks" + (f" ({profile})" if len(profiles) > 1 else "")
            kinds = ok[ok["profile"] == profile]["memory kind"].dropna().unique()
            if cost == "peak mem MiB" and len(kinds) > 1:
                title += " - mixed memory measures: " + ", ".join(sorted(kinds))
            panels.append((title, pts))
    return panels


def _nice_step(span: float, n: int = 5) -> float:
    raw = span / n if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def _si(v: float) -> str:
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suf}"
    return f"{v:.3g}"


def _place_labels(points: list[tuple[float, float, str]], box: tuple[float, float, float, float],
                  first: list[int]) -> list[tuple[float, float, str]]:
    """A position (x, baseline y, anchor) for each point's name that overlaps no name placed before
    it nor leaves the plot when it can help it: frontier points first, then the rest, each trying
    right-above, right-below, left-above, left-below and then further down (greedy)."""
    x0, y0, x1, y1 = box
    placed: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float, str]] = [(0.0, 0.0, "start")] * len(points)
    order = list(first) + [i for i in range(len(points)) if i not in first]
    for i in order:
        x, y, name = points[i]
        w, h = 5.2 * len(name) + 2, 10.0
        candidates = [(x + 6, y - 4, "start"), (x + 6, y + 11, "start"), (x - 6, y - 4, "end"),
                      (x - 6, y + 11, "end")]
        candidates += [(x + 6, y + 11 + 10 * k, "start") for k in range(1, 4)]
        best = None
        for lx, ly, anchor in candidates:
            left = lx if anchor == "start" else lx - w
            rect = (left, ly - h + 2, left + w, ly + 2)
            inside = rect[0] >= x0 - 2 and rect[2] <= x1 + 40 and rect[1] >= y0 - 12 and rect[3] <= y1 + 2
            clash = any(not (rect[2] < r[0] or rect[0] > r[2] or rect[3] < r[1] or rect[1] > r[3]) for r in placed)
            if inside and not clash:
                best = (lx, ly, anchor, rect)
                break
        if best is None:
            lx, ly, anchor = candidates[0]
            best = (lx, ly, anchor, (lx, ly - h + 2, lx + w, ly + 2))
        placed.append(best[3])
        out[i] = best[:3]
    return out


def pareto_svg(title: str, points: list[dict[str, Any]], x_label: str, log_x: bool,
               y_label: str = "score (%)") -> str:
    """A scatter of score against cost as inline SVG: frontier points filled and joined by a
    staircase (the best score reachable at each cost), every point named, hover for the figures."""
    W, H, L, R, T, B = 440, 300, 58, 18, 26, 46
    xs = [p["x"] for p in points]
    ys = [p["y"] for p in points]
    if log_x:
        xs_t = [math.log10(max(x, 1e-12)) for x in xs]
        lo, hi = math.floor(min(xs_t)), math.ceil(max(xs_t))
        if hi == lo:
            hi += 1
        x_ticks = [(float(k), _si(10.0 ** k)) for k in range(lo, hi + 1)]
    else:
        xs_t = xs
        step = _nice_step(max(xs) - min(xs) or max(abs(max(xs)), 1.0))
        lo = math.floor(min(xs) / step) * step
        hi = math.ceil(max(xs) / step) * step
        if hi == lo:
            lo, hi = lo - step, hi + step
        x_ticks = [(lo + k * step, f"{lo + k * step:g}") for k in range(int(round((hi - lo) / step)) + 1)]
    ystep = _nice_step(max(ys) - min(ys) or 1.0)
    ylo, yhi = math.floor(min(ys) / ystep) * ystep, math.ceil(max(ys) / ystep) * ystep
    if yhi == ylo:
        ylo, yhi = ylo - ystep, yhi + ystep
    y_ticks = [ylo + k * ystep for k in range(int(round((yhi - ylo) / ystep)) + 1)]

    def px(v: float) -> float:
        return L + (v - lo) / (hi - lo) * (W - L - R)

    def py(v: float) -> float:
        return H - B - (v - ylo) / (yhi - ylo) * (H - T - B)

    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="pareto" viewBox="0 0 {W} {H}" '
           f'width="{W}" height="{H}" role="img" aria-label="{e(title)}: {e(y_label)} against {e(x_label)}">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" class="t">{e(title)}</text>']
    for v, lab in x_ticks:
        x = px(v)
        out.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}" class="g"/>'
                   f'<text x="{x:.1f}" y="{H - B + 14}" text-anchor="middle">{e(lab)}</text>')
    for v in y_ticks:
        y = py(v)
        out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" class="g"/>'
                   f'<text x="{L - 5}" y="{y + 3:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" class="frame"/>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">{e(x_label)}</text>')
    out.append(f'<text transform="translate(14 {(T + H - B) / 2}) rotate(-90)" text-anchor="middle">'
               f'{e(y_label)}</text>')
    front = pareto_front(zip(xs, ys))
    fpts = sorted(((xs_t[i], ys[i]) for i in front))
    if fpts:
        d = f"M{px(fpts[0][0]):.1f},{py(fpts[0][1]):.1f}"
        for xv, yv in fpts[1:]:
            d += f" H{px(xv):.1f} V{py(yv):.1f}"
        d += f" H{W - R}"
        out.append(f'<path d="{d}" class="front"/>')
    labels = _place_labels([(px(xs_t[i]), py(ys[i]), str(p["method"])) for i, p in enumerate(points)],
                           (L, T, W - R, H - B), front)
    for i, p in enumerate(points):
        x, y = px(xs_t[i]), py(ys[i])
        on = i in front
        cost = _si(p["x"]) if log_x else f"{p['x']:g}"
        tip = f"{p['method']}: {p['y']:.2f} % at {cost} {x_label.split(' (')[0]}" + \
            (" (Pareto frontier)" if on else "")
        lx, ly, anchor = labels[i]
        out.append(f'<g class="pt{" on" if on else ""}" data-method="{e(p["method"])}">'
                   f'<title>{e(tip)}</title>'
                   f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4.5 if on else 3.5}"/>'
                   f'<text x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}">{e(p["method"])}</text></g>')
    out.append("</svg>")
    return "".join(out)


# --- HTML ------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
p.meta{color:#555;margin-top:0}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:#f2f4f7;position:sticky;top:0;cursor:pointer;user-select:none}
thead th:after{content:" \\2195";color:#aaa;font-size:11px}
thead th[aria-sort=ascending]:after{content:" \\2191";color:#000}
thead th[aria-sort=descending]:after{content:" \\2193";color:#000}
tbody tr:nth-child(even){background:#fafbfc}tbody tr:hover{background:#eef4ff}
td.bad{color:#b00020}
.scroll{overflow-x:auto}
.plots{display:flex;flex-wrap:wrap;gap:8px}
svg.pareto{border:1px solid #eee;background:#fff;font-size:10px}
svg.pareto .t{font-size:12px;font-weight:600}
svg.pareto .g{stroke:#eee}svg.pareto .frame{fill:none;stroke:#999}
svg.pareto .front{fill:none;stroke:#d62728;stroke-width:1.5;stroke-dasharray:4 2}
svg.pareto .pt circle{fill:#fff;stroke:#1f77b4;stroke-width:1.5}
svg.pareto .pt text{fill:#555;font-size:9px}
svg.pareto .pt.on circle{fill:#d62728;stroke:#d62728}
svg.pareto .pt.on text{fill:#000;font-weight:600}
details{margin:.25em 0;border:1px solid #e3e3e3;border-radius:4px;padding:.2em .6em}
details[open]{background:#fcfcfc}summary{cursor:pointer}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;font-size:12px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:.4em 0}dt{color:#555}dd{margin:0}
.problems li{color:#b00020}
"""

SORT_JS = """
(function(){
  function key(row, i, num){
    var c = row.cells[i]; if (!c) return num ? NaN : '';
    var v = c.hasAttribute('data-v') ? c.getAttribute('data-v') : c.textContent.trim();
    return num ? (v === '' ? NaN : parseFloat(v)) : v.toLowerCase();
  }
  function sortBy(table, th, i){
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function(h){ h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var num = th.getAttribute('data-type') === 'num';
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = key(a, i, num), y = key(b, i, num);
      if (num) {                      // blanks (failed, not measured) last either way
        if (isNaN(x)) return isNaN(y) ? 0 : 1;
        if (isNaN(y)) return -1;
        return asc ? x - y : y - x;
      }
      if (x === '') return y === '' ? 0 : 1;
      if (y === '') return -1;
      return asc ? x.localeCompare(y) : y.localeCompare(x);
    });
    rows.forEach(function(r){ body.appendChild(r); });
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function(th, i){
      th.tabIndex = 0;
      th.title = 'sort by ' + th.textContent;
      th.addEventListener('click', function(){ sortBy(table, th, i); });
      th.addEventListener('keydown', function(ev){
        if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); sortBy(table, th, i); }
      });
    });
  });
})();
"""


def _cell(v: Any, col: str) -> tuple[str, str | None, bool]:
    """(text shown, sort value, numeric?) of one table cell."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "", "", False
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return str(v), None, False
    if isinstance(v, MeanSd):  # mean ± sd over seeds: shown whole, sorted by the mean
        return str(v), repr(float(v)), True
    f = float(v)
    if math.isnan(f):
        return "", "", False
    if isinstance(v, numbers.Integral) or col in ("method params", "runs failed", "tokens/s"):
        text = f"{int(f):,}"
    elif col.startswith("merge"):
        text = f"{f:.1e}"
    else:
        text = f"{f:g}" if abs(f) < 1e6 else f"{f:,.0f}"
    return text, repr(f), True


def html_table(df: pd.DataFrame, table_id: str, index: bool = True) -> str:
    e = html.escape
    frame = df.reset_index() if index else df
    cols = [str(c) for c in frame.columns]
    cells = [[_cell(v, c) for v, c in zip(row, cols)] for row in frame.itertuples(index=False)]
    numeric = [sum(1 for r in cells if r[j][2]) > 0 and
               all(r[j][2] or r[j][0] in ("", "failed") for r in cells) for j in range(len(cols))]
    head = "".join(f'<th data-type="{"num" if numeric[j] else "text"}" scope="col">{e(c)}</th>'
                   for j, c in enumerate(cols))
    body = []
    for r in cells:
        tds = []
        for j, (text, sv, _) in enumerate(r):
            cls = ' class="n"' if numeric[j] else (' class="bad"' if text in ("failed",) else "")
            if text in ("failed",) and numeric[j]:
                cls = ' class="n bad"'
            dv = f' data-v="{e(sv or "")}"' if numeric[j] else ""
            tds.append(f"<td{cls}{dv}>{e(text)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f'<div class="scroll"><table class="sortable" id="{e(table_id)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _dl(items: dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(f"<dt>{e(str(k))}</dt><dd>{e(_plain(v))}</dd>" for k, v in items.items()
                   if v is not None and v != {} and v != "")
    return f"<dl>{rows}</dl>"


def _plain(v: Any) -> str:
    if isinstance(v, dict) and any(isinstance(x, (dict, list)) for x in v.values()):
        return json.dumps(v, sort_keys=True, default=str)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_plain(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def run_details(record: dict[str, Any]) -> str:
    e = html.escape
    status = record.get("status")
    score = _num(record.get("score"))
    head = (f'<b>{e(str(record.get("method")))}</b> on {e(str(record.get("task")))} &middot; '
            f'<span class="{"" if status == "ok" else "bad"}">{e(str(status))}</span>'
            + (f" &middot; score {score * 100:.2f}" if score is not None else "")
            + f' &middot; <code>{e(str(record.get("run_id")))}</code>')
    facts = {
        "status": status, "reason": record.get("reason"), "profile": record.get("profile"),
        "model": record.get("model") or record.get("model_path"),
        "started": record.get("started_at"), "finished": record.get("finished_at"),
        "wall seconds": record.get("wall_seconds"), "git commit": record.get("git_commit"),
        "versions": record.get("versions"), "host": record.get("host"),
        "schema version": record.get("schema_version"),
        "metrics": record.get("metrics"), "params": record.get("params"),
        "memory": record.get("memory"), "throughput": record.get("throughput"),
        "merge": record.get("merge"), "eval samples": record.get("eval_samples"),
    }
    body = _dl(facts)
    body += f"<p>config</p><pre>{e(json.dumps(record.get('config'), indent=1, sort_keys=True, default=str))}</pre>"
    if record.get("traceback"):
        body += f"<p>traceback</p><pre>{e(str(record['traceback']))}</pre>"
    return f'<details class="run" id="run-{e(str(record.get("run_id")))}"><summary>{head}</summary>{body}</details>'


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _records_shown(records: list[dict[str, Any]], runs: pd.DataFrame) -> list[dict[str, Any]]:
    if runs.empty:
        return []
    by_id = {r.get("run_id"): r for r in records}
    return [by_id[i] for i in runs["run_id"] if i in by_id]


def render_html(records: list[dict[str, Any]], problems: list[str] = (), *,
                reference: str = DEFAULT_REFERENCE, title: str = "PEFT leaderboard",
                method_order: list[str] | None = None) -> str:
    e = html.escape
    runs = runs_frame(records)
    lb = leaderboard_frame(runs, reference)
    summary = summary_frame(runs, method_order)
    n_methods = runs["method"].nunique() if not runs.empty else 0
    n_tasks = runs["task"].nunique() if not runs.empty else 0
    profiles = ", ".join(dict.fromkeys(runs["profile"].astype(str))) if not runs.empty else "-"
    commits = ", ".join(sorted({str(r.get("git_commit"))[:12] for r in records if r.get("git_commit")})) or "-"
    kinds = set(runs["memory_kind"].dropna()) if not runs.empty else set()
    mem_label = "peak memory (MiB" + (", CPU peak RSS)" if kinds == {"cpu_peak_rss"} else ")")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request at view time
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">profile {e(profiles)} &middot; {_n(len(runs), "run")} &middot; '
        f'{_n(n_methods, "method")} &middot; {_n(n_tasks, "task")} &middot; commits {e(commits)} &middot; generated '
        f'{_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")} by <code>harness report '
        f'--format html</code></p>',
        '<nav><a href="#summary">summary</a> &middot; <a href="#runs">per task</a> &middot; '
        '<a href="#pareto">Pareto plots</a> &middot; <a href="#details">run details</a>'
        + (' &middot; <a href="#problems">problems</a>' if problems or (not runs.empty and
                                                                        (runs["status"] != "ok").any()) else "")
        + "</nav>",
        '<h2 id="summary">Summary by method</h2>',
        "<p>Task metrics in percent on the dev split (loss and perplexity as they are); avg score: mean "
        "of the task scores (blank unless every task ran); method params: the method's own trainable "
        "parameters (task head excluded); trainable %: method + head as a share of all parameters; "
        "peak mem: largest over tasks; samples/s, tokens/s: training throughput, mean over tasks. "
        "Click a column heading to sort.</p>",
        "<p>Over several seeds: each cell is the mean over the seeds measured ± their sample standard "
        "deviation; avg score: the mean of the per-seed averages over tasks ± their standard "
        "deviation; seeds: how many were measured.</p>" if "seeds" in summary.columns else "",
        html_table(summary, "summary-table") if not summary.empty else "<p>(no runs)</p>",
        '<h2 id="runs">Every method on every task</h2>',
        f"<p>score: the task's score (mean of its metrics) in percent; step time x {e(reference)}: "
        f"the run's training step time over {e(reference)}'s on the same task in these records "
        f"(below 1: faster), a ratio from one machine, so machine speed cancels out (it is only as "
        f"good as the machine was quiet; see each run's host load in its details).</p>",
        f"<p>{e(SEEDS_NOTE)}</p>" if "rank" in lb.columns else "",
        html_table(lb.drop(columns=["run_id"]), "runs-table", index=False) if not lb.empty else "<p>(no runs)</p>",
        '<h2 id="pareto">Pareto plots</h2>',
        "<p>Score against cost, one panel per task (and the mean over tasks for methods measured on "
        "all of them, at the largest cost of their runs). Filled red points and the dashed staircase "
        "are the Pareto frontier: no other method scores at least as well for less. Hover a point for "
        "its figures.</p>",
    ]
    for key, cost, label, log_x in (("params", "method params", "trainable parameters (method, log)", True),
                                    ("memory", "peak mem MiB", mem_label, False)):
        panels = _panels(lb, cost) if not lb.empty else []
        parts.append(f'<h3>score against {e(label.split(" (")[0])}</h3><div class="plots" id="pareto-{key}">')
        if key == "params":  # log axis: zero-parameter methods cannot sit on it
            panels = [(t, [p for p in pts if p["x"] > 0]) for t, pts in panels]
        parts += [pareto_svg(t, pts, label, log_x) for t, pts in panels if pts]
        if not panels:
            parts.append("<p>(no measured runs)</p>")
        parts.append("</div>")
        fronts = []
        for t, pts in panels:
            if pts:
                f = pareto_front((p["x"], p["y"]) for p in pts)
                fronts.append(f"{t}: " + ", ".join(pts[i]["method"] for i in sorted(f, key=lambda i: pts[i]["x"])))
        if fronts:
            parts.append('<p class="fronts">Frontier, cheapest first: ' + "; ".join(e(f) for f in fronts) + "</p>")
    parts.append(memory_chart_html(runs))  # the memory breakdown (memory budgets), if recorded
    parts.append('<h2 id="details">Run details</h2><p>Each run\'s record: status, config, library '
                 'versions, host and measurements.</p>')
    parts += [run_details(r) for r in _records_shown(records, runs)]
    bad = runs[runs["status"] != "ok"] if not runs.empty else runs
    if problems or len(bad):
        parts.append('<h2 id="problems">Problems</h2><ul class="problems">')
        parts += [f"<li>{e(r.method)} on {e(r.task)}: {e(str(r.status))}: {e(str(r.reason))}</li>"
                  for r in bad.itertuples()]
        parts += [f'<li class="unreadable">unreadable record {e(p)}</li>' for p in problems]
        parts.append("</ul>")
    parts.append(f"<script>{SORT_JS}</script></body></html>")
    return "\n".join(parts)


def _for_markdown(lb: pd.DataFrame) -> pd.DataFrame:
    shown = lb.drop(columns=["run_id"]).set_index("method").astype(object)
    shown["merge max |diff|"] = [f"{v:.1e}" if _num(v) is not None else None for v in shown["merge max |diff|"]]
    return shown


def leaderboard_markdown(records: list[dict[str, Any]], problems: list[str] = (),
                         reference: str = DEFAULT_REFERENCE) -> str:
    runs = runs_frame(records)
    lb = leaderboard_frame(runs, reference)
    text = ["# Leaderboard\n",
            f"Every method on every task, best score first within a task. score: the task's score "
            f"(mean of its metrics) in percent; step time x {reference}: step time over {reference}'s "
            f"on the same task in these records (machine speed cancels out).\n",
            *([SEEDS_NOTE + "\n"] if "rank" in lb.columns else []),
            to_markdown(_for_markdown(lb)) if not lb.empty else "(no runs)"]
    for cost, label in (("method params", "trainable parameters"), ("peak mem MiB", "peak memory")):
        panels = _panels(lb, cost) if not lb.empty else []
        lines = []
        for t, pts in panels:
            f = pareto_front((p["x"], p["y"]) for p in pts)
            unit = (lambda x: f"{_si(x)} params") if cost == "method params" else (lambda x: f"{x:.0f} MiB")
            lines.append(f"- {t}: " + ", ".join(
                f"{pts[i]['method']} ({pts[i]['y']:.2f}, {unit(pts[i]['x'])})"
                for i in sorted(f, key=lambda i: pts[i]["x"])))
        if lines:
            text.append(f"\n## Pareto frontier: score against {label}, cheapest first\n\n" + "\n".join(lines))
    if problems:
        text.append("\n## Unreadable records\n\n" + "\n".join(f"- {p}" for p in problems))
    return "\n".join(text) + "\n"


def write_leaderboard(records: list[dict[str, Any]], out_dir: str | Path, problems: list[str] = (),
                      html_page: bool = False, reference: str = DEFAULT_REFERENCE,
                      method_order: list[str] | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"leaderboard_md": out / "leaderboard.md", "leaderboard_csv": out / "leaderboard.csv"}
    paths["leaderboard_md"].write_text(leaderboard_markdown(records, problems, reference))
    leaderboard_frame(runs_frame(records), reference).to_csv(paths["leaderboard_csv"], index=False)
    if html_page:
        paths["leaderboard_html"] = out / "leaderboard.html"
        paths["leaderboard_html"].write_text(render_html(records, problems, reference=reference,
                                                         method_order=method_order))
    return paths
