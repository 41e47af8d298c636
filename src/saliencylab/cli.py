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

from saliencylab.clihelp import HelpTyper
from saliencylab.display import DEFAULT_ALPHA, DEFAULT_SMOOTH
from saliencylab.errors import UserError

app = HelpTyper(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="What did the image classifier look at, and can we trust that?")
F = TypeVar("F", bound=Callable[..., Any])

MODEL_HELP = ("efficientnet_lite0 (offline default), vgg16, torchvision:<name>, timm:<name>, a saliencylab "
              "checkpoint, a model file (.keras, .h5, TorchScript .pt, .pt2, .onnx), a transformers folder, "
              "or package.module:factory")
INPUT_SIZE_HELP = "model input H or H,W in pixels (for files that do not say; or model.json beside the model)"
CHANNELS_HELP = "model input channels, 1 or 3 (for files that do not say)"
MEAN_HELP = "per-channel mean the model subtracts from pixels in [0, 1], e.g. 0.485,0.456,0.406"
STD_HELP = "per-channel std the model divides by, e.g. 0.229,0.224,0.225"
CLASSES_HELP = "class names, comma-separated, one per output (negative,positive for one logit)"
CLASSES_FILE_HELP = "a text file of class names, one per line"
FRAME_HELP = ("which frame of a multi-frame DICOM: a number (1 is the first) or all (one image per frame, named "
              "file.dcm#frame=K); default: the first, with a note")
WEIGHTS_HELP = "a weights file (state dict) for the model; 'random' for an untrained one"
DATA_HELP = ("labelled images: a dataset folder (<class>/images + <class>/masks, <class>/*.png) or a CSV of "
             "file,label[,mask][,group] (default: the run's own test split)")
MASKS_HELP = "a folder of lung masks, matched to the images by file name"
DEVICE_HELP = "auto (CUDA when available), cpu or cuda"
PRECISION_HELP = "fp32 (full float32: TF32 off), tf32, or bf16 (autocast; maps stay float32)"


