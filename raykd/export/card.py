"""The model card written beside every exported model: ``model_card.json`` and ``model_card.md``.

A clinic (or a reviewer) that receives ``model.onnx`` must be able to see, without the run folder,
what the model was trained on, how well it did and on what, how far its probabilities can be
trusted, where its cancer-vs-benign threshold sits and what it must not be used for (after
Mitchell et al., "Model Cards for Model Reporting", FAT* 2019). :func:`run_export
<raykd.export.run.run_export>` builds the card from what it measured and writes both files into
the folder of ``model.onnx`` (and of ``model.safetensors``); the Serve app reads
``model_card.json`` from the artifact folder.

``model_card.json`` keys (stable; a value that is not known is ``null``, never left out):

* ``card_version``: 1.
* ``model``: ``name`` (timm name), ``version`` (run name / trial id), ``num_classes``, ``params``.
* ``data``: ``dataset`` (folder), ``name`` (its folder name), ``source`` (manifest ``source``:
  ``synthetic``, ``isic2019``, ...), ``source_dir``, ``manifest_version``, ``synthetic`` (bool),
  ``split_seed``, ``split_sizes`` (``{split: images}``).
* ``classes``: ``labels`` (label-index order), ``malignant``.
* ``performance``: ``split`` (``test``, else ``val``), ``source`` (``run summary``: the run's own
  scoring, the numbers the leaderboard shows; ``export``: scored at export), ``bma``,
  ``auroc_macro``, ``binary_auroc``, ``accuracy``, ``num_samples``; ``served``: the same five
  scored at export on the served (temperature-scaled) probabilities; ``per_class``: one row per
  class ``{label, recall, precision, support}`` from the served predictions.
* ``operating_point``: ``meta.decision`` (``threshold``, ``target_sensitivity``, ``rule``,
  ``val_sensitivity``, ``val_specificity``, ``test_sensitivity``, ``test_specificity``, ...) or
  ``null`` when the model has none.
* ``calibration``: ``temperature``, ``fitted`` (whether this export fitted it), ``bins``, ``val``
  and ``test`` (each ``{num_images, ece_before, ece_after, brier_before, brier_after, nll_before,
  nll_after}`` or ``null``).
* ``latency_ms``: single-image CPU milliseconds measured at export (median, one thread):
  ``torch`` and ``onnx``.
* ``size_bytes``: ``{file name: bytes}`` of every model file (safetensors, ONNX variants).
* ``training``: ``run_dir``, ``method``, ``teacher`` (``{name, checkpoint}``), ``hyperparameters``
  (``distill``, ``optim``, ``train`` sections of the run's saved config) and ``searched`` (what a
  search trial sampled), each ``null`` when the exported path is not a run folder.
* ``intended_use`` (text) and ``limitations`` (list of sentences).
* ``created`` (UTC ISO date-time) and ``raykd_version``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import raykd
from raykd.artifact.rundir import TrialDir
from raykd.data.manifest import Manifest

log = logging.getLogger(__name__)

__all__ = ["CARD_JSON", "CARD_KEYS", "CARD_MD", "build_card", "card_markdown", "performance_section",
           "training_section", "write_card"]

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
CARD_VERSION = 1
#: The top-level keys of ``model_card.json``, in order.
CARD_KEYS = ("card_version", "model", "data", "classes", "performance", "operating_point", "calibration",
             "latency_ms", "size_bytes", "training", "intended_use", "limitations", "created", "raykd_version")
_HEADLINE = (("bma", "bma"), ("auroc_macro", "auroc_macro"), ("binary_auroc", "binary/auroc"),
             ("accuracy", "accuracy"), ("num_samples", "num_samples"))

INTENDED_USE = (
    "Research and engineering evaluation of distilled skin-lesion classifiers (raykd). Not a medical "
    "device: it is not cleared, certified or clinically validated for diagnosis, screening or triage, "
    "and its output must not guide the care of a patient. Clinical use would need prospective "
    "validation on the target population under the applicable medical-device regulation."
)


def _num(v: Any) -> float | None:
    """A JSON-safe float (NaN, inf and missing become null)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def performance_section(run_metrics: dict | None, served: dict, per_class: list[dict], split: str) -> dict:
    """The ``performance`` block: headline numbers, the served ones, and the per-class table.

    Args:
        run_metrics: The run's own metrics of ``split`` (``summary.json``, the dict the leaderboard
            row holds), or None to report the export's own scoring as the headline.
        served: :func:`raykd.metrics.compute_from_arrays` of the served probabilities of ``split``.
        per_class: :func:`raykd.metrics.per_class_table` rows of the served predictions.
        split: ``test`` or ``val``.
    """
    head = run_metrics if run_metrics else served
    out: dict[str, Any] = {"split": split, "source": "run summary" if run_metrics else "export"}
    out.update({k: _num(head.get(src)) for k, src in _HEADLINE})
    out["served"] = {k: _num(served.get(src)) for k, src in _HEADLINE}
    out["per_class"] = [{"label": r["label"], "recall": _num(r["recall"]), "precision": _num(r["precision"]),
                         "support": int(r["support"])} for r in per_class]
    return out


