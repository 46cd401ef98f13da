"""The HTML dashboard: report.md's markdown rendered as HTML, and a committed study's dashboard in headless
Chromium (tables, legends beside the plots with whole labels, axes inside each metric's range)."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from priorlab.analysis.markdown import sections, to_html

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "results" / "dropout_vs_prior_gpu"  # a committed study: 2 data sizes × 2 dropout rates, 3 seeds
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_markdown_tables_headings_bold_lists_and_escaping():
    text = (
        "## Validity: a < b & c\n\nSome **bold `code`** text\nover two lines.\n\n"
        "| check | result |\n|---|:---:|\n| seeds <3> | **FAIL** |\n| base | pass |\n\n"
        "- **one**: first\n  - nested\n- two\n\n<details><summary>Every scale</summary>\n\n| a |\n|---|\n| 1 |\n\n"
        "</details>\n<script>alert(1)</script>\n[figure](figures/a.png) [x](javascript:alert(1))\n"
    )
    assert to_html(text).split("\n") == [
        "<h2>Validity: a &lt; b &amp; c</h2>",
        "<p>Some <strong>bold <code>code</code></strong> text over two lines.</p>",
        "<div class='table-wrap'><table><thead><tr><th>check</th><th>result</th></tr></thead><tbody>"
        "<tr><td>seeds &lt;3&gt;</td><td><strong>FAIL</strong></td></tr><tr><td>base</td><td>pass</td></tr>"
        "</tbody></table></div>",
        "<ul><li><strong>one</strong>: first<ul><li>nested</li></ul></li><li>two</li></ul>",
        "<details><summary>Every scale</summary>",
        "<div class='table-wrap'><table><thead><tr><th>a</th></tr></thead><tbody><tr><td>1</td></tr></tbody>"
        "</table></div>",
        "</details>",
        '<p>&lt;script&gt;alert(1)&lt;/script&gt; <a href="figures/a.png">figure</a> [x](javascript:alert(1))</p>',
    ]


def test_sections_picks_the_report_sections_by_title():
    text = "# Study\n\nintro\n\n## Validity: ok?\n\n| a |\n\n## Figures\n\nx\n\n## Findings: FD\n\n- y\n"
    assert sections(text, ("Validity", "Findings")) == [
        ("Validity: ok?", "## Validity: ok?\n\n| a |\n"),
        ("Findings: FD", "## Findings: FD\n\n- y"),
    ]


class Page(HTMLParser):
    """The tables (rows of cell texts) and the text of each <section id=...> of a page, and its probe's JSON."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.text: dict[str, str] = {}
        self.section, self.in_probe, self.cell, self.probe = None, False, None, ""
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs.get("id")
        self.in_probe = attrs.get("id") == "probe"
        if tag == "table" and self.section:
            self.tables.setdefault(self.section, []).append([])
        elif tag == "tr" and self.section:
            self.tables[self.section][-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[self.section][-1][-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "section":
            self.section = None

    def handle_data(self, data):
        if self.in_probe:
            self.probe += data
        if self.cell is not None:
            self.cell.append(data)
        if self.section:
            self.text[self.section] = self.text.get(self.section, "") + data


PROBE = """<script>
// After the page's own script: draw every metric and condition, measure the plot area, ticks and legend
function measure(id) {
  const el = document.getElementById(id), svg = el.querySelector('svg'), a = svg.querySelector('.plot-area');
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  return {area: box(a), yMin: +svg.dataset.yMin, yMax: +svg.dataset.yMax,
          ticks: [...svg.querySelectorAll('.ytick')].map(t => +t.textContent),
          legend: [...el.querySelectorAll('.legend li')].map(li => ({text: li.textContent, box: box(li),
                                                                     clipped: li.scrollWidth > li.clientWidth}))};
}
const probe = {scales: [], drift: [], width: document.documentElement.clientWidth};
for (const m of Object.keys(DATA.scales)) {
  metricSel.value = m; metricSel.onchange();
  for (const c of Object.keys(DATA.scales[m])) {
    condSel.value = c; condSel.onchange(); probe.scales.push({metric: m, condition: c, ...measure('scales')});
  }
}
for (const m of Object.keys(DATA.drift)) {
  driftSel.value = m; driftSel.onchange(); probe.drift.push({metric: m, ...measure('drift')});
}
const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(probe);
document.body.appendChild(pre);
</script>
"""


def _chromium(tmp_path: Path, page: Path, *args: str) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2000",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    out = subprocess.run([BROWSER, *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _assert_beside_and_whole(drawn: dict, names: list[str], width: float) -> None:
    assert [item["text"] for item in drawn["legend"]] == names, drawn  # every label whole, in the data's order
    for item in drawn["legend"]:
        left, _, right, _ = item["box"]
        assert left >= drawn["area"][2] and right <= width and not item["clipped"], (item, drawn["area"])


@pytest.mark.skipif(BROWSER is None, reason="no chromium, chromium-browser or google-chrome on PATH")
def test_dashboard_in_headless_chromium(tmp_path):
    """The dashboard of results/dropout_vs_prior_gpu, loaded by Chromium: validity and findings as HTML tables, each
    chart's legend beside its plot with whole labels, each axis inside its metric's range (FD's from 0 up)."""
    from priorlab.analysis.html import chart_data, write_dashboard
    from priorlab.analysis.results import load_results

    study = tmp_path / "dropout_vs_prior_gpu"
    study.mkdir()
    for name in ("results.csv", "report.md", "study.json"):
        shutil.copy(STUDY / name, study / name)
    page = write_dashboard(study)
    data = chart_data(load_results(study))
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = Page(_chromium(tmp_path, probed, "--dump-dom"))

    validity = dom.tables["validity"]
    assert len(validity) == 2 and validity[0][0] == ["check", "measured", "target", "result"]
    rows = {row[0]: row[3] for row in validity[0][1:]}
    assert rows["base converged (base/seed=0)"] == "pass" and rows["seeds per condition"] == "pass"
    assert rows["guidance pays (prior=self, main conditions)"] == "FAIL"  # was **FAIL**
    assert [row[0] for row in validity[1][1:]] == list(data["scales"]["fd"])  # one row per condition
    assert len(dom.tables["findings"]) == 4  # FD and accuracy: per scale; headlines: FD and accuracy
    for section in ("validity", "findings"):
        lines = [line.strip() for line in dom.text[section].splitlines()]
        assert not [line for line in lines if line.startswith(("|", "#"))] and "**" not in dom.text[section]

    probe = json.loads(dom.probe)
    assert len(probe["scales"]) == sum(len(c) for c in data["scales"].values()) and len(probe["drift"]) == 2
    for drawn in probe["scales"]:
        priors = data["scales"][drawn["metric"]][drawn["condition"]]
        _assert_beside_and_whole(drawn, [f"prior={p}" for p in priors], probe["width"])
    for drawn in probe["drift"]:
        assert "train_per_class=all, p=0.1" in data["drift"][drawn["metric"]]
        _assert_beside_and_whole(drawn, list(data["drift"][drawn["metric"]]), probe["width"])
    for drawn in probe["scales"] + probe["drift"]:
        lo, hi = data["ranges"][drawn["metric"]]
        assert drawn["ticks"][0] == drawn["yMin"] and drawn["ticks"][-1] == drawn["yMax"]
        assert lo is None or drawn["yMin"] >= lo, drawn
        assert hi is None or drawn["yMax"] <= hi, drawn
    assert data["ranges"]["fd"][0] == 0 and {d["metric"] for d in probe["scales"]} >= {"fd", "accuracy"}

    shot = tmp_path / "dashboard.png"  # an artifact to look at: the page as a reader first sees it
    _chromium(tmp_path, page, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
