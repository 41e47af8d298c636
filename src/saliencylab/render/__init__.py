"""Rendering, kept apart from computing: normalise, smooth, colour, overlay, figure grids."""

from saliencylab.render.figures import GridRow, saliency_grid, save_figure
from saliencylab.render.maps import NORMALISE_MODES, colorize, normalise, overlay, smooth, to_uint8

__all__ = ["NORMALISE_MODES", "GridRow", "colorize", "normalise", "overlay", "saliency_grid", "save_figure", "smooth",
           "to_uint8"]
