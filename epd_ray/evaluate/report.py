"""The Markdown report of a run: the figures of `metrics.json`, per method and judge, and the trials."""

from __future__ import annotations

from typing import Any

COLUMNS = [("objective", "J"), ("deid_rate", "D(mu)"), ("switching_deid_rate", "S(mu)"),
           ("genuine_acceptance", "G(mu)"), ("emotion_preserved", "E"), ("emotion_mse", "emotion MSE"),
           ("ssim", "SSIM")]


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def method_table(metrics: dict[str, Any], judge: str) -> list[str]:
    header = ["method"] + [title for _, title in COLUMNS] + [f"CMC miss r{k}" for k in range(1, 6)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, judged in metrics["methods"].items():
        row = judged[judge]
        cells = [method] + [_cell(row[key]) for key, _ in COLUMNS]
        cells += [_cell(v) for v in row["cmc_misclassification"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def trials_table(trials: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for t in trials for k in t["params"]})
    header = ["trial", "status", "epochs"] + keys + ["J", "D", "E", "SSIM"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in trials:
        m = t["metrics"]
        cells = [t["trial_id"], t["status"], str(t["epochs"])] + [f"{t['params'].get(k, float('nan')):.3f}" for k in keys]
        cells += [_cell(m.get("objective", float("nan"))), _cell(m.get("deid_rate", float("nan"))),
                  _cell(m.get("emotion_preserved", float("nan"))), _cell(m.get("ssim", float("nan")))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(metrics: dict[str, Any], trials: list[dict[str, Any]], *, title: str, notes: list[str]) -> str:
    lines = [f"# {title}", ""]
    lines += notes + [""]
    lines += [f"Split `{metrics['split']}` ({metrics['images']} images), mu = {metrics['mu']:.3f}, "
              f"J = D * S * G * E * SSIM^{metrics['ssim_weight']}.", ""]
    lines += ["## Judged by the independent evaluators (main figures)", "",
              "V_e and S_e never took part in any loss: these figures say whether identity is really gone.", ""]
    lines += method_table(metrics, "evaluators") + [""]
    lines += ["## Judged by the training verifiers (comparable with the paper)", "",
              "The generator was trained against V and S, so these figures flatter it.", ""]
    lines += method_table(metrics, "verifiers") + [""]
    if trials:
        lines += ["## Search trials (best epoch of each, on the validation split)", ""]
        lines += trials_table(trials) + [""]
    return "\n".join(lines)
