"""How fast `epd-ray deidentify` runs: faces per second through the generator, frames per second on a video.

    python -m benchmarks.deidentify                 # default run: well under 3 minutes on a 2-core CPU
    python -m benchmarks.deidentify --sizes 256 --budget 10 --video-frames 120

Aligned crops at 64, 128 and 256 px through a U-Net generator with ngf 64 (random weights: speed does not
depend on them), in fp32 and in bf16 autocast, on the CPU and on CUDA when there is one. Then the cost of
drawing the noise z several times per face (core/draws.py) with the `faces` preset's model, told the
expression its tellers (S, its two siblings and the two pickers) read in each face: one draw, and 32 draws
read by its two expression pickers or by S over six views, against the untold generator's one draw. Then a
short video (a real face, scikit-image's astronaut, moving over a photograph) per detector (CenterFace, Haar): frames
per second of detection alone, and of the whole pipeline (detection, tracking, generator, blending, H.264
encoding, audio mux). The `deface` tool cannot be installed beside epd-ray (it requires opencv-python,
which clashes with opencv-python-headless over cv2), so its equivalent is measured instead: the same
CenterFace detection, each face blurred (no generator), H.264 encoding. Every figure is measured after one
warm-up call.
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

from epd_ray.checkpoints import build_from_record, draw_readers, expression_tellers, network_record, save_checkpoint
from epd_ray.config import load_config
from epd_ray.core.draws import BestOfDraws
from epd_ray.core.labels import NUM_EMOTIONS
from epd_ray.core.networks import UNetGenerator, build_network, count_parameters
from epd_ray.deploy import DeidentifyOptions, FaceEngine, deidentify, export_model
from epd_ray.deploy.faces import blur_face
from epd_ray.deploy.video import Encoder
from epd_ray.faces import DETECTORS, face_region, make_detector
from epd_ray.train.gan import build_generator
from epd_ray.train.pretrain import network_specs

from benchmarks.detector_recall import CANVAS, paste_face, photos
from benchmarks.machine import describe, runnable_precisions

BATCH = {64: 16, 128: 8, 256: 2}
# (draws, pickers, told the expression, what reads the originals and the draws); the first is the reference
DRAWS = ((1, 0, False, "the generator alone"), (1, 2, True, "told, 5 tellers read x"),
         (32, 2, True, "2 pickers, once each"), (32, 0, True, "S over six views"), (16, 0, True, "S over six views"))


def faces_per_second(model: BestOfDraws | UNetGenerator, device: str, precision: str, budget: float,
                     batch: int) -> float:
    size = model.config["image_size"]
    engine = FaceEngine(model, device=device, precision=precision, batch_size=batch)
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
            return done / elapsed


def preset_model(draws: int, pickers: int, told: bool = True) -> BestOfDraws:
    """The `faces` preset's de-identifier (64 px, its generator as training builds it, its 3x3 median
    included, and its readers' and tellers' shapes; random weights: speed does not depend on them) drawing
    `draws` times, its readers `pickers` expression pickers (0: S); `told` False: a generator not told the
    expression (else told what S, its siblings and the pickers read)."""
    exp = load_config("faces", {"verifiers.pickers": pickers, "model.draws": draws, "model.expression_input": told})
    specs = network_specs(exp.verifiers, exp.model, num_identities=10, image_size=64)
    torch.manual_seed(0)
    networks = {name: network_record(spec["kind"], build_network(spec["kind"], **spec["args"]))
                for name, spec in specs.items() if name != "generator"}  # the warm start's: no median
    generator = build_generator(exp, image_size=64, emotions=NUM_EMOTIONS)
    reader = build_from_record(draw_readers(networks)) if draws > 1 or generator.expressions else None
    teller = build_from_record(expression_tellers(networks)) if generator.expressions else None
    return BestOfDraws(generator, reader, draws, teller).eval()


def video_frames(frames: int) -> list[np.ndarray]:
    """640x480 frames of the coffee photograph with the astronaut's face (80 px wide) crossing it."""
    astronaut, backgrounds = photos()
    background = cv2.resize(backgrounds[0], CANVAS[::-1], interpolation=cv2.INTER_AREA)
    out = []
    for i in range(frames):
        frame = background.copy()
        paste_face(frame, astronaut, (120 + (4 * i) % 400, 220), 80, 0, False, np.random.default_rng(i))
        out.append(frame)
    return out


def detection_fps(detector: str, frames: list[np.ndarray]) -> float:
    found = make_detector(detector)
    found.detect(frames[0])  # warm-up
    start = time.perf_counter()
    for frame in frames:
        found.detect(frame)
    return len(frames) / (time.perf_counter() - start)


def blur_only_fps(frames: list[np.ndarray], tmp: Path) -> float:
    """deface's work: CenterFace, each face blurred, H.264 out (to a file, as deidentify writes)."""
    detector = make_detector("centerface")
    detector.detect(frames[0])  # warm-up
    start = time.perf_counter()
    encoder = Encoder(tmp / "blurred.mp4", CANVAS[1], CANVAS[0], 25.0, 18)
    for frame in frames:
        frame = frame.copy()
        for box in detector.detect(frame):
            blur_face(frame, face_region(box))
        encoder.write(frame)
    encoder.close()
    return len(frames) / (time.perf_counter() - start)


