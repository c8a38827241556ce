"""Classification metrics with seeded bootstrap 95% intervals."""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """accuracy; balanced accuracy = mean recall over classes present; macro-F1 over classes seen in truth or prediction."""
    total = confusion.sum()
    correct = np.trace(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    tp = np.diag(confusion)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(len(tp)), where=present)
    seen = present | (predicted > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(len(tp)), where=seen)
    return {
        "accuracy": float(correct / total) if total else float("nan"),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1[seen].mean()) if seen.any() else float("nan"),
    }


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, bootstrap: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Each metric with its percentile bootstrap 95% interval (resampling images, seeded)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    point = metrics_from_confusion(_confusion(y_true, y_pred, n_classes))
    result = {name: {"value": point[name], "ci_low": point[name], "ci_high": point[name]} for name in METRICS}
    if bootstrap > 0 and len(y_true) > 1:
        rng = np.random.default_rng(seed)
        samples = {name: np.empty(bootstrap) for name in METRICS}
        for b in range(bootstrap):
            index = rng.integers(0, len(y_true), len(y_true))
            values = metrics_from_confusion(_confusion(y_true[index], y_pred[index], n_classes))
            for name in METRICS:
                samples[name][b] = values[name]
        for name in METRICS:
            low, high = np.nanpercentile(samples[name], [2.5, 97.5])
            result[name].update(ci_low=float(low), ci_high=float(high))
    return result
