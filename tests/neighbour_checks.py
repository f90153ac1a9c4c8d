"""What the fused-search tests on CPU (Triton's interpreter) and on CUDA share: one rule for "two
searches found the same neighbours", and a LOOK step whose fused search overflows."""

from __future__ import annotations

import torch

from look.methods import Batch, Method, StepOutput
from look.search import KnnResult


def assert_same_neighbours(first: KnnResult, second: KnnResult, *, atol: float) -> None:
    """The same k values per query (within ``atol``), and the same neighbour rows except where
    rows tie with the k-th value: those may be swapped for each other, nothing else may."""
    assert first.values.shape == second.values.shape
    torch.testing.assert_close(first.values, second.values, rtol=0, atol=atol)
    for row in range(first.values.shape[0]):
        rows_first = dict(zip(first.indices[row].tolist(), first.values[row].tolist(), strict=True))
        rows_second = set(second.indices[row].tolist())
        kth_value = float(first.values[row].min())
        for index in set(rows_first) - rows_second:
            assert abs(rows_first[index] - kth_value) <= atol, (
                f"query {row}: row {index} (similarity {rows_first[index]}) is a neighbour of one "
                f"search only and does not tie with the k-th value {kth_value}"
            )


def overflowing_look_step(
    method: Method, batch: Batch, *, copies: int, generator: torch.Generator
) -> tuple[StepOutput, StepOutput, torch.Tensor]:
    """Fill ``method``'s bank with random unit rows (labels from ``generator``) of which the first
    ``copies`` are the first query's embedding with label 0, so that its fused search's candidate
    buffer overflows. Returns the forward with the exactness check deferred, the forward redone
    under ``exact_redo``, and the scan's loss over the same queries and bank (the reference)."""
    import torch.nn.functional as F

    from look.losses import look_loss_terms

    memory = method.memory
    rows = memory.features.shape[0]
    method.defer_exactness_check = True
    with torch.no_grad():
        embedding = F.normalize(method.head(method.backbone(batch.views[0])).float(), dim=1)[0]
        features = F.normalize(torch.randn(rows, memory.dim, generator=generator), dim=1)
        labels = torch.randint(0, 5, (rows,), generator=generator)
        labels[:copies] = 0
        features = features.to(memory.features.device)
        features[:copies] = embedding
        memory.features.copy_(features)
        memory.labels.copy_(labels)
        memory.valid.fill_(True)
        memory.ids.copy_(torch.arange(rows, device=memory.ids.device))
    deferred = method(batch)
    assert deferred.inexact is not None and bool(deferred.inexact)
    with method.exact_redo():
        redone = method(batch)
    assert redone.inexact is None
    z = F.normalize(method.head(method.backbone(batch.views[0])).float(), dim=1)
    scan = look_loss_terms(
        z, batch.labels, memory.features, memory.labels, k=method.options.k,
        temperature=method.options.temperature, query_indices=batch.indices,
        memory_valid=memory.valid, search_backend="torch",
    )  # fmt: skip
    return deferred, redone, scan.loss.sum() / scan.valid.sum().clamp(min=1)
