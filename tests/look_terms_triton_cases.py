"""Cases for the fused LOOK loss terms, run in a subprocess with ``TRITON_INTERPRET=1`` (Triton
reads it when the kernels are defined, so it cannot be set in-process).

Each case runs the real kernels through Triton's CPU interpreter and checks them against the
definition (a naive loop, ``tests/losses/test_look_loss.py``) or the PyTorch path. Run directly:
``TRITON_INTERPRET=1 python -m tests.look_terms_triton_cases``.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import look.losses.look_terms_triton as terms_module
from look.losses import look_loss, look_loss_terms
from look.search_triton import get_kernel_config, set_kernel_config
from tests.interpreter_cases import run_cases
from tests.losses.test_look_loss import TEMPERATURE, assert_matches, make_problem, run_both

# (look.losses exports a function of the module's name, so the attribute is not the module)
look_loss_module = importlib.import_module("look.losses.look_loss")
# An fp16 memory is searched by the fused search here too: its selections' in-register sort runs
# one program at a time in the interpreter (~30 s a case); tests/search_triton_cases.py checks it,
# these cases select with torch.sort (same neighbours).
set_kernel_config(dataclasses.replace(get_kernel_config(), select="sort"))


@contextmanager
def counting_fused_calls() -> Iterator[list[int]]:
    """Counts the calls that the fused kernels served (returned terms, not None)."""
    calls = [0]
    original = look_loss_module.fused_neighbour_terms

    def counted(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)  # type: ignore[arg-type]
        calls[0] += result is not None
        return result

    look_loss_module.fused_neighbour_terms = counted  # type: ignore[assignment]
    try:
        yield calls
    finally:
        look_loss_module.fused_neighbour_terms = original  # type: ignore[assignment]


@contextmanager
def failing_kernel(name: str, message: str) -> Iterator[list[warnings.WarningMessage]]:
    """The kernel ``name`` raises ``RuntimeError(message)`` when launched; yields the warnings
    caught meanwhile, and afterwards lets the fused terms be tried again."""

    class Broken:
        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                raise RuntimeError(message)

            return launch

    original = getattr(terms_module, name)
    setattr(terms_module, name, Broken())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        setattr(terms_module, name, original)
        terms_module._FALLBACK.failed = False


def _terms_and_grad(problem: dict[str, torch.Tensor], **kwargs: object) -> tuple[object, ...]:
    query = problem["query"].clone().requires_grad_(True)
    terms = look_loss_terms(
        query, problem["query_labels"], problem["memory"], problem["memory_labels"],
        temperature=TEMPERATURE, query_indices=problem["query_indices"], **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    weights = torch.linspace(0.5, 1.5, terms.loss.shape[0])
    (grad,) = torch.autograd.grad((terms.loss * weights).sum(), query)
    return terms, grad


def case_matches_the_naive_reference() -> None:
    """Values, counts and gradients against the definition, one query at a time in fp64."""
    with counting_fused_calls() as calls:
        for seed, k in ((0, 1), (1, 3), (2, 10), (3, 10)):
            problem = make_problem(seed=seed, batch=12, rows=60, dim=16, dtype=torch.float32)
            assert_matches(*run_both(problem, k=k), atol=2e-5)
    assert calls[0] == 4, calls


def case_padding_and_queries_without_positive() -> None:
    """More k than valid rows (padding slots) and a query whose label no row has: exact zeros, no
    NaN, zero gradient for it, the rest as in PyTorch."""
    problem = make_problem(seed=5, batch=10, rows=100, dim=16, dtype=torch.float32)
    valid_rows = torch.rand(100, generator=torch.Generator().manual_seed(1)) > 0.85  # ~15 rows
    problem["query_labels"][0] = 99  # no row has this label
    kwargs = {"k": 20, "memory_valid": valid_rows}
    with counting_fused_calls() as calls:
        fused, fused_grad = _terms_and_grad(problem, **kwargs)
    with terms_module.fused_terms_enabled(False):
        torch_terms, torch_grad = _terms_and_grad(problem, **kwargs)
    assert calls[0] == 1
    assert (fused.neighbour_indices == -1).any()  # type: ignore[attr-defined]
    assert not fused.valid[0] and fused.loss[0] == 0 and not fused_grad[0].any()  # type: ignore[attr-defined]
    assert torch.equal(fused.valid, torch_terms.valid)  # type: ignore[attr-defined]
    assert torch.equal(fused.positive_in_topk, torch_terms.positive_in_topk)  # type: ignore[attr-defined]
    torch.testing.assert_close(fused.loss, torch_terms.loss, rtol=0, atol=1e-5)  # type: ignore[attr-defined]
    torch.testing.assert_close(
        fused.neighbour_agreement,
        torch_terms.neighbour_agreement,
        rtol=0,
        atol=1e-7,  # type: ignore[attr-defined]
    )
    torch.testing.assert_close(fused_grad, torch_grad, rtol=0, atol=1e-5)
    assert torch.isfinite(fused_grad).all()


def case_a_query_without_any_neighbour() -> None:
    """Only padding slots: no neighbour, no positive, loss exactly 0, zero gradient, no NaN."""
    generator = torch.Generator().manual_seed(11)
    memory = F.normalize(torch.randn(40, 8, generator=generator), dim=1)
    queries = F.normalize(torch.randn(3, 8, generator=generator), dim=1).requires_grad_(True)
    indices = torch.randint(0, 40, (3, 6), generator=generator)
    indices[1] = -1
    labels = torch.randint(0, 2, (40,), generator=generator)
    result = terms_module.fused_neighbour_terms(queries, memory, indices, labels[:3], labels, 0.1)
    assert result is not None
    loss, valid, agreement = result
    (grad,) = torch.autograd.grad(loss.sum(), queries)
    assert not valid[1] and loss[1] == 0 and agreement[1] == 0
    assert not grad[1].any() and torch.isfinite(grad).all() and torch.isfinite(loss).all()
    positives = labels[indices[[0, 2]]] == labels[[0, 2]].unsqueeze(1)
    torch.testing.assert_close(agreement[[0, 2]], positives.float().mean(dim=1))


def case_a_non_finite_query_gets_a_nan_loss_that_counts() -> None:
    """As on an accelerator (no host check): NaN loss, valid, so the mean is NaN; the other
    queries' terms and gradients as in PyTorch."""
    problem = make_problem(seed=12, batch=12, rows=100, dim=16, dtype=torch.float32)
    problem["query"][2, 3] = float("nan")
    finite = torch.ones(12, dtype=torch.bool)
    finite[2] = False
    original = look_loss_module.host_reads_are_free
    look_loss_module.host_reads_are_free = lambda device: False  # the accelerator policy
    results = {}
    try:
        for fused in (True, False):
            with terms_module.fused_terms_enabled(fused):
                query = problem["query"].clone().requires_grad_(True)
                terms = look_loss_terms(
                    query, problem["query_labels"], problem["memory"], problem["memory_labels"],
                    k=5, temperature=TEMPERATURE, query_indices=problem["query_indices"],
                )  # fmt: skip
                (grad,) = torch.autograd.grad(torch.where(finite, terms.loss, 0.0).sum(), query)
                results[fused] = terms, grad
    finally:
        look_loss_module.host_reads_are_free = original
    (fused_terms, fused_grad), (torch_terms, torch_grad) = results[True], results[False]
    assert torch.isnan(fused_terms.loss[2]) and fused_terms.valid[2]
    assert torch.equal(fused_terms.valid, torch_terms.valid)
    torch.testing.assert_close(
        fused_terms.loss[finite], torch_terms.loss[finite], rtol=0, atol=1e-5
    )
    torch.testing.assert_close(fused_grad[finite], torch_grad[finite], rtol=0, atol=1e-5)
    assert not fused_grad[2].any()


