"""LOOK loss vs a naive float64 per-query loop (values, validity, neighbours and gradients)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from look.losses import LookLoss, LookLossTerms, look_loss, look_loss_terms

TEMPERATURE = 0.1


@dataclass
class ReferenceTerms:
    losses: list[torch.Tensor | None]  # None where the query is dropped
    positive_in_topk: list[bool]
    neighbours: list[list[int]]  # the rows that entered the loss
    agreement: list[float]

    def mean(self, like: torch.Tensor) -> torch.Tensor:
        kept = [loss for loss in self.losses if loss is not None]
        if not kept:
            return like.sum() * 0
        return torch.stack(kept).sum() / len(kept)

    def valid(self) -> torch.Tensor:
        return torch.tensor([loss is not None for loss in self.losses])

    def values(self) -> torch.Tensor:
        return torch.stack(
            [torch.zeros((), dtype=torch.float64) if x is None else x.detach() for x in self.losses]
        )


def reference_look(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    memory: torch.Tensor,
    memory_labels: torch.Tensor,
    *,
    k: int | None,
    temperature: float,
    query_indices: torch.Tensor | None = None,
    memory_ids: torch.Tensor | None = None,
    memory_valid: torch.Tensor | None = None,
    no_positive: str = "drop",
) -> ReferenceTerms:
    """The definition, one query at a time: list the candidates, sort, take k, compute p_i."""
    rows = memory.shape[0]
    memory64 = memory.detach().double()
    ids = list(range(rows)) if memory_ids is None else memory_ids.tolist()
    out = ReferenceTerms([], [], [], [])
    for i in range(query.shape[0]):
        candidates = [
            j
            for j in range(rows)
            if (memory_valid is None or bool(memory_valid[j]))
            and (query_indices is None or ids[j] != int(query_indices[i]))
        ]
        similarity = {j: (query[i].double() * memory64[j]).sum() for j in candidates}
        ranked = sorted(candidates, key=lambda j: -similarity[j].item())
        neighbours = ranked if k is None else ranked[:k]
        label = int(query_labels[i])
        positives = [j for j in neighbours if int(memory_labels[j]) == label]
        out.positive_in_topk.append(bool(positives))
        out.agreement.append(len(positives) / len(neighbours) if neighbours else 0.0)
        if not positives and no_positive == "nearest" and k is not None:
            anywhere = [j for j in ranked if int(memory_labels[j]) == label]
            if anywhere:
                neighbours = [*neighbours[:-1], anywhere[0]]
                positives = [anywhere[0]]
        out.neighbours.append(neighbours)
        if not positives:
            out.losses.append(None)
            continue
        numerator = sum(torch.exp(similarity[j] / temperature) for j in positives)
        denominator = sum(torch.exp(similarity[j] / temperature) for j in neighbours)
        out.losses.append(-torch.log(numerator / denominator))
    return out


def make_problem(
    seed: int = 0,
    batch: int = 12,
    rows: int = 37,
    dim: int = 8,
    classes: int = 4,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Queries that are (noisy) copies of memory rows, so leave-one-out matters."""
    generator = torch.Generator().manual_seed(seed)
    memory = F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1)
    memory_labels = torch.randint(0, classes, (rows,), generator=generator)
    query_indices = torch.randperm(rows, generator=generator)[:batch]
    noise = 0.3 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    query = F.normalize(memory[query_indices] + noise, dim=1)
    return {
        "query": query.to(dtype),
        "query_labels": memory_labels[query_indices].clone(),
        "memory": memory.to(dtype),
        "memory_labels": memory_labels,
        "query_indices": query_indices,
    }


def run_both(
    problem: dict[str, torch.Tensor], **kwargs: object
) -> tuple[LookLossTerms, torch.Tensor, ReferenceTerms, torch.Tensor]:
    """Implementation and reference terms plus d(mean loss)/d(query) of each."""
    query = problem["query"].clone().requires_grad_(True)
    reference_query = problem["query"].double().clone().requires_grad_(True)
    args = (problem["query_labels"], problem["memory"], problem["memory_labels"])
    kwargs.setdefault("temperature", TEMPERATURE)
    kwargs.setdefault("query_indices", problem.get("query_indices"))
    terms = look_loss_terms(query, *args, **kwargs)  # type: ignore[arg-type]
    kwargs.pop("chunk_size", None)
    reference = reference_look(reference_query, *args, **kwargs)  # type: ignore[arg-type]
    mean = terms.loss.sum() / terms.valid.sum().clamp(min=1)
    (grad,) = torch.autograd.grad(mean, query)
    (reference_grad,) = torch.autograd.grad(
        reference.mean(reference_query), reference_query, allow_unused=True
    )
    if reference_grad is None:
        reference_grad = torch.zeros_like(reference_query)
    return terms, grad, reference, reference_grad


