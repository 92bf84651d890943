"""What an evaluation concludes, in figures and in words: whether the model beats the classical baselines,
whether it meets the targets that answer its users' two questions, how far its faces are from the input,
and the lines that say so. Kept apart from the judging itself (`evaluate.evaluate`) so that a model folder
can state its verdict without the judges.
"""

from __future__ import annotations

from typing import Any, Sequence

from epd_ray.config import EvaluationConfig
from epd_ray.core.metrics import wilson_interval

GENERATOR_METHOD = "epd-net"  # the model's name among the methods an evaluation judges

# The attackers beside the main judge, as the targets line names them (see `evaluate.judges`).
ATTACKS = {"parrot": "the parrot attack", "denoised": "the denoising attacker"}


def baseline_verdict(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Whether the model beats every baseline evaluated with it on J under the main judge (None: no model or
    no baseline in this evaluation). A model no better than doing nothing, blurring or pixelating is
    reported as such, never as success."""
    methods, main = metrics["methods"], metrics["main_judge"]
    baselines = {name: judged[main]["objective"] for name, judged in methods.items() if name != GENERATOR_METHOD}
    if GENERATOR_METHOD not in methods or not baselines:
        return None
    model = methods[GENERATOR_METHOD][main]["objective"]
    strongest = max(baselines, key=baselines.get)
    return {"judge": main, "beats_baselines": bool(model > baselines[strongest]), "objective": model,
            "strongest_baseline": strongest, "strongest_baseline_objective": baselines[strongest],
            "margin": model - baselines[strongest], "baselines": baselines,
            "ssim": {name: judged[main]["ssim"] for name, judged in methods.items() if "ssim" in judged[main]},
            "face_found": {name: judged["recogniser"]["face_found"] for name, judged in methods.items()
                           if "face_found" in judged.get("recogniser", {})}}


def verdict_line(verdict: dict[str, Any] | None) -> str | None:
    """One line that says whether the model beat the baselines, or None when there is nothing to compare."""
    if verdict is None:
        return None
    figures = ", ".join(f"{name} {j:.3f}" for name, j in verdict["baselines"].items())
    if verdict["beats_baselines"]:
        return (f"verdict: the model beats every baseline under the {verdict['judge']} judge: "
                f"J {verdict['objective']:.3f} against {figures}")
    return (f"warning: the model does NOT beat the baselines under the {verdict['judge']} judge: J "
            f"{verdict['objective']:.3f} against {figures} ({verdict['margin']:+.3f} behind "
            f"{verdict['strongest_baseline']}); it is no better at hiding identity while keeping expression than "
            "that baseline: train longer, widen the search, or check the pretraining warnings")


def faces_line(verdict: dict[str, Any] | None) -> str | None:
    """What the published faces look like beside the baselines' (None: no SSIM in the verdict, as in cards
    written before it was kept): J says how well a model hides people and keeps expressions, not whether
    its faces are ones a user would share. On JAFFE the faces preset's model scored SSIM 0.44 against blur's
    0.54 before `model.median_output` (0.47 with it), its faces visibly speckled (smoothed and blotched with
    it), though a face detector still found 0.96 of them (1.00)."""
    ssim = (verdict or {}).get("ssim") or {}
    if GENERATOR_METHOD not in ssim:
        return None
    found = verdict.get("face_found") or {}

    def others(figures: dict[str, float]) -> str:
        rest = ", ".join(f"{name} {v:.2f}" for name, v in figures.items() if name != GENERATOR_METHOD)
        return f" ({rest})" if rest else ""

    line = f"faces: SSIM {ssim[GENERATOR_METHOD]:.2f} to the unchanged face{others(ssim)}"
    if GENERATOR_METHOD in found:
        line += f"; the recogniser's detector finds a face in {found[GENERATOR_METHOD]:.2f} of them{others(found)}"
    return line + "; look at the de-identified samples (the run's report/samples.png) before sharing faces"


def read_instead(counts: list[list[int]], i: int, names: Sequence[str]) -> dict[str, int]:
    """What a judge read the lost faces of expression `i` as (a row of `expression_confusion`), most first."""
    lost = sorted(((n, j) for j, n in enumerate(counts[i]) if j != i and n), key=lambda t: (-t[0], t[1]))
    return {names[j]: n for n, j in lost}


def most_lost_expression(metrics: dict[str, Any], judged: dict[str, Any]) -> dict[str, Any] | None:
    """The expression S_e keeps least often in the model's faces (of those it reads right unchanged; on a tie
    the one with more faces), how many, and what it reads the lost ones as; None when nothing was lost or the
    evaluation did not count by expression."""
    counts, names = judged.get("evaluators", {}).get("expression_confusion"), metrics.get("emotions")
    if not counts or not names:
        return None
    shares = [(row[i] / sum(row), -sum(row), i) for i, row in enumerate(counts) if sum(row)]
    if not shares or min(shares)[0] == 1.0:
        return None
    i = min(shares)[2]
    return {"expression": names[i], "kept": counts[i][i], "readable": sum(counts[i]),
            "read_as": read_instead(counts, i, names)}


def target_verdict(metrics: dict[str, Any], cfg: EvaluationConfig) -> dict[str, Any] | None:
    """Whether the model answers its users' two questions well enough to share the faces (None: no model).

    Would a face recogniser still find the person: the share of de-identified faces named at rank 1 by the
    main judge, by the parrot attack (an attacker who knows the tool) and by the denoising attacker (a
    median filter first), at most `cfg.max_reidentified`. A judge that guesses among the gallery's N people
    names 1/N at rank 1, so on a set of few people (3: 0.33) the target lies below chance: `chance` says so.
    Can the expression still be read: the share kept by the main judge's emotion reader (S_e), at least
    `cfg.min_expression_kept`. Beating the baselines says a model is the best choice at hand, not that it
    is good enough; this says which target it misses. On real faces the pretrained reader's figure is shown
    beside S_e's but does not decide: it reads only some of a set's unchanged faces (about half of JAFFE's).

    Met and missed go by the figures; `intervals` (95%, `wilson_interval`) say how far the split's size
    lets them be trusted, and `undecided` names each target whose interval holds its threshold.
    """
    judged = metrics["methods"].get(GENERATOR_METHOD)
    if judged is None:
        return None
    main = metrics["main_judge"]
    named = {judge: judged[judge]["reidentified"] for judge in (main, *ATTACKS) if judge in judged}
    kept = judged[main]["expression_kept"]
    people = (metrics.get("gallery") or {}).get("identities")
    verdict = {"judge": main, "reidentified": named, "max_reidentified": cfg.max_reidentified,
               "chance": 1.0 / people if people else None,
               "expression_kept": kept, "reader_expression_kept": judged.get("reader", {}).get("expression_kept"),
               "min_expression_kept": cfg.min_expression_kept,
               "privacy_met": max(named.values()) <= cfg.max_reidentified,
               "expression_met": kept >= cfg.min_expression_kept,
               "most_lost_expression": most_lost_expression(metrics, judged)}
    faces = judged[main].get("num_probes")
    if faces:
        readable = round(judged[main]["emotion_accuracy_original"] * faces)  # kept's denominator
        intervals = {judge: wilson_interval(share, judged[judge]["num_probes"]) for judge, share in named.items()}
        intervals["expression_kept"] = wilson_interval(kept, readable)
        thresholds = {**{judge: cfg.max_reidentified for judge in named}, "expression_kept": cfg.min_expression_kept}
        verdict.update(faces=faces, readable=readable, intervals=intervals,
                       undecided=[name for name, (low, high) in intervals.items() if low <= thresholds[name] <= high])
    return verdict


def targets_line(targets: dict[str, Any] | None) -> str | None:
    """One line: both targets met, or a warning naming each one missed, its figures and what may help, and
    the one met after `met:`, so that a figure within its target is never read as missed."""
    if targets is None:
        return None
    intervals = targets.get("intervals", {})

    def figure(name: str, share: float) -> str:
        low_high = intervals.get(name)
        return f"{share:.3f}" + (f" ({low_high[0]:.2f}-{low_high[1]:.2f})" if low_high else "")

    def privacy(named: dict[str, float]) -> str:
        by = ", ".join(f"{ATTACKS.get(judge, judge)} {figure(judge, share)}" for judge, share in named.items())
        return f"named at rank 1 by {by} (target at most {targets['max_reidentified']:.2f})"

    reader = targets["reader_expression_kept"]
    kept = figure("expression_kept", targets["expression_kept"]) + (
        f", pretrained reader {reader:.3f}" if reader is not None else "")
    expression = f"expression kept {kept} (target at least {targets['min_expression_kept']:.2f})"
    size = ""
    if intervals:
        size = (f"; in brackets 95% intervals over the {targets['faces']} faces judged "
                f"({targets['readable']} for kept: those whose unchanged expression is read right)")
        if targets["undecided"]:
            names = ", ".join("kept" if n == "expression_kept" else ATTACKS.get(n, n) for n in targets["undecided"])
            size += f"; too few faces to tell whether these targets are met: {names}; judge on more faces"
    if targets["privacy_met"] and targets["expression_met"]:
        return f"targets: met: {privacy(targets['reidentified'])}; {expression}{size}"
    advice = []
    chance = targets.get("chance")
    named = targets["reidentified"]
    if chance is not None and chance >= targets["max_reidentified"]:
        advice.append(f"a guess among the gallery's {round(1 / chance)} people names {chance:.2f} at rank 1, at or "
                      "above the target: judge privacy on a set of more people")
    elif named[targets["judge"]] > targets["max_reidentified"]:
        advice.append("identity survives: train longer or search more (train.steps, search.num_samples, "
                      "--time-budget)")
    else:
        if named.get("denoised", 0) > targets["max_reidentified"]:
            advice.append("a median filter gives identities back: the change is partly noise, not another face")
        if named["parrot"] > targets["max_reidentified"]:
            advice.append("whoever holds the model can still name people (run on photographs of known people, "
                          "it gives stand-ins that match theirs): keep the model as private as the photographs")
    if not targets["expression_met"]:
        # kept counts only faces whose unchanged image the judge reads right: what is lost, the change lost
        lost = targets.get("most_lost_expression")
        most = (f" (most of all {lost['expression']}: {lost['kept']} of {lost['readable']} kept, the others read as "
                + ", ".join(f"{name} {n}" for name, n in lost["read_as"].items()) + ")") if lost else ""
        advice.append(f"expressions are lost{most}: the judge reads them on the unchanged faces, so the generator's "
                      "changes take them away; trained on few people it keeps the expressions of the faces it "
                      "learnt by heart, not expressions as such, and S, the verifier that steers it, learns them "
                      "from this data set alone: give it more people (varied copies of the same people's "
                      "photographs kept fewer on a JAFFE stand-in), and --emotion-data with a larger emotion set")
    # each attacker on the side of its own figure: one under the target is met, even when another is not
    over = {judge: share for judge, share in named.items() if share > targets["max_reidentified"]}
    under = {judge: share for judge, share in named.items() if judge not in over}
    parts = [(privacy(group), ok) for group, ok in ((over, False), (under, True)) if group]
    parts.append((expression, targets["expression_met"]))
    missed, met = "; ".join(p for p, ok in parts if not ok), "; ".join(p for p, ok in parts if ok)
    return f"warning: targets missed: {missed}; " + (f"met: {met}; " if met else "") + "; ".join(advice) + size
