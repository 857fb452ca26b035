"""``run_evaluate``: score a saved model on any ingested dataset, an external test set included.

A model is only as good as its score on images it has never seen; a test split drawn from the
training source (one hospital, one camera) hides how it does elsewhere. ``run_evaluate`` takes a
saved model (a run folder with its best artifact, an artifact folder or an exported ``.onnx`` file)
and any dataset folder made by ``python -m raykd.data ingest|synth`` and reports every metric
training reports, on the probabilities the model serves:

* the metrics of :func:`raykd.metrics.compute_from_arrays` (BMA first, accuracy, weighted
  precision/recall/F1, macro AUROC and AP, specificity, MCC, per-class recall and the
  cancer-vs-benign ``binary/*`` keys), plus ``f1_macro`` (mean per-class F1 over the classes that
  occur in the scored images, the convention BMA uses), the ECE and the Brier score
  (:mod:`raykd.export.calibrate`);
* the cancer-vs-benign view: sensitivity, specificity, PPV and NPV when the argmax class is
  malignant (the rule the ``binary/*`` metrics score) and, when the model carries a decision
  threshold (``meta.decision``), at that threshold;
* the per-class table (:func:`raykd.metrics.per_class_table`), the confusion matrix and the
  one-vs-rest ROC curves (:mod:`raykd.metrics.plots`);
* 95 % intervals for BMA and macro AUROC: a percentile bootstrap that draws the scored images with
  replacement (``resamples`` times, from ``seed``) and recomputes both on each draw, with the same
  conventions as the point estimates (a class absent from a draw is left out of its mean).

Images go through the serving path: :func:`raykd.export.run.score_split` reads the split with
pyarrow and feeds it batch by batch through the predictor's evaluation transform
(:mod:`raykd.artifact.predict`), so torch and ONNX Runtime score exactly what a server would.

Classes are matched by name. The dataset's labels are remapped to the model's class indices, so a
dataset listing the same classes in another order scores correctly. A dataset class with images in
the scored split that the model does not know is an error (:class:`ClassMismatchError`); a model
class without images there is reported and, having no recall, left out of BMA, macro AUROC and
macro F1 (the conventions of :mod:`raykd.metrics.classification`).

Outputs (in ``out``, default :func:`default_out_dir`): ``evaluation.json``, ``evaluation.md``,
``confusion_matrix.png`` and ``roc_curves.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raykd.artifact.format import BEST_DIR, find_artifact, load_artifact
from raykd.artifact.onnx_meta import ONNX_NAME
from raykd.artifact.predict import OnnxPredictor, TorchPredictor, preprocess_images, softmax
from raykd.data.manifest import Manifest, resolve_location
from raykd.export.calibrate import DEFAULT_BINS, brier, ece, operating_point
from raykd.export.run import score_split
from raykd.metrics.classification import compute_from_arrays, per_class_table
from raykd.metrics.plots import plot_confusion_matrix, plot_roc_curves

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_RESAMPLES", "SPLITS", "ClassMatch", "ClassMismatchError", "Evaluation", "binary_view",
           "bootstrap_intervals", "default_out_dir", "match_classes", "open_model", "run_evaluate"]

EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc_curves.png"
#: Splits ``run_evaluate`` takes; ``all`` is every split of the dataset together.
SPLITS = ("test", "val", "train", "all")
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95
ARGMAX_RULE = "malignant when the predicted (argmax) class is malignant"


class ClassMismatchError(ValueError):
    """The dataset holds images of a class the model does not have."""


# --------------------------------------------------------------------------------------------- model


class _OnnxLogits:
    """An :class:`~raykd.artifact.predict.OnnxPredictor` that also answers raw logits, as
    :class:`~raykd.artifact.predict.TorchPredictor.logits` does (what ``score_split`` reads)."""

    backend = "onnx"

    def __init__(self, path: Path) -> None:
        try:
            self.predictor = OnnxPredictor(path)
        except ValueError:  # no raykd contract in its metadata: the message says so
            raise
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a bad file
            raise ValueError(f"--model {path}: ONNX Runtime cannot load it "
                             f"({type(exc).__name__}: {exc})") from exc
        self.meta = self.predictor.meta

    def logits(self, images) -> np.ndarray:
        p = self.predictor
        batch = np.ascontiguousarray(preprocess_images(images, p.transform), dtype=np.float32)
        return np.asarray(p.session.run(None, {p.input_name: batch})[0], dtype=np.float32)


@dataclass
class LoadedModel:
    """A model ready to score: where it came from, its contract and a predictor with ``logits``."""

    path: Path
    #: ``"torch"`` (an artifact) or ``"onnx"`` (an ONNX file).
    backend: str
    meta: Any
    predictor: Any


def open_model(path: str | os.PathLike, *, device: str = "auto") -> LoadedModel:
    """Open ``path``: a run folder (its best artifact), an artifact folder, or an ``.onnx`` file.

    An ONNX file must carry the preprocessing contract in its metadata, as ``raykd export`` writes
    it (and ``raykd serve`` requires). A folder holding only ``model.onnx`` is opened as that file.

    Raises:
        FileNotFoundError: when the path does not exist or holds no model.
        ValueError: for an ONNX file without the raykd contract.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--model {path}: no such file or folder (pass a run folder, an artifact "
                                "folder or an .onnx file)")
    if p.is_dir() and (p / ONNX_NAME).is_file():
        try:
            find_artifact(p)
        except FileNotFoundError:
            p = p / ONNX_NAME
    if p.is_file() and p.suffix == ".onnx":
        scorer = _OnnxLogits(p)
        return LoadedModel(path=p, backend="onnx", meta=scorer.meta, predictor=scorer)
    artifact = find_artifact(p)
    model, meta = load_artifact(artifact)
    return LoadedModel(path=artifact, backend="torch", meta=meta,
                       predictor=TorchPredictor(model, meta, device=device))


