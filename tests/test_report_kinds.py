"""The report's text follows the folder it is written for: an explain folder's report carries no word of the
demo's two studies, phantoms or a spectral residual that was not run; its sections appear only with their data.
(The demo, run, audit and evaluate folders are checked on the demo in test_demo_report.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from saliencylab.cli import app

runner = CliRunner()
DEMO_TEXT = ("the article's two studies", "Study 1", "Study 2", "phantoms", "Phantoms are not patients",
             '"shortcut" phantoms carry')


def _explain(tmp_path, methods: str):
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"p{i}.png")
    out = tmp_path / f"ex-{methods.replace(',', '-')}"
    res = runner.invoke(app, ["explain", *[str(tmp_path / f"p{i}.png") for i in range(2)], "--model",
                              "torchvision:squeezenet1_1", "--weights", "random", "--methods", methods,
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    return (out / "report.html").read_text()


@pytest.mark.parametrize("methods", ["vanilla", "vanilla,spectral_residual"])
def test_explain_folder_report_has_its_own_text(tmp_path, methods):
    html = _explain(tmp_path, methods)
    assert 'data-kind="explain"' in html and 'id="explain"' in html and 'id="figure2"' in html
    assert "the saliency maps of 2 images" in html and "squeezenet1_1" in html
    for text in DEMO_TEXT:
        assert text not in html, text
    for section in ('id="study1"', 'id="cxr"', 'id="audit"', 'id="headline"', "Figure 3", "lungs blacked out"):
        assert section not in html, section
    assert ("spectral residual is model-free" in html) == ("spectral_residual" in methods)
    assert "run <code>saliencylab audit</code> on this" in html  # nothing measured trust yet: say how
