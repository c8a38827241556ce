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


def _correctness_summaries(tables: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Per [C+1, 2] table in a [B, C+1, 2] batch (rows: true class, last row unknown class;
    columns: wrong, right): accuracy, and balanced accuracy over the known classes present."""
    tables = tables.astype(np.float64)
    accuracy = tables[:, :, 1].sum(axis=1) / tables.sum(axis=(1, 2))
    if n_classes == 0:  # pooled over tasks: classes are not comparable, accuracy only
        return {"accuracy": accuracy}
    support = tables[:, :n_classes].sum(axis=2)
    present = support > 0
    recall = np.divide(tables[:, :n_classes, 1], support, out=np.zeros_like(support), where=present)
    with np.errstate(invalid="ignore", divide="ignore"):
        balanced = recall.sum(axis=1) / present.sum(axis=1)
    return {"accuracy": accuracy, "balanced_accuracy": balanced}


def correctness_metrics(
    labels: np.ndarray,
    correct: np.ndarray,
    n_classes: int,
    bootstrap: int = 1000,
    seed: int = 0,
    images: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of per-question right/wrong outcomes, as the μ-Bench protocol scores them (each image
    chooses among its own options, so there is no shared confusion matrix): accuracy, and
    balanced accuracy = mean per-class accuracy over the true classes present (label -1: class
    unknown, counted in accuracy only). Seeded bootstrap that resamples images (`images`: each
    question's image row; None: each question an image of its own): the questions about one image
    (`modality_0` and `_1`, every coarse key of a headline) go together, as they are not
    independent, and intervals drawn from questions as if they were came out too narrow."""
    labels = np.where(np.asarray(labels) < 0, n_classes, np.asarray(labels)).astype(np.int64)
    cells = labels * 2 + np.asarray(correct, dtype=np.int64)
    table = np.bincount(cells, minlength=(n_classes + 1) * 2)
    point = {
        k: float(v[0])
        for k, v in _correctness_summaries(table.reshape(1, n_classes + 1, 2), n_classes).items()
    }
    result = {name: {"value": value, "ci_low": value, "ci_high": value} for name, value in point.items()}
    draws = _resampled_tables(cells, table, images, bootstrap, seed) if bootstrap > 0 else None
    if draws is not None:
        samples = _correctness_summaries(draws.reshape(bootstrap, n_classes + 1, 2), n_classes)
        for name in result:
            low, high = np.nanpercentile(samples[name], [2.5, 97.5])
            result[name].update(ci_low=float(low), ci_high=float(high))
    return result


def _resampled_tables(
    cells: np.ndarray, table: np.ndarray, images: np.ndarray | None, bootstrap: int, seed: int
) -> np.ndarray | None:
    """[bootstrap, cells] outcome tables of images resampled with replacement (None: fewer than two
    images). Each image is a pattern, its questions' counts per cell, and images of one pattern are
    interchangeable, so resampling m images draws Multinomial(m, pattern counts / m) over the
    patterns: a few dozen per replicate, not 17k images. With one question per image the patterns
    are the table's cells, drawn as they always were (the same numbers as before images counted)."""
    rng = np.random.default_rng(seed)
    image_of = np.arange(len(cells)) if images is None else np.unique(images, return_inverse=True)[1]
    m = int(image_of.max()) + 1 if len(image_of) else 0
    if m < 2:
        return None
    if m == len(cells):  # one question per image
        present = np.flatnonzero(table)
        draws = np.zeros((bootstrap, table.size), dtype=np.int64)
        draws[:, present] = rng.multinomial(m, table[present] / m, size=bootstrap)
        return draws
    patterns, counts = _image_patterns(image_of, cells, m, table.size)
    drawn = rng.multinomial(m, counts / m, size=bootstrap).astype(np.float64)
    return np.rint(drawn @ patterns.astype(np.float64)).astype(np.int64)  # BLAS; counts are exact


def _image_patterns(
    image_of: np.ndarray, cells: np.ndarray, m: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct per-image count vectors and how many images have each. A few dozen on μ-Bench
    (an image's questions share its class), found by sorting each vector's bytes: `np.unique(axis=0)`
    took 46 ms on the 17k images of a coarse task, this 2 ms (a sweep scores every task at every α)."""
    per_image = np.bincount(image_of * size + cells, minlength=m * size).reshape(m, size)
    if per_image.max() > 255:  # more than 255 questions of one kind about one image: not μ-Bench's
        return np.unique(per_image, axis=0, return_counts=True)
    packed = np.ascontiguousarray(per_image.astype(np.uint8)).view(np.dtype((np.void, size))).ravel()
    _, first, counts = np.unique(packed, return_index=True, return_counts=True)
    return per_image[first], counts


def paired_task_mean_difference(
    pairs: list[tuple[np.ndarray, ...]], bootstrap: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Mean over tasks of (accuracy of A - accuracy of B), each task's questions answered by both,
    with a paired percentile bootstrap 95% interval: per task, resampling draws the counts of (A
    right, B wrong) and (A wrong, B right) together, tasks independently, so what the two models
    share (the same hard questions) cancels as it does in the point value. A pair's optional third
    array is each question's image: images are resampled with all their questions, as
    `correctness_metrics` does (one question per image: the same draws as resampling questions)."""
    tables: list[np.ndarray] = []
    questions: list[tuple[np.ndarray, np.ndarray | None]] = []  # (kind of each question, its image)
    for a, b, *image in pairs:
        a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
        kinds = np.where(a & ~b, 0, np.where(~a & b, 1, 2))
        tables.append(np.bincount(kinds, minlength=3).astype(np.int64))
        questions.append((kinds, image[0] if image else None))
    value = float(np.mean([(t[0] - t[1]) / t.sum() for t in tables]))
    result = {"value": value, "ci_low": value, "ci_high": value}
    if bootstrap > 0 and tables:
        rng = np.random.default_rng(seed)
        differences = np.zeros(bootstrap)
        for table, (kinds, images) in zip(tables, questions, strict=True):
            image_of = None if images is None else np.unique(images, return_inverse=True)[1]
            if image_of is None or image_of.max() + 1 == len(kinds):  # one question per image
                n = int(table.sum())
                draws = rng.multinomial(n, table / n, size=bootstrap)
                differences += (draws[:, 0] - draws[:, 1]) / n
                continue
            m = int(image_of.max()) + 1
            patterns, counts = _image_patterns(image_of, kinds, m, 3)
            drawn = rng.multinomial(m, counts / m, size=bootstrap).astype(np.float64) @ patterns
            differences += (drawn[:, 0] - drawn[:, 1]) / drawn.sum(axis=1)
        low, high = np.percentile(differences / len(tables), [2.5, 97.5])
        result.update(ci_low=float(low), ci_high=float(high))
    return result
