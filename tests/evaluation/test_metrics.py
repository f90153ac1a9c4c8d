from __future__ import annotations

import pytest
import torch

from look.evaluation import mean_per_class_accuracy, per_class_accuracy, top1_accuracy


def test_top1_and_mean_per_class_on_an_imbalanced_hand_example() -> None:
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 0, 0, 0, 1, 0, 2])
    assert top1_accuracy(predictions, targets) == pytest.approx(75.0)
    assert per_class_accuracy(predictions, targets) == {0: 100.0, 1: 50.0, 2: 50.0}
    assert mean_per_class_accuracy(predictions, targets) == pytest.approx(200.0 / 3)


def test_mean_per_class_ignores_classes_absent_from_the_targets() -> None:
    # Class 5 is predicted but never a target: it cannot have a recall.
    targets = torch.tensor([1, 1, 3])
    predictions = torch.tensor([1, 5, 3])
    assert mean_per_class_accuracy(predictions, targets) == pytest.approx(75.0)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="zero samples"):
        top1_accuracy(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="same length"):
        mean_per_class_accuracy(torch.tensor([0, 1]), torch.tensor([0]))
