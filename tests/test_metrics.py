"""The metrics of core/metrics.py (the paper's section IV) on fixed probabilities, with values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from epd_ray.core.metrics import (
    METRICS,
    accuracy,
    cmc_misclassification,
    compute_metrics,
    deid_rate,
    distance_to_all,
    emotion_mse,
    emotion_preserved,
    expression_confusion,
    expression_kept,
    genuine_acceptance,
    identity_distances,
    mu_sweep,
    paper_objective,
    pareto_front,
    privacy_gain,
    switching_deid_rate,
    top_k_hits,
)

torch.set_num_threads(2)

M = 4
ONEHOT = np.eye(M)
UNIFORM = np.full(M, 1 / M)
D_UNIFORM = math.sqrt((1 - 1 / 4) ** 2 + 3 / 16)  # = sqrt(0.75) = 0.866


def test_distances_by_hand():
    probs = np.stack([ONEHOT[0], ONEHOT[2], UNIFORM, [0.5, 0.5, 0, 0]])
    d = distance_to_all(probs)
    assert d.shape == (4, M)
    assert d[0] == pytest.approx([0, math.sqrt(2), math.sqrt(2), math.sqrt(2)])
    assert d[2] == pytest.approx([D_UNIFORM] * M)
    assert D_UNIFORM == pytest.approx(math.sqrt(0.75))
    # (0.5, 0.5, 0, 0) to e_0: sqrt(0.25 + 0.25); to e_2: sqrt(0.25 + 0.25 + 1)
    assert d[3] == pytest.approx([math.sqrt(0.5), math.sqrt(0.5), math.sqrt(1.5), math.sqrt(1.5)])
    labels = [0, 0, 1, 3]
    assert identity_distances(probs, labels) == pytest.approx([0, math.sqrt(2), D_UNIFORM, math.sqrt(1.5)])
    assert identity_distances(torch.tensor(probs), torch.tensor(labels)) == pytest.approx(
        identity_distances(probs, labels)
    )


def test_one_hot_on_another_identity_is_deidentified_but_not_switching():
    # Probe of identity 0 that the evaluator pins on identity 2.
    probs, labels = ONEHOT[[2]], [0]
    assert deid_rate(probs, labels, mu=0.35) == 1.0  # d(x', 0) = sqrt 2 > 0.35
    assert switching_deid_rate(probs, labels, mu=0.35) == 0.0  # d(x', 2) = 0 <= 0.35
    # Uniform output: far from every identity at mu = 0.35, so both count; not at mu = 0.9 > 0.866.
    assert deid_rate([UNIFORM], [0], 0.35) == 1.0 and switching_deid_rate([UNIFORM], [0], 0.35) == 1.0
    assert deid_rate([UNIFORM], [0], 0.9) == 0.0 and switching_deid_rate([UNIFORM], [0], 0.9) == 0.0


def test_rates_on_a_mixed_set():
    probs = np.stack([ONEHOT[0], ONEHOT[2], UNIFORM, [0.5, 0.5, 0, 0]])
    labels = [0, 0, 1, 3]
    mu = 0.35
    # d(own) = 0, 1.414, 0.866, 1.225  -> > 0.35 for probes 2, 3, 4
    assert deid_rate(probs, labels, mu) == pytest.approx(3 / 4)
    # nearest other identity: 1.414, 0 (pinned on 2), 0.866, 0.707 -> > 0.35 for probes 1, 3, 4
    assert switching_deid_rate(probs, labels, mu) == pytest.approx(3 / 4)
    assert switching_deid_rate(probs, labels, 0.8) == pytest.approx(2 / 4)
    # genuine acceptance on "originals": d(own) <= mu only for the first
    assert genuine_acceptance(probs, labels, mu) == pytest.approx(1 / 4)
    assert genuine_acceptance(probs, labels, 0.9) == pytest.approx(2 / 4)


def test_logits_passed_as_probabilities_are_rejected():
    with pytest.raises(ValueError, match="probability"):
        deid_rate(np.array([[3.0, -1.0, 0.5, 0.2]]), [0], 0.35)


def test_cmc_by_hand_and_non_increasing():
    scores = np.array([
        [0.7, 0.1, 0.1, 0.1],  # true 0 at rank 1
        [0.1, 0.2, 0.3, 0.4],  # true 0 at rank 4
        [0.1, 0.6, 0.2, 0.1],  # true 2 at rank 2
        [0.4, 0.3, 0.2, 0.1],  # true 3 at rank 4
    ])
    labels = [0, 0, 2, 3]
    cmc = cmc_misclassification(scores, labels, max_rank=5)
    assert cmc == pytest.approx([3 / 4, 2 / 4, 2 / 4, 0.0, 0.0])
    assert all(a >= b for a, b in zip(cmc, cmc[1:]))
    # logits give the same ranking
    assert cmc_misclassification(np.log(scores), labels) == pytest.approx(cmc)


def test_cmc_ties_count_in_expectation():
    # Uniform output: the true identity is in the top k with probability k / 4.
    cmc = cmc_misclassification(np.tile(UNIFORM, (3, 1)), [0, 1, 2], max_rank=5)
    assert cmc == pytest.approx([3 / 4, 2 / 4, 1 / 4, 0.0, 0.0])
    # one-hot on another identity: the true one ties with 2 others behind the winner
    cmc = cmc_misclassification(ONEHOT[[2]], [0], max_rank=4)
    assert cmc == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])


def test_emotion_mse_by_hand():
    a = np.array([[1.0, 0, 0], [0.5, 0.5, 0]])
    b = np.array([[0.0, 1, 0], [0.5, 0.5, 0]])
    # probe 1: mean(1, 1, 0) = 2/3; probe 2: 0  -> 1/3
    assert emotion_mse(a, b) == pytest.approx(1 / 3)
    assert emotion_mse(torch.tensor(a), torch.tensor(a)) == 0.0


def test_emotion_preserved_ratio_cap_and_zero():
    emotion = [0, 1, 2, 3]
    orig = [0, 1, 0, 0]  # acc 0.5
    assert emotion_preserved([0, 0, 0, 0], orig, emotion) == pytest.approx(0.25 / 0.5)
    assert emotion_preserved([0, 1, 2, 3], orig, emotion) == 1.0  # 1.0 / 0.5 capped at 1
    assert emotion_preserved([0, 1, 2, 3], [1, 0, 0, 0], emotion) == 0.0  # acc(x) = 0
    # scores are argmax-ed
    assert emotion_preserved(np.eye(4)[[0, 0, 0, 0]], np.eye(4)[orig], emotion) == pytest.approx(0.5)
    assert accuracy(np.eye(4)[[0, 1, 1, 3]], emotion) == pytest.approx(0.75)


def test_paper_objective():
    assert paper_objective(0.5, 0.8, 1.0, 0.9, 0.81) == pytest.approx(0.5 * 0.8 * 0.9 * 0.81**0.25)
    assert paper_objective(0.5, 0.8, 1.0, 0.9, 0.81, w=0.0) == pytest.approx(0.36)
    for i in range(5):
        factors = [0.9, 0.8, 0.7, 0.6, 0.5]
        factors[i] = 0.0
        assert paper_objective(*factors) == 0.0
    assert paper_objective(1, 1, 1, 1, -0.3) == 0.0  # negative SSIM clipped to 0


def test_privacy_counts_only_faces_named_in_the_original():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.5, 0.5]])
    identity = np.array([0, 1, 1, 0])  # named: 1, 1, 0, tie (1/2)
    assert top_k_hits(scores, identity).tolist() == [1.0, 1.0, 0.0, 0.5]
    assert privacy_gain(scores, scores, identity) == 0.0  # doing nothing hides nobody, whatever the judge
    swapped = scores[:, ::-1]  # every rank-1 answer flipped: hits become 0, 0, 1, 1/2
    assert privacy_gain(scores, swapped, identity) == pytest.approx((1 + 1 + 0 + 0) / 2.5)
    # a face named better after de-identification is no loss, and no credit for the others either
    assert privacy_gain(swapped, scores, identity) == pytest.approx((0 + 0 + 1 + 0) / 1.5)
    # a judge that names nobody in the originals has no identity to lose: privacy 0, never free credit
    assert privacy_gain(swapped[:2], scores[:2], identity[:2]) == 0.0


def test_expression_kept_counts_only_expressions_read_in_the_original():
    emotion = np.array([0, 1, 2, 3])
    assert expression_kept([0, 1, 2, 0], [0, 1, 2, 3], emotion) == pytest.approx(3 / 4)
    assert expression_kept([0, 1, 6, 6], [0, 1, 5, 5], emotion) == pytest.approx(1.0)  # 2 readable, both kept
    assert expression_kept([0, 1, 2, 3], [6, 6, 6, 6], emotion) == 0.0  # none readable: nothing kept


def test_expression_confusion_counts_the_readable_faces_by_what_they_are_read_as_after():
    emotion = np.array([0, 0, 1, 1, 2])
    read_after = [0, 2, 1, 0, 2]
    counts = expression_confusion(read_after, [0, 0, 1, 1, 1], emotion, num_classes=3)  # the last: misread
    assert counts == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert np.trace(counts) / np.sum(counts) == pytest.approx(expression_kept(read_after, [0, 0, 1, 1, 1], emotion))


def _evaluation():
    identity = np.array([0, 1, 2, 3])
    emotion = np.array([0, 1, 2, 3])
    orig_id = np.eye(M)[identity] * 0.9 + 0.1 / M  # evaluator sure of the truth on originals
    deid_id = np.stack([ONEHOT[1], UNIFORM, UNIFORM, ONEHOT[3]])
    orig_em = np.eye(7)[[0, 1, 2, 5]] * 0.93 + 0.01  # 3 of 4 right
    deid_em = np.eye(7)[[0, 1, 6, 6]] * 0.93 + 0.01  # 2 of 4 right
    ssim = np.array([0.8, 0.9, 0.7, 0.8])
    return orig_id, deid_id, orig_em, deid_em, identity, emotion, ssim


def test_compute_metrics_keys_and_values():
    orig_id, deid_id, orig_em, deid_em, identity, emotion, ssim = _evaluation()
    out = compute_metrics(orig_id, torch.tensor(deid_id), orig_em, deid_em, identity, emotion, ssim, mu=0.35)
    expected_keys = {
        "deid_rate", "switching_deid_rate", "genuine_acceptance", "cmc_misclassification", "emotion_mse",
        "emotion_preserved", "emotion_accuracy_original", "emotion_accuracy_deid", "identity_accuracy_original",
        "identity_accuracy_deid", "ssim", "objective", "privacy", "utility", "expression_kept", "reidentified",
        "reidentified_original", "paper_objective", "paper_privacy", "paper_utility",
    }
    assert expected_keys <= set(out) and set(METRICS) <= set(out)
    # own distances: sqrt 2, .866, .866, 0  -> D = 3/4
    # nearest other identity: 0 (probe 1 is pinned on identity 1), .866, .866, 1.414 -> S = 3/4
    assert out["deid_rate"] == pytest.approx(3 / 4)
    assert out["switching_deid_rate"] == pytest.approx(3 / 4)
    # originals: d(own) = ||(0.925 - 1, 0.025, 0.025, 0.025)|| = sqrt(0.005625 + 0.001875) = 0.0866 <= 0.35
    assert out["genuine_acceptance"] == pytest.approx(1.0)
    assert out["emotion_accuracy_original"] == pytest.approx(0.75)
    assert out["emotion_accuracy_deid"] == pytest.approx(0.5)
    assert out["emotion_preserved"] == pytest.approx(2 / 3)
    assert out["identity_accuracy_original"] == pytest.approx(1.0)
    assert out["ssim"] == pytest.approx(0.8)
    # all four named at rank 1 in the original; after: a miss, two 4-way ties (1/4 each), a hit
    assert out["reidentified_original"] == 1.0 and out["reidentified"] == pytest.approx(0.375)
    assert out["privacy"] == pytest.approx((1 + 0.75 + 0.75 + 0) / 4)
    assert out["expression_kept"] == pytest.approx(2 / 3)  # 3 read in the original, 2 of them still read
    assert out["utility"] == pytest.approx(2 / 3 * 0.8**0.25)
    assert out["objective"] == pytest.approx(0.625 * 2 / 3 * 0.8**0.25)
    assert out["paper_privacy"] == pytest.approx(9 / 16)
    assert out["paper_objective"] == pytest.approx(9 / 16 * 2 / 3 * 0.8**0.25)
    assert len(out["cmc_misclassification"]) == 5
    # rank 1: probe 1 pinned on 1 -> miss; probes 2, 3 uniform -> 3/4 miss each; probe 4 hit
    assert out["cmc_misclassification"][0] == pytest.approx((1 + 0.75 + 0.75 + 0) / 4)
    assert all(isinstance(v, float) for k, v in out.items() if k not in ("cmc_misclassification", "num_probes"))
    # doing nothing under an evaluator unsure of two faces: the paper's product pays for it, J does not
    weak = np.concatenate([orig_id[:2], np.eye(M)[identity[2:]] * 0.5 + 0.5 / M])
    unchanged = compute_metrics(weak, weak, orig_em, orig_em, identity, emotion, np.ones(4), mu=0.35)
    assert unchanged["paper_objective"] == pytest.approx(0.5 * 1.0 * 0.5 * 1.0)
    assert unchanged["privacy"] == 0.0 and unchanged["objective"] == 0.0


def test_compute_metrics_rejects_misaligned_inputs():
    orig_id, deid_id, orig_em, deid_em, identity, emotion, ssim = _evaluation()
    with pytest.raises(ValueError, match="ssim_per_image"):
        compute_metrics(orig_id, deid_id, orig_em, deid_em, identity, emotion, ssim[:3], mu=0.35)


def test_mu_sweep_monotone_and_consistent():
    orig_id, deid_id, _, _, identity, _, _ = _evaluation()
    sweep = mu_sweep(orig_id, deid_id, identity, mus=[0.05, 0.35, 0.9, 1.5])
    assert sweep["mu"] == [0.05, 0.35, 0.9, 1.5]
    d, s, g = sweep["deid_rate"], sweep["switching_deid_rate"], sweep["genuine_acceptance"]
    assert all(a >= b for a, b in zip(d, d[1:])) and all(a >= b for a, b in zip(s, s[1:]))
    assert all(a <= b for a, b in zip(g, g[1:]))
    assert d[1] == deid_rate(deid_id, identity, 0.35) and s[2] == switching_deid_rate(deid_id, identity, 0.9)
    assert g == [0.0, 1.0, 1.0, 1.0]  # own distance of originals is sqrt(0.0075) = 0.0866
    assert sweep["privacy"] == pytest.approx([a * b * c for a, b, c in zip(d, s, g)])


def test_pareto_front_by_hand():
    # (0.4, 0.4) is beaten by (0.5, 0.5) on both; (0.5, 0.4) only ties it on privacy and loses on utility;
    # equal points are both on the front (neither beats the other).
    points = [(0.2, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.5), (0.5, 0.4)]
    assert pareto_front(points) == [True, True, False, True, True, False]
    assert pareto_front([]) == [] and pareto_front([(0.0, 0.0)]) == [True]