# ------------------------------------------------------------------------------------------- classes


@dataclass
class ClassMatch:
    """How the dataset's classes map onto the model's."""

    model: list[str]
    dataset: list[str]
    #: ``label_map[i]``: the model's index of the dataset's class ``i`` (-1: the model lacks it).
    label_map: list[int]
    #: Model classes the dataset does not list at all.
    not_in_dataset: list[str]
    #: Dataset classes the model lacks that have no image in the scored split (ignored).
    ignored: list[str] = field(default_factory=list)

    def remap(self, labels: np.ndarray) -> np.ndarray:
        """Dataset label indices -> model label indices."""
        mapped = np.asarray(self.label_map, dtype=np.int64)[np.asarray(labels, dtype=np.int64)]
        assert (mapped >= 0).all(), "a label of a class the model lacks survived match_classes"
        return mapped


#: The same diagnosis under the codes of ISIC 2019, HAM10000 and PAD-UFES-20: HAM10000's ``akiec``
#: and PAD-UFES-20's ``ACK`` are ISIC 2019's ``AK`` (ISIC 2019 relabelled HAM10000 so), ``NEV`` is
#: ``NV``, and PAD-UFES-20's seborrheic keratoses ``SEK`` fall under ``BKL``.
SAME_CLASS = {"akiec": "ak", "ack": "ak", "nev": "nv", "sek": "bkl"}


def canonical_class(name: str) -> str:
    """A class name as matched across datasets: case-insensitive, with :data:`SAME_CLASS`."""
    key = name.strip().lower()
    return SAME_CLASS.get(key, key)


def match_classes(model_names: list[str], dataset_names: list[str], counts: dict[str, int], *,
                  model: str = "the model", dataset: str = "the dataset") -> ClassMatch:
    """Match classes by name (:func:`canonical_class`: ``mel`` is ``MEL``, ``akiec`` is ``AK``);
    ``counts`` are the scored split's images per dataset class.

    Raises:
        ClassMismatchError: naming every dataset class with images that the model does not have,
            and the model's classes.
    """
    keys = [canonical_class(n) for n in model_names]
    index = {k: i for i, k in enumerate(keys)}
    unknown = [n for n in dataset_names if canonical_class(n) not in index]
    scored = [n for n in unknown if counts.get(n, 0) > 0]
    if scored:
        listed = ", ".join(f"{n} ({counts[n]} images)" for n in scored)
        raise ClassMismatchError(
            f"{dataset} holds images of class(es) {listed} that {model} does not have; its classes are "
            f"{', '.join(model_names)}. A model cannot score a class it was not trained on: evaluate on a "
            "dataset without those images (ingest it without them) or with a model trained on them."
        )
    if unknown:
        log.info("dataset classes %s have no image in the scored split and are not model classes: ignored",
                 unknown)
    return ClassMatch(
        model=list(model_names), dataset=list(dataset_names),
        label_map=[index.get(canonical_class(n), -1) for n in dataset_names],
        not_in_dataset=[n for n, k in zip(model_names, keys) if k not in {canonical_class(d) for d in dataset_names}],
        ignored=unknown,
    )


