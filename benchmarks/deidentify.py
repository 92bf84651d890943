"""How fast `epd-ray deidentify` runs: faces per second through the generator, frames per second on a video.

    python -m benchmarks.deidentify                 # default run: well under 2 minutes on a 2-core CPU
    python -m benchmarks.deidentify --sizes 256 --budget 10 --video-frames 120

Aligned crops at 64, 128 and 256 px through a U-Net generator with ngf 64 (random weights: speed does not
depend on them), in fp32 and in bf16 autocast, on the CPU and on CUDA when there is one. Then a short
synthetic video (one face moving over a plain background) through the whole pipeline: Haar detection,
tracking, generator, blending, encoding. Every figure is measured after one warm-up call.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from epd_ray.checkpoints import network_record, save_checkpoint
from epd_ray.core.networks import UNetGenerator, count_parameters
from epd_ray.core.synthetic import make_synthetic_faces
from epd_ray.deploy import DeidentifyOptions, FaceEngine, deidentify, export_model

from benchmarks.machine import describe

BATCH = {64: 16, 128: 8, 256: 2}


def faces_per_second(size: int, device: str, precision: str, budget: float, batch: int) -> tuple[float, int]:
    torch.manual_seed(0)
    generator = UNetGenerator(image_size=size, ngf=64)
    engine = FaceEngine(generator, device=device, precision=precision, batch_size=batch)
    crops = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    seeds = list(range(batch))
    engine(crops, seeds)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while True:
        engine(crops, seeds)  # returns uint8 on the CPU, so the GPU work is finished when it returns
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            return done / elapsed, count_parameters(generator)


def video_fps(frames: int, size: int, device: str, precision: str) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_checkpoint(tmp / "trial.pt", {"networks": {"generator": network_record(
            "generator", UNetGenerator(image_size=size, ngf=64))}})
        model = export_model(tmp / "trial.pt", tmp / "model")
        face = make_synthetic_faces(1, 1, 128, seed=0).pixels[0]
        writer = cv2.VideoWriter(str(tmp / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (640, 360))
        for i in range(frames):
            frame = np.full((360, 640, 3), 185, np.uint8)
            x = 100 + (3 * i) % 300
            frame[100:228, x:x + 128] = face
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        options = DeidentifyOptions(device=device, precision=precision, batch_size=16, progress=False)
        start = time.perf_counter()
        summary = deidentify(model, tmp / "clip.avi", tmp / "out", options)
        elapsed = time.perf_counter() - start
        return summary.frames / elapsed, summary.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds measured per configuration")
    parser.add_argument("--video-frames", type=int, default=32)
    parser.add_argument("--video-size", type=int, default=128, help="model size for the video run")
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = parser.parse_args()

    print(describe(with_peaks=False))
    print(f"OpenCV {cv2.__version__}")
    print("\naligned crops through the generator (ngf 64), faces per second:")
    print(f"{'device':>7} {'size':>5} {'params':>11} {'batch':>5} {'fp32':>9} {'bf16':>9}")
    for device in args.devices:
        for size in args.sizes:
            cells = {}
            params = 0
            for precision in args.precisions:
                fps, params = faces_per_second(size, device, precision, args.budget, BATCH.get(size, 8))
                cells[precision] = f"{fps:9.1f}"
            print(f"{device:>7} {size:>5} {params:>11,} {BATCH.get(size, 8):>5} "
                  f"{cells.get('fp32', '-'):>9} {cells.get('bf16', '-'):>9}", flush=True)
    if args.video_frames > 0:
        print(f"\nvideo, whole pipeline (640x360, {args.video_frames} frames, one face, "
              f"{args.video_size} px model, ngf 64, fp32):")
        for device in args.devices:
            fps, summary = video_fps(args.video_frames, args.video_size, device, "fp32")
            print(f"{device:>7}: {fps:.1f} frames/s (faces found {summary['faces_found']}, "
                  f"replaced {summary['faces_replaced']})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