def pipeline_fps(frames: list[np.ndarray], size: int, device: str, tmp: Path) -> dict[str, tuple[float, dict]]:
    """Frames per second of `deidentify` on the clip, per detector, with the faces found and replaced."""
    torch.manual_seed(0)
    save_checkpoint(tmp / "trial.pt", {"networks": {"generator": network_record(
        "generator", UNetGenerator(image_size=size, ngf=64))}})
    model = export_model(tmp / "trial.pt", tmp / "model")
    writer = cv2.VideoWriter(str(tmp / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, CANVAS[::-1])
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    out = {}
    for detector in DETECTORS:
        options = DeidentifyOptions(detector=detector, device=device, batch_size=16, progress=False)
        deidentify(model, tmp / "clip.avi", tmp / f"warm-{detector}.mp4", options)  # warm-up
        start = time.perf_counter()
        summary = deidentify(model, tmp / "clip.avi", tmp / f"out-{detector}.mp4", options)
        out[detector] = (summary.frames / (time.perf_counter() - start), summary.as_dict())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds measured per configuration")
    parser.add_argument("--video-frames", type=int, default=32)
    parser.add_argument("--video-size", type=int, default=128, help="model size for the video run")
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--bf16", dest="force_bf16", action="store_true",
                        help="bf16 even on a CPU that emulates it (skipped there by default)")
    args = parser.parse_args()

    print(describe(with_peaks=False))
    print(f"OpenCV {cv2.__version__}")
    print("\naligned crops through the generator (ngf 64), faces per second:")
    print(f"{'device':>7} {'size':>5} {'params':>11} {'batch':>5} {'fp32':>9} {'bf16':>9}")
    for device in args.devices:
        for size in args.sizes:
            cells = {}
            params = 0
            precisions, skipped = runnable_precisions(args.precisions, device, args.force_bf16)
            if skipped and size == args.sizes[0]:
                print(f"  {skipped}")
            torch.manual_seed(0)
            generator = UNetGenerator(image_size=size, ngf=64)
            params = count_parameters(generator)
            for precision in precisions:
                fps = faces_per_second(generator, device, precision, args.budget, BATCH.get(size, 8))
                cells[precision] = f"{fps:9.1f}"
            print(f"{device:>7} {size:>5} {params:>11,} {BATCH.get(size, 8):>5} "
                  f"{cells.get('fp32', '-'):>9} {cells.get('bf16', '-'):>9}", flush=True)
    print("\ndraws of the noise z per face, the `faces` preset's model (64 px): faces per second, and the time "
          "a face takes against one draw of a generator not told the expression:")
    print(f"{'device':>7} {'draws, readers':>28} {'fp32':>9} {'x one':>7} {'bf16':>9} {'x one':>7}")
    for device in args.devices:
        precisions, _ = runnable_precisions(args.precisions, device, args.force_bf16)
        one = {}
        for draws, pickers, told, readers in DRAWS:
            model = preset_model(draws, pickers, told)
            cells = []
            for precision in ("fp32", "bf16"):
                if precision not in precisions:
                    cells.append(f"{'-':>9} {'-':>7}")
                    continue
                fps = faces_per_second(model, device, precision, args.budget, BATCH[64])
                one.setdefault(precision, fps)
                cells.append(f"{fps:9.1f} {one[precision] / fps:7.1f}")
            print(f"{device:>7} {f'{draws}, {readers}':>28} " + " ".join(cells), flush=True)
    if args.video_frames > 0:
        frames = video_frames(args.video_frames)
        print(f"\nvideo {CANVAS[1]}x{CANVAS[0]}, {args.video_frames} frames, one face; frames per second "
              f"(detection alone on the CPU; pipeline: {args.video_size} px model, ngf 64, fp32):")
        print(f"{'':>28} " + " ".join(f"{d:>11}" for d in DETECTORS))
        print(f"{'detection alone':>28} " + " ".join(f"{detection_fps(d, frames):11.1f}" for d in DETECTORS),
              flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            for device in args.devices:
                runs = pipeline_fps(frames, args.video_size, device, Path(tmp))
                print(f"{'whole pipeline, ' + device:>28} " + " ".join(f"{runs[d][0]:11.1f}" for d in DETECTORS)
                      + "   (faces found / replaced / by tracking alone: " + ", ".join(
                          f"{d} {r['faces_found']}/{r['faces_replaced']}/{r['faces_tracked']}"
                          for d, (_, r) in runs.items()) + ")", flush=True)
            print(f"{'deface-like (blur only)':>28} {blur_only_fps(frames, Path(tmp)):11.1f}", flush=True)

if __name__ == "__main__":
    sys.exit(main())
