"""What the command line tells a user: help pages, the methods listing, class names by word, a closed pipe."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from saliencylab.cli import app
from saliencylab.errors import UserError
from saliencylab.methods import METHODS
from saliencylab.methods.targets import class_matches, resolve_target

runner = CliRunner()
def commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("width", ["80", "120"])
def test_help_pages_have_no_placeholders_or_cut_text(width):
    names = commands()
    assert {"classify", "explain", "phantoms", "methods", "audit"} <= set(names)
    for args in ([], *([n] for n in names)):
        res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": width, "TERMINAL_WIDTH": width})
        assert res.exit_code == 0, (args, res.output)
        text = res.output
        for bad in ("<bool>", "<list[str]>", "<str>", "<int", "<float", "<path>", "…"):
            assert bad not in text, (args, bad, text)
        assert not re.search(r"\{\w+\}", text), (args, text)  # typer's {out} for a required argument
        if args == ["explain"]:
            flat = re.sub(r"[\s│]+", "", text)  # the default, whole, however it wraps
            assert "[default:vanilla,smoothgrad,integrated_gradients,gradcam]" in flat
            assert "[INPUTS...]" in text and "INTEGER" in text
        if args == ["phantoms"]:
            assert "phantoms [OPTIONS] OUT" in text
        if args == []:
            assert "saliencylab[web]" in re.sub(r"[\s│]+", "", text)


def test_methods_listing_shows_defaults_and_allowed_values():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert "ALLOWED VALUES" in lines[1]
    for name, spec in METHODS.items():
        at = next(i for i, line in enumerate(lines) if line.startswith(name + " "))
        for k, d in spec.describe_options().items():
            row = next(line for line in lines[at + 1:] if line.split()[:1] == [k])
            assert repr(d["default"]) in row and d["expects"] in row
            for choice in d["choices"]:
                assert choice in row
    assert re.search(r"rule +'gausslegendre' +one of gausslegendre, riemann_left", res.output)
    assert re.search(r"p_keep +0.5 +a number in \(0, 1\]", res.output)
    data = json.loads(runner.invoke(app, ["methods", "--json"]).output)
    assert data["rise"]["allowed"]["p_keep"] == "a number in (0, 1]" and data["rise"]["options"]["n_masks"] == 1000


@pytest.fixture(scope="module")
def imagenet() -> list[str]:
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def test_target_matches_words_of_class_names(imagenet):
    cats = [imagenet[i] for i in class_matches("cat", imagenet)]
    assert {"tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"} <= set(cats)
    assert not {"crate", "oxcart", "castle"} & set(cats)
    model, x = torch.nn.Flatten(), torch.zeros(2, 3)
    with pytest.raises(UserError) as err:  # several classes hold the word: never one of them silently
        resolve_target(model, x, "cat", imagenet)
    msg = str(err.value)
    assert "matches" in msg and "'Egyptian cat' (285)" in msg and "'tiger cat' (282)" in msg and "crate" not in msg
    assert resolve_target(model, x, "egyptian", imagenet).tolist() == [285, 285]  # one class: resolved
    assert resolve_target(model, x, "Tabby", imagenet).tolist() == [281, 281]  # an exact name, any case
    assert imagenet[int(resolve_target(model, x, "espresso", imagenet)[0])] == "espresso"
    with pytest.raises(UserError, match="Did you mean 'Egyptian cat'"):
        resolve_target(model, x, "egyptian kat", imagenet)


def test_a_closed_pipe_ends_quietly():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath("src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "saliencylab.cli", "methods", "--json"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first write: the write fails with EPIPE every time
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == "", err  # as `saliencylab methods --json | head -1` when head has left
