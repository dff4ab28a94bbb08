"""Tests of retrieval.metrics against independent references.

The references are a plain Python loop written from docs/protocol.md's formulas,
scikit-learn's ``average_precision_score`` and torchmetrics' ``RetrievalMAP``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import reference_ap
from sklearn.metrics import average_precision_score
from torchmetrics.retrieval import RetrievalMAP

from retrieval.metrics import RetrievalEvaluation, average_precision, evaluate_rankings, rank_order

LARGE = 96.0**2


def random_problem(seed: int, queries: int = 12, images: int = 60) -> dict[str, np.ndarray]:
    """Ground truth and scores with ties (one decimal), negative scores, unsorted ids,
    some queries without positives, and ignore masks that also hit relevant images."""
    rng = np.random.default_rng(seed)
    relevant = rng.random((queries, images)) < rng.uniform(0.02, 0.4, (queries, 1))
    relevant[:2] = False
    return {
        "scores": np.round(rng.normal(size=(queries, images)), 1).astype(np.float32),
        "relevant": relevant,
        "ignore": rng.random((queries, images)) < 0.2,
        "max_area": rng.uniform(0, 2 * LARGE, (queries, images)).astype(np.float32),
        "image_ids": rng.permutation(images) * 7 + 3,
    }


def reference_rows(problem, ignore, top_k=None, normalize="min_k_p") -> np.ndarray:
    """``reference_ap`` of every query of ``problem`` with the given ignore mask."""
    return np.array(
        [
            reference_ap(s, r, g, problem["image_ids"], top_k, normalize)
            for s, r, g in zip(problem["scores"], problem["relevant"], ignore, strict=True)
        ]
    )


def test_rank_order_breaks_ties_by_image_id():
    """Equal scores are ordered by ascending image id, not by column position."""
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]])
    ids = torch.tensor([40, 30, 10, 20, 50])
    expected = torch.tensor([[3, 1, 2, 0, 4], [2, 3, 1, 0, 4]])
    assert torch.equal(rank_order(scores, ids), expected)
    assert torch.equal(rank_order(scores[0], ids), expected[0])


def test_tie_break_changes_ap_hand_computed():
    """Ties resolved by image id: relevant images at ranks 3 and 4 give (1/3 + 2/4) / 2;
    with the ids reversed they move to ranks 1 and 4: (1 + 2/4) / 2."""
    scores = torch.tensor([0.5, 0.5, 0.5, 0.1])
    target = torch.tensor([True, False, False, True])
    late = average_precision(scores, target, tie_break=torch.tensor([3, 1, 2, 0]))
    early = average_precision(scores, target, tie_break=torch.tensor([0, 1, 2, 3]))
    assert late.item() == pytest.approx(5 / 12)
    assert early.item() == pytest.approx(0.75)


@pytest.mark.parametrize("normalize", ["min_k_p", "hits"])
@pytest.mark.parametrize("top_k", [1, 3, 10, 50, None])
def test_average_precision_matches_loop(top_k, normalize):
    """On random data with ties, negatives, ignored and empty queries, every row equals
    the docs/protocol.md loop (NaN exactly where the loop has no positives)."""
    problem = random_problem(seed=top_k or 0)
    ours = average_precision(
        torch.from_numpy(problem["scores"]),
        torch.from_numpy(problem["relevant"]),
        top_k=top_k,
        ignore=torch.from_numpy(problem["ignore"]),
        tie_break=torch.from_numpy(problem["image_ids"]),
        normalize=normalize,
    )
    expected = reference_rows(problem, problem["ignore"], top_k, normalize)
    assert ours.dtype == torch.float64
    assert ours.shape == (12,)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12)


def test_full_ap_matches_sklearn():
    """Full AP equals scikit-learn's average_precision_score on tie-free scores."""
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(6, 80))
    target = rng.random((6, 80)) < 0.3
    ours = average_precision(torch.from_numpy(scores), torch.from_numpy(target))
    for row in range(6):
        expected = average_precision_score(target[row], scores[row])
        assert ours[row].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("top_k", [5, 20])
