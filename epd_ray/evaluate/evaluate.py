"""Evaluate a generator and the classical baselines on a held-out split, judged twice.

Main figures come from the independent evaluators V_e, S_e, which no loss ever saw; the same de-identified
images are also judged by the training verifiers V, S, for comparison with the paper (and to show how much
those flatter the generator). Every method is measured at the same mu.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epd_ray.checkpoints import build_from_record, load_checkpoint
from epd_ray.config import EvaluationConfig
from epd_ray.core.baselines import gaussian_blur, no_change, pixelate
from epd_ray.core.scoring import Method, deidentify_pixels, judge
from epd_ray.data.shards import load_split

JUDGES = {"evaluators": ("identity_evaluator", "emotion_evaluator"),
          "verifiers": ("identity_verifier", "emotion_verifier")}


def baseline_methods(cfg: EvaluationConfig) -> dict[str, Method]:
    return {"no_change": no_change, "blur": partial(gaussian_blur, sigma=cfg.blur_sigma),
            "pixelate": partial(pixelate, blocks=cfg.pixelate_blocks)}


def generator_method(generator: nn.Module, seed: int) -> Method:
    """The generator as published: eval mode, its dropout noise z still on, a fixed seed."""
    generator.eval()
    torch.manual_seed(seed)
    return generator


def evaluate_methods(methods: dict[str, Method], *, dataset_dir: Path, pretrained_path: Path, split: str,
                     mu: float, cfg: EvaluationConfig, device: torch.device | None = None,
                     precision: str = "fp32") -> dict[str, Any]:
    device = device or torch.device("cpu")
    faces = load_split(dataset_dir, split)
    networks = load_checkpoint(pretrained_path)["networks"]
    judges = {name: tuple(build_from_record(networks[k], pretrained_path).to(device) for k in pair)
              for name, pair in JUDGES.items()}
    results: dict[str, Any] = {}
    for method_name, method in methods.items():
        deid = deidentify_pixels(method, faces.pixels, batch_size=cfg.batch_size, device=device,
                                 precision=precision)
        results[method_name] = {
            judge_name: judge(faces.pixels, deid, faces.identity, faces.emotion, identity_net=id_net,
                              emotion_net=emo_net, mu=mu, ssim_weight=cfg.ssim_weight,
                              batch_size=cfg.batch_size, device=device, precision=precision)
            for judge_name, (id_net, emo_net) in judges.items()
        }
    return {"split": split, "images": len(faces), "mu": mu, "ssim_weight": cfg.ssim_weight, "methods": results}
