"""`saliencylab demo --quick` end to end, its reuse and interruption, and the report in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import headless_chromium
from saliencylab.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SALIENCYLAB_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    res = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and len([ln for ln in res.output.splitlines() if ln.startswith("  ")]) == 3
    return out


def test_demo_writes_every_stage(demo):
    for rel in ("study1/classify.json", "study1/explain/figure.png", "runs/shortcut/best.pt", "runs/clean/best.pt",
                "runs/shortcut/eval/metrics.json", "runs/shortcut/eval-clean/metrics.json",
                "runs/clean/eval/metrics.json", "runs/shortcut/audit/audit.json", "runs/clean/audit/audit.json",
                "report.html", "report_numbers.json"):
        assert (demo / rel).is_file(), rel
    top = json.loads((demo / "study1/classify.json").read_text())["images"]
    assert top[1]["top"][0]["class"] == "espresso"
    stages = json.loads((demo / "demo.json").read_text())["stages"]
    assert len(stages) == 11 and not any(s["reused"] for s in stages)


def test_demo_report_shows_the_phantoms_beside_the_real_data(demo):
    """With the [anatomy] extra (in the test extra), the demo draws the phantoms beside the real lung outlines and
    opacity boxes, and the report embeds that figure in study 2; without it, neither appears."""
    from saliencylab.data import anatomy

    html = (demo / "report.html").read_text()
    if anatomy.available():
        assert (demo / "phantoms_vs_real.png").is_file() and 'id="phantoms-vs-real"' in html
        assert "data:image/png;base64," in html.split('id="phantoms-vs-real"', 1)[1][:200]
    else:
        assert not (demo / "phantoms_vs_real.png").exists() and 'id="phantoms-vs-real"' not in html


def test_demo_rerun_reuses_and_interrupted_demo_finishes(demo, tmp_path, monkeypatch):
    res = runner.invoke(app, ["demo", "--quick", "--out", str(demo)])
    assert res.exit_code == 0 and res.output.count("reused") == 11

    copy = tmp_path / "demo"
    shutil.copytree(demo, copy)
    for marker in ("audit: shortcut model", "audit: clean model"):
        (copy / ".done" / marker).unlink()
    import saliencylab.studies.audit as audit_mod

    real = audit_mod.audit
    monkeypatch.setattr(audit_mod, "audit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    res = runner.invoke(app, ["demo", "--quick", "--out", str(copy)])
    assert res.exit_code == 130 and "interrupted" in res.stderr
    monkeypatch.setattr(audit_mod, "audit", real)
    res = runner.invoke(app, ["demo", "--quick", "--out", str(copy)])
    assert res.exit_code == 0, res.output
    assert res.output.count("reused") == 9 and (copy / "report.html").is_file()
    assert not list(copy.rglob("*.tmp*"))  # no half-written file anywhere
    for path in copy.rglob("*.json"):
        json.loads(path.read_text())


def test_report_command_on_a_single_run(demo):
    res = runner.invoke(app, ["report", str(demo / "runs" / "clean")])
    assert res.exit_code == 0, res.output
    html = (demo / "runs" / "clean" / "report.html").read_text()
    assert 'id="audit"' in html and 'id="study1"' not in html
    res = runner.invoke(app, ["report", str(demo / "data")])
    assert res.exit_code == 2 and "nothing to report" in res.stderr


def test_report_in_a_real_browser(demo, tmp_path):
    html = (demo / "report.html").read_text()
    assert not re.search(r'(?:src|href)\s*=\s*"(?:https?:)?//', html)  # nothing to fetch from anywhere
    assert "<script" not in html
    browser = headless_chromium(window="1200,3000")
    try:
        browser.get((demo / "report.html").as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
        assert len(images) >= 10 and all(done and width > 0 for _, done, width in images), images
        requests = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name);")
        assert [r for r in requests if not r.startswith(("data:", "file:"))] == []
        for section in ("table1", "figure2", "cxr", "audit", "limitations", "reproducibility"):
            assert browser.find_elements("id", section), section
        metrics = json.loads((demo / "runs/shortcut/eval/metrics.json").read_text())
        cell = browser.find_element("css selector", 'table[data-run="shortcut"][data-eval="eval"] '
                                                    'td[data-metric="balanced_accuracy"]')
        assert cell.text == f"{metrics['balanced_accuracy']['value']:.3f}"
        audit = json.loads((demo / "runs/shortcut/audit/audit.json").read_text())
        mass = browser.find_element("css selector", 'table[data-audit="shortcut"] tr[data-method="vanilla"] '
                                                    'td[data-metric="lung_mass"]')
        assert mass.text == f"{100 * audit['methods']['vanilla']['lung_mass']:.0f}%"
        flips = browser.find_element("css selector", 'span[data-metric="marker_flips"][data-run="shortcut"]')
        assert flips.text == str(audit["probes"]["marker_swap"]["flips"])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        browser.quit()
