"""report.html: one self-contained page per run and per sweep, for a colleague to open without shelltrain.

Everything comes from what the run dir (or the sweep dir) already holds: summary.json's figures and sections,
the plots/*.png (inlined as data: URIs, so the page is one file that needs no network), the config. The sweep
page holds summary.csv's table (sortable by clicking a column header, or by opening `report.html#sort=COLUMN`)
and sweep.png. Standard library only; torch-free, so the sweep callback can import it.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from shelltrain import rundir, summary

PROVENANCE = ("device", "threads", "processes", "torch", "torchvision", "run_dir")
SHOWN_ELSEWHERE = ("per_class", "confused_pairs")
FIRST_PLOTS = {rundir.CURVES_PLOT: 0, rundir.CONFUSION_PLOT: 1}  # the rest (per_class, top_losses, ...) by name
TITLES = {"prune": "Pruning", "compress": "Compression", "cv": "Cross-validation", "gates": "Quality gates"}

PAGE = string.Template(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; border-bottom: 2px solid #3465a4; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; color: #204a87; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #eef2f8; }
tr:nth-child(even) td { background: #f7f7f7; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-dir=asc]::after { content: " \\25B2"; }
table.sortable th[data-dir=desc]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; gap: 3em; flex-wrap: wrap; align-items: flex-start; }
.wide { overflow-x: auto; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: .9em; }
pre { background: #f4f4f4; padding: .8em; overflow-x: auto; font-size: .85em; }
.status-completed { color: #2e7d32; font-weight: bold; }
</style></head>
<body>
<h1>$title</h1>
$body
<script>
(function () {
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
    var asc = th.getAttribute("data-dir") !== "asc";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-dir"); });
    th.setAttribute("data-dir", asc ? "asc" : "desc");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[i].textContent.trim(), y = b.cells[i].textContent.trim();
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var d = (isNaN(x) || isNaN(y)) ? x.localeCompare(y) : parseFloat(x) - parseFloat(y);
      return asc ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
  var wanted = decodeURIComponent(location.hash.replace(/^#sort=/, ""));
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    if (location.hash.indexOf("#sort=") === 0 && th.textContent === wanted) { sortBy(th); }
  });
})();
</script>
</body></html>
"""
)


def write_run_page(run_dir: Path, config: dict[str, Any], result: dict[str, Any] | None = None) -> Path:
    """<run dir>/report.html from its summary (`result`, else its summary.json), plots/ and `config` (the job's
    resolved config)."""
    run_dir = Path(run_dir)
    result = summary.read(run_dir) if result is None else result
    figures = _section("Results", _pairs((k, v) for k, v in _flat(result) if k not in PROVENANCE))
    where = _section("Provenance", _pairs((k, result[k]) for k in PROVENANCE if k in result))
    plots = sorted(
        (run_dir / rundir.PLOTS).glob("*.png"), key=lambda p: (FIRST_PLOTS.get(p.name, len(FIRST_PLOTS)), p.name)
    )
    sections = [
        f'<div class="row">{figures}{where}</div>',
        _plots(plots),
        _per_class(result.get("per_class")),
        _confused(result.get("confused_pairs")),
        *(_dict_section(k, v) for k, v in result.items() if isinstance(v, (dict, list)) and k not in SHOWN_ELSEWHERE),
        _section("Configuration", _config(config)),
    ]
    if (run_dir / rundir.MODEL_CARD).is_file():
        sections.append(_section("Model card", f'<a href="{rundir.MODEL_CARD}">{rundir.MODEL_CARD}</a>'))
    path = run_dir / rundir.REPORT_PAGE
    rundir.write_text(_page(f"shelltrain run: {run_dir.name}", sections), path)
    return path


