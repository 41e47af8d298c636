"""The report's sentence on the saliency inside the lungs says what the audit's verdict says, never the opposite.

`tests/fixtures/audit_lungs.json` is the audit.json of `saliencylab demo --quick`'s shortcut model (its test split,
16 phantoms), cut to two methods; each test sets the lung numbers and verdicts it needs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from saliencylab.report.writer import write_report
from saliencylab.studies import verdicts

FIXTURE = Path(__file__).parent / "fixtures" / "audit_lungs.json"


def _verdict(word: str, difference: float, low: float, high: float, images: int) -> dict:
    return {"verdict": word, "difference": difference, "low": low, "high": high, "images": images,
            "min_effect": verdicts.MIN_EFFECT["lungs"], "better": "higher"}


def _report(folder: Path, audit: dict) -> str:
    folder.mkdir()
    (folder / "audit.json").write_text(json.dumps(audit))
    return write_report(folder).read_text()


def _sentence(html: str, method: str) -> str:
    (text,) = re.findall(rf"<li><strong>{method}</strong>: (.*?)\.</li>", html)
    return text


def _table_word(html: str, method: str) -> str:
    """The lungs verdict in the audit's table row of `method` (the first table's row)."""
    return re.search(rf'<tr data-method="{method}">.*?data-verdict="lungs">([^<]+)<', html, re.S).group(1)


def _audit() -> dict:
    """The fixture with numbers where the ratio's words and the verdict disagree.

    vanilla: 62.4% inside lungs that cover 24% (2.6x: 'well above chance' by the ratio), but the per-image
    differences spread so wide that the interval holds 0: the audit says at chance. gradcam: 30% inside lungs
    that cover 36% (0.83x: 'below chance' by the ratio) on 4 images: the audit says too few images.
    """
    a = json.loads(FIXTURE.read_text())
    v, g = a["methods"]["vanilla"], a["methods"]["gradcam"]
    v.update(lung_mass=0.624, lung_share=0.24)
    v["verdicts"]["lungs"] = _verdict(verdicts.CHANCE, 0.384, -0.05, 0.71, 16)
    g.update(lung_mass=0.30, lung_share=0.36)
    g["verdicts"]["lungs"] = _verdict(verdicts.FEW, -0.06, -0.2, 0.08, 4)
    return a


def test_lung_sentence_follows_the_audits_verdict_not_the_ratio(tmp_path):
    html = _report(tmp_path / "audit", _audit())
    vanilla, gradcam = _sentence(html, "vanilla"), _sentence(html, "gradcam")
    assert _table_word(html, "vanilla") == verdicts.CHANCE and _table_word(html, "gradcam") == verdicts.FEW
    assert vanilla == ("62% of the saliency falls inside the lungs, which cover 24% of the image (2.6x their share): "
                       "at chance, the audit's verdict (per-image difference to their share +0.384, 95% interval "
                       "-0.050 to +0.710, 16 images)")
    assert gradcam == ("30% of the saliency falls inside the lungs, which cover 36% of the image (0.8x their share): "
                       "too few images to judge (4; the audit needs 6)")
    for text in (vanilla, gradcam):
        assert not re.search(r"(well |barely )?above chance|below chance", text), text


def test_an_audit_without_verdicts_keeps_the_ratio_wording(tmp_path):
    a = _audit()
    for s in a["methods"].values():
        del s["verdicts"]  # audit.json files written before verdicts existed
    html = _report(tmp_path / "old", a)
    assert _sentence(html, "vanilla").endswith("of the image: well above chance (2.6x)")
    assert _sentence(html, "gradcam").endswith("of the image: below chance (0.8x)")
