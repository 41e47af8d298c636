"""Normalisation, smoothing and overlays: values, edge cases and shape checks."""

from __future__ import annotations

import numpy as np
import pytest

from saliencylab.render import colorize, normalise, overlay, smooth


def test_normalise_modes_values():
    m = np.array([[-2.0, 0.0], [1.0, 4.0]])
    np.testing.assert_allclose(normalise(m, "absmax"), [[-0.5, 0.0], [0.25, 1.0]])
    np.testing.assert_allclose(normalise(m, "minmax"), [[0.0, 2 / 6], [3 / 6, 1.0]])
    big = np.zeros(1000)
    big[:990] = np.linspace(0, 1, 990)
    big[-1] = 1e6  # one extreme pixel does not flatten the rest
    p = normalise(big, "percentile", percentile=99)
    assert p[-1] == 1.0 and 0.4 < p[495] < 0.6


@pytest.mark.parametrize("mode", ["absmax", "minmax", "percentile"])
@pytest.mark.parametrize("value", [0.0, 3.0, np.nan])
def test_normalise_never_nan_on_constant_maps(mode, value):
    out = normalise(np.full((5, 5), value), mode)
    assert np.isfinite(out).all()


def test_smooth_preserves_mass_and_zero_sigma_is_identity():
    m = np.zeros((21, 21), dtype=np.float32)
    m[10, 10] = 1
    s = smooth(m, 2.0)
    assert abs(s.sum() - 1) < 1e-4 and s[10, 10] < 0.1 and s[10, 10] == s.max()
    np.testing.assert_array_equal(smooth(m, 0), m)


def test_overlay_checks_and_values():
    img = np.full((4, 5), 0.5)
    heat = np.zeros((4, 5))
    out = overlay(img, heat, alpha=0.8)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out, 128)  # a zero map leaves the image as it is
    heat[0, 0] = 1.0
    out = overlay(img, heat, alpha=1.0, cmap="gray")
    np.testing.assert_array_equal(out[0, 0], 255)
    with pytest.raises(ValueError, match="does not match"):
        overlay(img, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, heat, alpha=2)
    with pytest.raises(ValueError, match="expected an image"):
        overlay(np.zeros((4, 5, 2)), heat)


def test_colorize_signed_uses_diverging_centre():
    c = colorize(np.array([[-1.0, 0.0, 1.0]]))
    assert c[0, 0, 2] > c[0, 0, 0] and c[0, 2, 0] > c[0, 2, 2]  # blue for negative, red for positive
    assert (c[0, 1] > 240).all()  # white at zero (bwr)