def test_hits_variant_matches_torchmetrics(top_k):
    """normalize="hits" equals torchmetrics RetrievalMAP(top_k) on tie-free scores.

    torchmetrics >= 1.8 treats scores <= 0 as not retrieved, so its scores are shifted
    to be positive (our ranking does not depend on the sign), and only queries with
    positives are compared (its default 'neg' scores an empty query 0; ours skips it).
    """
    rng = np.random.default_rng(2)
    scores = torch.from_numpy(rng.normal(size=(8, 50)))
    target = torch.from_numpy(rng.random((8, 50)) < 0.2)
    target[0] = False
    ours = average_precision(scores, target, top_k=top_k, normalize="hits")
    kept = target.any(dim=1)
    metric = RetrievalMAP(top_k=top_k)
    indexes = torch.arange(8).unsqueeze(1).expand(8, 50)
    metric.update(scores[kept] - scores.min() + 1, target[kept], indexes[kept])
    assert torch.isnan(ours[0])
    assert metric.compute().item() == pytest.approx(ours[kept].mean().item(), rel=1e-6)


def test_no_positives_is_nan_and_skipped():
    """A query without relevant (non-ignored) images is NaN, left out of the mean and
    counted in categories_skipped; ignoring its only positive makes it skipped too."""
    scores = np.array([[0.9, 0.1, 0.5], [0.9, 0.1, 0.5], [0.9, 0.1, 0.5]])
    relevant = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=bool)
    ignore = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]], dtype=bool)
    out = evaluate_rankings(scores, relevant, ignore, np.zeros((3, 3)), np.arange(3), top_k=2)
    assert np.isnan(out["ap"][[0, 2]]).all()
    assert out["ap"][1] == 1.0
    assert out["map"] == 1.0
    assert out["map@2"] == 1.0
    assert out["map@2_hits"] == 1.0
    assert out["categories"] == 3
    assert out["categories_skipped"] == 2
    assert out["positives"].tolist() == [0, 1, 0]
    assert torch.isnan(average_precision(torch.tensor([0.3, 0.2]), torch.tensor([False, False])))


def test_no_category_with_positives_gives_nan_means():
    """With nothing to average, every mean is NaN rather than 0 or a warning."""
    out = evaluate_rankings(
        np.ones((2, 3)),
        np.zeros((2, 3), bool),
        np.zeros((2, 3), bool),
        np.zeros((2, 3)),
        np.arange(3),
    )
    assert all(math.isnan(out[key]) for key in ("map", "map@50", "map@50_hits", "map_s-m"))
    assert out["categories_skipped"] == out["categories_skipped_s-m"] == 2


@pytest.mark.parametrize("top_k", [1, 4, None])
def test_all_positives_score_one(top_k):
    """When every image is relevant, every precision@k is 1, so every AP is 1."""
    scores = torch.randn(3, 7)
    target = torch.ones(3, 7, dtype=torch.bool)
    for normalize in ("min_k_p", "hits"):
        ap = average_precision(scores, target, top_k=top_k, normalize=normalize)
        assert torch.equal(ap, torch.ones(3, dtype=torch.float64))


def test_ranking_does_not_depend_on_sign():
    """All-negative scores rank exactly like the same scores shifted to be positive
    (unlike torchmetrics >= 1.8, which drops scores <= 0)."""
    rng = np.random.default_rng(3)
    scores = torch.from_numpy(-rng.random((5, 40)) - 1.0)
    target = torch.from_numpy(rng.random((5, 40)) < 0.3)
    assert torch.equal(rank_order(scores), rank_order(scores + 10.0))
    for top_k in (5, None):
        negative = average_precision(scores, target, top_k=top_k)
        shifted = average_precision(scores + 10.0, target, top_k=top_k)
        assert torch.equal(negative, shifted)
    assert (average_precision(scores, target) > 0).all()


