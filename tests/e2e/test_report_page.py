"""report.html, per run and per sweep, loaded in a real browser: headless Chromium renders it, the DOM holds the
expected sections, the console has no script errors and the screenshot is a picture, not a blank page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import run_in_process

from shelltrain import report_page, sweep

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed: apt-get install -y chromium (.ci/run installs it)"
)
TINY = ["model=cnn", "model.width=8", "trainer.epochs=2", "trainer.limit_train_batches=6", "plots=true"]


def browse(page: Path, tmp_path: Path, *flags: str, fragment: str = "") -> subprocess.CompletedProcess:
    """Headless Chromium on `page` (a profile of its own, so parallel tests do not share one)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--enable-logging=stderr", "--v=0"]
    command += [f"--user-data-dir={tmp_path / 'chromium-profile'}", *flags, page.resolve().as_uri() + fragment]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Uncaught" not in result.stderr, result.stderr[-2000:]  # a script error on the page
    return result


def headings(dom: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", dom)


def assert_rendered(page: Path, tmp_path: Path) -> None:
    """A screenshot of the page with text, tables and plots on it: far more than a few colours."""
    from PIL import Image

    shot = tmp_path / "screenshot.png"
    browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000")
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, f"{shot}: {len(colours or [])} colours, a blank page?"


@needs_chromium
def test_a_run_writes_one_self_contained_report_page_that_renders(tmp_path):
    run = tmp_path / "run"
    summary = run_in_process(run, *TINY)
    page = run / "report.html"
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from the network
    plots = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert len(plots) >= 4 and text.count('src="data:image/png;base64,') == len(plots)  # every plot inlined
    dom = browse(page, tmp_path, "--dump-dom").stdout
    expected = ["Results", "Provenance", "Plots", "Per-class metrics", "Most-confused class pairs", "Data fingerprint"]
    assert headings(dom)[: len(expected)] == expected and "Model card" in headings(dom)
    assert f"{summary['test_acc']:.4g}" in dom and "model.width" not in dom and "width: 8" in dom  # the config
    assert_rendered(page, tmp_path)


def test_report_html_false_writes_no_page(tmp_path):
    run_in_process(tmp_path, *TINY, "plots=false", "report.html=false")
    assert (tmp_path / "summary.json").is_file() and not (tmp_path / "report.html").exists()


@needs_chromium
def test_the_page_shows_calibration_prune_and_compress_sections_where_a_run_has_them(tmp_path):
    summary = {
        "status": "completed",
        "test_acc": 0.75,
        "device": "cpu",
        "calibration": {"method": "temperature", "temperature": 1.7, "test_ece_before": 0.12, "test_ece_after": 0.03},
        "prune": {"method": "l1", "before": {"params": 1000}, "after": {"params": 400}},
        "compress": [{"model": "teacher", "test_acc": 0.8}, {"model": "student", "test_acc": 0.75}],
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = report_page.write_run_page(tmp_path, {"model": {"name": "cnn"}})
    dom = browse(page, tmp_path, "--dump-dom").stdout
    assert headings(dom) == ["Results", "Provenance", "Calibration", "Pruning", "Compression", "Configuration"]
    assert "prune.after.params" in dom and "student" in dom and "1.7" in dom


def _job(sweep_dir: Path, job: int, lr: str, score: float) -> None:
    run = sweep_dir / str(job)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra/overrides.yaml").write_text(yaml.safe_dump([f"optimizer.lr={lr}"]))
    (run / ".hydra/hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": job}}}))
    (run / ".hydra/config.yaml").write_text(yaml.safe_dump({"trainer": {"monitor": "val_acc"}, "plots": True}))
    (run / "plots").mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "completed", "best_val_acc": score, "test_acc": score}))


@needs_chromium
def test_a_sweep_page_holds_the_jobs_table_sortable_by_a_column_and_the_sweep_plot(tmp_path):
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"report": {"html": True}}))
    for job, (lr, score) in enumerate([("0.1", 0.5), ("0.01", 0.9), ("0.001", 0.7)]):
        _job(tmp_path, job, lr, score)
    assert sweep.main([str(tmp_path)]) == 0
    page = tmp_path / "report.html"
    assert page.read_text().count('src="data:image/png;base64,') == 1  # sweep.png, inlined
    dom = browse(page, tmp_path, "--dump-dom").stdout
    assert headings(dom) == ["Jobs", "Sweep plot"]
    assert _jobs_in_order(dom) == ["0", "1", "2"]  # as summary.csv lists them
    sorted_dom = browse(page, tmp_path, "--dump-dom", fragment="#sort=score").stdout  # the header's click handler
    assert _jobs_in_order(sorted_dom) == ["0", "2", "1"]  # ascending score: the script ran
    assert_rendered(page, tmp_path)


def test_a_sweep_with_report_html_false_writes_no_page(tmp_path):
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"report": {"html": False}}))
    _job(tmp_path, 0, "0.1", 0.5)
    assert sweep.main([str(tmp_path)]) == 0
    assert (tmp_path / "summary.csv").is_file() and not (tmp_path / "report.html").exists()


def _jobs_in_order(dom: str) -> list[str]:
    body = dom.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return re.findall(r"<tr><td[^>]*>(\d+)</td>", body)
