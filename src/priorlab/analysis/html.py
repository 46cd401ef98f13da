"""A self-contained HTML dashboard of a study (`priorlab dashboard NAME` offline): one file, openable from the run
folder with no server and no network.

It holds the validity checks, an interactive chart of any final metric against the guidance scale (mean over
seeds with its 95% band, one line per prior, a menu for the metric and one for the condition), the drift of the
unconditional branch over fine-tuning steps for each condition, and the report's figures (sample grids with
their class rows and scale among them) embedded as images. The chart is drawn as SVG by a few lines of plain
JavaScript from the data embedded in the page (no plotting library: nothing to download).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import pandas as pd

from priorlab import atomic
from priorlab.analysis.results import axis_columns, final_rows, load_results
from priorlab.analysis.stats import mean_ci
from priorlab.study.layout import axis_label

CHART_METRICS = ("fd", "accuracy", "kid", "precision", "recall", "nll", "ideal_mse")
DRIFT_METRICS = ("disagreement/all", "loss/all")


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def _condition_label(keys: list[str], cond: tuple) -> str:
    return ", ".join(f"{axis_label(k)}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in zip(keys, cond, strict=True))  # fmt: skip


def chart_data(frame: pd.DataFrame) -> dict:
    """{"metric": {"condition": {"prior": [[w, mean, lo, hi], ...]}}} from the final step of each run, and the
    drift curves {"metric": {"condition": [[step, mean, lo, hi], ...]}}; intervals are 95% t over seeds."""
    keys = [*axis_columns(frame), "cond_dropout"]
    final = final_rows(frame)
    out: dict = {"scales": {}, "drift": {}}
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
    for metric in DRIFT_METRICS:
        prior = "" if metric.startswith("disagreement") else "self"
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
    return out


def _validity_html(study_dir: Path) -> str:
    """The validity section of report.md (its table and verdict lines), as preformatted text."""
    report = study_dir / "report.md"
    if not report.exists():
        return "<p>No report.md yet: run <code>priorlab report</code> for the validity checks.</p>"
    text = report.read_text()
    start = text.find("## Validity")
    if start < 0:
        return ""
    end = text.find("\n## ", start + 3)
    section = text[start : end if end > 0 else len(text)]
    return f"<pre class='validity'>{html.escape(section)}</pre>"


def _figures_html(study_dir: Path) -> str:
    parts = []
    for png in sorted((study_dir / "figures").glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        name = html.escape(png.stem)
        parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{data}'><figcaption>{name}</figcaption>"
                     "</figure>")  # fmt: skip
    return "\n".join(parts)


SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('data').textContent);
const COLORS = ['#d62728', '#1f77b4', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b'];
function svgPlot(el, series, xlabel, ylabel) {
  const W = 560, H = 320, L = 60, R = 140, T = 15, B = 45;
  let xs = [], ys = [];
  for (const s of series) for (const p of s.points) { xs.push(p[0]); for (const v of p.slice(1)) if (v !== null) ys.push(v); }
  if (!xs.length) { el.innerHTML = '<p>no data</p>'; return; }
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1; if (y1 === y0) y1 = y0 + 1;
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R), Y = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  let s = `<svg width="${W}" height="${H}" xmlns="http://www.w3.org/2000/svg" font-size="11">`;
  s += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="black"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="black"/>`;
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4, xv = x0 + (x1 - x0) * i / 4;
    s += `<text x="${L - 5}" y="${Y(yv) + 4}" text-anchor="end">${yv.toPrecision(3)}</text>`;
    s += `<text x="${X(xv)}" y="${H - B + 15}" text-anchor="middle">${xv.toPrecision(3)}</text>`;
  }
  s += `<text x="${(L + W - R) / 2}" y="${H - 8}" text-anchor="middle">${xlabel}</text>`;
  s += `<text x="14" y="${(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 14 ${(T + H - B) / 2})">${ylabel}</text>`;
  series.forEach((ser, i) => {
    const c = COLORS[i % COLORS.length], pts = ser.points;
    const band = pts.filter(p => p[2] !== null && p[3] !== null);
    if (band.length > 1) {
      const up = band.map(p => `${X(p[0])},${Y(p[3])}`), down = band.slice().reverse().map(p => `${X(p[0])},${Y(p[2])}`);
      s += `<polygon points="${up.concat(down).join(' ')}" fill="${c}" fill-opacity="0.15" stroke="none"/>`;
    }
    s += `<polyline points="${pts.map(p => `${X(p[0])},${Y(p[1])}`).join(' ')}" fill="none" stroke="${c}" stroke-width="2"/>`;
    for (const p of pts) s += `<circle cx="${X(p[0])}" cy="${Y(p[1])}" r="3" fill="${c}"><title>${ser.name}: ${xlabel} ${p[0]}: ${p[1].toPrecision(4)}${p[2] !== null ? ' [' + p[2].toPrecision(4) + ', ' + p[3].toPrecision(4) + ']' : ''}</title></circle>`;
    s += `<text x="${W - R + 10}" y="${T + 15 * (i + 1)}" fill="${c}">${ser.name}</text>`;
  });
  el.innerHTML = s + '</svg>';
}
function fill(select, options) { select.innerHTML = options.map(o => `<option>${o}</option>`).join(''); }
function drawScales() {
  const m = document.getElementById('metric').value, c = document.getElementById('condition').value;
  const lines = (DATA.scales[m] || {})[c] || {};
  svgPlot(document.getElementById('scales'), Object.entries(lines).map(([k, v]) => ({name: 'prior=' + k, points: v})),
          'guidance scale w', m + ' (mean over seeds, 95% band)');
}
function drawDrift() {
  const m = document.getElementById('drift-metric').value, per = DATA.drift[m] || {};
  svgPlot(document.getElementById('drift'), Object.entries(per).map(([k, v]) => ({name: k, points: v})),
          'fine-tuning step', m);
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
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto}} pre.validity{{white-space:pre-wrap;
background:#f6f6f6;padding:.5em}} figure{{display:inline-block;margin:.5em}} img{{max-width:520px}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Validity</h2>{_validity_html(study_dir)}
<h2>Final metrics against the guidance scale</h2>
<label>metric <select id="metric"></select></label> <label>condition <select id="condition"></select></label>
<div id="scales"></div>
<h2>Drift of the unconditional branch over fine-tuning</h2>
<label>measure <select id="drift-metric"></select></label><div id="drift"></div>
<h2>Figures of the report</h2>
{_figures_html(study_dir)}
<script type="application/json" id="data">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""
    return atomic.write_text(study_dir / "dashboard.html", page)
