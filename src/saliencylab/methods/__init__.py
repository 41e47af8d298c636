"""Attribution methods, one module per family, each a plain function registered by name.

Contract: `method(model, x[B, C, *spatial], target[B], **options) -> Tensor[B, *spatial]`, raw (not
normalised), on x's device, leaving the model (mode, hooks, parameter gradients) and x untouched.
"""

# isort: off  (registration order is the order users see: gradient methods first)
from saliencylab.methods import cam, gradient, perturbation, spectral  # noqa: F401  (registers the methods)

# isort: on
from saliencylab.methods.gradient import completeness_error, make_baseline
from saliencylab.methods.registry import METHODS, MethodSpec, get_method, parse_methods, register_method
from saliencylab.methods.targets import resolve_target

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