def test_negative_infinity_ranks_last():
    """-inf is a legal score: it ranks after every finite score, ties broken by id.
    Ranking: 0.2, -3.0, then the -inf pair by id (id 2 before id 5): hits at 2 and 4."""
    scores = torch.tensor([-math.inf, 0.2, -math.inf, -3.0])
    target = torch.tensor([True, False, False, True])
    ids = torch.tensor([5, 1, 2, 3])
    assert rank_order(scores, ids).tolist() == [1, 3, 2, 0]
    ap = average_precision(scores, target, tie_break=ids)
    assert ap.item() == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert ap.item() == pytest.approx(reference_ap(scores.tolist(), target.tolist(), None, ids))


def test_top_k_larger_than_database():
    """K > N is legal: AP@K then equals the full AP (min(K, P) = P), in both variants."""
    problem = random_problem(seed=4)
    scores, target = torch.from_numpy(problem["scores"]), torch.from_numpy(problem["relevant"])
    full = average_precision(scores, target)
    for normalize in ("min_k_p", "hits"):
        at_k = average_precision(scores, target, top_k=1000, normalize=normalize)
        torch.testing.assert_close(at_k, full, equal_nan=True)


@pytest.mark.parametrize("top_k", [3, None])
def test_ignore_equals_deleting_columns(top_k):
    """Ignoring an image for a query gives the AP of the same query with that image's
    column deleted from the database."""
    problem = random_problem(seed=5)
    ignore = problem["ignore"]
    ours = average_precision(
        torch.from_numpy(problem["scores"]),
        torch.from_numpy(problem["relevant"]),
        top_k=top_k,
        ignore=torch.from_numpy(ignore),
        tie_break=torch.from_numpy(problem["image_ids"]),
    )
    for row in range(len(ignore)):
        kept = ~ignore[row]
        deleted = average_precision(
            torch.from_numpy(problem["scores"][row, kept]),
            torch.from_numpy(problem["relevant"][row, kept]),
            top_k=top_k,
            tie_break=torch.from_numpy(problem["image_ids"][kept]),
        )
        torch.testing.assert_close(ours[row], deleted, equal_nan=True)


def test_small_medium_equals_removing_large_relevant_images():
    """s-m metrics equal the plain metrics with each category's relevant images whose
    largest instance is >= large_area removed by hand; large negatives stay."""
    problem = random_problem(seed=6)
    out = evaluate_rankings(**problem, top_k=10, large_area=LARGE)
    removed = problem["ignore"] | (problem["relevant"] & (problem["max_area"] >= LARGE))
    np.testing.assert_allclose(out["ap@10_s-m"], reference_rows(problem, removed, 10), rtol=1e-12)
    np.testing.assert_allclose(out["ap_s-m"], reference_rows(problem, removed), rtol=1e-12)
    kept_positives = (problem["relevant"] & ~removed).sum(axis=1)
    assert out["positives_s-m"].tolist() == kept_positives.tolist()


