"""The README and CI stay true: the methods table lists the registry, CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

from saliencylab.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_readme_methods_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Methods", 1)[1].split("\n\n", 2)[1]
    names = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert names == list(METHODS)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert len(blocks) >= 2 and "saliencylab" in blocks[0]
    assert blocks[1].strip() in (ROOT / ".ci" / "run").read_text()
