"""Whole-set metrics against scikit-learn / scipy (installed with full mlflow), plus hand-checked cases."""
from __future__ import annotations

import numpy as np
import pytest

from crossdna.finetune import metrics as M

sk = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_classification_matches_sklearn(rng, k):
    y = rng.integers(0, k, 500)
    logits = rng.normal(size=(500, k)) + 1.5 * np.eye(k)[y] * rng.random((500, 1))
    got = M.classification_metrics(logits, y)
    pred = logits.argmax(1)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert got["mcc"] == pytest.approx(sk.matthews_corrcoef(y, pred), abs=1e-12)
    assert got["f1_macro"] == pytest.approx(sk.f1_score(y, pred, average="macro"), abs=1e-12)
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = sk.roc_auc_score(y, prob[:, 1]) if k == 2 else sk.roc_auc_score(y, prob, multi_class="ovr")
    assert got["auroc"] == pytest.approx(want, abs=1e-12)


def test_ties_and_degenerate_cases():
    y = np.array([0, 1, 1, 0, 1, 0])
    s = np.array([0.5, 0.5, 0.9, 0.1, 0.5, 0.5])  # heavy ties
    assert M.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s))
    assert M.average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s))
    assert np.isnan(M.roc_auc(np.zeros(4), np.arange(4.0)))
    assert M.matthews_corrcoef(np.array([0, 1, 0]), np.array([0, 0, 0]), 2) == 0.0  # constant prediction


def test_metrics_are_not_per_batch_averages(rng):
    """Per-batch MCC averaged over batches (upstream defect 15) differs from the whole-set value."""
    y = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, y, 1 - y)
    whole = M.matthews_corrcoef(y, pred, 2)
    per_batch = np.mean([M.matthews_corrcoef(y[i:i + 8], pred[i:i + 8], 2) for i in range(0, 200, 8)])
    assert whole == pytest.approx(sk.matthews_corrcoef(y, pred))
    assert abs(whole - per_batch) > 1e-3


def test_multilabel_matches_sklearn(rng):
    y = (rng.random((300, 4)) < 0.3).astype(np.float32)
    y[:, 3] = 0  # a label with no positives is skipped, not counted as 0.5
    logits = rng.normal(size=(300, 4)) + 2 * y
    got = M.multilabel_metrics(logits, y)
    assert got["auroc"] == pytest.approx(np.mean([sk.roc_auc_score(y[:, j], logits[:, j]) for j in range(3)]))
    assert got["auprc"] == pytest.approx(np.mean([sk.average_precision_score(y[:, j], logits[:, j]) for j in range(3)]))
    assert got["labels_scored"] == 3


def test_regression_matches_scipy(rng):
    t = rng.normal(size=(400, 2))
    p = t + rng.normal(size=(400, 2))
    p[:50, 1] = 0.0  # ties in the ranks
    got = M.regression_metrics(p, t)
    assert got["pearson"] == pytest.approx(np.mean([stats.pearsonr(p[:, j], t[:, j])[0] for j in range(2)]))
    assert got["spearman"] == pytest.approx(np.mean([stats.spearmanr(p[:, j], t[:, j])[0] for j in range(2)]))