def _read_yaml(path: Path) -> dict | None:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return doc if isinstance(doc, dict) else None


def training_section(run_dir: Path | None) -> dict:
    """Method, teacher and hyperparameters from a run folder's ``config.yaml`` (and ``trial.json``)."""
    empty = {"run_dir": None, "method": None, "teacher": None, "hyperparameters": None, "searched": None}
    if run_dir is None:
        return empty
    cfg = _read_yaml(TrialDir(run_dir).config_file)
    if cfg is None:
        return {**empty, "run_dir": str(run_dir)}
    distill = cfg.get("distill") or {}
    method = distill.get("method")
    teacher = cfg.get("teacher") or {}
    uses_teacher = method not in (None, "baseline") and (teacher.get("name") or teacher.get("checkpoint"))
    trial = TrialDir(run_dir).read_trial() or {}
    return {
        "run_dir": str(run_dir),
        "method": trial.get("label") or method,
        "teacher": ({"name": trial.get("teacher") or teacher.get("name"), "checkpoint": teacher.get("checkpoint")}
                    if uses_teacher else None),
        "hyperparameters": {"distill": distill.get("params"), "optim": cfg.get("optim"), "train": cfg.get("train")},
        "searched": trial.get("config"),
    }


def _data_section(dataset: str | os.PathLike, split_sizes: dict[str, int]) -> dict:
    try:
        manifest = Manifest.load(dataset)
    except (FileNotFoundError, ValueError, TypeError):
        log.warning("%s has no readable manifest.json: the model card names the folder only", dataset)
        manifest = None
    sizes = dict(split_sizes)
    if manifest is not None:
        sizes = {split: int(sum(c.values())) for split, c in manifest.class_counts.items()}
    return {
        "dataset": str(dataset),
        "name": Path(dataset).name,
        "source": manifest.source if manifest else None,
        "source_dir": manifest.source_dir if manifest else None,
        "manifest_version": manifest.version if manifest else None,
        "synthetic": (manifest.source == "synthetic") if manifest else None,
        "split_seed": manifest.split_seed if manifest else None,
        "split_sizes": sizes,
    }


