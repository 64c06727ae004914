"""Metrics: confusion matrix and per-class precision/recall/F1 on small hand-computed cases."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest

from fer_search.metrics import ClassificationReport, ClassScores, classification_report, confusion_matrix

ABC = ("a", "b", "c")


def report(y_true: list[int], y_pred: list[int], classes: tuple[str, ...] = ABC) -> ClassificationReport:
    return classification_report(np.array(y_true, dtype=np.int64), np.array(y_pred, dtype=np.int64), classes)


def per_class(rep: ClassificationReport, field: str) -> list[float]:
    return [getattr(scores, field) for scores in rep.per_class.values()]


def assert_close(actual: list[float], expected: list[float]) -> None:
    assert actual == pytest.approx(expected, abs=1e-12)


def all_numbers(value: Any) -> list[float]:
    """Every number in a nested report, to check that none is NaN."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in all_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in all_numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) else []


def test_confusion_matrix_rows_are_true_columns_predicted() -> None:
    cm = confusion_matrix(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2]), 3)
    assert cm.dtype == np.int64
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_confusion_matrix_counts_repeated_pairs_and_keeps_unused_classes() -> None:
    cm = confusion_matrix(np.array([1, 1, 1, 1]), np.array([3, 3, 3, 1]), 5)
    expected = np.zeros((5, 5), dtype=np.int64)
    expected[1, 3], expected[1, 1] = 3, 1
    assert np.array_equal(cm, expected)


def test_report_hand_computed() -> None:
    # cm = [[2,1,0],[0,1,1],[0,0,1]]: predicted column sums 2,2,2; true row sums 3,2,1.
    rep = report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2])
    assert_close(per_class(rep, "precision"), [2 / 2, 1 / 2, 1 / 2])
    assert_close(per_class(rep, "recall"), [2 / 3, 1 / 2, 1 / 1])
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]  # 0.8, 0.5, 2/3
    assert_close(per_class(rep, "f1"), f1)
    assert rep.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # 59/90
    assert rep.accuracy == pytest.approx(4 / 6)
    assert per_class(rep, "support") == [3, 2, 1]
    assert rep.n == 6
    assert rep.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert list(rep.per_class) == list(ABC)


def test_class_never_predicted_has_zero_precision_not_nan() -> None:
    # Class c (2) is never predicted; class b is predicted 3 times, right once.
    rep = report([0, 1, 2, 2], [0, 1, 1, 1])
    assert_close(per_class(rep, "precision"), [1.0, 1 / 3, 0.0])
    assert_close(per_class(rep, "recall"), [1.0, 1.0, 0.0])
    assert_close(per_class(rep, "f1"), [1.0, 0.5, 0.0])
    assert rep.macro_f1 == pytest.approx(0.5)
    assert rep.accuracy == pytest.approx(0.5)
    assert not any(math.isnan(x) for x in all_numbers(dataclasses.asdict(rep)))


def test_class_absent_from_truth_has_zero_recall_and_support() -> None:
    # Class c never occurs but is predicted once (a false positive).
    rep = report([0, 0, 1, 1], [0, 2, 1, 1])
    assert_close(per_class(rep, "precision"), [1.0, 1.0, 0.0])
    assert_close(per_class(rep, "recall"), [0.5, 1.0, 0.0])
    assert_close(per_class(rep, "f1"), [2 / 3, 1.0, 0.0])
    assert per_class(rep, "support") == [2, 2, 0]
    assert rep.macro_f1 == pytest.approx(5 / 9)
    assert not any(math.isnan(x) for x in all_numbers(dataclasses.asdict(rep)))


def test_class_absent_and_never_predicted_counts_as_zero_in_macro_f1() -> None:
    rep = report([0, 1], [0, 1])
    assert_close(per_class(rep, "f1"), [1.0, 1.0, 0.0])
    assert rep.macro_f1 == pytest.approx(2 / 3)
    assert rep.accuracy == 1.0


def test_perfect_predictions() -> None:
    y = [0, 1, 2, 2, 1, 0, 2]
    rep = report(y, y)
    for key in ("precision", "recall", "f1"):
        assert per_class(rep, key) == [1.0, 1.0, 1.0]
    assert rep.accuracy == 1.0 and rep.macro_f1 == 1.0
    assert rep.confusion == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]


def test_empty_input_gives_zeros_not_nan() -> None:
    rep = report([], [])
    assert rep.n == 0 and rep.accuracy == 0.0 and rep.macro_f1 == 0.0
    assert not any(math.isnan(x) for x in all_numbers(dataclasses.asdict(rep)))


def test_report_is_what_metrics_json_holds() -> None:
    rep = classification_report(np.array([0, 1, 1], dtype=np.int64), np.array([0, 0, 1], dtype=np.int64), ("x", "y"))
    doc = dataclasses.asdict(rep)
    assert json.loads(json.dumps(doc)) == doc
    assert list(doc) == ["accuracy", "macro_f1", "n", "per_class", "confusion"]
    assert doc["per_class"]["y"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert list(doc["per_class"]["x"]) == ["precision", "recall", "f1", "support"]
    assert all(type(v) is float for s in rep.per_class.values() for v in (s.precision, s.recall, s.f1))
    assert all(type(s.support) is int for s in rep.per_class.values())
    assert type(rep.n) is int and all(type(v) is int for row in rep.confusion for v in row)
    assert rep.per_class["x"] == ClassScores(precision=0.5, recall=1.0, f1=pytest.approx(2 / 3), support=1)
