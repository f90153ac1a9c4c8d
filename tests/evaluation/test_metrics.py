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


@pytest.mark.parametrize("protocol", ["knn", "linear", "fewshot"])
def test_protocols_refuse_features_that_would_give_a_meaningless_accuracy(protocol: str) -> None:
    from look.evaluation import (
        FewShotOptions,
        KnnOptions,
        LinearProbeOptions,
        fewshot_evaluate,
        knn_classify,
        linear_probe,
    )

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 8, generator=generator)
    labels = torch.arange(60) % 3

    def run(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor) -> object:
        if protocol == "knn":
            return knn_classify(train, train_labels, test, labels[:30], options=KnnOptions(ks=(5,)))
        if protocol == "linear":
            options = LinearProbeOptions(c_grid=(1.0,), max_iter=5)
            return linear_probe(train, train_labels, test, labels[:30], options=options)
        options = FewShotOptions(n_way=2, shots=(1,), queries=2, episodes=3)
        return fewshot_evaluate(train, train_labels, options=options)

    run(features, labels, features[:30])  # (the well-formed call works)
    # One NaN row was every query's nearest neighbour in kNN (chance accuracy, no error).
    poisoned = features.clone()
    poisoned[[4, 7], 0] = float("nan")
    with pytest.raises(ValueError, match=r"features hold NaN or Inf in 2 row\(s\): 4, 7"):
        run(poisoned, labels, features[:30])
    with pytest.raises(ValueError, match="one class index per feature row: 60 rows"):
        run(features, labels[:10], features[:30])
    with pytest.raises(ValueError, match="labels must be >= 0, got -1"):
        run(features, labels - 1, features[:30])
    if protocol != "fewshot":
        with pytest.raises(ValueError, match="differ in dimension: 8 vs 4"):
            run(features, labels, features[:30, :4])
        with pytest.raises(ValueError, match="test features hold NaN"):
            run(features, labels, poisoned[:30])
        with pytest.raises(ValueError, match="needs train and test images, got 0 and 30"):
            run(features[:0], labels[:0], features[:30])
        # A label past num_classes would be scored as always wrong, not refused.
        protocol_function = knn_classify if protocol == "knn" else linear_probe
        options = KnnOptions(ks=(5,)) if protocol == "knn" else LinearProbeOptions(c_grid=(1.0,))
        with pytest.raises(
            ValueError, match="test labels must be class indices below num_classes=2, got 2"
        ):
            protocol_function(
                features, labels % 2, features[:30], labels[:30], options=options, num_classes=2
            )


def test_knn_options_say_that_ks_is_a_tuple() -> None:
    from look.evaluation import KnnOptions

    with pytest.raises(ValueError, match=r"ks must be a non-empty tuple of ints, e.g. \(20, 200\)"):
        KnnOptions(ks=20).validate()  # type: ignore[arg-type]