def _limitations(data: dict, perf: dict, calibration: dict | None, decision: dict) -> list[str]:
    out = []
    if data["synthetic"]:
        out.append("Trained and evaluated on procedurally generated synthetic images (manifest source "
                   "'synthetic'), not on real dermoscopy: its numbers say nothing about its performance on "
                   "patients.")
    elif data["synthetic"] is None:
        out.append("The training data could not be identified (no manifest beside the dataset).")
    sizes = data["split_sizes"]
    n = perf.get("num_samples")
    out.append(f"Measured on {'?' if n is None else int(n)} {perf['split']} images of one "
               f"dataset ({data['name']}; split sizes {sizes}); performance on other populations, skin types, "
               "devices and acquisition settings is unknown.")
    out.append("It always answers with one of its classes: a lesion of any other kind, or an image that is "
               "not a dermoscopy image, is forced into one of them.")
    if calibration and calibration.get("fitted"):
        fitted = "The temperature and the threshold were" if decision else "The temperature was"
        out.append(f"{fitted} fitted on the validation split "
                   f"({(calibration.get('val') or {}).get('num_images')} images); they may not transfer to "
                   "data from another source.")
    if decision:
        test = decision.get("test_sensitivity")
        out.append(f"The cancer-vs-benign threshold {decision['threshold']:.4g} reached validation sensitivity "
                   f"{_f(decision.get('val_sensitivity'))} against a target of {decision['target_sensitivity']}"
                   + (f" and test sensitivity {_f(test)}" if test is not None else "")
                   + "; on new data it can miss more cancers than that.")
    else:
        out.append("No cancer-vs-benign operating point was chosen (no malignant class in its labels, no "
                   "malignant validation case, or calibration skipped).")
    return out


def build_card(*, meta, dataset: str | os.PathLike, performance: dict, calibration: dict | None,
               latency_ms: dict[str, float | None], files: dict[str, Path], run_dir: Path | None,
               split_sizes: dict[str, int], params: int | None = None) -> dict:
    """The card as a dict with :data:`CARD_KEYS` (see the module docstring for each block).

    Args:
        meta: The exported model's :class:`~raykd.artifact.ArtifactMeta` (temperature and decision
            as served).
        dataset: Dataset folder the numbers were measured on.
        performance: :func:`performance_section`.
        calibration: ``ExportReport.calibration`` (None when this export did not calibrate).
        latency_ms: ``{"torch": ms, "onnx": ms}``.
        files: ``{file name: path}`` of the model files whose sizes are reported.
        run_dir: The run folder the model came from, or None.
        split_sizes: Images per split, used when the dataset has no manifest.
        params: Parameter count.
    """
    data = _data_section(dataset, split_sizes)
    calib = dict(calibration) if calibration else {"temperature": meta.temperature, "fitted": False,
                                                   "bins": None, "val": None, "test": None}
    calib.setdefault("fitted", True)
    decision = dict(meta.decision or {})
    card = {
        "card_version": CARD_VERSION,
        "model": {"name": meta.model_name, "version": meta.version, "num_classes": meta.num_classes,
                  "params": params},
        "data": data,
        "classes": {"labels": list(meta.label_names), "malignant": list(meta.malignant)},
        "performance": performance,
        "operating_point": decision or None,
        "calibration": calib,
        "latency_ms": {k: _num(v) for k, v in latency_ms.items()},
        "size_bytes": {name: int(Path(p).stat().st_size) for name, p in files.items()},
        "training": training_section(run_dir),
        "intended_use": INTENDED_USE,
        "limitations": _limitations(data, performance, calibration, decision),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "raykd_version": raykd.__version__,
    }
    assert tuple(card) == CARD_KEYS
    return card


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _perf_row(name: str, v: dict) -> str:
    return (f"| {name} | {_f(v['bma'])} | {_f(v['auroc_macro'])} | {_f(v['binary_auroc'])} | {_f(v['accuracy'])} "
            f"| {_f(v['num_samples'], 0)} |")


def _data_lines(card: dict) -> list[str]:
    d, classes = card["data"], card["classes"]
    source = f"source {_f(d['source'])}, {_f(d['source_dir'])}, manifest version {_f(d['manifest_version'])}"
    return [f"- dataset: `{d['dataset']}` ({source}; synthetic: {_f(d['synthetic'])})",
            f"- split sizes: {d['split_sizes']} (split seed {_f(d['split_seed'])})",
            f"- classes: {', '.join(classes['labels'])}; malignant: {', '.join(classes['malignant']) or 'none'}"]


