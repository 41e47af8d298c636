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

from saliencylab.metrics._common import MetricOptionError, at_least, choice, undefined
from saliencylab.metrics.similarity import spearman, ssim

MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
RandomisationMode = Literal["cascading", "independent"]
LayerOrder = Literal["top_down", "bottom_up"]
RANDOMISATION_MODES: tuple[str, ...] = ("cascading", "independent")
LAYER_ORDERS: tuple[str, ...] = ("top_down", "bottom_up")


def parameter_layers(model: nn.Module) -> list[str]:
    """Names of modules that own parameters, in definition order (input side first)."""
    # floating-point parameters only: an integer state held as a parameter (a Keras layer's seed) is no weight
    return [name for name, m in model.named_modules()
            if any(p.is_floating_point() for p in m.parameters(recurse=False))]


def randomise(module: nn.Module, seed: int) -> None:
    """Re-initialise a module's own parameters (its `reset_parameters`, else a scaled normal), seeded.

    The draws come from the CPU generator (the module is moved to the CPU for them and back), so a seed
    gives the same weights on every device; the global random state is left as it was.
    """
    from saliencylab.devices import module_device

    device = module_device(module)
    if device.type != "cpu":
        module.to("cpu")
    try:
        _reset(module, seed)
    finally:
        if device.type != "cpu":
            module.to(device)


