"""Classification metrics: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassScores:
    """One class's figures on one split."""

    precision: float
    recall: float
    f1: float
    support: int  # images of the class in the split


@dataclass(frozen=True)
class ClassificationReport:
    """Everything metrics.json holds for one model on one split; dataclasses.asdict gives its JSON."""

    accuracy: float
    macro_f1: float
    n: int  # images in the split
    per_class: dict[str, ClassScores]  # in the order of the classes
    confusion: list[list[int]]  # counts, rows = true class, columns = predicted class


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> ClassificationReport:
    """Accuracy, macro-F1 and each class's precision, recall and F1 of `y_pred`, as plain floats and ints.

    A class never predicted has precision 0 and a class absent from y_true has recall 0, the
    usual convention (sklearn's zero_division=0), so macro-F1 is never NaN.
    """
    cm = confusion_matrix(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    actual = cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = int(cm.sum())
    return ClassificationReport(
        accuracy=float(tp.sum() / total) if total else 0.0,
        macro_f1=float(f1.mean()),
        n=total,
        per_class={
            c: ClassScores(
                precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]), support=int(actual[i])
            )
            for i, c in enumerate(classes)
        },
        confusion=cm.tolist(),
    )
