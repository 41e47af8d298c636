"""The `saliencylab` command: parses flags, delegates to the studies, turns UserError into one line."""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from saliencylab.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="What did the image classifier look at, and can we trust that?")
F = TypeVar("F", bound=Callable[..., Any])

MODEL_HELP = ("efficientnet_lite0 (offline default), vgg16, torchvision:<name>, timm:<name>, "
              "or a saliencylab checkpoint file")
WEIGHTS_HELP = "a weights file (state dict) for the model; 'random' for an untrained one"


def friendly(fn: F) -> F:
    """Print a UserError as one line on stderr and exit 2; never show the user a traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; nothing partial was written", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:
            if os.environ.get("SALIENCYLAB_DEBUG"):
                raise
            typer.echo(f"internal error: {type(err).__name__}: {err} "
                       "(set SALIENCYLAB_DEBUG=1 for the traceback, and please report it)", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _coerce(value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f"'{value}' is not a boolean; use true or false")
        return value.lower() in ("true", "1", "yes")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(value)
            except ValueError:
                raise UserError(f"'{value}' is not a number") from None
    if default is None or isinstance(default, (str, tuple)):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def parse_method_options(pairs: list[str], methods: list[Any], batch_size: int | None) -> dict[str, dict[str, Any]]:
    """['smoothgrad.n_samples=32', ...] -> {'smoothgrad': {'n_samples': 32}}, checked against the signatures."""
    opts: dict[str, dict[str, Any]] = {m.name: {} for m in methods}
    by_name = {m.name: m for m in methods}
    for spec in methods:
        if batch_size is not None and "batch_size" in spec.options():
            opts[spec.name]["batch_size"] = batch_size
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot:
            raise UserError(f"--set '{pair}': write METHOD.OPTION=VALUE, e.g. --set smoothgrad.n_samples=32")
        if method not in by_name:
            raise UserError(f"--set '{pair}': method '{method}' is not among --methods ({', '.join(by_name)})")
        known = by_name[method].options()
        if option not in known:
            raise UserError(f"--set '{pair}': {method} has no option '{option}'; it has {', '.join(known) or 'none'}")
        opts[method][option] = _coerce(value, known[option])
    return opts


@app.command(epilog="Examples:  saliencylab classify  ·  saliencylab classify photos/ --top-k 3 --json top.json  ·  "
                    "saliencylab classify sample:coffee scan.dcm --model vgg16 --weights vgg16.pth")
@friendly
def classify(
    inputs: list[str] = typer.Argument(None, help="image files, folders, globs or sample:<name> "
                                                  "(default: the four bundled photos)", show_default=False),
    model: str = typer.Option("efficientnet_lite0", "--model", "-m", help=MODEL_HELP),
    weights: str = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="classes to list per image"),
    json_path: Path = typer.Option(None, "--json", help="also write the predictions to this JSON file"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="images per forward pass"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="report unreadable images and go on"),
) -> None:
    """Classify images and print the top-k classes with probabilities (the article's Table 1)."""
    from saliencylab.data import expand_inputs
    from saliencylab.fsutil import write_json
    from saliencylab.models import load_model
    from saliencylab.studies.photos import classify as run

    sources = expand_inputs(inputs or [])
    clf = load_model(model, weights=weights, device=device)
    skipped: list[tuple[str, str]] = []
    rows = []
    for row in run(clf, sources, k=top_k, batch_size=batch_size, skip_bad=skip_bad, skipped=skipped):
        rows.append(row)
        typer.echo(_table(row))
    for source, reason in skipped:
        typer.echo(f"skipped {source}: {reason}", err=True)
    if json_path is not None:
        write_json(json_path, {"model": clf.describe(), "images": rows,
                               "skipped": [{"source": s, "reason": r} for s, r in skipped]})
        typer.echo(f"wrote {json_path}")


def _table(row: dict[str, Any]) -> str:
    width = max(len(t["class"]) for t in row["top"])
    lines = [f"{row['source']}  ({row['size'][1]}x{row['size'][0]})",
             f"  {'rank':>4}  {'class':<{width}}  {'probability':>11}"]
    lines += [f"  {t['rank']:>4}  {t['class']:<{width}}  {100 * t['probability']:>10.2f}%" for t in row["top"]]
    return "\n".join(lines) + "\n"


@app.command(epilog="Examples:  saliencylab explain  ·  saliencylab explain sample:chelsea --methods vanilla,gradcam "
                    "--out runs/cat  ·  saliencylab explain xrays/ --target 'tabby' --set smoothgrad.n_samples=32  ·  "
                    "saliencylab explain scan.png --methods all --sign signed --normalise absmax")
@friendly
def explain(
    inputs: list[str] = typer.Argument(None, help="image files, folders, globs or sample:<name> "
                                                  "(default: the four bundled photos)", show_default=False),
    model: str = typer.Option("efficientnet_lite0", "--model", "-m", help=MODEL_HELP),
    weights: str = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    methods: str = typer.Option("vanilla,smoothgrad,integrated_gradients,gradcam", "--methods",
                                help="comma-separated method names, or 'all' (see `saliencylab methods`)"),
    target: str = typer.Option("predicted", "--target", "-t",
                               help="predicted, a class index, a class name, or positive/negative for a binary model"),
    out: Path = typer.Option(Path("runs/explain"), "--out", "-o", help="output folder"),
    set_options: list[str] = typer.Option(None, "--set", help="a method option, METHOD.OPTION=VALUE (repeatable)"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="images per batch"),
    method_batch_size: int = typer.Option(None, "--method-batch-size", min=1,
                                          help="most perturbed samples per forward pass in sampling methods"),
    normalise: str = typer.Option("auto", "--normalise",
                                  help="auto (each method's own), absmax, minmax or percentile (display only)"),
    smooth: float = typer.Option(0.01, "--smooth", min=0.0,
                                 help="Gaussian sigma as a fraction of the longer image side (0: off; display only)"),
    sign: str = typer.Option("abs", "--sign", help="abs, positive or signed (display only)"),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="overlay opacity"),
    cmap: str = typer.Option(None, "--cmap", help="matplotlib colormap (default jet; bwr for signed)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="report unreadable images and go on"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bar (default: on a terminal)"),
) -> None:
    """Draw saliency maps over images: overlays (PNG), raw maps (.npy), a figure grid and results.json."""
    from saliencylab.data import expand_inputs
    from saliencylab.methods import parse_methods
    from saliencylab.models import load_model
    from saliencylab.render.maps import NORMALISE_MODES
    from saliencylab.studies.photos import DisplaySettings
    from saliencylab.studies.photos import explain as run

    if normalise not in ("auto", *NORMALISE_MODES):
        raise UserError(f"--normalise {normalise}: use auto or one of {', '.join(NORMALISE_MODES)}")
    if sign not in ("abs", "positive", "signed"):
        raise UserError(f"--sign {sign}: use abs, positive or signed")
    if cmap is not None:
        import matplotlib

        if cmap not in matplotlib.colormaps:
            raise UserError(f"--cmap {cmap}: not a matplotlib colormap (try jet, inferno, viridis, bwr)")
    specs = parse_methods(methods)
    options = parse_method_options(set_options or [], specs, method_batch_size)
    sources = expand_inputs(inputs or [])
    clf = load_model(model, weights=weights, device=device)
    display = DisplaySettings(sign=sign, smooth=smooth, normalise=normalise, alpha=alpha, cmap=cmap)
    result = run(clf, sources, specs, out, options=options, target=target, batch_size=batch_size,
                 display=display, skip_bad=skip_bad, progress=progress,
                 command=" ".join(shlex.quote(a) for a in ["saliencylab", *sys.argv[1:]]),
                 model_args={"model": model, "weights": weights})
    for source, reason in result.skipped:
        typer.echo(f"skipped {source}: {reason}", err=True)
    for rec in result.images:
        t = rec["target"]
        typer.echo(f"{rec['source']}: {t['class']} ({100 * t['probability']:.1f}%) -> {out / rec['name']}/")
    per = ", ".join(f"{k} {v / max(1, len(result.images)):.2f}s" for k, v in result.seconds.items())
    typer.echo(f"seconds per image: {per}")
    typer.echo(f"wrote {out / 'figure.png'} and {out / 'results.json'}")


