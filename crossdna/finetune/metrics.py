"""Evaluation metrics, computed once over the whole evaluation set.

Upstream computes MCC and F1 per batch and averages them over a shuffled eval loader (spec §6 defect 15), which
makes the number depend on the batching. Here every metric sees all predictions at once. The implementations are
numpy (no scikit-learn dependency); tests check them against scikit-learn/scipy where those are installed.
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes).astype(np.float64)


def matthews_corrcoef(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Multiclass MCC (Gorodkin's R_K); 0 when a marginal is constant, as in scikit-learn."""
    c = confusion_matrix(y_true, y_pred, num_classes)
    t, p = c.sum(1), c.sum(0)
    n, correct = c.sum(), np.trace(c)
    cov_tp = correct * n - t @ p
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float(cov_tp / denom) if denom > 0 else 0.0


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over all classes (a class absent from both gets F1 = 0, as in scikit-learn)."""
    c = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(c)
    denom = c.sum(0) + c.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based positions start+1..end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Binary AUROC by the rank-sum (Mann-Whitney) formula, ties counted one half; NaN if one class is absent."""
    y = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """AUPRC as average precision (step-wise, scikit-learn's definition); NaN if there are no positives."""
    y = np.asarray(y_true).astype(bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(score, dtype=np.float64)[order], y[order]
    # Evaluate precision/recall only at the last index of each run of tied scores.
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall_step = np.diff(np.r_[0, tp]) / y.sum()
    return float((precision * recall_step).sum())


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_average_ranks(np.asarray(x, dtype=np.float64)), _average_ranks(np.asarray(y, dtype=np.float64)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, MCC, macro-F1 on argmax; AUROC (binary: positive-class probability; multiclass: one-vs-rest macro)."""
    num_classes = logits.shape[1]
    pred = logits.argmax(axis=1)
    prob = _softmax(logits.astype(np.float64))
    if num_classes == 2:
        auroc = roc_auc(labels == 1, prob[:, 1])
    else:
        auroc = _nanmean([roc_auc(labels == k, prob[:, k]) for k in range(num_classes)])
    return {
        "accuracy": float((pred == labels).mean()),
        "mcc": matthews_corrcoef(labels, pred, num_classes),
        "f1_macro": macro_f1(labels, pred, num_classes),
        "auroc": auroc,
    }


def multilabel_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """DeepSEA style: AUROC and AUPRC per label, macro-averaged over labels that have both classes present."""
    aurocs = [roc_auc(labels[:, k], logits[:, k]) for k in range(labels.shape[1])]
    auprcs = [average_precision(labels[:, k], logits[:, k]) for k in range(labels.shape[1])]
    return {"auroc": _nanmean(aurocs), "auprc": _nanmean(auprcs),
            "labels_scored": float(sum(np.isfinite(a) for a in aurocs))}


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """DeepSTARR style: Pearson and Spearman per output, averaged over outputs; MSE over all values."""
    k = target.shape[1]
    return {
        "pearson": _nanmean([pearson(pred[:, j], target[:, j]) for j in range(k)]),
        "spearman": _nanmean([spearman(pred[:, j], target[:, j]) for j in range(k)]),
        "mse": float(np.mean((pred.astype(np.float64) - target) ** 2)),
    }


def compute_metrics(kind: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if kind == "multiclass":
        return classification_metrics(outputs, labels)
    if kind == "multilabel":
        return multilabel_metrics(outputs, labels)
    if kind == "regression":
        return regression_metrics(outputs, labels)
    raise ValueError(f"task.kind: unknown task kind {kind!r}")


# Which metrics each kind may be selected on; all of them are "higher is better" except mse.
METRICS = {
    "multiclass": ("accuracy", "mcc", "f1_macro", "auroc"),
    "multilabel": ("auroc", "auprc"),
    "regression": ("pearson", "spearman", "mse"),
}
LOWER_IS_BETTER = frozenset({"mse", "loss"})