def _performance_lines(p: dict) -> list[str]:
    lines = ["| | BMA | AUROC (macro) | cancer-vs-benign AUROC | accuracy | images |", "|---|---|---|---|---|---|",
             _perf_row(p["source"], p), _perf_row("served (export)", p["served"]), "",
             "| class | recall | precision | support |", "|---|---|---|---|"]
    return lines + [f"| {r['label']} | {_f(r['recall'])} | {_f(r['precision'])} | {r['support']} |"
                    for r in p["per_class"]]


def _operating_lines(op: dict | None) -> list[str]:
    if not op:
        return ["None."]
    val = f"sensitivity {_f(op.get('val_sensitivity'))}, specificity {_f(op.get('val_specificity'))}"
    test = f"sensitivity {_f(op.get('test_sensitivity'))}, specificity {_f(op.get('test_specificity'))}"
    return [f"- rule: {op.get('rule')}",
            f"- threshold {_f(op['threshold'])} for a target sensitivity of {op['target_sensitivity']}",
            f"- validation: {val}", f"- test: {test}"]


def _calibration_lines(c: dict) -> list[str]:
    how = "fitted on the validation split" if c["fitted"] else "not fitted by this export"
    lines = [f"Temperature {_f(c['temperature'])} ({how}).", ""]
    rows = [(s, c.get(s)) for s in ("val", "test") if c.get(s)]
    if rows:
        lines += ["| split | images | ECE before | ECE after | Brier before | Brier after |", "|---|---|---|---|---|---|"]
        lines += [f"| {s} | {v['num_images']} | {_f(v['ece_before'])} | {_f(v['ece_after'])} | "
                  f"{_f(v['brier_before'])} | {_f(v['brier_after'])} |" for s, v in rows]
    return lines


def _cost_lines(card: dict) -> list[str]:
    lat = card["latency_ms"]
    latency = f"torch {_f(lat.get('torch'), 2)} ms, ONNX {_f(lat.get('onnx'), 2)} ms"
    return [f"- single-image CPU latency (one thread): {latency}",
            *[f"- {name}: {size:,} bytes" for name, size in card["size_bytes"].items()],
            f"- parameters: {_f(card['model']['params'])}"]


def _training_lines(t: dict) -> list[str]:
    return [f"- run: {_f(t['run_dir'])}", f"- method: {_f(t['method'])}", f"- teacher: {_f(t['teacher'])}",
            f"- hyperparameters: `{json.dumps(t['hyperparameters'], default=str)}`",
            f"- searched: `{json.dumps(t['searched'], default=str)}`"]


def card_markdown(card: dict) -> str:
    """The card as Markdown, for a person reading the folder."""
    m, p = card["model"], card["performance"]
    sections = [
        (f"# Model card: {m['name']} ({m['version'] or 'unversioned'})",
         [f"Created {card['created']} by raykd {card['raykd_version']}."]),
        ("## Intended use", [card["intended_use"]]),
        ("## Limitations", [f"- {s}" for s in card["limitations"]]),
        ("## Data", _data_lines(card)),
        (f"## Performance ({p['split']} split, {p['source']})", _performance_lines(p)),
        ("## Cancer-vs-benign operating point", _operating_lines(card["operating_point"])),
        ("## Calibration", _calibration_lines(card["calibration"])),
        ("## Cost", _cost_lines(card)),
        ("## Training", _training_lines(card["training"])),
    ]
    return "\n\n".join(head + "\n\n" + "\n".join(body) for head, body in sections) + "\n"


def write_card(directory: str | os.PathLike, card: dict) -> tuple[Path, Path]:
    """Write ``model_card.json`` and ``model_card.md`` into ``directory``; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / CARD_JSON, directory / CARD_MD
    for path, text in zip(paths, (json.dumps(card, indent=2, default=_json_default), card_markdown(card)),
                          strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return str(v)
