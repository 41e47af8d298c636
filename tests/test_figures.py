"""Figure grids and overlays as a reader sees them: nothing clipped, columns wrapped, near-zero saliency invisible."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from saliencylab.render import GridRow, overlay  # noqa: E402
from saliencylab.render.figures import grid_figure, saliency_grid  # noqa: E402
from saliencylab.render.maps import DEFAULT_CMAP, OPACITY_FLOOR, colorize, opacity  # noqa: E402

NAMES = ["vanilla", "gradient_x_input", "smoothgrad", "integrated_gradients", "gradcam", "gradcam_pp",
         "occlusion", "rise", "spectral_residual"]


def rows(n_images: int, h: int = 30, w: int = 40, signed: bool = False, n_maps: int = 1) -> list[GridRow]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_images):
        image = rng.random((h, w, 3))
        maps = [rng.uniform(-1 if signed else 0, 1, (h, w)) for _ in range(n_maps)]
        out.append(GridRow(image, f"motorcycle_left_{i}\nEgyptian cat 79.1%", maps))
    return out


def drawn_texts(fig) -> list[Text]:
    """The text artists the renderer draws: titles, and tick and axis labels of axes that are on."""
    texts = list(fig.texts)
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title]
        if ax.axison:
            texts += [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label]
    return texts


@pytest.mark.parametrize("n_methods", [1, 2, 9])
@pytest.mark.parametrize("signed", [False, True])
def test_every_label_lies_inside_the_figure(n_methods, signed):
    fig = grid_figure(rows(2, signed=signed, n_maps=n_methods), NAMES[:n_methods])
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        texts = [t for t in drawn_texts(fig) if t.get_visible() and t.get_text().strip()]
        labels = {t.get_text() for t in texts}
        assert "normalised saliency" in labels and NAMES[n_methods - 1] in labels
        assert ("-1" in "".join(labels) or "\u22121" in "".join(labels)) == signed  # a signed bar runs from -1
        for t in texts:
            box = t.get_window_extent(renderer)
            assert box.x0 >= -0.5 and box.y0 >= -0.5, (t.get_text(), box)
            assert box.x1 <= width + 0.5 and box.y1 <= height + 0.5, (t.get_text(), box, width, height)
        # every image keeps its aspect (30 x 40 pixels) and no panel is a sliver
        for im in fig.findobj(AxesImage):
            if im.axes.get_label() == "<colorbar>":
                continue
            box = im.axes.get_window_extent(renderer)
            assert box.height / box.width == pytest.approx(30 / 40, rel=0.02)
            assert box.width > 60
        # columns wrap at 4 methods: the figure is never a long strip
        assert 0.5 < width / height < 4.5
        assert width <= 100 * (2.2 * 5 + 1.0) + 1
    finally:
        plt.close(fig)


def test_nine_methods_wrap_onto_three_rows_per_image(tmp_path):
    fig = grid_figure(rows(1, n_maps=9), NAMES)
    try:
        shown = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
        assert len(shown) == 10  # the image and nine overlays
        spans = {(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in shown}
        assert max(r for r, _ in spans) == 2 and max(c for _, c in spans) == 4
    finally:
        plt.close(fig)
    saliency_grid(rows(1, n_maps=9), NAMES, tmp_path / "figure.png")
    from PIL import Image

    w, h = Image.open(tmp_path / "figure.png").size
    assert w / h < 2.5, (w, h)  # not a 2480x224 strip


def test_a_zero_map_leaves_the_image_as_it_is_and_the_peak_gets_full_alpha():
    rng = np.random.default_rng(1)
    img = (rng.random((6, 7, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(overlay(img, np.zeros((6, 7))), img)
    m = np.full((6, 7), OPACITY_FLOOR * 0.9)  # below the floor: still invisible
    np.testing.assert_array_equal(overlay(img, m), img)
    m[2, 3] = 1.0
    for alpha in (0.4, 1.0):
        out = overlay(img, m, alpha=alpha).astype(np.float64)
        heat = colorize(m)[2, 3].astype(np.float64)
        expected = img[2, 3] * (1 - alpha) + heat * alpha
        np.testing.assert_allclose(out[2, 3], expected, atol=1.0)
        np.testing.assert_array_equal(out[0, 0], img[0, 0])


def test_opacity_ramp_and_default_colour_map():
    m = np.array([-1.0, -0.55, 0.0, 0.05, 0.1, 0.55, 1.0])
    np.testing.assert_allclose(opacity(m, 0.8), [0.8, 0.4, 0, 0, 0, 0.4, 0.8], atol=1e-6)
    assert DEFAULT_CMAP == "inferno"
    inferno = matplotlib.colormaps["inferno"]([0.0, 1.0])[None, :, :3]
    np.testing.assert_array_equal(colorize(np.array([[0.0, 1.0]])), (inferno * 255 + 0.5).astype(np.uint8))
    c = colorize(np.array([[-1.0, 0.0, 1.0]]))  # signed maps stay on bwr
    assert c[0, 0, 2] > 200 and c[0, 2, 0] > 200 and (c[0, 1] > 240).all()
    img = np.full((1, 3), 0.5)
    out = overlay(img, np.array([[0.0, 0.5, 1.0]]), alpha=1.0, cmap="gray")  # --cmap and --alpha still apply
    np.testing.assert_array_equal(out[0, 2], 255)
    np.testing.assert_array_equal(out[0, 0], 128)


def _bar_colour(fig, value: float) -> np.ndarray:
    """The RGB the drawn figure shows at `value` on its colour bar (the pixel at the bar's centre line)."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float64)
    (bar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    x = bar.transAxes.transform((0.5, 0.0))[0]
    y = bar.transData.transform((0.0, value))[1]  # a vertical bar: values run along y
    return pixels[pixels.shape[0] - 1 - int(y), int(x)]


@pytest.mark.parametrize(("signed", "alpha", "values"), [(False, 0.7, [0.05, 0.3, 0.6, 0.95]),
                                                         (False, 0.4, [0.05, 0.95]),
                                                         (True, 0.7, [-0.95, -0.3, 0.05, 0.3, 0.95])])
def test_colour_bar_shows_each_value_as_the_overlay_draws_it(signed, alpha, values):
    """Low saliency fades out on the bar as on the image: the bar's colour at v is an overlay's pixel at v over the
    bar's gray, and never the full-opacity colour map (which would show low values stronger than any overlay)."""
    fig = grid_figure(rows(1, signed=signed, n_maps=2), NAMES[:2], alpha=alpha)
    try:
        for v in values:
            got = _bar_colour(fig, v)
            m = np.array([[v, -1.0]]) if signed else np.array([[v]])  # a map with a negative pixel is a signed map
            gray = np.full(m.shape, 0.5)  # the bar's background (render.maps.BAR_BACKGROUND)
            expected = overlay(gray, m, alpha=alpha)[0, 0].astype(np.float64)  # inferno, or bwr when signed
            np.testing.assert_allclose(got, expected, atol=6, err_msg=f"value {v}")
            if abs(v) < OPACITY_FLOOR:  # below the floor an overlay shows the image: the bar shows plain gray
                np.testing.assert_allclose(got, 128, atol=2)
    finally:
        plt.close(fig)
