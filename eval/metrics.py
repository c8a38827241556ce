"""Classification metrics with seeded bootstrap 95% intervals.

Every metric is a function of the confusion matrix, and resampling n images with replacement
gives a confusion matrix distributed Multinomial(n, cell counts / n). The bootstrap draws those
matrices directly: O(classes²) per replicate instead of O(images), the same distribution. A sweep
scores every task and split at every alpha, so resampling 17k μ-Bench images 1000 times each
would cost seconds per alpha, more than the GPU forward over them.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def metrics_from_confusions(confusions: np.ndarray) -> dict[str, np.ndarray]:
    """Per [C, C] matrix in a [B, C, C] batch: accuracy; balanced accuracy = mean recall over
    classes present; macro-F1 over classes seen in truth or prediction (NaN where undefined)."""
    confusions = confusions.astype(np.float64)
    total = confusions.sum(axis=(1, 2))
    tp = np.diagonal(confusions, axis1=1, axis2=2)
    support = confusions.sum(axis=2)
    predicted = confusions.sum(axis=1)
    present = support > 0
    seen = present | (predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=seen)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": tp.sum(axis=1) / total,
            "balanced_accuracy": recall.sum(axis=1) / present.sum(axis=1),
            "macro_f1": f1.sum(axis=1) / seen.sum(axis=1),
        }


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """The three metrics of one [C, C] confusion matrix."""
    return {name: float(values[0]) for name, values in metrics_from_confusions(confusion[None]).items()}


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, bootstrap: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Each metric with its percentile bootstrap 95% interval (resampling images, seeded)."""
    confusion = confusion_matrix(
        np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64), n_classes
    )
    point = metrics_from_confusion(confusion)
    result = {name: {"value": point[name], "ci_low": point[name], "ci_high": point[name]} for name in METRICS}
    n = int(confusion.sum())
    if bootstrap > 0 and n > 1:
        cells = np.flatnonzero(confusion)  # empty cells stay empty: draw over the others only
        counts = confusion.ravel()[cells]
        draws = np.zeros((bootstrap, n_classes * n_classes), dtype=np.int64)
        draws[:, cells] = np.random.default_rng(seed).multinomial(n, counts / n, size=bootstrap)
        samples = metrics_from_confusions(draws.reshape(bootstrap, n_classes, n_classes))
        for name in METRICS:
            low, high = np.nanpercentile(samples[name], [2.5, 97.5])
            result[name].update(ci_low=float(low), ci_high=float(high))
    return result