def case_strided_inputs_as_pytorch() -> None:
    """Memory rows, labels and queries that are views with strides give the PyTorch terms."""
    generator = torch.Generator().manual_seed(13)
    memory = F.normalize(torch.randn(400, 16, generator=generator), dim=1)[::2]
    labels = torch.randint(0, 3, (400,), generator=generator)[::2]
    queries = F.normalize(torch.randn(9, 32, generator=generator)[:, :16], dim=1)
    queries = queries.t().contiguous().t()  # column-major: not contiguous by rows
    indices = torch.randint(0, 200, (9, 7), generator=generator).t().contiguous().t()
    assert not (memory.is_contiguous() or labels.is_contiguous() or queries.is_contiguous())
    query_labels = torch.randint(0, 3, (9,), generator=generator)
    leaf = queries.detach().requires_grad_(True)
    result = terms_module.fused_neighbour_terms(leaf, memory, indices, query_labels, labels, 0.1)
    assert result is not None
    loss, valid, agreement = result
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    is_positive = labels[indices] == query_labels.unsqueeze(1)
    reference_leaf = queries.detach().clone().requires_grad_(True)
    logits = (reference_leaf.unsqueeze(1) * memory[indices]).sum(-1) / 0.1
    expected = torch.where(
        is_positive.any(1),
        torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~is_positive, -1e30), 1),
        0.0,
    )
    (expected_grad,) = torch.autograd.grad(expected.sum(), reference_leaf)
    torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)
    assert torch.equal(valid, is_positive.any(1))
    torch.testing.assert_close(agreement, is_positive.float().mean(1))


