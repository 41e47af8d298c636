"""Sanity checks by model randomisation (Adebayo et al. 2018, https://arxiv.org/abs/1810.03292).

A map that explains the model must change when the model's weights are destroyed. Layers are
re-initialised from the output down (cascading) or one at a time (independent), on a single copy of the
model, and the maps of the same images are compared with the original ones (Spearman rank correlation
of absolute and signed maps, SSIM). A method passes when, with every layer randomised, its maps are no
more similar to the originals than the original maps of two unrelated images are to each other (the line
Arun et al. 2021 drew, https://doi.org/10.1148/ryai.2021200267).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from saliencylab.metrics._common import choice
from saliencylab.metrics.similarity import spearman, ssim

MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
RandomisationMode = Literal["cascading", "independent"]
LayerOrder = Literal["top_down", "bottom_up"]
RANDOMISATION_MODES: tuple[str, ...] = ("cascading", "independent")
LAYER_ORDERS: tuple[str, ...] = ("top_down", "bottom_up")


def parameter_layers(model: nn.Module) -> list[str]:
    """Names of modules that own parameters, in definition order (input side first)."""
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def randomise(module: nn.Module, seed: int) -> None:
    """Re-initialise a module's own parameters (its `reset_parameters`, else a scaled normal), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
                nn.init.normal_(module.weight, 1.0, 0.5)  # BN's reset would make it an identity, not random
                nn.init.normal_(module.bias, 0.0, 0.5)
        else:
            with torch.no_grad():
                for p in module.parameters(recurse=False):
                    p.normal_(0, float(p.std()) if p.numel() > 1 else 0.1)


def _compare(orig: np.ndarray, new: np.ndarray) -> dict[str, float]:
    """Mean similarity over images of two stacks of maps (N, H, W), and the share of `new` maps that are
    constant ('constant_share': their similarities are NaN, undefined, and left out of the means)."""
    rows = [(spearman(np.abs(a), np.abs(b)), spearman(a, b), ssim(np.abs(a), np.abs(b))) for a, b in
            zip(orig, new, strict=True)]
    arr = np.array(rows, dtype=np.float64).reshape(-1, 3)

    def mean(col: np.ndarray) -> float:  # NaN (a constant map has no rank order) when no value is defined
        finite = col[np.isfinite(col)]
        return float(finite.mean()) if finite.size else math.nan

    constant = [bool(np.ptp(np.abs(np.asarray(b, np.float64))) == 0) for b in new]
    return {"spearman_abs": mean(arr[:, 0]), "spearman": mean(arr[:, 1]), "ssim": mean(arr[:, 2]),
            "constant_share": float(np.mean(constant)) if constant else math.nan}


def unrelated_baseline(maps: np.ndarray, max_pairs: int = 200) -> dict[str, float]:
    """Mean similarity of the maps of different images: the line a randomised model must get below."""
    pairs = list(itertools.combinations(range(len(maps)), 2))[:max_pairs]
    if not pairs:
        return {"spearman_abs": math.nan, "spearman": math.nan, "ssim": math.nan, "constant_share": math.nan}
    return _compare(np.stack([maps[i] for i, _ in pairs]), np.stack([maps[j] for _, j in pairs]))


def randomisation_check(model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: MapFn, *,
                        mode: RandomisationMode = "cascading", layers: list[str] | None = None, seed: int = 0,
                        progress: Callable[[str], None] | None = None,
                        order: LayerOrder = "top_down") -> dict[str, Any]:
    """Similarity of maps before and after randomising layers, per step, and the verdict.

    Args:
        x: (B, C, H, W) in [0, 1]; target: (B,).
        method: `(model, x, target) -> [B, H, W]` (bind the method's options first).
        mode: 'cascading' (cumulatively, in `order`) or 'independent' (one layer at a time).
        layers: module names to randomise (default: every module with parameters).
        order: 'top_down' (from the output layer down, as Adebayo et al.) or 'bottom_up' (from the input
            layer up, which Hedstrom et al. 2023 recommend).

    Returns:
        {'mode', 'order', 'steps': [{'layer', 'spearman_abs', 'spearman', 'ssim'}], 'baseline': similarity of
        unrelated images, 'passed': the last cascading step's SSIM below the baseline's, 'final': the last
        step's similarity, 'reason': why 'passed' is None (independent mode, one image, every SSIM undefined)
        or True without an SSIM (the randomised maps are all constant), else None}. Each step also has
        'constant_share', the share of its maps that are constant. The model is not modified (a deep copy
        is randomised; each method restores modes).
    """
    choice("randomisation_check", "mode", mode, RANDOMISATION_MODES)
    choice("randomisation_check", "order", order, LAYER_ORDERS)
    original = method(model, x, target).detach().float().cpu().numpy()
    names = layers or parameter_layers(model)
    work = copy.deepcopy(model)  # one copy, randomised step by step
    mods = dict(work.named_modules())
    steps = []
    sequence = list(reversed(names)) if order == "top_down" else list(names)
    for i, name in enumerate(sequence):
        saved = copy.deepcopy(mods[name].state_dict()) if mode == "independent" else None
        randomise(mods[name], seed + i)
        maps = method(work, x, target).detach().float().cpu().numpy()
        steps.append({"layer": name, **_compare(original, maps)})
        if saved is not None:
            mods[name].load_state_dict(saved)
        if progress:
            progress(name)
    baseline = unrelated_baseline(original)
    final = steps[-1] if steps else {}
    passed, reason = _verdict(mode, final, baseline)
    return {"mode": mode, "order": order, "steps": steps, "baseline": baseline, "final": final, "passed": passed,
            "reason": reason}


def _verdict(mode: str, final: dict[str, float], baseline: dict[str, float]) -> tuple[bool | None, str | None]:
    if mode != "cascading":
        return None, "only a cascading randomisation gives a verdict"
    if not final:
        return None, "the model has no layer with parameters"
    if math.isnan(baseline["ssim"]):
        return None, "no baseline: it needs two or more images with non-constant maps"
    if math.isnan(final["ssim"]):
        if final.get("constant_share") == 1.0:  # the originals are not all constant: the baseline is defined
            return True, ("the fully randomised model's maps are constant (e.g. all zero): no structure is "
                          "left to resemble the originals; SSIM itself is undefined (NaN)")
        return None, "SSIM is undefined for every image at the last step"
    return bool(final["ssim"] <= baseline["ssim"]), None