@app.callback()
def _options(
    threads: int = typer.Option(None, "--threads", min=1, show_default=False,
                                help="CPU threads for torch (default: $SALIENCYLAB_THREADS, else $OMP_NUM_THREADS, "
                                     "else the CPUs this process may use: affinity and cgroup quota)"),
) -> None:
    """What did the image classifier look at, and can we trust that?"""
    from saliencylab.runtime import configure

    try:
        configure(threads)
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


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
        except BrokenPipeError:  # `saliencylab methods --json | head`: the reader left; stop quietly
            raise typer.Exit(quiet_broken_pipe()) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:
            if os.environ.get("SALIENCYLAB_DEBUG"):
                raise
            typer.echo(f"internal error: {type(err).__name__}: {err} "
                       "(set SALIENCYLAB_DEBUG=1 for the traceback, and please report it)", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def quiet_broken_pipe() -> int:
    """After a BrokenPipeError on stdout: point stdout at /dev/null so that the interpreter's last flush
    cannot raise again, and return the exit status of a process ended by SIGPIPE (141), as `yes | head` does."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (a test runner's buffer)
        pass
    return 141


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
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="report unreadable images and go on"),
    frame: str = typer.Option(None, "--frame", help=FRAME_HELP),
    input_size: str = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    channels: int = typer.Option(None, "--channels", help=CHANNELS_HELP),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    classes: str = typer.Option(None, "--classes", help=CLASSES_HELP),
    classes_file: Path = typer.Option(None, "--classes-file", help=CLASSES_FILE_HELP),
) -> None:
    """Classify images and print the top-k classes with probabilities (the article's Table 1)."""
    from saliencylab.data import expand_inputs
    from saliencylab.data.images import parse_frame
    from saliencylab.fsutil import check_output_file, write_json
    from saliencylab.models import load_model, preprocessing_kwargs
    from saliencylab.precision import check_precision
    from saliencylab.precision import precision as run_at
    from saliencylab.studies.photos import classify as run
    from saliencylab.studies.photos import nothing_read

    precision = check_precision(precision)
    if json_path is not None:
        check_output_file(json_path, "--json")
    sources = expand_inputs(inputs or [], frame=parse_frame(frame))
    clf = load_model(model, weights=weights, device=device,
                     **preprocessing_kwargs(input_size, channels, mean, std, classes, classes_file))
    skipped: list[tuple[str, str]] = []
    rows = []
    with run_at(precision, clf.device):
        for row in run(clf, sources, k=top_k, batch_size=batch_size, skip_bad=skip_bad, skipped=skipped):
            rows.append(row)
            typer.echo(_table(row))
    for source, reason in skipped:
        typer.echo(f"skipped {source}: {reason}", err=True)
    if not rows:
        raise nothing_read(skipped)
    if json_path is not None:
        write_json(json_path, {"model": clf.describe(), "device": str(clf.device), "precision": precision,
                               "images": rows,
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
    smooth: float = typer.Option(DEFAULT_SMOOTH, "--smooth", min=0.0,
                                 help="Gaussian sigma as a fraction of the longer image side (0: off; display only, "
                                      "and SmoothGrad/RISE convergence checks compare maps at it)"),
    sign: str = typer.Option("abs", "--sign", "--sign-mode",
                             help="abs, positive or signed (display only; --sign-mode under torchrun)"),
    alpha: float = typer.Option(DEFAULT_ALPHA, "--alpha", min=0.0, max=1.0,
                                help="overlay opacity at the map's peak (it follows the saliency; below 0.1: none)"),
    cmap: str = typer.Option(None, "--cmap", help="matplotlib colormap (default inferno; bwr for signed)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="report unreadable images and go on"),
    frame: str = typer.Option(None, "--frame", help=FRAME_HELP),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bar (default: on a terminal)"),
    adapt: bool = typer.Option(True, "--adapt/--no-adapt",
                               help="double integrated_gradients' steps per image (up to 256) until its completeness "
                                    "error is within --tolerance of the logit gap; --no-adapt only warns"),
    tolerance: float = typer.Option(0.05, "--tolerance", min=0.001, max=0.5,
                                    help="IG completeness error as a share of the logit gap; SmoothGrad and RISE "
                                         "warn below an estimated run-to-run agreement of 1 - tolerance"),
    input_size: str = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    channels: int = typer.Option(None, "--channels", help=CHANNELS_HELP),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    classes: str = typer.Option(None, "--classes", help=CLASSES_HELP),
    classes_file: Path = typer.Option(None, "--classes-file", help=CLASSES_FILE_HELP),
    outputs: str = typer.Option("npy,png", "--outputs",
                                help="npy,png (maps and overlays), npy (maps only) or hdf5 (one store per shard; "
                                     "pip install saliencylab[hdf5])"),
    map_dtype: str = typer.Option("float32", "--map-dtype", help="float32 or float16 for the stored maps"),
    shard_size: int = typer.Option(64, "--shard-size", min=1,
                                   help="images per shard: the unit of resuming and of work per torchrun process"),
    workers: int = typer.Option(2, "--workers", min=0,
                                help="threads that decode, draw and write beside the model (0: none)"),
    grid: int = typer.Option(8, "--grid", min=0, help="images shown in figure.png (a spread sample of the run)"),
    force: bool = typer.Option(False, "--force", help="replace --out's contents when it holds another run"),
    resume: bool = typer.Option(False, "--resume",
                                help="continue the job in --out (re-running the same command does the same; "
                                     "this flag refuses a folder with nothing to resume)"),
    engine: str = typer.Option("local", "--engine",
                               help="local (this process, or each torchrun rank) or ray (the shards in a Ray actor "
                                    "pool; pip install saliencylab[ray])"),
    actors: int = typer.Option(1, "--actors", min=1, help="with --engine ray: actors in the pool"),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", min=0.0,
                                         help="with --engine ray: GPUs per actor (1 on GPU nodes; 0 runs on CPUs)"),
    cpus_per_actor: float = typer.Option(0.5, "--cpus-per-actor", min=0.01,
                                         help="with --engine ray: CPUs per actor (fractional leaves room for Ray)"),
    ray_address: str = typer.Option(None, "--ray-address",
                                    help="with --engine ray: a running cluster ('auto'); default a local Ray"),
) -> None:
    """Draw saliency maps over images: raw maps (.npy), overlays (PNG), a figure grid and results.json.

    A resumable job: each image is written as it finishes; run the same command again to finish a killed
    run (only missing or changed maps are computed). Runs unchanged under torchrun (one process per GPU).
    """
    from saliencylab.data import expand_inputs
    from saliencylab.data.images import parse_frame
    from saliencylab.dist import local_device
    from saliencylab.fsutil import check_output_dir
    from saliencylab.methods import parse_methods
    from saliencylab.methods.convergence import ConvergenceRule
    from saliencylab.methods.registry import parse_method_options
    from saliencylab.models import load_model, preprocessing_kwargs
    from saliencylab.precision import check_precision
    from saliencylab.render.maps import NORMALISE_MODES
    from saliencylab.studies.photos import DisplaySettings
    from saliencylab.studies.photos import explain as run
    from saliencylab.studies.streaming import StreamConfig

    stream = StreamConfig(shard_size=shard_size, outputs=outputs.replace(" ", ""), map_dtype=map_dtype,
                          workers=workers, grid=grid, force=force, resume=resume,
                          engine=engine, actors=actors, gpus_per_actor=gpus_per_actor,
                          cpus_per_actor=cpus_per_actor, ray_address=ray_address)
    stream.check()
    precision = check_precision(precision)
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
    check_output_dir(out, "--out", beside=True)
    sources = expand_inputs(inputs or [], frame=parse_frame(frame))
    model_kwargs = preprocessing_kwargs(input_size, channels, mean, std, classes, classes_file)
    clf = load_model(model, weights=weights, device=str(local_device(device)), **model_kwargs)
    if methods.strip() == "all":  # every method that applies to this model (rollout needs a transformer, ...)
        specs = [s for s in specs if clf.supports(s.family)]
    display = DisplaySettings(sign=sign, smooth=smooth, normalise=normalise, alpha=alpha, cmap=cmap)
    result = run(clf, sources, specs, out, options=options, target=target, batch_size=batch_size,
                 display=display, skip_bad=skip_bad, progress=progress, stream=stream,
                 command=" ".join(shlex.quote(a) for a in ["saliencylab", *sys.argv[1:]]),
                 model_args={"model": model, "weights": weights, **model_kwargs}, precision=precision,
                 convergence=ConvergenceRule(tolerance=tolerance, adapt=adapt, smooth=smooth))
    from saliencylab.dist import world

    if not world().main:  # under torchrun rank 0 speaks for the job
        return
    for source, reason in result.skipped[:20]:
        typer.echo(f"skipped {source}: {reason}", err=True)
    if len(result.skipped) > 20:
        typer.echo(f"... and {len(result.skipped) - 20} more skipped (see results.json)", err=True)
    for line in result.warnings[:20]:
        typer.echo(f"warning: {line}", err=True)
    if result.n_warnings > 20:
        typer.echo(f"... and {result.n_warnings - 20} more convergence warnings (see results.json)", err=True)
    for rec in result.images:
        t = rec["target"]
        typer.echo(f"{rec['source']}: {t['class']} ({100 * t['probability']:.1f}%) -> {out / rec['name']}/")
    if result.n_images > len(result.images):
        typer.echo(f"figure.png shows {len(result.images)} of {result.n_images} images (--grid N to change); "
                   "results.json lists all of them")
    if result.reused:
        typer.echo(f"resumed: {result.computed} maps written, {result.reused} kept from the earlier run")
    per = ", ".join(f"{k} {v / max(1, result.n_images):.2f}s" for k, v in result.seconds.items())
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
                                    help="lead marker rate per class ('L' on the patient's left, the image's right; or "
                                         "'R'), CLASS=RATE,... (equal rates: no shortcut)"),
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
    from saliencylab.fsutil import check_output_dir

    check_output_dir(out, "OUT")
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
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bars (default: on a terminal)"),
) -> None:
    """Train a COVID-19 vs normal chest X-ray classifier (Adam, binary cross-entropy, 90/10 split)."""
    from saliencylab.fsutil import check_output_dir
    from saliencylab.models.registry import resolve_device
    from saliencylab.train import TrainConfig
    from saliencylab.train import train as run

    names = tuple(c.strip() for c in classes.split(","))
    if len(names) != 2:
        raise UserError(f"--classes '{classes}': give two class folders, negative first (e.g. Normal,COVID)")
    check_output_dir(out, "--out")
    cfg = TrainConfig(data=str(data), model=model, epochs=epochs, image_size=image_size, batch_size=batch_size,
                      lr=lr, seed=seed, classes=names, class_weight=class_weight, augment=augment, hflip=hflip,
                      group_column=group_column, max_minutes=max_minutes)
    summary = run(cfg, out, resume=resume, device=str(resolve_device(device)), progress=progress,
                  log=typer.echo)
    from saliencylab.dist import world

    if not world().main:  # under torchrun, rank 0 speaks
        return
    typer.echo(f"best validation loss {summary['best_val_loss']:.4f}; checkpoint {out / 'best.pt'}")


@app.command(epilog="Examples:  saliencylab evaluate runs/cxr  ·  saliencylab evaluate runs/cxr --data "
                    "data/phantoms-swapped  ·  saliencylab evaluate --model model.pt --data images.csv  ·  "
                    "saliencylab evaluate --model cxr_cnn --weights w.pt --data DIR --classes Normal,COVID --n 500")
@friendly
def evaluate(
    run: Path = typer.Argument(None, help="a run folder written by `saliencylab train` (or use --model and --data)"),
    model: str = typer.Option(None, "--model", "-m", help="instead of a run: " + MODEL_HELP),
    weights: str = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    data: Path = typer.Option(None, "--data", help=DATA_HELP),
    classes: str = typer.Option(None, "--classes", help=CLASSES_HELP),
    masks: Path = typer.Option(None, "--masks", help=MASKS_HELP),
    input_size: str = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    channels: int = typer.Option(None, "--channels", help=CHANNELS_HELP),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    n: int = typer.Option(None, "--n", "--sample", min=1,
                          help="a seeded sample of this many images (default: all; --sample under torchrun)"),
    threshold: float = typer.Option(0.5, "--threshold", min=0.0, max=1.0, help="positive when p >= threshold"),
    out: Path = typer.Option(None, "--out", help="output folder (default: RUN/eval, RUN/eval-<data>, or "
                                                 "runs/<model>-<data>/eval)"),
    methods: str = typer.Option("vanilla,smoothgrad,integrated_gradients,gradcam", "--methods",
                                help="saliency methods for Figure 3"),
    per_side: int = typer.Option(2, "--per-side", min=0, help="Figure 3 images predicted near 0 and near 1"),
    low: float = typer.Option(0.1, "--low", help="'near 0' means p <= this"),
    high: float = typer.Option(0.9, "--high", help="'near 1' means p >= this"),
    seed: int = typer.Option(0, "--seed", help="picks Figure 3's images and the bootstrap resamples"),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="images per batch (memory stays flat)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bars (default: on a terminal)"),
) -> None:
    """Test a model: predictions.csv, metrics.json with 95% CIs, ROC, confusion matrix, Figure 3."""
    from saliencylab.fsutil import check_output_dir
    from saliencylab.methods import parse_methods
    from saliencylab.models import preprocessing_kwargs
    from saliencylab.studies.cxr import evaluate as run_eval
    from saliencylab.studies.cxr import summary_lines

    parse_methods(methods)
    device, precision = _device_and_precision(device, precision)
    if out is not None:
        check_output_dir(out, "--out")
    elif run is not None and run.is_dir():
        check_output_dir(run, "RUN")  # the evaluation goes into RUN/eval...
    metrics = run_eval(run, model=model, weights=weights, data=str(data) if data else None,
                       classes=_class_list(classes), masks=masks, n=n, threshold=threshold, out=out, methods=methods,
                       n_per_side=per_side, low=low, high=high, seed=seed, batch_size=batch_size, progress=progress,
                       log=lambda line: typer.echo(line, err=True),
                       model_kwargs=preprocessing_kwargs(input_size, channels, mean, std), device=device,
                       precision=precision)
    from saliencylab.dist import world

    if not world().main:  # under torchrun, rank 0 speaks
        return
    typer.echo(f"{metrics['scope']} of {metrics['data']}: {metrics['n']} images"
               + (f" ({metrics['unreadable']} unreadable skipped)" if metrics["unreadable"] else ""))
    for line in summary_lines(metrics):
        typer.echo(line)
    typer.echo(f"wrote {metrics['out']}/metrics.json, predictions.csv, unreadable.json, roc.png, confusion.png, "
               "histograms.png" + (", figure3.png" if metrics.get("figure3", {}).get("images") else ""))


