"""A self-contained HTML dashboard of a study (`priorlab dashboard NAME` offline): one file, openable from the run
folder with no server and no network.

It holds the validity checks and the findings of report.md (rendered from its markdown), an interactive chart of
any final metric against the guidance scale (mean over seeds with its 95% band, one line per prior, a menu for the
metric and one for the condition), the drift of the unconditional branch over fine-tuning steps for each
condition, and the report's figures (sample grids with their class rows and scale among them) embedded as images.
The chart is drawn as SVG by a few lines of plain JavaScript from the data embedded in the page (no plotting
library: nothing to download), its legend beside it as HTML; axes of metrics that cannot be negative start at 0
or above.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import pandas as pd
from matplotlib.colors import to_hex

from priorlab import atomic
from priorlab.analysis.figures import COLORS, metric_range, prior_color
from priorlab.analysis.markdown import sections, to_html
from priorlab.analysis.results import axis_columns, extra_priors, final_rows, load_results
from priorlab.analysis.stats import mean_ci
from priorlab.keys import SELF, key, row_parts
from priorlab.study.layout import axis_label

# What the charts plot, shared with the W&B workspace (`commands.dashboard.panel_spec`), so that both show the same
# keys: the guided samples' metrics (eval/cond/<metric>/prior=<p>/w=<w>) against the scale, and the drift measures.
CHART_METRICS = ("fd", "accuracy", "kid", "precision", "recall", "nll", "ideal_mse")
DRIFT_KEYS = (key("prior", "disagreement", bucket="all"), key("prior", "loss", model=SELF, bucket="all"))
REPORT_SECTIONS = {"validity": ("Validity",), "findings": ("Headline", "Findings")}  # id: report.md's ## titles


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def _condition_label(keys: list[str], cond: tuple) -> str:
    return ", ".join(f"{axis_label(k)}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in zip(keys, cond, strict=True))  # fmt: skip


def _range(metric: str) -> list[float | None]:
    """[lo, hi] of the metric's values (None: unbounded), as the report's figures bound them: the chart's axis
    stays inside, and a band over seeds that crosses a bound is drawn up to it."""
    return [_num(v) for v in metric_range(metric)]


def _prior_colors(final: pd.DataFrame) -> dict[str, str]:
    """Each prior's colour in the report's figures (self red, base blue, extra priors in name order)."""
    extras = extra_priors(final)
    priors = [p for p in final["prior"].dropna().unique() if p in COLORS or p in extras]
    return {str(p): to_hex(prior_color(p, extras)) for p in priors}


def chart_data(frame: pd.DataFrame) -> dict:
    """{"scales": {"metric": {"condition": {"prior": [[w, mean, lo, hi], ...]}}}} from the final step of each run,
    the drift curves {"drift": {"metric": {"condition": [[step, mean, lo, hi], ...]}}} (intervals are 95% t over
    seeds), each metric's range {"ranges": {"metric": [lo, hi]}} and each prior's colour {"colors": {...}}."""
    keys = [*axis_columns(frame), "cond_dropout"]
    final = final_rows(frame)
    out: dict = {"scales": {}, "drift": {}, "ranges": {}, "colors": _prior_colors(final)}
    for metric in CHART_METRICS:
        sub = final[(final["metric"] == metric) & final["guidance_scale"].notna() & (final["prior"] != "")]
        if sub.empty:
            continue
        per_cond: dict = {}
        for cond, g in sub.groupby(keys, sort=True):
            cond = cond if isinstance(cond, tuple) else (cond,)
            lines = {}
            for prior, h in g.groupby("prior", sort=True):
                pts = []
                for w, vals in h.groupby("guidance_scale", sort=True)["value"]:
                    e = mean_ci(vals)
                    pts.append([float(w), _num(e.mean), _num(e.lo), _num(e.hi)])
                lines[str(prior)] = pts
            per_cond[_condition_label(keys, cond)] = lines
        out["scales"][metric] = per_cond
        out["ranges"][metric] = _range(metric)
    for drift_key in DRIFT_KEYS:
        metric, prior, _ = row_parts(drift_key)
        sub = frame[(frame["metric"] == metric) & (frame["prior"] == prior)]
        if sub.empty:
            continue
        per_cond = {}
        for cond, g in sub.groupby(keys, sort=True):
            cond = cond if isinstance(cond, tuple) else (cond,)
            pts = []
            for step, vals in g.groupby("step", sort=True)["value"]:
                e = mean_ci(vals)
                pts.append([float(step), _num(e.mean), _num(e.lo), _num(e.hi)])
            per_cond[_condition_label(keys, cond)] = pts
        out["drift"][metric] = per_cond
        out["ranges"][metric] = _range(metric)
    return out


def _report_html(study_dir: Path, prefixes: tuple[str, ...]) -> str:
    """The sections of report.md whose titles start with `prefixes`, as HTML (tables, headings, bold, lists)."""
    report = study_dir / "report.md"
    if not report.exists():
        return "<p>No report.md yet: run <code>priorlab report</code> for the validity checks and findings.</p>"
    found = sections(report.read_text(), prefixes)
    if not found:
        return f"<p>report.md has no section on {html.escape(' or '.join(prefixes).lower())}.</p>"
    return "\n".join(to_html(markdown) for _, markdown in found)


def _figures_html(study_dir: Path) -> str:
    parts = []
    for png in sorted((study_dir / "figures").glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        name = html.escape(png.stem)
        parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{data}'><figcaption>{name}</figcaption>"
                     "</figure>")  # fmt: skip
    return "\n".join(parts)


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222;line-height:1.4}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em} nav{font-size:14px}
.table-wrap{overflow-x:auto} table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top} th{background:#f3f3f3}
tbody tr:nth-child(even){background:#fafafa} code{background:#f3f3f3;padding:0 .2em} summary{cursor:pointer}
.plot{display:flex;align-items:flex-start;gap:1em;flex-wrap:wrap;margin-top:.5em}
ul.legend{list-style:none;padding:0;margin:12px 0 0;font-size:13px} ul.legend li{margin:.3em 0;white-space:nowrap}
.swatch{display:inline-block;width:16px;height:3px;vertical-align:middle;margin-right:.5em}
figure{display:inline-block;margin:.5em} img{max-width:560px}
"""

SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('data').textContent);
const COLORS = ['#d62728', '#1f77b4', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2', '#7f7f7f'];
const esc = t => String(t).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
const fmt = v => String(+v.toPrecision(6));
function ticks(lo, hi, n, range) {  // round values (1, 2, 2.5 or 5 times a power of ten) that cover [lo, hi]
  if (hi === lo) { const d = Math.abs(lo) / 10 || 1; lo = Math.max(lo - d, range[0] ?? -Infinity); hi = Math.min(hi + d, range[1] ?? Infinity); }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(f => f * mag).find(s => s >= raw * 0.999);
  const out = [];
  for (let t = Math.floor(lo / step + 1e-9) * step; t < hi + step * 0.999; t += step) out.push(+t.toPrecision(12));
  return out;
}
function svgPlot(el, series, xlabel, ylabel, range) {
  // range: [lo, hi] of the metric's values (null: unbounded); the axis stays inside, a band crossing it is cut there
  const W = 640, H = 340, L = 64, R = 16, T = 12, B = 44;
  const clip = v => Math.min(Math.max(v, range[0] ?? -Infinity), range[1] ?? Infinity);
  series = series.map(s => ({...s, points: s.points.filter(p => p[1] !== null)})).filter(s => s.points.length);
  let xs = [], ys = [];
  for (const s of series) for (const p of s.points) { xs.push(p[0]); for (const v of p.slice(1)) if (v !== null) ys.push(clip(v)); }
  if (!xs.length) { el.innerHTML = '<p>no data</p>'; return; }
  const xt = ticks(Math.min(...xs), Math.max(...xs), 6, [null, null]), yt = ticks(Math.min(...ys), Math.max(...ys), 5, range);
  const x0 = xt[0], x1 = xt[xt.length - 1], y0 = yt[0], y1 = yt[yt.length - 1];
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R), Y = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  let s = `<svg class="chart" width="${W}" height="${H}" xmlns="http://www.w3.org/2000/svg" font-size="12" data-y-min="${y0}" data-y-max="${y1}">`;
  s += `<rect class="plot-area" x="${L}" y="${T}" width="${W - L - R}" height="${H - T - B}" fill="none" stroke="#999"/>`;
  for (const v of yt) s += `<line x1="${L}" x2="${W - R}" y1="${Y(v)}" y2="${Y(v)}" stroke="#eee"/><text class="ytick" x="${L - 6}" y="${Y(v) + 4}" text-anchor="end">${fmt(v)}</text>`;
  for (const v of xt) s += `<text class="xtick" x="${X(v)}" y="${H - B + 16}" text-anchor="middle">${fmt(v)}</text>`;
  s += `<text x="${(L + W - R) / 2}" y="${H - 8}" text-anchor="middle">${esc(xlabel)}</text>`;
  s += `<text x="14" y="${(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 14 ${(T + H - B) / 2})">${esc(ylabel)}</text>`;
  let legend = '<ul class="legend">';
  series.forEach((ser, i) => {
    const c = ser.color || COLORS[i % COLORS.length], pts = ser.points, name = esc(ser.name);
    const band = pts.filter(p => p[2] !== null && p[3] !== null);
    if (band.length > 1) {
      const up = band.map(p => `${X(p[0])},${Y(clip(p[3]))}`), down = band.slice().reverse().map(p => `${X(p[0])},${Y(clip(p[2]))}`);
      s += `<polygon points="${up.concat(down).join(' ')}" fill="${c}" fill-opacity="0.15" stroke="none"/>`;
    }
    s += `<polyline points="${pts.map(p => `${X(p[0])},${Y(p[1])}`).join(' ')}" fill="none" stroke="${c}" stroke-width="2"/>`;
    for (const p of pts) s += `<circle cx="${X(p[0])}" cy="${Y(p[1])}" r="3" fill="${c}"><title>${name}: ${esc(xlabel)} ${p[0]}: ${p[1].toPrecision(4)}${p[2] !== null ? ' [' + p[2].toPrecision(4) + ', ' + p[3].toPrecision(4) + ']' : ''}</title></circle>`;
    legend += `<li><span class="swatch" style="background:${c}"></span>${name}</li>`;
  });
  el.innerHTML = s + '</svg>' + legend + '</ul>';
}
function fill(select, options) { select.innerHTML = options.map(o => `<option>${esc(o)}</option>`).join(''); }
function drawScales() {
  const m = document.getElementById('metric').value, c = document.getElementById('condition').value;
  const lines = (DATA.scales[m] || {})[c] || {}, used = Object.values(DATA.colors);
  const spare = COLORS.filter(c => !used.includes(c));  // for priors without a colour in the report's figures
  let j = 0, color = k => DATA.colors[k] || spare[j++ % spare.length];
  svgPlot(document.getElementById('scales'), Object.entries(lines).map(([k, v]) => ({name: 'prior=' + k, points: v, color: color(k)})),
          'guidance scale w', m + ' (mean over seeds, 95% band)', DATA.ranges[m]);
}
function drawDrift() {
  const m = document.getElementById('drift-metric').value, per = DATA.drift[m] || {};
  svgPlot(document.getElementById('drift'), Object.entries(per).map(([k, v]) => ({name: k, points: v})),
          'fine-tuning step', m + ' (mean over seeds, 95% band)', DATA.ranges[m]);
}
const metricSel = document.getElementById('metric'), condSel = document.getElementById('condition');
fill(metricSel, Object.keys(DATA.scales));
function conditions() { fill(condSel, Object.keys(DATA.scales[metricSel.value] || {})); drawScales(); }
metricSel.onchange = conditions; condSel.onchange = drawScales;
if (Object.keys(DATA.scales).length) conditions();
const driftSel = document.getElementById('drift-metric');
fill(driftSel, Object.keys(DATA.drift)); driftSel.onchange = drawDrift;
if (Object.keys(DATA.drift).length) drawDrift();
"""


def write_dashboard(study_dir: str | Path) -> Path:
    """Write study_dir/dashboard.html from results.csv, report.md and figures/ (atomically); returns its path."""
    study_dir = Path(study_dir)
    frame = load_results(study_dir)
    meta_path = study_dir / "study.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    title = f"priorlab study {meta.get('name', study_dir.name)} (preset {meta.get('preset', '?')})"
    data = json.dumps(chart_data(frame)).replace("</", "<\\/")  # no "</script>" inside the data
    report = {id_: _report_html(study_dir, prefixes) for id_, prefixes in REPORT_SECTIONS.items()}
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
<nav><a href="#validity">validity</a> · <a href="#scales-section">metrics vs w</a> · <a href="#drift-section">drift</a>
· <a href="#findings">findings</a> · <a href="#figures">figures</a></nav>
<section id="validity">{report["validity"]}</section>
<section id="scales-section"><h2>Final metrics against the guidance scale</h2>
<label>metric <select id="metric"></select></label> <label>condition <select id="condition"></select></label>
<div id="scales" class="plot"></div></section>
<section id="drift-section"><h2>Drift of the unconditional branch over fine-tuning</h2>
<label>measure <select id="drift-metric"></select></label><div id="drift" class="plot"></div></section>
<section id="findings">{report["findings"]}</section>
<section id="figures"><h2>Figures of the report</h2>
{_figures_html(study_dir)}</section>
<script type="application/json" id="data">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""
    return atomic.write_text(study_dir / "dashboard.html", page)
