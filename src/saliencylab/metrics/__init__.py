"""Metrics: classification (with confidence intervals) and explanation checks, one module per family:
localisation (mass, pointing game, rank accuracy, mask AUROC, Otsu IoU), faithfulness (deletion/insertion,
ROAD, faithfulness correlation), complexity (sparseness, entropy), sanity (model randomisation: MPRT, sMPRT,
eMPRT, Random Logit), stability (noise, shift, max-sensitivity), similarity of maps, and shortcut probes.

Undefined cases give NaN with an `UndefinedMetric` warning that says why; bad options raise
`MetricOptionError` (a ValueError and a UserError) naming the option and its allowed values."""

from saliencylab.metrics._common import MetricOptionError, UndefinedMetric

__all__ = ["MetricOptionError", "UndefinedMetric"]