@app.command(epilog="Examples:  saliencylab audit runs/cxr  ·  saliencylab audit runs/shortcut --n 100 --compare "
                    "runs/cxr  ·  saliencylab audit --model model.pt --data images.csv --masks lungs/  ·  "
                    "saliencylab audit runs/cxr --data data/swapped --methods vanilla,gradcam --road")
@friendly
def audit(
    run: Path = typer.Argument(None, help="a run folder written by `saliencylab train`, or an `explain` output "
                                          "folder (or use --model and --data)"),
    model: str = typer.Option(None, "--model", "-m", help="instead of a run: " + MODEL_HELP),
    weights: str = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    data: Path = typer.Option(None, "--data", help=DATA_HELP),
    classes: str = typer.Option(None, "--classes", help=CLASSES_HELP),
    masks: Path = typer.Option(None, "--masks", help=MASKS_HELP),
    input_size: str = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    channels: int = typer.Option(None, "--channels", help=CHANNELS_HELP),
    mean: str = typer.Option(None, "--mean", help=MEAN_HELP),
    std: str = typer.Option(None, "--std", help=STD_HELP),
    methods: str = typer.Option(None, "--methods", help="comma-separated method names, or 'all' (default: an "
                                                        "explain folder's own, else vanilla,smoothgrad,"
                                                        "integrated_gradients,gradcam)"),
    n: int = typer.Option(64, "--n", "--sample", min=1,
                          help="images to audit (seeded sample; --sample under torchrun)"),
    compare: Path = typer.Option(None, "--compare", help="a second run or model: rank agreement of its maps"),
    sanity_images: int = typer.Option(8, "--sanity-images", min=2, help="images for the randomisation check"),
    faithfulness_images: int = typer.Option(16, "--faithfulness-images", min=1,
                                            help="images for deletion / insertion curves"),
    road: bool = typer.Option(False, "--road", help="also fill removed pixels by noisy linear imputation (slow)"),
    data_randomisation: bool = typer.Option(False, "--data-randomisation",
                                            help="also retrain on shuffled labels and compare the maps (slow)"),
    smprt: bool = typer.Option(False, "--smprt", help="also the smoothed randomisation test, sMPRT (slow)"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="images per batch (memory stays flat in --n)"),
    out: Path = typer.Option(None, "--out", help="output folder (default: RUN/audit or runs/<model>-<data>/audit)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bar (default: on a terminal)"),
    shard_size: int = typer.Option(256, "--shard-size", min=1,
                                   help="images per shard (rounded up to whole batches): the unit of resuming "
                                        "and of work per torchrun process"),
    resume: bool = typer.Option(False, "--resume",
                                help="finish a killed audit (running the same command again does too; this flag "
                                     "refuses a folder with nothing to resume)"),
) -> None:
    """Measure whether the saliency maps can be trusted: localisation, sanity, faithfulness, stability, probes.

    Without masks (photos, an explain folder, a CSV without a mask column) the checks that need none run
    (sanity, faithfulness, stability, agreement); the others are listed as skipped, with the reason.
    """
    from saliencylab.fsutil import check_output_dir
    from saliencylab.models import preprocessing_kwargs
    from saliencylab.studies.audit import audit as run_audit

    device, precision = _device_and_precision(device, precision)
    if out is not None:
        check_output_dir(out, "--out")
    elif run is not None and run.is_dir():
        check_output_dir(run, "RUN")  # the audit goes into RUN/audit...
    result = run_audit(run, model=model, weights=weights, data=str(data) if data else None,
                       classes=_class_list(classes), masks=masks, methods=methods, n=n,
                       compare=str(compare) if compare else None, sanity_images=sanity_images,
                       faithfulness_images=faithfulness_images, road=road, data_randomisation=data_randomisation,
                       smprt=smprt, seed=seed, batch_size=batch_size, out=out, progress=progress, log=typer.echo,
                       model_kwargs=preprocessing_kwargs(input_size, channels, mean, std), device=device,
                       precision=precision, shard_size=shard_size, resume=resume)
    if "rank" in result:  # another torchrun rank: rank 0 reports
        return
    typer.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    typer.echo(f"wrote {result['out']}/audit.json, audit_images.csv, flagged.csv, unreadable.json and figures")