def _reset(module: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's global state is untouched
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
                nn.init.normal_(module.weight, 1.0, 0.5)  # BN's reset would make it an identity, not random
                nn.init.normal_(module.bias, 0.0, 0.5)
        else:
            with torch.no_grad():
                for p in module.parameters(recurse=False):
                    if p.is_floating_point():
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


Similarity = Literal["ssim", "spearman"]
SIMILARITIES: tuple[str, ...] = ("ssim", "spearman")


def _same(a: np.ndarray, b: np.ndarray, rtol: float = 1e-5) -> bool:
    """Equal up to float32 rounding, relative to the maps' scale (all-zero maps are equal)."""
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    return bool(np.abs(a - b).max(initial=0.0) <= rtol * scale)


def random_logit(model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: MapFn, *,
                 other: torch.Tensor | None = None, similarity: Similarity = "ssim", seed: int = 0,
                 maps: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Random Logit (Sixt, Granz & Landgraf 2020, https://arxiv.org/abs/1912.09818): how similar is the map
    for the target class to the map for another class? A map that explains the decision should differ.

    For a single-logit binary model the other class is the logit's negation (target 0 <-> 1): methods that
    discard the gradient's sign (vanilla, SmoothGrad: |gradient|) then give identical maps for both classes,
    and signed ones give the exact negation. Both cases are detected and reported (`identical`, `negated`,
    `reason`), so a report can say the check cannot tell the classes apart, rather than print a similarity.

    Args:
        x: (B, C, H, W) in [0, 1]; target: (B,).
        method: `(model, x, target) -> [B, H, W]`.
        other: (B,) classes to compare with; default: for one logit, the other class; else a class drawn
            uniformly among the K - 1 non-target ones, from a generator seeded with `seed` (image by image).
        similarity: 'ssim' (as Sixt et al.) or 'spearman'.
        maps: (B, H, W) maps for `target` when already computed.

    Returns:
        One dict per image: {'target', 'other', 'similarity' (in [-1, 1]; lower is better; NaN with an
        `UndefinedMetric` warning when a map is constant), 'identical', 'negated', 'single_logit', 'reason'
        (None unless identical or negated)}. No chance level: compare with the similarity of maps of
        unrelated images (`unrelated_baseline`).
    """
    from saliencylab.methods._common import eval_mode

    choice("random_logit", "similarity", similarity, SIMILARITIES)
    with eval_mode(model), torch.inference_mode():
        k = int(model(x[:1]).shape[1])
    t = target.detach().cpu().long().reshape(-1)
    if other is None:
        if k == 1:
            other = 1 - t
        else:
            rng = np.random.default_rng(seed)
            draw = torch.from_numpy(rng.integers(0, k - 1, size=len(t)))
            other = draw + (draw >= t).long()  # skip the target class
    other = other.detach().cpu().long().reshape(-1)
    if (other == t).any():
        raise MetricOptionError("random_logit: other must differ from target for every image")
    a = (maps if maps is not None else method(model, x, target)).detach().double().cpu().numpy()
    b = method(model, x, other.to(target.device)).detach().double().cpu().numpy()
    sim = ssim if similarity == "ssim" else spearman
    rows = []
    for i in range(len(a)):
        identical = _same(a[i], b[i])
        negated = not identical and _same(a[i], -b[i])
        reason = None
        if identical:
            reason = (f"the maps for class {int(t[i])} and class {int(other[i])} are identical"
                      + (": the model has one logit and the method discards the gradient's sign, so it cannot "
                         "tell the classes apart" if k == 1 else ""))
        elif negated:
            reason = (f"the map for class {int(other[i])} is the negation of the map for class {int(t[i])}"
                      + (" (one logit: the classes differ only in sign)" if k == 1 else ""))
        rows.append({"target": int(t[i]), "other": int(other[i]), "similarity": sim(a[i], b[i]),
                     "identical": identical, "negated": negated, "single_logit": k == 1, "reason": reason})
    return rows


def smoothed(method: MapFn, *, n_noisy: int = 16, noise: float = 0.1, seed: int = 0) -> MapFn:
    """`method` averaged over `n_noisy` copies of the input with Gaussian noise of std `noise` (pixel units),
    the same seeded noise on every call: the denoising step of sMPRT (Hedstrom et al. 2023)."""
    at_least("smoothed", "n_noisy", n_noisy, 1)
    at_least("smoothed", "noise", noise, 0.0)

    def fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        total = None
        for _ in range(n_noisy):
            eps = torch.randn(x.shape, generator=gen).to(x) * noise
            m = method(model, x + eps, target).detach()
            total = m if total is None else total + m
        return total / n_noisy

    return fn


def smooth_mprt(model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: MapFn, *, n_noisy: int = 16,
                noise: float = 0.1, mode: RandomisationMode = "cascading", order: LayerOrder = "bottom_up",
                layers: list[str] | None = None, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """sMPRT, the smoothed model parameter randomisation test (Hedstrom et al. 2023, "Sanity checks
    revisited", https://arxiv.org/abs/2401.06465): `randomisation_check` on maps averaged over `n_noisy`
    noisy copies of each image (the same noise before and after randomisation), so that the methods' own
    noise does not pass for a change. Layers go bottom-up by default, as the paper recommends.

    Returns:
        `randomisation_check`'s dict (steps, baseline, final, passed, reason) plus 'n_noisy' and 'noise'.
        With n_noisy=1 and noise=0 it equals `randomisation_check`.
    """
    res = randomisation_check(model, x, target, smoothed(method, n_noisy=n_noisy, noise=noise, seed=seed),
                              mode=mode, order=order, layers=layers, seed=seed, progress=progress)
    return res | {"n_noisy": n_noisy, "noise": noise}


Complexity = Literal["histogram", "entropy"]
COMPLEXITIES: tuple[str, ...] = ("histogram", "entropy")


def efficient_mprt(model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: MapFn, *,
                   complexity: Complexity = "histogram", n_bins: int = 100, layers: list[str] | None = None,
                   seed: int = 0, maps: torch.Tensor | None = None) -> dict[str, Any]:
    """eMPRT, the efficient model parameter randomisation test (Hedstrom et al. 2023,
    https://arxiv.org/abs/2401.06465): randomise every layer at once (on a deep copy) and measure the
    relative rise in each map's complexity, (C_random - C_original) / C_original. A map that explains the
    model turns to noise, whose complexity is higher; a map that ignores the model (an edge detector) does
    not change: rise 0.

    Args:
        x: (B, C, H, W); target: (B,); method: `(model, x, target) -> [B, H, W]`.
        complexity: 'histogram' (the paper's discrete entropy of `n_bins` value bins,
            `complexity.histogram_entropy`) or 'entropy' (Bhatt et al.'s entropy of |map| / sum,
            `complexity.complexity`).
        layers: module names to randomise (default: every module with parameters).
        maps: (B, H, W) maps of the original model when already computed.

    Returns:
        {'original', 'randomised', 'rise': per-image lists; 'mean_rise': the mean of the defined rises}.
        Higher is better; 0 is the line of a map that ignores the parameters. A rise is NaN (with an
        `UndefinedMetric` warning) when the original map's complexity is 0 (e.g. a constant map) or a map
        is non-finite. The model is not modified.
    """
    from saliencylab.metrics.complexity import complexity as bhatt
    from saliencylab.metrics.complexity import histogram_entropy

    choice("efficient_mprt", "complexity", complexity, COMPLEXITIES)
    at_least("efficient_mprt", "n_bins", n_bins, 2)

    def measure(m: np.ndarray) -> float:
        return histogram_entropy(m, n_bins=n_bins) if complexity == "histogram" else bhatt(m)

    original = (maps if maps is not None else method(model, x, target)).detach().double().cpu().numpy()
    work = copy.deepcopy(model)
    mods = dict(work.named_modules())
    for i, name in enumerate(reversed(layers or parameter_layers(model))):
        randomise(mods[name], seed + i)
    randomised = method(work, x, target).detach().double().cpu().numpy()
    before = [measure(m) for m in original]
    after = [measure(m) for m in randomised]
    rise = []
    for b0, b1 in zip(before, after, strict=True):
        if not (math.isfinite(b0) and math.isfinite(b1)):
            rise.append(math.nan)
        elif b0 == 0:
            rise.append(undefined("efficient_mprt: the original map's complexity is 0 (a constant map): the relative "
                                  "rise is undefined", stacklevel=2))
        else:
            rise.append((b1 - b0) / b0)
    finite = [r for r in rise if math.isfinite(r)]
    return {"original": before, "randomised": after, "rise": rise,
            "mean_rise": float(np.mean(finite)) if finite else math.nan}