def assert_matches(
    terms: LookLossTerms,
    grad: torch.Tensor,
    reference: ReferenceTerms,
    reference_grad: torch.Tensor,
    *,
    atol: float,
    check_neighbours: bool = True,
) -> None:
    assert torch.equal(terms.valid, reference.valid())
    assert terms.positive_in_topk.tolist() == reference.positive_in_topk
    torch.testing.assert_close(terms.loss.double(), reference.values(), rtol=0, atol=atol)
    torch.testing.assert_close(
        terms.neighbour_agreement.double(),
        torch.tensor(reference.agreement, dtype=torch.float64),
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(grad.double(), reference_grad, rtol=0, atol=atol)
    assert not torch.isnan(terms.loss).any()
    if check_neighbours:
        for row, expected in enumerate(reference.neighbours):
            got = [j for j in terms.neighbour_indices[row].tolist() if j >= 0]
            assert sorted(got) == sorted(expected)


@pytest.mark.parametrize("no_positive", ["drop", "nearest"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_matches_reference_fp64(k: int, no_positive: str) -> None:
    problem = make_problem(seed=k)
    terms, grad, reference, reference_grad = run_both(problem, k=k, no_positive=no_positive)
    assert terms.loss.dtype == torch.float64
    assert terms.neighbour_indices.shape == (12, k)
    assert terms.valid.any()
    assert_matches(terms, grad, reference, reference_grad, atol=1e-10)


def test_some_queries_lack_positives_in_random_problem() -> None:
    # Guards the test above: with k=1 some queries must actually hit the no-positive path.
    problem = make_problem(seed=1)
    terms = look_loss_terms(
        problem["query"],
        problem["query_labels"],
        problem["memory"],
        problem["memory_labels"],
        k=1,
        temperature=TEMPERATURE,
        query_indices=problem["query_indices"],
    )
    assert (~terms.positive_in_topk).any()


@pytest.mark.parametrize("k", [2, 7, None])
def test_fp32_matches_fp64_reference(k: int | None) -> None:
    problem = make_problem(seed=3, dtype=torch.float32)
    terms, grad, reference, reference_grad = run_both(problem, k=k, no_positive="nearest")
    assert terms.loss.dtype == torch.float32
    assert_matches(
        terms, grad, reference, reference_grad, atol=1e-4, check_neighbours=k is not None
    )


@pytest.mark.parametrize("chunk_size", [1, 5, 36, 65536])
def test_all_candidates_is_nca_and_matches_reference(chunk_size: int) -> None:
    problem = make_problem(seed=4)
    problem["memory_valid"] = torch.rand(37, generator=torch.Generator().manual_seed(4)) > 0.2
    terms, grad, reference, reference_grad = run_both(
        problem, k=None, memory_valid=problem["memory_valid"], chunk_size=chunk_size
    )
    assert terms.neighbour_indices.shape == (12, 0)
    assert_matches(terms, grad, reference, reference_grad, atol=1e-10, check_neighbours=False)


def test_k_at_least_candidates_equals_nca() -> None:
    problem = make_problem(seed=5)
    common = {
        "query_labels": problem["query_labels"],
        "memory": problem["memory"],
        "memory_labels": problem["memory_labels"],
        "temperature": TEMPERATURE,
        "query_indices": problem["query_indices"],
    }
    nca = look_loss_terms(problem["query"], k=None, **common)  # type: ignore[arg-type]
    for k in (36, 37, 500):  # N-1 (exactly all candidates with leave-one-out), N, more
        top_k = look_loss_terms(problem["query"], k=k, **common)  # type: ignore[arg-type]
        torch.testing.assert_close(top_k.loss, nca.loss, rtol=0, atol=1e-12)
        assert torch.equal(top_k.valid, nca.valid)
        torch.testing.assert_close(top_k.neighbour_agreement, nca.neighbour_agreement)
        assert top_k.neighbour_indices.shape == (12, min(k, 37))
        # Leave-one-out: 36 real neighbours per query, the rest padding.
        assert torch.equal((top_k.neighbour_indices >= 0).sum(dim=1), torch.full((12,), 36))


def test_ties_in_similarity_are_harmless() -> None:
    # Every memory row appears three times with the same label, so the k-th neighbour is usually
    # one of several equal rows; which copy is picked must not change the loss.
    generator = torch.Generator().manual_seed(6)
    base = F.normalize(torch.randn(9, 5, generator=generator, dtype=torch.float64), dim=1)
    base_labels = torch.randint(0, 3, (9,), generator=generator)
    memory = base.repeat(3, 1)
    memory_labels = base_labels.repeat(3)
    query = F.normalize(torch.randn(8, 5, generator=generator, dtype=torch.float64), dim=1)
    problem = {
        "query": query,
        "query_labels": torch.randint(0, 3, (8,), generator=generator),
        "memory": memory,
        "memory_labels": memory_labels,
        "query_indices": None,
    }
    for k in (2, 4, 5, 8):
        for chunk_size in (4, 27):
            terms, grad, reference, reference_grad = run_both(
                problem, k=k, chunk_size=chunk_size, no_positive="nearest"
            )
            assert_matches(
                terms, grad, reference, reference_grad, atol=1e-10, check_neighbours=False
            )
            # The selected rows are the same *base* rows as the reference's.
            for row, expected in enumerate(reference.neighbours):
                got = [j % 9 for j in terms.neighbour_indices[row].tolist()]
                assert sorted(got) == sorted(j % 9 for j in expected)


def test_nearest_swaps_in_the_nearest_positive() -> None:
    memory = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    memory_labels = torch.tensor([0, 0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.0]])
    query_labels = torch.tensor([1])
    kwargs = {"k": 2, "temperature": 0.5}
    dropped = look_loss_terms(query, query_labels, memory, memory_labels, **kwargs)  # type: ignore[arg-type]
    assert not dropped.valid.item()
    assert dropped.loss.item() == 0.0
    assert dropped.neighbour_indices.tolist() == [[0, 1]]
    swapped = look_loss_terms(
        query,
        query_labels,
        memory,
        memory_labels,
        no_positive="nearest",
        **kwargs,  # type: ignore[arg-type]
    )
    assert swapped.valid.item()
    assert not swapped.positive_in_topk.item()
    assert swapped.neighbour_agreement.item() == 0.0  # measured on the true top-k
    assert swapped.neighbour_indices.tolist() == [[0, 2]]
    # p = e^{0.6/τ} / (e^{1/τ} + e^{0.6/τ})
    expected = -math.log(math.exp(1.2) / (math.exp(2.0) + math.exp(1.2)))
    assert swapped.loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("no_positive", ["drop", "nearest"])
def test_single_member_class_is_dropped(no_positive: str) -> None:
    problem = make_problem(seed=7)
    # Query 0's label exists only on its own memory row, which leave-one-out removes.
    problem["memory_labels"] = problem["memory_labels"].clone()
    problem["memory_labels"][problem["query_indices"][0]] = 9
    problem["query_labels"] = problem["query_labels"].clone()
    problem["query_labels"][0] = 9
    for k in (3, None):
        terms, grad, reference, reference_grad = run_both(problem, k=k, no_positive=no_positive)
        assert not terms.valid[0]
        assert terms.loss[0].item() == 0.0
        assert torch.all(grad[0] == 0)
        assert_matches(terms, grad, reference, reference_grad, atol=1e-10, check_neighbours=False)


@pytest.mark.parametrize("no_positive", ["drop", "nearest"])
@pytest.mark.parametrize("k", [3, None])
def test_no_query_has_a_positive_gives_exact_zero_with_graph(
    k: int | None, no_positive: str
) -> None:
    problem = make_problem(seed=8)
    query = problem["query"].float().requires_grad_(True)
    loss = look_loss(
        query,
        torch.full((12,), 42),  # a label no memory row has
        problem["memory"].float(),
        problem["memory_labels"],
        k=k,
        temperature=TEMPERATURE,
        no_positive=no_positive,  # type: ignore[arg-type]
    )
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert query.grad is not None
    assert torch.all(query.grad == 0)


def test_query_without_candidates_is_dropped() -> None:
    problem = make_problem(seed=9)
    query = problem["query"].clone().requires_grad_(True)
    memory_valid = torch.zeros(37, dtype=torch.bool)
    for k in (4, None):
        terms = look_loss_terms(
            query,
            problem["query_labels"],
            problem["memory"],
            problem["memory_labels"],
            k=k,
            temperature=TEMPERATURE,
            memory_valid=memory_valid,
            no_positive="nearest",
        )
        assert not terms.valid.any()
        assert torch.all(terms.loss == 0)
        assert torch.all(terms.neighbour_agreement == 0)
        (grad,) = torch.autograd.grad(terms.loss.sum(), query)
        assert torch.all(grad == 0)


def test_empty_memory() -> None:
    query = torch.randn(3, 4, requires_grad=True)
    for k in (2, None):
        loss = look_loss(
            query,
            torch.zeros(3, dtype=torch.int64),
            torch.empty(0, 4),
            torch.empty(0, dtype=torch.int64),
            k=k,
            temperature=TEMPERATURE,
        )
        assert loss.item() == 0.0
        assert loss.requires_grad


@pytest.mark.parametrize("k", [3, None])
def test_invalid_rows_are_never_neighbours(k: int | None) -> None:
    problem = make_problem(seed=10)
    memory = problem["memory"].clone()
    memory_labels = problem["memory_labels"].clone()
    memory_valid = torch.ones(37, dtype=torch.bool)
    # Rows 30.. are "unwritten": they would be every query's best positive if they counted.
    memory_valid[30:] = False
    memory[30:32] = problem["query"][:2]
    memory_labels[30:32] = problem["query_labels"][:2]
    memory[32:] = float("nan")  # garbage in unwritten rows must not leak either
    problem.update(memory=memory, memory_labels=memory_labels)
    terms, grad, reference, reference_grad = run_both(
        problem, k=k, memory_valid=memory_valid, chunk_size=5, no_positive="nearest"
    )
    assert torch.isfinite(grad).all()
    assert (terms.neighbour_indices < 30).all()
    assert_matches(
        terms, grad, reference, reference_grad, atol=1e-10, check_neighbours=k is not None
    )


def test_more_k_than_valid_rows_pads_and_stays_exact() -> None:
    problem = make_problem(seed=11)
    memory_valid = torch.zeros(37, dtype=torch.bool)
    memory_valid[:6] = True
    terms, grad, reference, reference_grad = run_both(
        problem, k=10, memory_valid=memory_valid, chunk_size=4
    )
    # Six real neighbours per query, the other slots padding (in no particular order).
    assert torch.equal((terms.neighbour_indices >= 0).sum(dim=1), torch.full((12,), 6))
    assert_matches(terms, grad, reference, reference_grad, atol=1e-10)


def test_queue_memory_with_duplicate_ids() -> None:
    # A FIFO queue holds several past embeddings of one sample; none of them is a neighbour of it.
    generator = torch.Generator().manual_seed(12)
    query = F.normalize(torch.randn(4, 6, generator=generator, dtype=torch.float64), dim=1)
    query_ids = torch.tensor([100, 101, 102, 103])
    query_labels = torch.tensor([0, 1, 0, 1])
    stale_copies = F.normalize(
        query.repeat(3, 1) + 0.05 * torch.randn(12, 6, dtype=torch.float64), dim=1
    )
    others = F.normalize(torch.randn(14, 6, generator=generator, dtype=torch.float64), dim=1)
    memory = torch.cat([stale_copies, others])
    memory_ids = torch.cat([query_ids.repeat(3), torch.arange(200, 214)])
    memory_labels = torch.cat(
        [query_labels.repeat(3), torch.randint(0, 2, (14,), generator=generator)]
    )
    problem = {
        "query": query,
        "query_labels": query_labels,
        "memory": memory,
        "memory_labels": memory_labels,
        "query_indices": query_ids,
    }
    terms, grad, reference, reference_grad = run_both(
        problem, k=5, memory_ids=memory_ids, chunk_size=7
    )
    assert_matches(terms, grad, reference, reference_grad, atol=1e-10)
    for row in range(4):
        chosen = terms.neighbour_indices[row]
        assert not (memory_ids[chosen] == query_ids[row]).any()


@pytest.mark.parametrize("k", [4, None])
def test_chunk_size_does_not_change_the_result(k: int | None) -> None:
    problem = make_problem(seed=13, dtype=torch.float32)
    results = [
        look_loss_terms(
            problem["query"],
            problem["query_labels"],
            problem["memory"],
            problem["memory_labels"],
            k=k,
            temperature=TEMPERATURE,
            query_indices=problem["query_indices"],
            chunk_size=chunk_size,
        )
        for chunk_size in (5, 1, 36, 37)  # N=37: 5 and 36 do not divide it
    ]
    for other in results[1:]:
        assert torch.equal(other.neighbour_indices, results[0].neighbour_indices)
        assert torch.equal(other.valid, results[0].valid)
        torch.testing.assert_close(other.loss, results[0].loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("memory_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [5, None])
def test_low_precision_memory(memory_dtype: torch.dtype, k: int | None) -> None:
    problem = make_problem(seed=14, dtype=torch.float32)
    exact = dict(problem)
    problem["memory"] = problem["memory"].to(memory_dtype)
    terms, grad, reference, reference_grad = run_both(problem, k=k)
    assert terms.loss.dtype == torch.float32
    # Against the reference on the same rounded memory: tight.
    assert_matches(
        terms, grad, reference, reference_grad, atol=1e-4, check_neighbours=k is not None
    )
    # Against the full-precision memory: loose (bf16 rounding moves similarities by ~4e-3).
    _, _, exact_reference, _ = run_both(exact, k=k)
    torch.testing.assert_close(terms.loss.double(), exact_reference.values(), rtol=0, atol=0.05)


def test_bf16_query_from_autocast_is_computed_in_fp32() -> None:
    problem = make_problem(seed=15, dtype=torch.float32)
    query = problem["query"].to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        terms = look_loss_terms(
            query,
            problem["query_labels"],
            problem["memory"],
            problem["memory_labels"],
            k=None,
            temperature=TEMPERATURE,
            query_indices=problem["query_indices"],
        )
    assert terms.loss.dtype == torch.float32
    reference = reference_look(
        query.detach().double(),
        problem["query_labels"],
        problem["memory"],
        problem["memory_labels"],
        k=None,
        temperature=TEMPERATURE,
        query_indices=problem["query_indices"],
    )
    torch.testing.assert_close(terms.loss.double(), reference.values(), rtol=0, atol=1e-4)
    terms.loss.sum().backward()
    assert query.grad is not None
    assert query.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("k", [3, None])
def test_no_gradient_into_memory(k: int | None) -> None:
    problem = make_problem(seed=16)
    memory = problem["memory"].clone().requires_grad_(True)
    query = problem["query"].clone().requires_grad_(True)
    loss = look_loss(
        query,
        problem["query_labels"],
        memory,
        problem["memory_labels"],
        k=k,
        temperature=TEMPERATURE,
        query_indices=problem["query_indices"],
    )
    loss.backward()
    assert memory.grad is None
    assert query.grad is not None
    assert query.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [3, 25, None])  # 25 of 37 rows takes the dense-logits path
def test_memory_may_be_updated_in_place_before_backward(k: int | None) -> None:
    # The LOOK method writes this batch into the memory after the forward and before backward.
    problem = make_problem(seed=18, dtype=torch.float32)
    memory = problem["memory"].clone()
    query = problem["query"].clone().requires_grad_(True)
    kwargs = {"k": k, "temperature": TEMPERATURE, "query_indices": problem["query_indices"]}
    loss = look_loss(query, problem["query_labels"], memory, problem["memory_labels"], **kwargs)  # type: ignore[arg-type]
    (expected,) = torch.autograd.grad(loss, query)
    loss = look_loss(query, problem["query_labels"], memory, problem["memory_labels"], **kwargs)  # type: ignore[arg-type]
    memory.mul_(0.5)
    (grad,) = torch.autograd.grad(loss, query)
    torch.testing.assert_close(grad, expected)


def test_scalar_and_module_agree_with_terms() -> None:
    problem = make_problem(seed=17)
    args = (problem["query"], problem["query_labels"], problem["memory"], problem["memory_labels"])
    terms = look_loss_terms(
        *args, k=3, temperature=TEMPERATURE, query_indices=problem["query_indices"]
    )
    assert (~terms.valid).any() and terms.valid.any()
    expected = terms.loss[terms.valid].mean()
    scalar = look_loss(*args, k=3, temperature=TEMPERATURE, query_indices=problem["query_indices"])
    module = LookLoss(3, TEMPERATURE)
    assert "k=3" in repr(module)
    torch.testing.assert_close(scalar, expected)
    torch.testing.assert_close(module(*args, query_indices=problem["query_indices"]), expected)
    module_terms = module.terms(*args, query_indices=problem["query_indices"])
    torch.testing.assert_close(module_terms.loss, terms.loss)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
        ({"temperature": -0.07}, "got -0.07"),
        ({"temperature": float("nan")}, "got nan"),
        ({"temperature": "warm"}, "temperature must be a positive number"),
        ({"k": 0}, "k must be >= 1, got 0"),
        ({"k": 1.5}, "k must be a positive integer"),
        ({"no_positive": "skip"}, "no_positive must be one of"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        (
            {"query_labels": torch.zeros(3, dtype=torch.int64)},
            r"query_labels must have shape \(4,\)",
        ),
        (
            {"memory_labels": torch.zeros(6, dtype=torch.int64)},
            r"memory_labels must have shape \(5,\)",
        ),
        ({"query_labels": torch.zeros(4)}, "query_labels must be an integer tensor"),
        ({"memory": torch.randn(5, 2)}, "same feature dimension"),
        ({"query_indices": torch.arange(5)}, r"query_ids must have shape \(4,\)"),
        ({"query": torch.full((4, 3), float("nan"))}, "query contains NaN or Inf"),
        ({"query": torch.tensor([[float("inf"), 0, 0]] * 4)}, "query contains NaN or Inf"),
    ],
)
def test_validation_errors(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "query": F.normalize(torch.randn(4, 3), dim=1),
        "query_labels": torch.zeros(4, dtype=torch.int64),
        "memory": F.normalize(torch.randn(5, 3), dim=1),
        "memory_labels": torch.zeros(5, dtype=torch.int64),
        "k": 2,
        "temperature": TEMPERATURE,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        look_loss_terms(
            arguments.pop("query"),  # type: ignore[arg-type]
            arguments.pop("query_labels"),  # type: ignore[arg-type]
            arguments.pop("memory"),  # type: ignore[arg-type]
            arguments.pop("memory_labels"),  # type: ignore[arg-type]
            **arguments,  # type: ignore[arg-type]
        )


def test_module_validates_at_construction() -> None:
    with pytest.raises(ValueError, match="got -1"):
        LookLoss(5, -1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        LookLoss(0, 0.1)
    with pytest.raises(ValueError, match="no_positive"):
        LookLoss(5, 0.1, no_positive="ignore")  # type: ignore[arg-type]
    assert LookLoss(None, 0.1).k is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("no_positive", ["drop", "nearest"])
@pytest.mark.parametrize("by_ids", [False, True])
@pytest.mark.parametrize("k", [3, 40])
def test_dense_and_gathered_logits_agree(
    k: int, by_ids: bool, no_positive: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # k=40 of 60 rows takes the logits from one dense B × N product (fp32: the search runs on
    # it too; bf16: the search is the chunked scan); a zero limit forces the chunked search and
    # the row gather.
    import importlib

    module = importlib.import_module("look.losses.look_loss")
    g = torch.Generator().manual_seed(3)
    memory = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (60,), generator=g)
    valid = torch.rand(60, generator=g) > 0.1
    memory = memory.masked_fill(~valid.unsqueeze(1), float("nan")).to(dtype)  # unwritten: anything
    # A queue's rows carry explicit ids; a bank's ids are its row numbers.
    memory_ids = torch.randperm(60, generator=g) if by_ids else None
    query_ids = memory_ids[:6] if memory_ids is not None else torch.arange(6)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(4)), dim=1)
        query.requires_grad_(True)
        terms = look_loss_terms(
            query, labels[:6], memory, labels, k=k, temperature=0.1, query_indices=query_ids,
            memory_ids=memory_ids, memory_valid=valid, no_positive=no_positive,  # type: ignore[arg-type]
        )  # fmt: skip
        terms.loss.sum().backward()
        neighbours = terms.neighbour_indices.sort(dim=1).values
        return terms.loss.detach(), query.grad, neighbours  # type: ignore[return-value]

    default_loss, default_grad, default_neighbours = run()
    monkeypatch.setattr(module, "_DENSE_LOGITS_LIMIT", 0)
    gathered_loss, gathered_grad, gathered_neighbours = run()
    assert torch.isfinite(default_grad).all()
    assert torch.equal(default_neighbours, gathered_neighbours)
    torch.testing.assert_close(default_loss, gathered_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(default_grad, gathered_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("by_ids", [False, True])
def test_nca_recomputing_backward_equals_autograd_and_keeps_no_b_by_n(
    dtype: torch.dtype, by_ids: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    module = importlib.import_module("look.losses.look_loss")
    g = torch.Generator().manual_seed(8)
    rows, batch, chunk = 90, 7, 16  # several chunks, the last one short
    memory = F.normalize(torch.randn(rows, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (rows,), generator=g)
    labels[:] = labels.clamp(max=1)  # label 2 (query 6 below) has no row: no positive
    valid = torch.rand(rows, generator=g) > 0.2
    memory = memory.masked_fill(~valid.unsqueeze(1), float("nan")).to(dtype)
    memory_ids = torch.randperm(rows, generator=g) if by_ids else None
    query_ids = (memory_ids if by_ids else torch.arange(rows))[:batch]  # type: ignore[index]
    query_labels = torch.tensor([0, 1, 0, 1, 0, 1, 2])

    def run() -> tuple[torch.Tensor, torch.Tensor, int]:
        query = F.normalize(
            torch.randn(batch, 8, generator=torch.Generator().manual_seed(9)), dim=1
        )
        query.requires_grad_(True)
        # Saved tensors that hold one value per (query, memory row) of some chunk.
        query_by_row = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal query_by_row
            if tensor.dim() == 2 and tensor.shape[0] == batch and tensor.shape[1] != 8:
                query_by_row += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            terms = look_loss_terms(
                query, query_labels, memory, labels, k=None, temperature=0.1,
                query_indices=query_ids, memory_ids=memory_ids, memory_valid=valid,
                chunk_size=chunk,
            )  # fmt: skip
        (terms.loss * torch.arange(1.0, batch + 1)).sum().backward()
        assert not bool(terms.valid[6]) and float(terms.loss[6].detach()) == 0.0
        return terms.loss.detach(), query.grad, query_by_row  # type: ignore[return-value]

    kept_loss, kept_grad, kept_saved = run()
    monkeypatch.setattr(module, "_NCA_RECOMPUTE_ABOVE", 0)
    recomputed_loss, recomputed_grad, recomputed_saved = run()
    torch.testing.assert_close(recomputed_loss, kept_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(recomputed_grad, kept_grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(recomputed_grad).all()
    # Autograd keeps several B × chunk tensors per chunk (over 2·B·N values in all); the
    # recomputing backward keeps only the queries, the rows and per-query results.
    assert kept_saved > 2 * batch * rows
    assert recomputed_saved == 0


def test_a_nan_memory_row_is_refused_on_the_cpu_unless_it_is_unused() -> None:
    # It would be every query's nearest neighbour: a NaN loss with no error.
    query = F.normalize(torch.randn(4, 3), dim=1)
    memory = F.normalize(torch.randn(10, 3), dim=1)
    labels, memory_labels = torch.arange(4) % 2, torch.arange(10) % 2
    memory[3, 0] = float("nan")
    for k in (2, None):  # LOOK and NCA
        with pytest.raises(ValueError, match="memory contains NaN or Inf"):
            look_loss(query, labels, memory, memory_labels, k=k, temperature=TEMPERATURE)
    valid = torch.ones(10, dtype=torch.bool)
    valid[3] = False  # an unwritten row may hold anything
    loss = look_loss(
        query, labels, memory, memory_labels, k=2, temperature=TEMPERATURE, memory_valid=valid
    )
    assert torch.isfinite(loss)


def test_the_module_reads_a_memory_module_as_its_tensors_would_be_passed() -> None:
    from look.memory import MemoryBank, MemoryQueue
    from look.sharded import ShardedMemoryBank

    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(4, 8, generator=generator), dim=1)
    labels = torch.tensor([0, 1, 0, 1])
    loss = LookLoss(2, TEMPERATURE)
    # A half-written bank: left without its valid mask, the unwritten zero rows would count.
    bank = MemoryBank(20, 8)
    bank.update(
        torch.arange(6),
        F.normalize(torch.randn(6, 8, generator=generator), dim=1),
        torch.arange(6) % 2,
    )
    by_tensors = loss(
        query,
        labels,
        bank.features,
        bank.labels,
        query_indices=torch.arange(4),
        memory_valid=bank.search_valid(),
    )
    assert torch.equal(loss(query, labels, bank, query_indices=torch.arange(4)), by_tensors)
    # A queue compares the ids it stores, not row numbers, with the queries' (leave-one-out).
    queue = MemoryQueue(8, 8)
    queue.update(
        torch.tensor([10, 11, 12, 13, 14]),
        F.normalize(torch.randn(5, 8, generator=generator), dim=1),
        torch.tensor([0, 1, 0, 1, 0]),
    )
    indices = torch.tensor([10, 11, 2, 3])
    by_tensors = loss.terms(
        query,
        labels,
        queue.features,
        queue.labels,
        query_indices=indices,
        memory_ids=queue.ids,
        memory_valid=queue.search_valid(),
    )
    terms = loss.terms(query, labels, queue, query_indices=indices)
    assert torch.equal(terms.loss, by_tensors.loss)
    assert 0 not in terms.neighbour_indices[0].tolist()  # row 0 holds query 0's own id, 10
    with pytest.raises(ValueError, match="memory_valid: read from the memory module"):
        loss(query, labels, bank, memory_valid=bank.search_valid())
    with pytest.raises(ValueError, match="sharded_look_loss_terms"):
        loss(query, labels, ShardedMemoryBank(20, 8))
    with pytest.raises(ValueError, match="memory_labels is required"):
        loss(query, labels, bank.features)


def test_a_bank_needs_the_queries_indices_in_its_range() -> None:
    """Without them each query would be its own nearest neighbour (its row is in the bank)."""
    from look.memory import MemoryBank

    generator = torch.Generator().manual_seed(0)
    bank = MemoryBank(10, 8)
    rows = F.normalize(torch.randn(10, 8, generator=generator), dim=1)
    bank.update(torch.arange(10), rows, torch.arange(10) % 2)
    loss = LookLoss(2, TEMPERATURE)
    labels = torch.arange(4) % 2
    with pytest.raises(ValueError, match="query_indices is required with a MemoryBank"):
        loss(rows[:4], labels, bank)
    with pytest.raises(ValueError, match=r"query_indices lie in \[100, 103\], outside \[-1, 10\)"):
        loss(rows[:4], labels, bank, query_indices=torch.arange(4) + 100)
    # -1: queries that are not in the bank (their own rows are not there to leave out).
    outside = loss.terms(rows[:4], labels, bank, query_indices=torch.full((4,), -1))
    inside = loss.terms(rows[:4], labels, bank, query_indices=torch.arange(4))
    assert outside.neighbour_indices[:, 0].tolist() == [0, 1, 2, 3], "each finds its own row"
    assert all(i not in row for i, row in enumerate(inside.neighbour_indices.tolist()))


def test_a_queue_needs_the_queries_indices_and_says_so() -> None:
    # (it once said "memory_ids was given without query_ids", ids the user never passed)
    from look.memory import MemoryQueue

    queue = MemoryQueue(8, 3)
    queue.update(torch.arange(4), torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    query = F.normalize(torch.randn(2, 3), dim=1)
    with pytest.raises(ValueError, match="query_indices is required with a MemoryQueue"):
        LookLoss(2, TEMPERATURE)(query, torch.tensor([0, 1]), queue)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
@pytest.mark.parametrize("k", [3, 9, None])
def test_narrow_integer_ids_and_labels_give_the_int64_loss(
    dtype: torch.dtype, k: int | None
) -> None:
    # gather and indexing take int32/int64 only: narrower ids once crashed inside the search.
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(4, 3, generator=generator), dim=1)
    memory = F.normalize(torch.randn(10, 3, generator=generator), dim=1)
    query_labels = torch.randint(0, 2, (4,), generator=generator)
    memory_labels = torch.randint(0, 2, (10,), generator=generator)
    ids = torch.arange(4)
    expected = look_loss_terms(
        query, query_labels, memory, memory_labels, k=k, temperature=0.1, query_indices=ids
    )
    narrow = look_loss_terms(
        query, query_labels.to(dtype), memory, memory_labels.to(dtype), k=k, temperature=0.1,
        query_indices=ids.to(dtype),
    )  # fmt: skip
    torch.testing.assert_close(narrow.loss, expected.loss)
    assert torch.equal(narrow.valid, expected.valid)


def test_loss_modules_warn_about_rows_that_are_not_unit_vectors() -> None:
    import warnings

    from look.losses import NotUnitNormWarning, SupConLoss

    generator = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(8, 4, generator=generator), dim=1)
    labels = torch.arange(8) % 2
    memory = F.normalize(torch.randn(20, 4, generator=generator), dim=1)
    memory_labels = torch.arange(20) % 2
    look, supcon = LookLoss(k=5, temperature=0.1), SupConLoss(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotUnitNormWarning)  # unit rows: silent
        look(z, labels, memory, memory_labels)
        supcon(z, labels)
    # A forgotten normalize: the loss would read a norm of 3 as a temperature 3 times smaller.
    with pytest.warns(NotUnitNormWarning, match=r"LookLoss: the rows of query .*normalize"):
        look(3 * z, labels, memory, memory_labels)
    with pytest.warns(NotUnitNormWarning, match=r"SupConLoss: the rows of anchors"):
        supcon(3 * z, labels)