# ----------------------------------------------------------------------------------------- bootstrap


def _bma(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``labels`` (as :func:`compute_from_arrays`)."""
    cm = np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, -1)
    support = cm.sum(axis=1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean())


def _auroc_macro(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest AUROC (Mann-Whitney U, ties counted half) averaged over the classes with at
    least one positive and one negative, as ``auroc_macro`` of :func:`compute_from_arrays`."""
    from scipy.stats import rankdata  # lazy: scipy is heavy

    n = len(labels)
    values = []
    for k in range(probs.shape[1]):
        pos = labels == k
        n_pos = int(pos.sum())
        if 0 < n_pos < n:
            ranks = rankdata(probs[:, k])
            values.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)))
    return float(np.mean(values)) if values else math.nan


def bootstrap_intervals(probs: np.ndarray, labels: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES,
                        seed: int = DEFAULT_SEED, level: float = LEVEL) -> dict:
    """Percentile-bootstrap intervals of BMA and macro AUROC over the scored images.

    Each of ``resamples`` draws takes ``N`` images with replacement (``numpy.random.default_rng(seed)``)
    and recomputes both metrics; the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
    percentiles of the draws. A draw on which a metric is undefined (a macro AUROC with no class
    holding both positives and negatives) is left out and counted in ``undefined``.

    Returns:
        ``{"method", "level", "resamples", "seed", "bma": {"low", "high", "undefined"},
        "auroc_macro": {...}}``; with ``resamples == 0`` the bounds are None.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0 (0: no intervals), got {resamples} (--bootstrap)")
    rng = np.random.default_rng(seed)
    preds, n, c = probs.argmax(axis=1), len(labels), probs.shape[1]
    draws: dict[str, list[float]] = {"bma": [], "auroc_macro": []}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        draws["bma"].append(_bma(preds[idx], labels[idx], c))
        draws["auroc_macro"].append(_auroc_macro(probs[idx], labels[idx]))
    out: dict[str, Any] = {"method": "percentile bootstrap over the scored images", "level": level,
                           "resamples": resamples, "seed": seed}
    q = [50 * (1 - level), 50 * (1 + level)]
    for name, values in draws.items():
        v = np.asarray(values, dtype=np.float64)
        ok = v[np.isfinite(v)]
        low, high = (float(x) for x in np.percentile(ok, q)) if ok.size else (None, None)
        out[name] = {"low": low, "high": high, "undefined": int(v.size - ok.size)}
    return out


# ----------------------------------------------------------------------------------- cancer vs benign


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def binary_view(probs: np.ndarray, labels: np.ndarray, meta) -> dict | None:
    """Cancer-vs-benign counts and rates at the argmax rule and at ``meta.decision``'s threshold.

    None when the model names no malignant class. Rates with a zero denominator are None.
    """
    mal = meta.malignant_indices()
    if not mal:
        return None
    truth = np.isin(labels, mal)
    flagged = np.isin(probs.argmax(axis=1), mal)
    tp, fn = int((flagged & truth).sum()), int((~flagged & truth).sum())
    fp, tn = int((flagged & ~truth).sum()), int((~flagged & ~truth).sum())
    out: dict[str, Any] = {
        "malignant": list(meta.malignant), "rule": ARGMAX_RULE, "positives": tp + fn, "negatives": fp + tn,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn), "decision": None,
    }
    threshold = (meta.decision or {}).get("threshold")
    if threshold is not None:
        op = operating_point(probs[:, mal].sum(axis=1), truth, float(threshold))
        out["decision"] = {"threshold": float(threshold), "sensitivity": op["sensitivity"],
                           "specificity": op["specificity"]}
    return out


# ------------------------------------------------------------------------------------------- report


def _json_safe(value: Any) -> Any:
    """NaN and inf as null, numpy scalars as Python numbers, recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _f(v: Any, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _ci(iv: dict | None) -> str:
    if not iv or iv.get("low") is None:
        return "-"
    return f"[{iv['low']:.4f}, {iv['high']:.4f}]"


@dataclass
class Evaluation:
    """What ``run_evaluate`` measured; ``to_dict()`` is ``evaluation.json``."""

    model: dict
    dataset: dict
    classes: dict
    metrics: dict
    intervals: dict
    binary: dict | None
    per_class: list[dict]
    confusion_matrix: list[list[int]]
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _json_safe({"evaluation_version": 1, **asdict(self)})

    def _headline(self) -> list[tuple[str, str, str]]:
        """``(name, value, 95 % interval)`` of the headline metrics."""
        m, iv = self.metrics, self.intervals
        return [("BMA", _f(m["bma"]), _ci(iv.get("bma"))), ("accuracy", _f(m["accuracy"]), ""),
                ("macro F1", _f(m["f1_macro"]), ""),
                ("AUROC (macro)", _f(m["auroc_macro"]), _ci(iv.get("auroc_macro"))),
                (f"ECE ({m['ece_bins']} bins)", _f(m["ece"]), ""), ("Brier", _f(m["brier"]), "")]

    def _binary_line(self) -> str | None:
        b = self.binary
        if not b:
            return None
        line = (f"cancer vs benign ({', '.join(b['malignant'])}; argmax rule): sensitivity "
                f"{_f(b['sensitivity'])}, specificity {_f(b['specificity'])}, AUROC "
                f"{_f(self.metrics.get('binary/auroc'))}")
        if b["decision"]:
            d = b["decision"]
            line += (f"; at the model's threshold {d['threshold']:.4g}: sensitivity {_f(d['sensitivity'])}, "
                     f"specificity {_f(d['specificity'])}")
        return line

    def _interval_line(self) -> str:
        iv = self.intervals
        if not iv.get("resamples"):
            return "no bootstrap intervals (--bootstrap 0)"
        return (f"{int(iv['level'] * 100)} % intervals: percentile bootstrap, {iv['resamples']} resamples of "
                f"the {self.dataset['num_images']} scored images with replacement, seed {iv['seed']}")

    def _title(self) -> str:
        m, d = self.model, self.dataset
        return (f"{m['name']} ({m['backend']}, {m['model_name']}) on {d['name']}, split {d['split']} "
                f"({d['num_images']} images)")

    def summary(self) -> str:
        """The few lines the CLI prints."""
        rows = [f"evaluated {self._title()}"]
        rows += [f"  {name:<15} {value:>7}  {f'95 % CI {ci}' if ci and ci != '-' else ''}".rstrip()
                 for name, value, ci in self._headline()]
        extra = [self._binary_line(), *self._class_notes(), *self.notes, self._interval_line()]
        rows += [f"  {line}" for line in extra if line]
        if self.files:
            folder = Path(next(iter(self.files.values()))).parent
            rows.append(f"wrote {', '.join(Path(p).name for p in self.files.values())} to {folder}")
        return "\n".join(rows)

    def _class_notes(self) -> list[str]:
        c = self.classes
        out = []
        if c["absent"]:
            out.append(f"model classes without images here: {', '.join(c['absent'])} (left out of BMA, "
                       "macro AUROC and macro F1)")
        if c["reordered"]:
            out.append("the dataset lists the model's classes in another order: labels remapped by name")
        return out

    def markdown(self) -> str:
        """``evaluation.md``."""
        m, d = self.model, self.dataset
        lines = [f"# Evaluation: {self._title()}", "",
                 f"- model: `{m['path']}` ({m['backend']}; version {m['version'] or '-'}; temperature "
                 f"{m['temperature']:.4g}; trained on `{m['trained_on'] or '-'}`)",
                 f"- data: `{d['path']}` (source {d['source']}), split `{d['split']}`, "
                 f"{d['num_images']} images",
                 *[f"- {line}" for line in self._class_notes() + self.notes], "",
                 "| metric | value | 95 % interval |", "|---|---:|---:|",
                 *[f"| {name} | {value} | {ci or '-'} |" for name, value, ci in self._headline()], "",
                 f"{self._interval_line()}; the other metrics are point estimates on the served "
                 "probabilities.", ""]
        if self.binary:
            b = self.binary
            lines += [f"**{self._binary_line()}.** PPV {_f(b['ppv'])}, NPV {_f(b['npv'])} "
                      f"({b['positives']} malignant, {b['negatives']} benign images).", ""]
        lines += ["| class | precision | recall | F1 | specificity | support | predicted |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['label']} | {_f(r['precision'])} | {_f(r['recall'])} | {_f(r['f1'])} | "
                  f"{_f(r['specificity'])} | {r['support']} | {r['predicted']} |" for r in self.per_class]
        lines += ["", f"![confusion matrix]({CONFUSION_PNG})", "", f"![ROC curves]({ROC_PNG})", ""]
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------- run


def _dataset_name(data: str | os.PathLike) -> str:
    return str(data).rstrip("/").rsplit("/", 1)[-1] or "dataset"


def default_out_dir(model: str | os.PathLike, data: str | os.PathLike, split: str) -> Path:
    """``<model folder>/evaluate-<dataset name>-<split>/``; for an ``.onnx`` file, in its folder
    with the file's stem appended (``evaluate-ham-test-model-int8``), so variants do not collide."""
    p = Path(model).expanduser()
    name = f"evaluate-{_dataset_name(data)}-{split}"
    if p.is_file():
        return p.parent / (f"{name}-{p.stem.replace('.', '-')}" if p.suffix == ".onnx" else name)
    return p / name


def _scored_splits(manifest, split: str, data) -> list[str]:
    """The dataset splits ``split`` names (``all``: every split with images); an empty one is an error."""
    if split == "all":
        names = ["train", "val", "test"] + sorted(set(manifest.class_counts) - {"train", "val", "test"})
        chosen = [s for s in names if sum(manifest.counts(s))]
    else:
        chosen = [split] if sum(manifest.counts(split)) else []
    if not chosen:
        have = [s for s in manifest.class_counts if sum(manifest.counts(s))]
        raise ValueError(f"{data} has no images in split {split!r}; its splits with images: "
                         f"{', '.join(have) or 'none'} (pick one with --split)")
    return chosen


def _score(loaded: LoadedModel, dataset, splits: list[str],
           batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Raw logits and dataset labels of every image of ``splits``, and the scoring seconds."""
    scored = [score_split(loaded.predictor, dataset, s, batch_size=batch_size) for s in splits]
    return (np.concatenate([s.logits for s in scored]), np.concatenate([s.labels for s in scored]),
            sum(s.seconds for s in scored))


def _notes(meta, dataset: str, manifest, split: str) -> list[str]:
    """Caveats worth printing: the model's own training images, a different malignant list."""
    notes = []
    if meta.dataset and resolve_location(meta.dataset) == resolve_location(dataset):
        if split in ("train", "all"):
            notes.append("the model was trained on these images (its own dataset's train split is included)")
        elif split == "val":
            notes.append("the val split chose the model's best epoch (and its temperature and threshold at "
                         "export)")
    shared = [n for n in manifest.label_names if n in meta.label_names]
    if {n for n in manifest.malignant if n in shared} != {n for n in meta.malignant if n in shared}:
        notes.append(f"the dataset counts {', '.join(manifest.malignant) or 'no class'} malignant, the model "
                     f"{', '.join(meta.malignant) or 'no class'}: the cancer-vs-benign view uses the model's")
    return notes


def _metrics(probs: np.ndarray, labels: np.ndarray, meta, per_class: list[dict], bins: int) -> dict:
    """compute_from_arrays, with macro F1, ECE and Brier; BMA, accuracy, macro F1 and AUROC first."""
    scores = compute_from_arrays(probs, labels, meta.label_names, meta.malignant)
    present = [r["f1"] for r in per_class if r["support"] > 0]
    out = {"bma": scores["bma"], "accuracy": scores["accuracy"], "f1_macro": float(np.mean(present)),
           "auroc_macro": scores["auroc_macro"]}
    out.update({k: v for k, v in scores.items() if k not in out})
    out.update({"ece": ece(probs, labels, bins), "ece_bins": bins, "brier": brier(probs, labels)})
    return out


def _write(ev: Evaluation, out_dir: Path, probs: np.ndarray, labels: np.ndarray) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    names, title = ev.classes["model"], f"{ev.model['name']} on {ev.dataset['name']} {ev.dataset['split']}"
    ev.files = {"json": str(out_dir / EVALUATION_JSON), "markdown": str(out_dir / EVALUATION_MD),
                "confusion_matrix": str(out_dir / CONFUSION_PNG), "roc_curves": str(out_dir / ROC_PNG)}
    plot_confusion_matrix(np.asarray(ev.confusion_matrix), names, ev.files["confusion_matrix"],
                          title=f"{title}: BMA {_f(ev.metrics['bma'], 3)}")
    plot_roc_curves(probs, labels, names, ev.files["roc_curves"], title=title)
    Path(ev.files["markdown"]).write_text(ev.markdown())
    Path(ev.files["json"]).write_text(json.dumps(ev.to_dict(), indent=2))


def _model_name(path: Path) -> str:
    """The run folder's name for ``RUN/<artifact>``, else the folder's or the file's."""
    if path.suffix == ".onnx":
        folder = path.parent.parent if path.parent.name == BEST_DIR else path.parent
        return f"{folder.name}/{path.name}"
    return path.parent.name if path.name == BEST_DIR else path.name


def _evaluation(loaded: LoadedModel, data, manifest, split: str, splits: list[str], match: ClassMatch,
                logits: np.ndarray, labels: np.ndarray, seconds: float, *, resamples: int, seed: int,
                bins: int) -> tuple[Evaluation, np.ndarray]:
    """Every number of the report from the scored split; also returns the served probabilities."""
    meta, n = loaded.meta, loaded.meta.num_classes
    probs = softmax(logits / meta.temperature)
    cm = np.bincount(labels * n + probs.argmax(axis=1), minlength=n * n).reshape(n, n)
    per_class = per_class_table(cm, meta.label_names)
    shared_data = [x for x in manifest.label_names if x in meta.label_names]
    ev = Evaluation(
        model={"path": str(loaded.path), "name": _model_name(loaded.path), "backend": loaded.backend,
               "model_name": meta.model_name, "version": meta.version, "temperature": meta.temperature,
               "trained_on": meta.dataset, "images_per_s": len(labels) / max(seconds, 1e-9)},
        dataset={"path": str(data), "name": _dataset_name(data), "source": manifest.source, "split": split,
                 "splits": splits, "num_images": int(len(labels))},
        classes={"model": list(meta.label_names), "dataset": list(manifest.label_names),
                 "label_map": dict(zip(manifest.label_names, match.label_map)),
                 "absent": [r["label"] for r in per_class if r["support"] == 0],
                 "not_in_dataset": match.not_in_dataset, "ignored": match.ignored,
                 "reordered": shared_data != [x for x in meta.label_names if x in manifest.label_names]},
        metrics=_metrics(probs, labels, meta, per_class, bins),
        intervals=bootstrap_intervals(probs, labels, resamples=resamples, seed=seed),
        binary=binary_view(probs, labels, meta), per_class=per_class, confusion_matrix=cm.tolist(),
        notes=_notes(meta, str(data), manifest, split),
    )
    return ev, probs


def run_evaluate(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    split: str = "test",
    out: str | os.PathLike | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    batch_size: int = 32,
    device: str = "auto",
    bins: int | None = None,
) -> Evaluation:
    """Score the model at ``model`` on ``split`` of the dataset ``data`` and write the report.

    Args:
        model: Run folder, artifact folder or ``.onnx`` file.
        data: Dataset folder or URI with a ``manifest.json`` (``python -m raykd.data``).
        split: ``test``, ``val``, ``train`` or ``all`` (every split together).
        out: Output folder (default: :func:`default_out_dir`).
        resamples: Bootstrap resamples for the BMA and AUROC intervals (0: none).
        seed: Seed of the bootstrap.
        batch_size: Images per forward pass.
        device: Torch device (``auto``, ``cpu``, ``cuda``); ONNX files run on ONNX Runtime's CPU.
        bins: ECE bins (default: the export's, 15).

    Returns:
        The evaluation (also in ``out/evaluation.json`` and ``out/evaluation.md``).

    Raises:
        FileNotFoundError: a missing model or dataset path, a folder without a model.
        ValueError: an unknown or empty split, a negative ``resamples``;
            :class:`ClassMismatchError` when the data holds a class the model does not have.
    """
    if split not in SPLITS:  # before anything is loaded
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)} (--split)")
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0 (0: no intervals), got {resamples} (--bootstrap)")
    manifest = Manifest.load(data)
    splits = _scored_splits(manifest, split, data)
    loaded = open_model(model, device=device)
    counts = {n: sum(manifest.counts(s)[i] for s in splits) for i, n in enumerate(manifest.label_names)}
    match = match_classes(loaded.meta.label_names, manifest.label_names, counts,
                          model=f"the model {loaded.path}", dataset=f"{data} (split {split})")
    logits, raw_labels, seconds = _score(loaded, data, splits, batch_size)
    labels = match.remap(raw_labels)
    ev, probs = _evaluation(loaded, data, manifest, split, splits, match, logits, labels, seconds,
                            resamples=resamples, seed=seed, bins=bins or DEFAULT_BINS)
    _write(ev, Path(out) if out else default_out_dir(model, data, split), probs, labels)
    log.info("evaluation of %s on %s (%s): %s", ev.model["name"], data, split, ev.files["json"])
    return ev