@app.command(epilog="Examples:  saliencylab phantoms data/phantoms  ·  saliencylab phantoms data/shortcut "
                    "--marker-rate COVID=0.9,Normal=0.1  ·  saliencylab phantoms data/small --n-covid 100 "
                    "--n-normal 100 --size 128 --seed 1")
@friendly
def phantoms(
    out: Path = typer.Argument(..., help="folder to write the dataset into (the real database's layout)"),
    n_covid: int = typer.Option(3616, "--n-covid", min=0, help="COVID-like images (the article: 3,616)"),
    n_normal: int = typer.Option(10192, "--n-normal", min=0, help="normal images (the article: 10,192)"),
    size: int = typer.Option(256, "--size", min=32, help="image side in pixels"),
    seed: int = typer.Option(0, "--seed", help="every image's seed derives from it"),
    marker_rate: str = typer.Option("0.5", "--marker-rate",
                                    help="'L' marker rate per class, CLASS=RATE,... (equal rates: no shortcut)"),
    exposure_shift: str = typer.Option("0", "--exposure-shift", help="brightness shift per class, CLASS=SHIFT,..."),
    lesion_scale: float = typer.Option(1.0, "--lesion-scale", min=0.0, help="lesion opacity multiplier"),
    workers: int = typer.Option(0, "--workers", min=0, help="processes (0: all cores)"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bar (default: on a terminal)"),
    text_rate: str = typer.Option("0", "--text-rate", help="burned-in text label rate per class, CLASS=RATE,..."),
    site_rate: str = typer.Option("0", "--site-rate",
                                  help="share from hospital 1 (borders, hard contrast) per class, CLASS=RATE,..."),
    ap_rate: str = typer.Option("0", "--ap-rate", help="AP (portable) film rate per class, CLASS=RATE,..."),
    device_rate: str = typer.Option("0", "--device-rate", help="ECG leads and lines rate per class, CLASS=RATE,..."),
    anatomy: str = typer.Option("auto", "--anatomy",
                                help="real (lung outlines and opacity boxes of the anatomy extra), drawn, or auto"),
) -> None:
    """Generate synthetic chest X-ray phantoms with lung and lesion masks and controllable shortcuts."""
    from saliencylab.data.phantoms import PhantomConfig, generate, parse_rates

    cfg = PhantomConfig(n_covid=n_covid, n_normal=n_normal, size=size, seed=seed,
                        marker_rate=parse_rates(marker_rate), exposure_shift=parse_rates(exposure_shift,
                                                                                        "--exposure-shift"),
                        lesion_scale=lesion_scale, workers=workers,
                        text_rate=parse_rates(text_rate, "--text-rate"),
                        site_rate=parse_rates(site_rate, "--site-rate"), ap_rate=parse_rates(ap_rate, "--ap-rate"),
                        device_rate=parse_rates(device_rate, "--device-rate"), anatomy=anatomy)
    summary = generate(cfg, out, progress=progress)
    if summary.get("reused"):
        typer.echo(f"{out}: {summary['images']} phantoms already there with these settings; kept them")
    else:
        typer.echo(f"wrote {summary['images']} phantoms to {out} in {summary['seconds']:.1f}s "
                   f"({summary['images_per_second']:.0f} images/s on {summary['workers']} processes)")


@app.command(epilog="Examples:  saliencylab train --data data/phantoms --out runs/cxr  ·  saliencylab train --data "
                    "COVID-19_Radiography_Dataset --epochs 10 --image-size 128  ·  saliencylab train --data d "
                    "--model efficientnet_lite0 --image-size 128 --out runs/lite0  ·  saliencylab train --data d "
                    "--out runs/cxr --resume")
@friendly
def train(
    data: Path = typer.Option(..., "--data", help="dataset root: phantoms or the COVID-19 Radiography Database"),
    model: str = typer.Option("cxr_cnn", "--model", "-m", help="cxr_cnn, or efficientnet_lite0 for transfer learning"),
    out: Path = typer.Option(Path("runs/cxr"), "--out", "-o", help="run folder"),
    epochs: int = typer.Option(8, "--epochs", min=1),
    image_size: int = typer.Option(128, "--image-size", min=16, help="input side in pixels"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Adam learning rate"),
    seed: int = typer.Option(0, "--seed"),
    classes: str = typer.Option("Normal,COVID", "--classes", help="negative,positive class folders"),
    class_weight: bool = typer.Option(False, "--class-weight/--no-class-weight", help="weigh the positive class"),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="small shifts, rotations, exposure jitter"),
    hflip: bool = typer.Option(False, "--hflip", help="also flip left-right (off: laterality is information)"),
    group_column: str = typer.Option(None, "--group-column", help="metadata.csv column naming each patient"),
    max_minutes: float = typer.Option(0.0, "--max-minutes", min=0.0, help="stop after the epoch past this budget"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in --out"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bars (default: on a terminal)"),
) -> None:
    """Train a COVID-19 vs normal chest X-ray classifier (Adam, binary cross-entropy, 90/10 split)."""
    from saliencylab.models.registry import resolve_device
    from saliencylab.train import TrainConfig
    from saliencylab.train import train as run

    names = tuple(c.strip() for c in classes.split(","))
    if len(names) != 2:
        raise UserError(f"--classes '{classes}': give two class folders, negative first (e.g. Normal,COVID)")
    cfg = TrainConfig(data=str(data), model=model, epochs=epochs, image_size=image_size, batch_size=batch_size,
                      lr=lr, seed=seed, classes=names, class_weight=class_weight, augment=augment, hflip=hflip,
                      group_column=group_column, max_minutes=max_minutes)
    summary = run(cfg, out, resume=resume, device=str(resolve_device(device)), progress=progress,
                  log=typer.echo)
    typer.echo(f"best validation loss {summary['best_val_loss']:.4f}; checkpoint {out / 'best.pt'}")


@app.command(epilog="Examples:  saliencylab evaluate runs/cxr  ·  saliencylab evaluate runs/cxr --data "
                    "data/phantoms-swapped  ·  saliencylab evaluate runs/cxr --threshold 0.3 --methods vanilla,gradcam")
@friendly
def evaluate(
    run: Path = typer.Argument(..., help="a run folder written by `saliencylab train`"),
    data: Path = typer.Option(None, "--data", help="another dataset to test on (default: the run's own test split)"),
    threshold: float = typer.Option(0.5, "--threshold", min=0.0, max=1.0, help="positive when p >= threshold"),
    out: Path = typer.Option(None, "--out", help="output folder (default: RUN/eval or RUN/eval-<data>)"),
    methods: str = typer.Option("vanilla,smoothgrad,integrated_gradients,gradcam", "--methods",
                                help="saliency methods for Figure 3"),
    per_side: int = typer.Option(2, "--per-side", min=0, help="Figure 3 images predicted near 0 and near 1"),
    low: float = typer.Option(0.1, "--low", help="'near 0' means p <= this"),
    high: float = typer.Option(0.9, "--high", help="'near 1' means p >= this"),
    seed: int = typer.Option(0, "--seed", help="picks Figure 3's images and the bootstrap resamples"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bars (default: on a terminal)"),
) -> None:
    """Test a trained model: predictions.csv, metrics.json with 95% CIs, ROC, confusion matrix, Figure 3."""
    from saliencylab.methods import parse_methods
    from saliencylab.studies.cxr import evaluate as run_eval
    from saliencylab.studies.cxr import summary_lines

    parse_methods(methods)
    metrics = run_eval(run, data=str(data) if data else None, threshold=threshold, out=out, methods=methods,
                       n_per_side=per_side, low=low, high=high, seed=seed, progress=progress)
    typer.echo(f"{metrics['scope']} of {metrics['data']}: {metrics['n']} images")
    for line in summary_lines(metrics):
        typer.echo(line)
    typer.echo(f"wrote {metrics['out']}/metrics.json, predictions.csv, roc.png, confusion.png, histograms.png"
               + (", figure3.png" if metrics.get("figure3", {}).get("images") else ""))


@app.command(epilog="Examples:  saliencylab audit runs/cxr  ·  saliencylab audit runs/shortcut --n 100 --compare "
                    "runs/cxr  ·  saliencylab audit runs/cxr --data data/swapped --methods vanilla,gradcam --road")
@friendly
def audit(
    run: Path = typer.Argument(..., help="a run folder written by `saliencylab train`, or an `explain` output folder"),
    methods: str = typer.Option("vanilla,smoothgrad,integrated_gradients,gradcam", "--methods",
                                help="comma-separated method names, or 'all'"),
    n: int = typer.Option(64, "--n", min=1, help="test images to audit (seeded sample)"),
    data: Path = typer.Option(None, "--data", help="another dataset (default: the run's own test split)"),
    compare: Path = typer.Option(None, "--compare", help="a second run: rank agreement of its maps with these"),
    sanity_images: int = typer.Option(8, "--sanity-images", min=2, help="images for the randomisation check"),
    faithfulness_images: int = typer.Option(16, "--faithfulness-images", min=1,
                                            help="images for deletion / insertion curves"),
    road: bool = typer.Option(False, "--road", help="also fill removed pixels by noisy linear imputation (slow)"),
    data_randomisation: bool = typer.Option(False, "--data-randomisation",
                                            help="also retrain on shuffled labels and compare the maps (slow)"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="images per batch (memory stays flat in --n)"),
    out: Path = typer.Option(None, "--out", help="output folder (default: RUN/audit)"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bar (default: on a terminal)"),
) -> None:
    """Measure whether the saliency maps can be trusted: localisation, sanity, faithfulness, stability, probes.

    On an `explain` output folder (photos, no masks), the checks that apply: sanity, faithfulness,
    stability and agreement between methods, with the methods and options that `explain` used.
    """
    from saliencylab.studies.audit import audit as run_audit
    from saliencylab.studies.audit import audit_explain

    if (run / "results.json").is_file() and not (run / "best.pt").is_file():
        result = audit_explain(run, n=n, sanity_images=sanity_images, faithfulness_images=faithfulness_images,
                               seed=seed, out=out, log=typer.echo)
        typer.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
        typer.echo(f"wrote {result['out']}/audit.json")
        return
    result = run_audit(run, methods=methods, n=n, data=str(data) if data else None,
                       compare=str(compare) if compare else None, sanity_images=sanity_images,
                       faithfulness_images=faithfulness_images, road=road, data_randomisation=data_randomisation,
                       seed=seed, batch_size=batch_size, out=out, progress=progress, log=typer.echo)
    p = result["probes"]
    if "lungs_blacked_out" in p:
        b = p["lungs_blacked_out"]
        typer.echo(f"lungs blacked out: accuracy {b['accuracy']:.3f} (majority baseline "
                   f"{b['majority_baseline_accuracy']:.3f}), AUROC {b['auroc']:.3f} (0.5: nothing left to read)")
    if "marker_swap" in p:
        typer.echo(f"marker added vs removed: {p['marker_swap']['flips']} of {p['marker_swap']['images']} "
                   "predictions flip")
    typer.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    typer.echo(f"wrote {result['out']}/audit.json, audit_images.csv, flagged.csv and figures")


@app.command(epilog="Examples:  saliencylab demo  ·  saliencylab demo --quick --out runs/quick  ·  "
                    "saliencylab demo --force")
@friendly
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="output folder"),
    quick: bool = typer.Option(False, "--quick", help="fewer, smaller phantoms and fewer samples (about a minute)"),
    force: bool = typer.Option(False, "--force", help="recompute everything instead of reusing finished stages"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bars (default: on a terminal)"),
) -> None:
    """Run the whole article on the embedded defaults: both studies, the audit, and an HTML report."""
    from saliencylab.studies.demo import run_demo

    result = run_demo(out, quick=quick, force=force, progress=progress, log=typer.echo)
    h = result["headline"]
    typer.echo(f"report: {result['report']}")
    lines = (("shortcut eval balanced_accuracy", "shortcut model, balanced accuracy on its own test split"),
             ("shortcut eval-clean balanced_accuracy", "shortcut model, balanced accuracy on clean phantoms"),
             ("shortcut marker_swap flip_rate", "shortcut model, predictions that flip with the marker"))
    for key, words in lines:
        if key in h:
            typer.echo(f"  {words}: {h[key]:.3f}")


@app.command(epilog="Examples:  saliencylab report runs/demo  ·  saliencylab report runs/cxr  ·  "
                    "saliencylab report runs/explain")
@friendly
def report(
    run: Path = typer.Argument(..., help="a demo folder, a training run folder, or an explain output folder"),
) -> None:
    """Write one self-contained report.html (images embedded, nothing fetched from the network)."""
    from saliencylab.report.writer import write_report

    path = write_report(run, command=" ".join(shlex.quote(a) for a in ["saliencylab", *sys.argv[1:]]))
    typer.echo(f"wrote {path}")


@app.command("methods")
@friendly
def list_methods(as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """List the saliency methods with their options and papers."""
    from saliencylab.methods import METHODS

    if as_json:
        typer.echo(json.dumps({n: {"family": s.family, "paper": s.paper, "options": {
            k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in s.options().items()}}
            for n, s in METHODS.items()}, indent=2))
        return
    for name, spec in METHODS.items():
        opts = ", ".join(f"{k}={v!r}" for k, v in spec.options().items()) or "-"
        typer.echo(f"{name:<22} {spec.family:<13} {spec.paper}\n{'':<22} options: {opts}")


@app.command("models")
@friendly
def list_models() -> None:
    """List the registered model names."""
    from saliencylab.models import available_models

    for name in available_models():
        typer.echo(name)
    typer.echo("torchvision:<name>, timm:<name>, or a checkpoint file written by saliencylab")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
