"""Any `nn.Module` from Python, and `package.module:factory` from the command line."""

from __future__ import annotations

import importlib
import re

from torch import nn

from saliencylab.errors import UserError
from saliencylab.models._checkpoint import load_state_dict_file
from saliencylab.models._classifier import CamLayout, Classifier
from saliencylab.models._preprocess import Preprocessing
from saliencylab.models.formats._assemble import assemble

FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def from_module(net: nn.Module, given: Preprocessing, *, name: str = "module", weights: str | None = None,
                layout: CamLayout | None = None) -> Classifier:
    """Wrap a module that maps normalised x[B, C, H, W] to logits [B, K]; `weights` is a state-dict file."""
    if not isinstance(net, nn.Module):
        raise UserError(f"{name} gives a {type(net).__name__}, not a torch.nn.Module")
    source = "random"
    if weights is not None and weights != "random":
        load_state_dict_file(weights, net, name)
        source = str(weights)
    elif weights is None:
        source = "as built"
    cam_layer = getattr(net, "cam_layer", None)
    return assemble(net, source=name, name=name, fmt="module", declared=Preprocessing(), given=given,
                    weights=source, cam_layer=f"net.{cam_layer}" if isinstance(cam_layer, str) else None,
                    layout=layout)


def from_factory(spec: str, given: Preprocessing, weights: str | None) -> Classifier:
    """`package.module:factory`: import the module, call factory() (no arguments), load `weights` into it."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as err:
        raise UserError(f"--model {spec}: cannot import '{mod_name}' ({type(err).__name__}: {err}); check the "
                        "name and that its folder is on PYTHONPATH") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UserError(f"--model {spec}: '{mod_name}' has no callable '{attr}'")
    try:
        net = factory()
    except Exception as err:
        raise UserError(f"--model {spec}: {attr}() failed ({type(err).__name__}: {err}); it must build the "
                        "model with no arguments") from None
    return from_module(net, given, name=spec, weights=weights)