def test_small_medium_keeps_large_negatives_hand_computed():
    """A negative with a large area still outranks the small positive: AP = 1/2, not 1."""
    out = evaluate_rankings(
        np.array([[0.9, 0.8, 0.7]]),
        np.array([[False, True, True]]),
        np.zeros((1, 3), bool),
        np.array([[1e6, 1e6, 10.0]]),
        np.array([1, 2, 3]),
        top_k=2,
    )
    assert out["ap_s-m"][0] == pytest.approx(0.5)
    assert out["ap"][0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["positives_s-m"][0] == 1
    assert out["positives"][0] == 2


def test_evaluate_rankings_matches_loop():
    """Every per-category array equals the loop, and each mean is the mean of the
    categories that have positives."""
    problem = random_problem(seed=7)
    out = evaluate_rankings(**problem, top_k=5)
    ignore = problem["ignore"]
    np.testing.assert_allclose(out["ap@5"], reference_rows(problem, ignore, 5), rtol=1e-12)
    np.testing.assert_allclose(out["ap"], reference_rows(problem, ignore), rtol=1e-12)
    hits = reference_rows(problem, ignore, 5, "hits")
    np.testing.assert_allclose(out["ap@5_hits"], hits, rtol=1e-12)
    assert out["map@5_hits"] == pytest.approx(np.nanmean(hits), rel=1e-12)
    assert out["map"] == pytest.approx(np.nanmean(reference_rows(problem, ignore)), rel=1e-12)
    assert out["positives"].tolist() == (problem["relevant"] & ~ignore).sum(axis=1).tolist()
    assert out["categories_skipped"] == int((out["positives"] == 0).sum()) >= 2


def test_min_k_p_and_hits_differ_on_a_late_hit():
    """P < K with a late hit (the LVIS-rare pattern): min(K, P) keeps the late hit's
    share missing, so AP@K <= AP; dividing by hits found puts AP@K above AP.
    Ranking [hit, -, -, -, hit], K = 3: 1/2, 1/1, and full AP (1 + 2/5) / 2."""
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    target = torch.tensor([True, False, False, False, True])
    min_k_p = average_precision(scores, target, top_k=3).item()
    hits = average_precision(scores, target, top_k=3, normalize="hits").item()
    full = average_precision(scores, target).item()
    assert (min_k_p, hits, full) == pytest.approx((0.5, 1.0, 0.7))
    assert min_k_p <= full < hits


def test_split_means():
    """Per-split means average only that split's categories with positives; categories
    labelled None belong to no split."""
    problem = random_problem(seed=8, queries=6)
    splits = ["rare", "common", "rare", None, "common", "rare"]
    out = evaluate_rankings(**problem, top_k=10, splits=splits)
    rare = np.array([0, 2, 5])
    assert out["rare.map@10"] == pytest.approx(np.nanmean(out["ap@10"][rare]))
    assert out["rare.map"] == pytest.approx(np.nanmean(out["ap"][rare]))
    assert out["rare.map@10_s-m"] == pytest.approx(np.nanmean(out["ap@10_s-m"][rare]))
    assert out["rare.categories"] == 3
    assert out["rare.categories_skipped"] == 1
    assert out["common.map"] == pytest.approx(np.nanmean(out["ap"][[1, 4]]))
    assert out["common.categories_skipped"] == 1
    assert not any(key.startswith("None") for key in out)


def metric_inputs(problem, columns):
    """The Metric's update arguments for a subset of image columns, as tensors."""
    return [torch.from_numpy(problem[key][:, columns]) for key in problem if key != "image_ids"] + [
        torch.from_numpy(problem["image_ids"][columns])
    ]


def assert_same_results(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)


def test_metric_in_shuffled_chunks_equals_functional():
    """Accumulating images chunk by chunk, in any column order, gives exactly
    evaluate_rankings over the whole matrix (ties are broken by id, not position)."""
    problem = random_problem(seed=9)
    splits = ["a", "b"] * 6
    expected = evaluate_rankings(**problem, top_k=7, splits=splits)
    metric = RetrievalEvaluation(top_k=7, splits=splits)
    shuffled = np.random.default_rng(0).permutation(60)
    for chunk in np.array_split(shuffled, [5, 6, 30]):
        metric.update(*metric_inputs(problem, chunk))
    assert_same_results(metric.compute(), expected)
    metric.reset()
    metric.update(*metric_inputs(problem, np.arange(60)))
    assert_same_results(metric.compute(), expected)


def test_metric_gathers_image_chunks_across_ranks():
    """A distributed gather (torchmetrics concatenates list states along dim 0) joins
    the two ranks' images, not their categories: rank 0 then computes the metrics of
    all images. The gather is simulated in-process by a dist_sync_fn."""
    problem = random_problem(seed=10)
    other = RetrievalEvaluation(top_k=5)
    other.update(*metric_inputs(problem, np.arange(25, 60)))
    other_states = iter(
        [torch.cat(getattr(other, name)) for name in other._reductions]  # gather order
    )

    def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        return [tensor, next(other_states)]

    metric = RetrievalEvaluation(
        top_k=5, dist_sync_fn=gather, distributed_available_fn=lambda: True
    )
    metric.update(*metric_inputs(problem, np.arange(0, 10)))
    metric.update(*metric_inputs(problem, np.arange(10, 25)))
    assert_same_results(metric.compute(), evaluate_rankings(**problem, top_k=5))


def test_metric_passes_kwargs_to_torchmetrics():
    """sync_on_compute=False reaches torchmetrics (needed when only rank 0 computes)."""
    metric = RetrievalEvaluation(sync_on_compute=False)
    assert metric.sync_on_compute is False
    assert metric.higher_is_better is True
    assert metric.full_state_update is False


@pytest.mark.parametrize("name", ["relevant", "ignore", "max_area", "image_ids"])
def test_shape_mismatch_names_the_argument(name):
    """A wrongly shaped input raises a ValueError that names it, in both forms."""
    problem = random_problem(seed=11, queries=3, images=8)
    problem[name] = problem[name][..., :-1]
    with pytest.raises(ValueError, match=name):
        evaluate_rankings(**problem)
    with pytest.raises(ValueError, match=name):
        RetrievalEvaluation().update(*[torch.as_tensor(v) for v in problem.values()])


@pytest.mark.parametrize("name", ["target", "ignore", "tie_break"])
def test_average_precision_shape_mismatch_names_the_argument(name):
    """average_precision names the argument whose shape does not fit the scores."""
    kwargs = {"target": torch.ones(2, 4, dtype=torch.bool)}
    kwargs[name] = torch.ones(3, dtype=torch.bool if name != "tie_break" else torch.long)
    with pytest.raises(ValueError, match=name):
        average_precision(torch.rand(2, 4), **kwargs)


def test_metric_rejects_a_chunk_with_other_categories():
    """Every chunk must score the same categories as the first one."""
    metric = RetrievalEvaluation()
    problem = random_problem(seed=12, queries=3, images=8)
    metric.update(*metric_inputs(problem, np.arange(4)))
    fewer = [v[:2] if v.ndim == 2 else v for v in metric_inputs(problem, np.arange(4, 8))]
    with pytest.raises(ValueError, match="categories"):
        metric.update(*fewer)


def test_invalid_inputs_raise_clear_errors():
    """NaN scores, repeated image ids, and a bad K or normalize each fail with a
    message saying what is wrong."""
    with pytest.raises(ValueError, match="NaN"):
        average_precision(torch.tensor([0.1, math.nan]), torch.tensor([True, False]))
    problem = random_problem(seed=13, queries=2, images=4)
    problem["image_ids"] = np.array([1, 2, 2, 3])
    with pytest.raises(ValueError, match="unique"):
        evaluate_rankings(**problem)
    with pytest.raises(ValueError, match="top_k"):
        average_precision(torch.rand(3), torch.ones(3, dtype=torch.bool), top_k=0)
    with pytest.raises(ValueError, match="normalize"):
        average_precision(torch.rand(3), torch.ones(3, dtype=torch.bool), normalize="mean")


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_compute_before_update_raises():
    """With no image seen there is no ranking: compute() says so instead of failing
    inside torch.cat."""
    with pytest.raises(ValueError, match="before any update"):
        RetrievalEvaluation().compute()


def test_output_shapes_and_types():
    """[N] gives a 0-d float64 tensor; evaluate_rankings gives numpy arrays per category
    and python numbers for means and counts."""
    ap = average_precision(torch.rand(5), torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool))
    assert ap.shape == ()
    assert ap.dtype == torch.float64
    out = evaluate_rankings(**random_problem(seed=14, queries=3, images=9), top_k=4)
    assert out["ap@4"].dtype == np.float64
    assert out["ap@4"].shape == (3,)
    assert out["positives"].dtype == np.int64
    assert isinstance(out["map@4"], float)
    assert isinstance(out["categories"], int)


def test_the_small_medium_rule_is_written_once():
    """Invariant: the s-m rule (a relevant image whose largest instance is at least
    ``large_area`` leaves the ranking) is written in one place, the metric's
    ``evaluate_rankings``; a second copy (once ``GroundTruth.small_medium_ignore``, never
    called) would drift from the one the reported numbers use."""
    from pathlib import Path

    import retrieval

    root = Path(retrieval.__file__).parent
    holders = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "max_area >= large_area" in p.read_text(encoding="utf-8")
    ]
    assert holders == ["metrics/functional.py"]
