"""The article's path in its own framework: a Keras Sequential CNN trained with Keras (torch backend) on
phantoms, then `saliencylab audit --model model.keras --data phantoms/` finds the marker shortcut.

The phantoms carry the "L" marker on every COVID-like film and no normal one, with lesions switched off, so
the marker is the only thing that separates the classes: a model that learns the task learns the shortcut,
and the audit must say so (the marker-swap probe flips its decisions; its saliency sits on the marker far
above the marker's share of the image).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from saliencylab.cli import app

if importlib.util.find_spec("keras") is None:  # not importorskip: that would import it on the default backend
    pytest.skip("needs the keras extra", allow_module_level=True)

SIZE = 64


@pytest.fixture(scope="module")
def marker_only_phantoms(tmp_path_factory):
    from saliencylab.data.phantoms import PhantomConfig, generate

    root = tmp_path_factory.mktemp("keras-article") / "phantoms"
    generate(PhantomConfig(n_covid=40, n_normal=40, size=SIZE, seed=3, lesion_scale=0.0, workers=1,
                           marker_rate={"COVID": 1.0, "Normal": 0.0}), root, progress=False)
    return root


def _load(root):
    xs, ys = [], []
    for label, cls in enumerate(("Normal", "COVID")):
        for path in sorted((root / cls / "images").glob("*.png")):
            xs.append(np.asarray(Image.open(path).convert("L"), dtype=np.float32)[..., None])
            ys.append(label)
    return np.stack(xs), np.array(ys, dtype=np.float32)


@pytest.mark.slow
def test_keras_model_trained_on_phantoms_is_audited_and_the_marker_found(marker_only_phantoms, tmp_path):
    from saliencylab.models.formats.keras import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(0)
    x, y = _load(marker_only_phantoms)
    model = keras.Sequential([  # the article's shape: conv/pool blocks, dense, dropout, one sigmoid output
        keras.Input((SIZE, SIZE, 1)), keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(8, 3, activation="relu", padding="same"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu", padding="same"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu", padding="same"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu", padding="same"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.2),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="binary_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=25, batch_size=16, shuffle=True, verbose=0)
    assert history.history["accuracy"][-1] >= 0.9, history.history["accuracy"]  # it learnt the task
    path = tmp_path / "article.keras"
    model.save(path)

    out = tmp_path / "audit"
    res = CliRunner().invoke(app, ["audit", "--model", str(path), "--data", str(marker_only_phantoms),
                                   "--classes", "Normal,COVID", "--methods", "vanilla", "--n", "40",
                                   "--sanity-images", "2", "--faithfulness-images", "2", "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    audit = json.loads((out / "audit.json").read_text())
    assert audit["kind"] == "model" and audit["images"] == 40
    swap = audit["probes"]["marker_swap"]
    assert swap["flips"] >= 0.5 * swap["images"], swap  # adding or removing the marker decides the class
    vanilla = audit["methods"]["vanilla"]
    assert vanilla["marker_mass"] > 3 * vanilla["marker_share"], vanilla  # saliency piles up on the marker
