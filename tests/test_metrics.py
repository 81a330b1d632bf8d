import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from dermcir.metrics import accuracy_at_k, average_precision, mean_average_precision, retrieval_metrics


def naive_ap(scores, q, d):
    """Reference: sort (pessimistic ties: irrelevant first), precision at each hit."""
    out = []
    for i in range(len(q)):
        rel = np.array([d[j] == q[i] for j in range(len(d))])
        order = sorted(range(len(d)), key=lambda j: (-scores[i][j], rel[j]))
        hits, total = 0, 0.0
        for rank, j in enumerate(order, 1):
            if rel[j]:
                hits += 1
                total += hits / rank
        out.append(total / rel.sum() if rel.sum() else np.nan)
    return np.array(out)


def naive_acc(scores, q, d, k):
    good, answerable = 0, 0
    for i in range(len(q)):
        rel = np.array([d[j] == q[i] for j in range(len(d))])
        if not rel.any():  # no relevant item: left out, as mAP leaves it out
            continue
        answerable += 1
        order = sorted(range(len(d)), key=lambda j: (-scores[i][j], rel[j]))[:k]
        good += any(rel[j] for j in order)
    return good / answerable


@pytest.mark.parametrize("seed", range(5))
def test_ap_matches_sklearn_without_ties(seed):
    rng = np.random.default_rng(seed)
    q, d = rng.integers(0, 3, 12), rng.integers(0, 3, 40)
    scores = rng.normal(size=(12, 40))
    ours = average_precision(scores, q, d)
    for i in range(12):
        rel = d == q[i]
        if rel.any():
            assert ours[i] == pytest.approx(average_precision_score(rel, scores[i]))
        else:
            assert np.isnan(ours[i])


@pytest.mark.parametrize("seed", range(5))
def test_ap_and_acc_match_naive_loop_with_ties(seed):
    rng = np.random.default_rng(seed)
    q, d = rng.integers(0, 3, 9), rng.integers(0, 3, 25)
    scores = rng.integers(0, 3, size=(9, 25)).astype(float)  # many ties
    np.testing.assert_allclose(average_precision(scores, q, d), naive_ap(scores, q, d), equal_nan=True)
    for k in (1, 2, 4):
        assert accuracy_at_k(scores, q, d, k) == pytest.approx(naive_acc(scores, q, d, k))


@pytest.mark.parametrize("seed", range(5))
def test_ap_with_ties_is_at_most_sklearns_and_equal_on_tie_free_rows(seed):
    # scikit-learn is the independent reference here: it scores a tied group at the group's precision, which the
    # pessimistic order (tied irrelevant items first) can only lower
    rng = np.random.default_rng(seed)
    q, d = rng.integers(0, 3, 10), rng.integers(0, 3, 30)
    scores = rng.integers(0, 4, size=(10, 30)).astype(float)
    scores[:3] = rng.normal(size=(3, 30))  # three rows without ties
    ours = average_precision(scores, q, d)
    for i in range(10):
        rel = d == q[i]
        if not rel.any():
            continue
        reference = average_precision_score(rel, scores[i])
        if i < 3:
            assert ours[i] == pytest.approx(reference)
        else:
            assert ours[i] <= reference + 1e-12


def test_tied_groups_by_hand():
    # one relevant and one irrelevant item tied: both conventions give 1/2
    assert average_precision(np.array([[1.0, 1.0]]), [0], [0, 1])[0] == pytest.approx(0.5)
    assert average_precision_score([True, False], [1.0, 1.0]) == pytest.approx(0.5)
    # two relevant items tied with one irrelevant: ours ranks the irrelevant first, (1/2 + 2/3) / 2; sklearn 2/3
    assert average_precision(np.array([[1.0, 1.0, 1.0]]), [0], [0, 0, 1])[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert average_precision_score([True, True, False], [1.0, 1.0, 1.0]) == pytest.approx(2 / 3)
    assert accuracy_at_k(np.array([[1.0, 1.0, 1.0]]), [0], [0, 0, 1], 1) == 0.0


def test_queries_without_a_relevant_item_are_left_out_of_every_figure():
    q, d = np.array([0, 2]), np.array([0, 1, 1])  # nothing in the database shares query 1's category
    scores = (q[:, None] == d[None, :]).astype(float)
    assert retrieval_metrics(scores, q, d) == {"mAP": 100.0, "Acc@1": 100.0, "Acc@2": 100.0, "Acc@4": 100.0}
    assert np.isnan(accuracy_at_k(np.zeros((1, 3)), [2], [0, 1, 1], 1))


def test_constant_scores_are_not_rewarded():
    q, d = np.array([0, 1]), np.array([1, 0, 1, 0])
    assert accuracy_at_k(np.zeros((2, 4)), q, d, 2) == 0.0
    assert mean_average_precision(np.zeros((2, 4)), q, d) == pytest.approx(np.mean([(1 / 3 + 2 / 4) / 2] * 2))


def test_perfect_ranking_and_percent_output():
    q, d = np.array(["a", "b"]), np.array(["a", "b", "a", "b"])
    scores = (q[:, None] == d[None, :]).astype(float)
    assert retrieval_metrics(scores, q, d) == {"mAP": 100.0, "Acc@1": 100.0, "Acc@2": 100.0, "Acc@4": 100.0}


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 query labels and 3 database labels"):
        average_precision(np.zeros((2, 2)), [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="2D"):
        average_precision(np.zeros(3), [0], [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([[np.nan]]), [0], [0])


def test_k_and_labels_of_the_wrong_kind_are_named():
    """k=1.5 raised "slice indices must be integers", k="2" a comparison TypeError, and k=True counted as 1; labels
    from a generator raised "len() of unsized object"; tuple labels failed inside numpy's sort."""
    rng = np.random.default_rng(0)
    scores, q, d = rng.random((3, 4)), ["a", "b", "a"], ["a", "b", "a", "b"]
    for k in (1.5, "2", True, 0):
        with pytest.raises(ValueError, match=f"k must be a whole number >= 1, got {k!r}"):
            accuracy_at_k(scores, q, d, k)
    assert accuracy_at_k(scores, q, d, np.int64(2)) == accuracy_at_k(scores, q, d, 2)
    assert mean_average_precision(scores, iter(q), (x for x in d)) == mean_average_precision(scores, q, d)
    with pytest.raises(TypeError, match="not a set"):
        mean_average_precision(scores, set(q), d)
    with pytest.raises(ValueError, match=r"one value per query and per database item, got shapes \(3, 2\) and \(4,\)"):
        mean_average_precision(scores, [(1, 2), (1, 2), (3, 4)], d)
