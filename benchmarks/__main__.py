"""Run the benchmarks one after the other, each in its own process (each starts its own Ray, if any).

    python -m benchmarks                         # all, default (quick / reduced) settings: about 10 min on 2 cores
    python -m benchmarks --bf16                  # bf16 rounds too on a CPU that emulates bf16 (AVX2-only): longer
    python -m benchmarks train_step search       # some of them
    python -m benchmarks --full                  # train_step --full and search --full (the quick preset): long

Each benchmark also runs alone: python -m benchmarks.<name> --help.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = {
    "train_step": "one EPD-Net G+D update against a plain PyTorch pix2pix update (64/128/256 px, fp32/bf16)",
    "ray_overhead": "a GAN epoch in a Ray Train TorchTrainer against the same loop in plain PyTorch",
    "search": "trials per hour and time to the first result of the Tune search (reduced unless --full)",
    "deidentify": "faces and video frames per second through a trained generator, per face detector",
    "detector_recall": "face detector recall, false positives and ms per megapixel: CenterFace against Haar",
    "ingest": "images per second into a training loop: the Ray Data stream against a DataLoader over PNG files",
    "recogniser": "faces per second through dlib's recogniser: spread over the cores against one process",
}
HAS_FULL = {"train_step", "search"}
HAS_BF16 = {"train_step", "deidentify"}  # bf16 rounds, skipped where bf16 is emulated unless --bf16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--full", action="store_true", help="pass --full to the benchmarks that have it")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 rounds even where bf16 is emulated (no AVX512-BF16/AMX): skipped there by default")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done: list[tuple[str, int, float]] = []
    for name in names:
        command = ([sys.executable, "-m", f"benchmarks.{name}"] + (["--full"] if args.full and name in HAS_FULL else [])
                   + (["--bf16"] if args.bf16 and name in HAS_BF16 else []))
        print(f"\n{'=' * 100}\n{name}: {BENCHMARKS[name]}\n$ {' '.join(command[1:])}\n{'=' * 100}", flush=True)
        started = time.perf_counter()
        code = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
        done.append((name, code, time.perf_counter() - started))
    print(f"\n{'benchmark':<14} {'exit':>4} {'wall (s)':>9}")
    for name, code, wall in done:
        print(f"{name:<14} {code:>4} {wall:>9.0f}")
    return max((code for _, code, _ in done), default=0)


if __name__ == "__main__":
    sys.exit(main())
