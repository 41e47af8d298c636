"""Attribution methods, one module per family, each a plain function registered by name.

Contract: `method(model, x[B, C, *spatial], target[B], **options) -> Tensor[B, *spatial]`, raw (not
normalised), on x's device, leaving the model (mode, hooks, parameter gradients) and x untouched.
"""

from saliencylab.methods import attention, cam, gradient, perturbation, spectral  # noqa: F401  (registers them)
from saliencylab.methods.gradient import completeness_error, make_baseline
from saliencylab.methods.registry import METHODS, MethodSpec, get_method, parse_methods, register_method
from saliencylab.methods.targets import resolve_target

# users see the methods family by family, gradient methods first, whatever the import order
_FAMILIES = ("gradient", "cam", "attention", "perturbation", "model-free")
_ordered = sorted(METHODS.items(), key=lambda item: _FAMILIES.index(item[1].family))
METHODS.clear()
METHODS.update(_ordered)

__all__ = [
    "METHODS",
    "MethodSpec",
    "completeness_error",
    "get_method",
    "make_baseline",
    "parse_methods",
    "register_method",
    "resolve_target",
]