def write_sweep_page(csv_path: Path) -> Path:
    """report.html beside a sweep's summary.csv: its jobs' table (sortable) and sweep.png when there is one."""
    folder = Path(csv_path).parent
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    header, records = rows[0], rows[1:]
    links = header.index("run_dir") if "run_dir" in header else None
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join(
        "<tr>" + "".join(_job_cell(folder, value, i == links) for i, value in enumerate(record)) + "</tr>"
        for record in records
    )
    table = (
        f'<div class="wide"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    )
    hint = "<p>Click a column header to sort by it; click again to reverse.</p>"
    plot = folder / rundir.SWEEP_PLOT
    sections = [_section("Jobs", hint + table), _plots([plot] if plot.is_file() else [], "Sweep plot")]
    path = folder / rundir.REPORT_PAGE
    rundir.write_text(_page(f"shelltrain sweep: {folder.name}", sections), path)
    return path


def wanted_for_sweep(sweep_dir: Path) -> bool:
    """report.html for a sweep unless its config (Hydra's multirun.yaml) says report.html=false; a folder without
    one (shelltrain-summary --out) gets its page."""
    path = Path(sweep_dir) / rundir.SWEEP_CONFIG
    return not path.is_file() or OmegaConf.select(OmegaConf.load(path), "report.html") is not False


def _page(title: str, sections: Iterable[str]) -> str:
    return PAGE.substitute(title=html.escape(title), body="\n".join(s for s in sections if s))


def _section(heading: str, content: str) -> str:
    return f"<section><h2>{html.escape(heading)}</h2>\n{content}\n</section>" if content else ""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value:,}</td>'
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    css = f' class="status-{html.escape(text)}"' if text == "completed" else ""
    return f"<td{css}>{html.escape(text)}</td>"


def _pairs(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th>{_cell(v)}</tr>" for k, v in items)
    return f"<table>{rows}</table>" if rows else ""


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested sections as dotted keys (prune.before.params), lists of records left to _dict_section."""
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += _flat(value, f"{prefix}{key}.") if prefix else []
        elif not isinstance(value, list) or prefix:
            items.append((f"{prefix}{key}", value))
    return items


def _dict_section(name: str, value: Any) -> str:
    """A summary.json section (calibration, prune, compress, ensemble, cv, gates, ...): records as a table,
    anything else as dotted key/value rows."""
    heading = TITLES.get(name, name.replace("_", " ").capitalize())
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns = list(dict.fromkeys(k for v in value for k in v))
        return _section(heading, _table(columns, ([v.get(c, "") for c in columns] for v in value)))
    if isinstance(value, list):
        return _section(heading, _pairs((str(i), v) for i, v in enumerate(value)))
    return _section(heading, _pairs(_flat(value, f"{name}.")))


def _config(config: dict[str, Any]) -> str:
    """The job's resolved config, folded: long, and wanted less often than the figures."""
    text = yaml.safe_dump(config, sort_keys=False)
    fold = f"the job's resolved config ({text.count(chr(10))} lines)"
    return f"<details><summary>{html.escape(fold)}</summary><pre>{html.escape(text)}</pre></details>"


def _per_class(per_class: dict[str, dict[str, Any]] | None) -> str:
    if not per_class:
        return ""
    columns = list(dict.fromkeys(k for v in per_class.values() for k in v))
    rows = ([name, *(v.get(c, "") for c in columns)] for name, v in per_class.items())
    return _section("Per-class metrics", _table(["class", *columns], rows))


def _confused(pairs: list[dict[str, Any]] | None) -> str:
    if not pairs:
        return ""
    rows = ([p["true"], p["predicted"], p["count"]] for p in pairs)
    return _section("Most-confused class pairs", _table(["true", "predicted", "count"], rows))


def _plots(paths: Sequence[Path], heading: str = "Plots") -> str:
    figures = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"><figcaption>{html.escape(p.name)}</figcaption></figure>'
        for p in paths
    )
    return _section(heading, figures)


def _job_cell(folder: Path, value: str, is_run_dir: bool) -> str:
    """A sweep table cell; a job's run_dir links to its own report.html when it has one."""
    page = folder / value / rundir.REPORT_PAGE
    if is_run_dir and value and page.is_file():
        href = html.escape(f"{value}/{rundir.REPORT_PAGE}")
        return f'<td><a href="{href}">{html.escape(value)}</a></td>'
    try:
        float(value)
    except ValueError:
        return f"<td>{html.escape(value)}</td>"
    return f'<td class="num">{html.escape(value)}</td>'
