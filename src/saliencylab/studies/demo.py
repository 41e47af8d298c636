"""`saliencylab demo`: the whole article, reproduced and extended, in one command on the embedded defaults.

Stages (each skipped when its outputs are already there and valid, unless `force`):
1. study 1: the four bundled photos classified and explained (Table 1, Figure 2);
2. phantoms: a training set with the "L" marker shortcut (COVID 0.9, Normal 0.1) and a clean one
   (equal rates), drawn from the same seed so that both hold the same patients;
3. two cxr_cnn models, one per training set, evaluated on their own test split and on the other set;
4. the audit of both models;
5. the HTML report.
Every stage writes atomically and records a `.done` marker, so Ctrl-C at any point and a re-run finish
the job without a corrupt file.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saliencylab.fsutil import write_json


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; `quick()` is the test suite's."""

    n_covid: int = 1000
    n_normal: int = 2000
    phantom_size: int = 256
    image_size: int = 128
    epochs: int = 8
    audit_images: int = 64
    sanity_images: int = 8
    faithfulness_images: int = 12
    smoothgrad_samples: int | None = None  # None: the method's default
    ig_steps: int = 32
    lesion_scale: float = 1.0
    seed: int = 0

    @staticmethod
    def quick() -> DemoConfig:
        """Small and fast; lesions drawn twice as strong so that a minute of training learns them."""
        return DemoConfig(n_covid=300, n_normal=300, phantom_size=128, image_size=64, epochs=10, audit_images=16,
                          sanity_images=4, faithfulness_images=3, smoothgrad_samples=4, ig_steps=8, lesion_scale=2.0)