def _device_and_precision(device: str, precision: str) -> tuple[str, str]:
    """Check --device and --precision before any work (a one-line error naming the flag)."""
    from saliencylab.devices import choose_device
    from saliencylab.precision import check_precision

    return str(choose_device(device)), check_precision(precision)


def _class_list(classes: str | None) -> tuple[str, ...] | None:
    """'Normal,COVID' -> ('Normal', 'COVID')."""
    if classes is None:
        return None
    names = tuple(c.strip() for c in classes.split(",") if c.strip())
    if len(names) < 2:
        raise UserError(f"--classes '{classes}': give two or more class names, negative first (e.g. Normal,COVID)")
    return names


@app.command(epilog="Examples:  saliencylab demo  ·  saliencylab demo --quick --out runs/quick  ·  "
                    "saliencylab demo --force")
@friendly
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="output folder"),
    quick: bool = typer.Option(False, "--quick", help="fewer, smaller phantoms and fewer samples (about 2 minutes)"),
    force: bool = typer.Option(False, "--force", help="recompute everything instead of reusing finished stages"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bars (default: on a terminal)"),
) -> None:
    """Run the whole article on the embedded defaults: both studies, the audit, and an HTML report."""
    from saliencylab.fsutil import check_output_dir
    from saliencylab.studies.demo import run_demo

    device, precision = _device_and_precision(device, precision)
    check_output_dir(out, "--out")
    result = run_demo(out, quick=quick, force=force, progress=progress, log=typer.echo, device=device,
                      precision=precision)
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
    from saliencylab.fsutil import check_output_dir, check_output_file
    from saliencylab.report.writer import write_report

    if run.is_dir():
        check_output_dir(run, "RUN")
        check_output_file(run / "report.html", "RUN")
    path = write_report(run, command=" ".join(shlex.quote(a) for a in ["saliencylab", *sys.argv[1:]]))
    typer.echo(f"wrote {path}")


