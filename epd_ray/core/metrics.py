"""Evaluation metrics: the objective J that the search maximises, and the paper's section IV metrics.

J = privacy x utility is measured against the unchanged images as its zero point (doing nothing scores 0
under every judge): privacy is the share of faces a judge names at rank 1 in the original that it no
longer names after de-identification; utility the share of correctly read expressions that stay correct,
times SSIM^w. The paper's D(mu), S(mu), G(mu), CMC and emotion MSE are kept as reported figures.

All functions take evaluator outputs as torch tensors or numpy arrays (probabilities = softmax of the
evaluator's logits, unless a function says it also takes logits) and return Python floats. They compute
in float64 numpy, so results do not depend on the device or dtype the evaluator ran in.

Notation: for a probe x with identity I_x and emotion E_x and its de-identified x' = G(x, z),
d(x', j) = ||I_j - softmax(V_e(x'))||_2, the distance of the evaluator's output from the one-hot of j.
For a probability vector p, d(j) = sqrt(||p||^2 - 2 p_j + 1), in [0, sqrt 2].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]

DEFAULT_MU_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 29))  # 0.05 .. 1.40


def _np(a: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu")
        a = a.float() if a.is_floating_point() else a
        a = a.numpy()
    return np.asarray(a, dtype=dtype)


def _labels(labels: ArrayLike, n: int) -> np.ndarray:
    out = _np(labels, np.int64).reshape(-1)
    if out.shape[0] != n:
        raise ValueError(f"expected {n} labels, got {out.shape[0]}")
    return out


def _probs(probs: ArrayLike) -> np.ndarray:
    """Check that rows look like probability vectors (catches logits passed by mistake)."""
    p = _np(probs)
    if p.ndim != 2:
        raise ValueError(f"expected an (N, classes) array of probabilities, got shape {p.shape}")
    if p.size and (p.min() < -1e-6 or np.abs(p.sum(axis=1) - 1.0).max() > 1e-2):
        raise ValueError("rows must be probability vectors (softmax of the logits), got something else")
    return p


def _predictions(pred: ArrayLike) -> np.ndarray:
    """Class predictions from either labels (N,) or scores (N, classes) (argmax)."""
    a = _np(pred)
    if a.ndim == 2:
        return a.argmax(axis=1)
    return a.reshape(-1).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------


def distance_to_all(probs: ArrayLike) -> np.ndarray:
    """(N, M) array of d(x, j) = ||I_j - p_x||_2 for every probe x and identity j."""
    p = _probs(probs)
    sq = (p**2).sum(axis=1, keepdims=True) - 2.0 * p + 1.0
    return np.sqrt(np.clip(sq, 0.0, None))


def identity_distances(probs: ArrayLike, identity_labels: ArrayLike | None = None) -> np.ndarray:
    """d(x, I_x) for each probe, shape (N,); without labels, `distance_to_all(probs)` (N, M)."""
    dist = distance_to_all(probs)
    if identity_labels is None:
        return dist
    labels = _labels(identity_labels, dist.shape[0])
    return dist[np.arange(dist.shape[0]), labels]


def deid_rate(probs_deid: ArrayLike, identity: ArrayLike, mu: float) -> float:
    """D(mu): share of de-identified probes with d(x', I_x) > mu."""
    d = identity_distances(probs_deid, identity)
    return float(np.mean(d > mu)) if d.size else 0.0


def switching_deid_rate(probs_deid: ArrayLike, identity: ArrayLike, mu: float) -> float:
    """S(mu): share of probes with d(x', j) > mu for every identity j != I_x.

    A de-identified face that the evaluator pins on another real person fails this (it is "switched"
    onto someone), even though it counts as de-identified in D(mu).
    """
    dist = distance_to_all(probs_deid)
    n = dist.shape[0]
    if n == 0:
        return 0.0
    labels = _labels(identity, n)
    others = dist.copy()
    others[np.arange(n), labels] = np.inf
    return float(np.mean((others > mu).all(axis=1)))


def genuine_acceptance(probs_orig: ArrayLike, identity: ArrayLike, mu: float) -> float:
    """G(mu): share of ORIGINAL probes with d(x, I_x) <= mu (a threshold no real face passes proves nothing)."""
    d = identity_distances(probs_orig, identity)
    return float(np.mean(d <= mu)) if d.size else 0.0


def top_k_hits(scores: ArrayLike, identity: ArrayLike, k: int = 1) -> np.ndarray:
    """Per probe, the chance that its true identity is in the judge's top k, ties broken uniformly at random.

    `scores` are (N, M), higher meaning "more like identity j": logits, probabilities or negative distances
    (logits avoid ties created by softmax underflow). With g identities scoring strictly higher than the
    true one and t (the true one included) scoring equal to it, the chance is clip((k - g) / t, 0, 1).
    """
    s = _np(scores)
    if s.ndim != 2:
        raise ValueError(f"expected an (N, identities) array of scores, got shape {s.shape}")
    n = s.shape[0]
    labels = _labels(identity, n)
    true = s[np.arange(n), labels][:, None]
    return np.clip((k - (s > true).sum(axis=1)) / (s == true).sum(axis=1), 0.0, 1.0)


def cmc_misclassification(logits_or_probs: ArrayLike, identity: ArrayLike, max_rank: int = 5) -> list[float]:
    """Share of probes whose true identity is NOT in the judge's top k, for k = 1..max_rank (non-increasing)."""
    if _np(logits_or_probs).shape[0] == 0:
        return [0.0] * max_rank
    return [float(1.0 - top_k_hits(logits_or_probs, identity, k).mean()) for k in range(1, max_rank + 1)]


def accuracy(pred: ArrayLike, labels: ArrayLike) -> float:
    """Share of correct predictions; `pred` is labels (N,) or scores (N, classes)."""
    p = _predictions(pred)
    if p.size == 0:
        return 0.0
    return float(np.mean(p == _labels(labels, p.shape[0])))


# --------------------------------------------------------------------------------------------------
# Emotion, structure, composite
# --------------------------------------------------------------------------------------------------


def emotion_mse(probs_deid: ArrayLike, probs_orig: ArrayLike) -> float:
    """Mean over probes of mean_k (softmax(S_e(x'))_k - softmax(S_e(x))_k)^2 (paper Table I: 0.0099)."""
    a, b = _probs(probs_deid), _probs(probs_orig)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    return float(np.mean((a - b) ** 2)) if a.size else 0.0


def emotion_preserved(pred_deid: ArrayLike, pred_orig: ArrayLike, emotion: ArrayLike) -> float:
    """E = min(1, acc(S_e, x') / acc(S_e, x)); 0 when acc(S_e, x) is 0 (nothing to preserve).

    Predictions are labels (N,) or scores (N, classes).
    """
    acc_orig = accuracy(pred_orig, emotion)
    if acc_orig <= 0.0:
        return 0.0
    return float(min(1.0, accuracy(pred_deid, emotion) / acc_orig))


def privacy_gain(scores_orig: ArrayLike, scores_deid: ArrayLike, identity: ArrayLike) -> float:
    """Among the probes the judge names at rank 1 in the original, the share it no longer names after
    de-identification. Zero for an unchanged image under every judge (the zero point of the objective);
    zero too when the judge names nobody in the originals, since there is no identity it could lose.
    A probe's share of being named (ties: a fraction) can only be lost, never gained, by de-identifying."""
    before, after = top_k_hits(scores_orig, identity), top_k_hits(scores_deid, identity)
    known = before.sum()
    return float(np.clip(before - after, 0.0, None).sum() / known) if known > 0 else 0.0


def _read_in_original(pred_deid: ArrayLike, pred_orig: ArrayLike, emotion: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The true expressions of the probes the emotion judge reads correctly in the original, and what it reads
    in their de-identified faces: what `expression_kept` and `expression_confusion` count."""
    orig, deid = _predictions(pred_orig), _predictions(pred_deid)
    labels = _labels(emotion, orig.shape[0])
    readable = orig == labels
    return labels[readable], deid[readable]


def expression_kept(pred_deid: ArrayLike, pred_orig: ArrayLike, emotion: ArrayLike) -> float:
    """Among the probes whose expression the emotion judge reads correctly in the original, the share it
    still reads correctly after de-identification (0 when it reads none: nothing to keep)."""
    labels, deid = _read_in_original(pred_deid, pred_orig, emotion)
    return float(np.mean(deid == labels)) if labels.size else 0.0


def expression_confusion(pred_deid: ArrayLike, pred_orig: ArrayLike, emotion: ArrayLike,
                         num_classes: int) -> list[list[int]]:
    """Counts over the probes whose expression the emotion judge reads correctly in the original: row i is
    that expression, column j the one it reads after de-identification. The diagonal is what
    `expression_kept` counts; the rest says which expressions a method loses, and as what they are read
    instead: one figure cannot tell a model that loses every expression a little from one that turns every
    surprise into fear."""
    labels, deid = _read_in_original(pred_deid, pred_orig, emotion)
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels, deid), 1)
    return counts.tolist()


def utility_score(kept: float, ssim: float, w: float = 0.25) -> float:
    """Expression kept times max(SSIM, 0)^w, the utility half of J."""
    return float(kept * max(float(ssim), 0.0) ** w)


def paper_objective(D: float, S: float, G: float, E: float, ssim: float, w: float = 0.25) -> float:
    """The paper's D * S * G * E * max(SSIM, 0)^w. Reported, never searched: a judge that rejects some
    unchanged faces gives D > 0 to doing nothing, so this product rewards returning the input."""
    return float(D * S * G * E * max(float(ssim), 0.0) ** w)


def wilson_interval(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a share measured on `n` faces: where the share on every face like
    them may lie. A test split of a small real set is a few dozen faces: 58 of 66 expressions kept (0.88)
    spans 0.78-0.94, so that split alone can neither meet nor miss a target of 0.9. (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (privacy, utility) points no other point dominates (both maximised; equal points are all kept)."""
    return [not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points) for p in points]


def mu_sweep(
    identity_probs_orig: ArrayLike,
    identity_probs_deid: ArrayLike,
    identity: ArrayLike,
    mus: Sequence[float] = DEFAULT_MU_GRID,
) -> dict[str, list[float]]:
    """D(mu), S(mu), G(mu) and their product over a grid of thresholds (default 0.05 .. 1.40).

    Returns {"mu": [...], "deid_rate": [...], "switching_deid_rate": [...], "genuine_acceptance": [...],
    "privacy": [...]}, lists aligned with "mu": ready for a plot or a table.
    """
    dist_deid = distance_to_all(identity_probs_deid)
    dist_orig = distance_to_all(identity_probs_orig)
    n = dist_deid.shape[0]
    labels = _labels(identity, n)
    own_deid = dist_deid[np.arange(n), labels]
    own_orig = dist_orig[np.arange(dist_orig.shape[0]), _labels(identity, dist_orig.shape[0])]
    others = dist_deid.copy()
    others[np.arange(n), labels] = np.inf
    nearest_other = others.min(axis=1)
    out: dict[str, list[float]] = {k: [] for k in
                                   ("mu", "deid_rate", "switching_deid_rate", "genuine_acceptance", "privacy")}
    for mu in mus:
        d = float(np.mean(own_deid > mu)) if n else 0.0
        s = float(np.mean(nearest_other > mu)) if n else 0.0
        g = float(np.mean(own_orig <= mu)) if own_orig.size else 0.0
        out["mu"].append(float(mu))
        out["deid_rate"].append(d)
        out["switching_deid_rate"].append(s)
        out["genuine_acceptance"].append(g)
        out["privacy"].append(d * s * g)
    return out


# --------------------------------------------------------------------------------------------------
# Registries and entry points
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricInputs:
    """Everything the metrics need, converted once to float64/int64 numpy. Identity scores are (N, M),
    higher meaning "more like identity j"; for a classifier judge they are its softmax probabilities."""

    identity_scores_orig: np.ndarray
    identity_scores_deid: np.ndarray
    emotion_probs_orig: np.ndarray
    emotion_probs_deid: np.ndarray
    identity: np.ndarray
    emotion: np.ndarray
    ssim_per_image: np.ndarray
    mu: float = float("nan")


# name -> function of MetricInputs; adding a metric is one entry. These hold for any identity judge.
METRICS: dict[str, Callable[[MetricInputs], float | list[float]]] = {
    "privacy": lambda m: privacy_gain(m.identity_scores_orig, m.identity_scores_deid, m.identity),
    "expression_kept": lambda m: expression_kept(m.emotion_probs_deid, m.emotion_probs_orig, m.emotion),
    "reidentified_original": lambda m: float(top_k_hits(m.identity_scores_orig, m.identity).mean()),
    "reidentified": lambda m: float(top_k_hits(m.identity_scores_deid, m.identity).mean()),
    "cmc_misclassification": lambda m: cmc_misclassification(m.identity_scores_deid, m.identity, 5),
    "emotion_mse": lambda m: emotion_mse(m.emotion_probs_deid, m.emotion_probs_orig),
    "emotion_preserved": lambda m: emotion_preserved(m.emotion_probs_deid, m.emotion_probs_orig, m.emotion),
    "emotion_accuracy_original": lambda m: accuracy(m.emotion_probs_orig, m.emotion),
    "emotion_accuracy_deid": lambda m: accuracy(m.emotion_probs_deid, m.emotion),
    "ssim": lambda m: float(np.mean(m.ssim_per_image)) if m.ssim_per_image.size else 0.0,
}

# The paper's metrics (section IV): they read the judge's scores as probabilities and threshold them at mu.
PAPER_METRICS: dict[str, Callable[[MetricInputs], float]] = {
    "deid_rate": lambda m: deid_rate(m.identity_scores_deid, m.identity, m.mu),
    "switching_deid_rate": lambda m: switching_deid_rate(m.identity_scores_deid, m.identity, m.mu),
    "genuine_acceptance": lambda m: genuine_acceptance(m.identity_scores_orig, m.identity, m.mu),
    "identity_accuracy_original": lambda m: accuracy(m.identity_scores_orig, m.identity),
    "identity_accuracy_deid": lambda m: accuracy(m.identity_scores_deid, m.identity),
}


def _inputs(identity_scores_orig, identity_scores_deid, emotion_probs_orig, emotion_probs_deid, identity, emotion,
            ssim_per_image, mu: float, probabilities: bool) -> MetricInputs:
    scores = _probs if probabilities else _np
    inputs = MetricInputs(
        identity_scores_orig=scores(identity_scores_orig), identity_scores_deid=scores(identity_scores_deid),
        emotion_probs_orig=_probs(emotion_probs_orig), emotion_probs_deid=_probs(emotion_probs_deid),
        identity=_np(identity, np.int64).reshape(-1), emotion=_np(emotion, np.int64).reshape(-1),
        ssim_per_image=_np(ssim_per_image).reshape(-1), mu=float(mu))
    n = inputs.identity.shape[0]
    for name in ("identity_scores_orig", "identity_scores_deid", "emotion_probs_orig", "emotion_probs_deid",
                 "emotion", "ssim_per_image"):
        if getattr(inputs, name).shape[0] != n:
            raise ValueError(f"{name} has {getattr(inputs, name).shape[0]} rows, expected {n} (one per probe)")
    return inputs


def judged_metrics(identity_scores_orig: ArrayLike, identity_scores_deid: ArrayLike, emotion_probs_orig: ArrayLike,
                   emotion_probs_deid: ArrayLike, identity: ArrayLike, emotion: ArrayLike,
                   ssim_per_image: ArrayLike, ssim_weight: float = 0.25) -> dict[str, Any]:
    """The METRICS registry and the objective for any identity judge (a recogniser, an attacker).

    privacy: faces named at rank 1 in the original that are no longer named after de-identification;
    utility: expression kept (among those read correctly in the original) x SSIM^w; objective J: their
    product, the figure the search maximises. "No change" scores privacy 0 and J 0 under every judge.
    """
    inputs = _inputs(identity_scores_orig, identity_scores_deid, emotion_probs_orig, emotion_probs_deid, identity,
                     emotion, ssim_per_image, float("nan"), probabilities=False)
    out: dict[str, Any] = {name: fn(inputs) for name, fn in METRICS.items()}
    out["utility"] = utility_score(out["expression_kept"], out["ssim"], ssim_weight)
    out["objective"] = float(out["privacy"] * out["utility"])
    out["ssim_weight"] = float(ssim_weight)
    out["num_probes"] = int(inputs.identity.shape[0])
    return out


def compute_metrics(
    identity_probs_orig: ArrayLike,
    identity_probs_deid: ArrayLike,
    emotion_probs_orig: ArrayLike,
    emotion_probs_deid: ArrayLike,
    identity: ArrayLike,
    emotion: ArrayLike,
    ssim_per_image: ArrayLike,
    mu: float,
    ssim_weight: float = 0.25,
) -> dict[str, Any]:
    """Every metric for a classifier judge: `judged_metrics` (privacy, utility, J) plus the paper's
    D(mu), S(mu), G(mu), identity accuracies and its own products, kept as `paper_privacy` (D*S*G),
    `paper_utility` (E*SSIM^w) and `paper_objective`. Inputs are softmax outputs. Values are JSON-ready."""
    inputs = _inputs(identity_probs_orig, identity_probs_deid, emotion_probs_orig, emotion_probs_deid, identity,
                     emotion, ssim_per_image, mu, probabilities=True)
    out = judged_metrics(inputs.identity_scores_orig, inputs.identity_scores_deid, inputs.emotion_probs_orig,
                         inputs.emotion_probs_deid, inputs.identity, inputs.emotion, inputs.ssim_per_image,
                         ssim_weight)
    out.update({name: fn(inputs) for name, fn in PAPER_METRICS.items()})
    out["paper_privacy"] = float(out["deid_rate"] * out["switching_deid_rate"] * out["genuine_acceptance"])
    out["paper_utility"] = utility_score(out["emotion_preserved"], out["ssim"], ssim_weight)
    out["paper_objective"] = paper_objective(out["deid_rate"], out["switching_deid_rate"], out["genuine_acceptance"],
                                             out["emotion_preserved"], out["ssim"], ssim_weight)
    out["mu"] = float(mu)
    return out
