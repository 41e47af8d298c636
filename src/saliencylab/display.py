"""Display defaults shared by the renderer, the CLI, the workbench and the convergence checks.

No imports on purpose: the CLI reads these while it builds its options, before `runtime.configure` has set
the thread variables that numpy's BLAS and torch read when they load.
"""

DEFAULT_ALPHA = 0.7
"""Overlay opacity at the map's peak: the one default of the renderer, the CLI's --alpha, the API and the page."""
DEFAULT_SMOOTH = 0.01
"""Display smoothing: Gaussian sigma as a fraction of the map's longer side (CLI --smooth; convergence checks compare
sampled maps at this smoothing, as they are drawn)."""