@app.command(epilog="Examples:  saliencylab serve  ·  saliencylab serve --model efficientnet_lite0 --model "
                    "runs/cxr/best.pt  ·  saliencylab serve --host 0.0.0.0 --token \"$(openssl rand -hex 16)\"")
@friendly
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (another one needs --token to be safe)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    model: list[str] = typer.Option(None, "--model", "-m", help="a model to offer, NAME or NAME@WEIGHTS "
                                                                 "(repeatable; default efficientnet_lite0)"),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.01,
                                        help="largest upload, checked before decoding"),
    queue: int = typer.Option(4, "--queue", min=0, help="requests that may wait for the model (more get 503)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    token: str = typer.Option(None, "--token", envvar="SALIENCYLAB_TOKEN", help="require this token on every API call"),
) -> None:
    """A browser workbench and HTTP API on this machine (needs `pip install 'saliencylab\\[web]'`)."""
    from saliencylab.web.server import run_server

    run_server(host=host, port=port, models=model or ["efficientnet_lite0"], max_upload_mb=max_upload_mb,
               queue=queue, device=device, token=token, log=typer.echo)


@app.command("methods")
@friendly
def list_methods(as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """List the saliency methods with their options and papers."""
    from saliencylab.methods import METHODS

    if as_json:
        typer.echo(json.dumps({n: {"family": s.family, "paper": s.paper, "options": {
            k: d["default"] for k, d in s.describe_options().items()}, "allowed": {
            k: d["expects"] for k, d in s.describe_options().items()}, "option_types": s.describe_options()}
            for n, s in METHODS.items()}, indent=2))
        return
    typer.echo(f"{'METHOD':<22} {'FAMILY':<13} PAPER")
    typer.echo(f"    {'OPTION':<14} {'DEFAULT':<16} ALLOWED VALUES   (change with --set METHOD.OPTION=VALUE)")
    for name, spec in METHODS.items():
        typer.echo(f"{name:<22} {spec.family:<13} {spec.paper}")
        for k, d in spec.describe_options().items():
            typer.echo(f"    {k:<14} {d['default']!r:<16} {d['expects']}")


@app.command("models")
@friendly
def list_models() -> None:
    """List the registered model names."""
    from saliencylab.models import available_models

    for name in available_models():
        typer.echo(name)
    typer.echo("torchvision:<name>, timm:<name>, or a checkpoint file written by saliencylab")


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `saliencylab explain --help | head`: help text written after the reader left
        sys.exit(quiet_broken_pipe())


if __name__ == "__main__":
    main()