def case_half_precision_memory_as_pytorch() -> None:
    """An fp16 memory (the interpreter has no bf16): rows widened to fp32, as PyTorch does."""
    problem = make_problem(seed=6, batch=16, rows=300, dim=24, dtype=torch.float32)
    problem["memory"] = problem["memory"].half()
    with counting_fused_calls() as calls:
        fused, fused_grad = _terms_and_grad(problem, k=30)
    with terms_module.fused_terms_enabled(False):
        torch_terms, torch_grad = _terms_and_grad(problem, k=30)
    assert calls[0] == 1
    torch.testing.assert_close(fused.loss, torch_terms.loss, rtol=0, atol=1e-5)  # type: ignore[attr-defined]
    torch.testing.assert_close(fused_grad, torch_grad, rtol=0, atol=1e-5)


def case_memory_updated_in_place_before_backward() -> None:
    """The backward pass uses the rows the forward pass saw, not the rewritten memory."""
    problem = make_problem(seed=7, batch=12, rows=60, dim=16, dtype=torch.float32)
    memory = problem["memory"].clone()
    query = problem["query"].clone().requires_grad_(True)
    args = (query, problem["query_labels"], memory, problem["memory_labels"])
    kwargs = {"k": 5, "temperature": TEMPERATURE, "query_indices": problem["query_indices"]}
    with counting_fused_calls() as calls:
        (expected,) = torch.autograd.grad(look_loss(*args, **kwargs), query)  # type: ignore[arg-type]
        loss = look_loss(*args, **kwargs)  # type: ignore[arg-type]
        memory.mul_(0.5)
        (grad,) = torch.autograd.grad(loss, query)
    assert calls[0] == 2
    torch.testing.assert_close(grad, expected)


def case_nearest_rule_and_dense_path_stay_in_pytorch() -> None:
    """ "nearest" swaps neighbours first, and a large k next to a small memory takes the whole
    product: both keep the PyTorch terms."""
    problem = make_problem(seed=8, batch=12, rows=37, dim=8, dtype=torch.float32)
    with counting_fused_calls() as calls:
        assert_matches(*run_both(problem, k=3, no_positive="nearest"), atol=2e-5)
        assert_matches(*run_both(problem, k=30), atol=2e-5)  # 37 × 4 <= 30 × 8: dense
    assert calls[0] == 0, calls


def case_a_failing_kernel_warns_once_and_pytorch_takes_over() -> None:
    problem = make_problem(seed=9, batch=12, rows=60, dim=16, dtype=torch.float32)
    with terms_module.fused_terms_enabled(False):
        expected, expected_grad = _terms_and_grad(problem, k=5)
    with failing_kernel("_terms_forward_kernel", "no kernel for this GPU") as caught:
        terms, grad = _terms_and_grad(problem, k=5)
        again, _ = _terms_and_grad(problem, k=5)  # not retried: no second warning
    messages = [str(w.message) for w in caught if "fused Triton LOOK loss terms" in str(w.message)]
    assert len(messages) == 1 and "no kernel for this GPU" in messages[0], messages
    torch.testing.assert_close(terms.loss, expected.loss)  # type: ignore[attr-defined]
    torch.testing.assert_close(again.loss, expected.loss)  # type: ignore[attr-defined]
    torch.testing.assert_close(grad, expected_grad)


def case_a_failing_backward_kernel_gives_the_same_gradient() -> None:
    problem = make_problem(seed=10, batch=12, rows=60, dim=16, dtype=torch.float32)
    _, expected_grad = _terms_and_grad(problem, k=6)
    with failing_kernel("_terms_backward_kernel", "backward kernel unavailable") as caught:
        _, grad = _terms_and_grad(problem, k=6)
    assert any("backward kernel unavailable" in str(w.message) for w in caught)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)


def case_empty_batch() -> None:
    memory = F.normalize(torch.randn(50, 8), dim=1)
    result = terms_module.fused_neighbour_terms(
        torch.empty(0, 8), memory, torch.empty(0, 5, dtype=torch.int64),
        torch.empty(0, dtype=torch.int64), torch.zeros(50, dtype=torch.int64), 0.1,
    )  # fmt: skip
    assert result is not None and all(part.shape == (0,) for part in result)


if __name__ == "__main__":
    run_cases(globals())