def run_demo(out: str | Path, *, quick: bool = False, force: bool = False, progress: bool | None = None,
             log: Callable[[str], None] = print, device: str = "cpu", precision: str = "fp32") -> dict[str, Any]:
    """Run every stage into `out`; return the headline numbers and the report's path.

    Args:
        progress: progress bars inside long stages (None: only on a terminal).
        device: where every stage's model runs ('auto', 'cpu', 'cuda'); precision: 'fp32', 'tf32' or 'bf16'
            for classification, explanation, evaluation and the audit (training stays float32).
    """
    from saliencylab.data.phantoms import PhantomConfig, generate
    from saliencylab.devices import choose_device
    from saliencylab.methods import parse_methods
    from saliencylab.methods.convergence import ConvergenceRule
    from saliencylab.models import load_model
    from saliencylab.precision import check_precision
    from saliencylab.report.writer import write_report
    from saliencylab.studies.audit import audit
    from saliencylab.studies.cxr import evaluate
    from saliencylab.studies.photos import classify, explain
    from saliencylab.train import TrainConfig, train

    cfg = DemoConfig.quick() if quick else DemoConfig()
    dev, precision = choose_device(device), check_precision(precision)
    out = Path(out)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = asdict(cfg) | {"quick": quick}
    old = out / "demo.json"
    if old.is_file() and json.loads(old.read_text()).get("settings") != settings:
        raise_mixed(out)
    write_json(out / "demo.json", {"settings": settings})
    stages: list[dict[str, Any]] = []

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        marker = out / ".done" / name
        t = time.perf_counter()
        if marker.is_file():
            log(f"{name:<28} reused")
            stages.append({"stage": name, "seconds": 0.0, "reused": True})
            return None
        result = fn()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("ok\n")
        seconds = time.perf_counter() - t
        stages.append({"stage": name, "seconds": round(seconds, 1), "reused": False})
        log(f"{name:<28} {seconds:6.1f}s")
        return result

    method_options = {"integrated_gradients": {"n_steps": cfg.ig_steps}}
    if cfg.smoothgrad_samples is not None:
        method_options["smoothgrad"] = {"n_samples": cfg.smoothgrad_samples}

    # full demo: IG steps adapted per image until converged; --quick only reports (its 8 steps stay 8)
    rule = ConvergenceRule(adapt=not quick)

    def study1() -> None:
        from saliencylab.precision import precision as run_at

        clf = load_model("efficientnet_lite0", device=dev)
        sources = [f"sample:{n}" for n in ("chelsea", "coffee", "rocket", "motorcycle_left")]
        with run_at(precision, dev):
            rows = list(classify(clf, sources, k=5))
        write_json(out / "study1" / "classify.json", {"model": clf.describe(), "images": rows})
        specs = parse_methods("vanilla,smoothgrad,integrated_gradients,gradcam,spectral_residual")
        res = explain(clf, sources, specs, out / "study1" / "explain", progress=progress, options=method_options,
                      model_args={"model": "efficientnet_lite0", "weights": None}, precision=precision,
                      convergence=rule)
        for line in res.warnings:
            log(f"warning: {line}")

    def phantoms(name: str, rates: dict[str, float]) -> Callable[[], None]:
        def fn() -> None:
            generate(PhantomConfig(n_covid=cfg.n_covid, n_normal=cfg.n_normal, size=cfg.phantom_size, seed=cfg.seed,
                                   marker_rate=rates, lesion_scale=cfg.lesion_scale), out / "data" / name,
                     progress=progress)
        return fn

    def real_data_figure() -> None:
        """The phantoms beside the real lung outlines and opacity boxes, for the report (with [anatomy])."""
        from saliencylab.data import anatomy
        from saliencylab.render.figures import phantoms_vs_real

        if anatomy.available():
            phantoms_vs_real(out / "phantoms_vs_real.png", size=min(cfg.phantom_size * 2, 256))

    def fit(name: str, data: str) -> Callable[[], None]:
        def fn() -> None:
            train(TrainConfig(data=str(out / "data" / data), epochs=cfg.epochs, image_size=cfg.image_size,
                              seed=cfg.seed), out / "runs" / name, progress=progress, log=lambda *_: None,
                  device=str(dev))
        return fn

    def test(name: str, data: str | None, label: str) -> Callable[[], None]:
        def fn() -> None:
            evaluate(out / "runs" / name, data=str(out / "data" / data) if data else None,
                     out=out / "runs" / name / label, progress=progress, seed=cfg.seed, device=dev,
                     precision=precision)
        return fn

    def check(name: str, other: str) -> Callable[[], None]:
        def fn() -> None:
            audit(out / "runs" / name, n=cfg.audit_images, compare=str(out / "runs" / other),
                  sanity_images=cfg.sanity_images, faithfulness_images=cfg.faithfulness_images, seed=cfg.seed,
                  options=method_options, progress=progress, log=lambda *_: None, device=dev, precision=precision)
        return fn

    stage("study 1: photos", study1)
    stage("phantoms: with shortcut", phantoms("shortcut", {"COVID": 0.9, "Normal": 0.1}))
    stage("phantoms beside real data", real_data_figure)
    stage("phantoms: clean", phantoms("clean", {"COVID": 0.5, "Normal": 0.5}))
    stage("train: shortcut model", fit("shortcut", "shortcut"))
    stage("train: clean model", fit("clean", "clean"))
    stage("evaluate: shortcut model", test("shortcut", None, "eval"))
    stage("evaluate: on clean phantoms", test("shortcut", "clean", "eval-clean"))
    stage("evaluate: clean model", test("clean", None, "eval"))
    stage("audit: shortcut model", check("shortcut", "clean"))
    stage("audit: clean model", check("clean", "shortcut"))
    t = time.perf_counter()
    report = write_report(out, command="saliencylab demo" + (" --quick" if quick else ""))
    log(f"{'report':<28} {time.perf_counter() - t:6.1f}s")
    headline = json.loads((out / "report_numbers.json").read_text())
    write_json(out / "demo.json", {"settings": settings, "stages": stages, "headline": headline,
                                   "device": str(dev), "precision": precision})
    return {"report": str(report), "headline": headline, "stages": stages}


def raise_mixed(out: Path) -> None:
    from saliencylab.errors import UserError

    raise UserError(f"'{out}' holds a demo run with other settings (--quick or not); use --force to start over "
                    "or another --out")
