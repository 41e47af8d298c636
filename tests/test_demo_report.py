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
                                                    '[data-metric="lung_mass"]')
        assert mass.text == f"{100 * audit['methods']['vanilla']['lung_mass']:.0f}%"
        flips = browser.find_element("css selector", 'span[data-metric="marker_flips"][data-run="shortcut"]')
        assert flips.text == str(audit["probes"]["marker_swap"]["flips"])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        browser.quit()


DEMO_ONLY = ("the article's two studies", '"shortcut" phantoms carry', "Study 1", "Study 2")


def test_report_text_follows_the_folder_kind(demo):
    """Demo, run, audit and evaluate folders: each report has its own lead and only the sections its data
    supports; the headline box speaks in sentences with chance levels, never raw keys."""
    html = (demo / "report.html").read_text()
    assert 'data-kind="demo"' in html and "the article's two studies" in html and 'id="study1"' in html
    assert "spectral residual is model-free" in html  # the demo runs it
    box = html.split('id="headline"', 1)[1].split("</div>", 1)[0]
    assert "marker_mass" not in box and "lung_mass" not in box and "of the saliency on the marker, which covers" in box
    assert "images flagged for saliency on the marker or outside the lungs beyond chance" in box
    for run in ("shortcut", "clean"):  # both models' flags appear, with their rule
        assert f'data-flags="{run}"' in html and f'data-summary="{run}"' in html
    for verdict in ("faithfulness", "lungs", "marker", "stability"):
        assert f'data-verdict="{verdict}"' in html
    assert "deletion &darr;" in html and "insertion &uarr;" in html and 'class="scroll"' in html
    runs = demo / "runs"
    expect = {runs / "shortcut": ("run", True, True), runs / "shortcut" / "audit": ("audit", False, True),
              runs / "shortcut" / "eval": ("evaluate", True, False)}
    for folder, (kind, has_eval, has_audit) in expect.items():
        res = runner.invoke(app, ["report", str(folder)])
        assert res.exit_code == 0, res.output
        page = (folder / "report.html").read_text()
        assert f'data-kind="{kind}"' in page, kind
        assert ('id="cxr"' in page) == has_eval and ('id="audit"' in page) == has_audit, kind
        assert ("Figure 3" in page) == has_eval, kind
        for text in DEMO_ONLY:
            assert text not in page, (kind, text)
        assert "synthetic chest X-ray phantoms" in page or kind == "audit"  # the data are phantoms: said once
        assert 'id="figure2"' not in page and 'id="explain"' not in page


def test_figure3_titles_say_label_and_prediction(demo):
    from saliencylab.studies.cxr import figure_3  # noqa: F401  (the titles are drawn there)

    metrics = json.loads((demo / "runs/shortcut/eval/metrics.json").read_text())
    assert metrics["figure3"]["images"], "the quick demo's Figure 3 shows images"
    html = (demo / "report.html").read_text()
    assert 'figure 3 for shortcut eval' in html and 'gives the true class ("label")' in html
    src = (ROOT / "src/saliencylab/studies/cxr.py").read_text()
    assert 'f"{Path(rec.file).name}\\nlabel {name}, predicted {probs[i]:.2f}"' in src


def test_audit_report_at_900_px(demo):
    """In a 900 px window the page never scrolls sideways (the audit tables scroll in their own box), audit
    figures show at their drawn size (text >= 9 pt as drawn at 100 dpi), and print keeps figures whole."""
    html = (demo / "report.html").read_text()
    assert "figure, img, table, .box { break-inside: avoid; }" in html
    browser = headless_chromium(window="900,1000")
    try:
        browser.get((demo / "report.html").as_uri())
        page = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth];")
        assert page[0] <= page[1], page
        boxes = browser.execute_script(
            "return Array.from(document.querySelectorAll('div.scroll')).map(d => "
            "[d.getBoundingClientRect().right, d.scrollWidth, d.clientWidth]);")
        assert boxes and all(right <= page[1] for right, _, _ in boxes), boxes
        assert any(sw > cw for _, sw, cw in boxes), "the wide audit table scrolls inside its box"
        figs = browser.execute_script(
            "return Array.from(document.querySelectorAll('figure.audit-fig img')).map(i => "
            "[i.alt, i.naturalWidth, i.getBoundingClientRect().width]);")
        assert len(figs) >= 4, figs  # localisation, sanity (per model) and the flagged images
        for alt, natural, shown in figs:
            assert natural <= 860 and abs(shown - natural) <= 2, (alt, natural, shown)  # 2: the 1 px borders
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        audit = browser.find_element("id", "audit")
        browser.execute_script("arguments[0].scrollIntoView();", audit)
        assert browser.save_screenshot(str(ARTIFACTS / "audit-900px.png"))
        flags = browser.find_element("css selector", '[data-flags="shortcut"]')
        browser.execute_script("arguments[0].scrollIntoView();", flags)
        assert browser.save_screenshot(str(ARTIFACTS / "audit-flags-900px.png"))
    finally:
        browser.quit()
