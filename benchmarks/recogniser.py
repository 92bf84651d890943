"""How fast the pretrained face recogniser judges: faces per second, in one process and spread over the cores.

    python -m benchmarks.recogniser                  # 256 faces: about a minute on 2 cores
    python -m benchmarks.recogniser --faces 1024

dlib's ResNet takes about 0.1 s per face on one core and holds the GIL, so a test split of thousands of
faces, judged once per method and once more for each parrot gallery, takes many minutes in one process.
The driver's evaluations (`evaluate`, the end of `tune`/`train`, `report`, the search's gallery) spread
large batches over worker processes, one per usable core. Three figures against the reference, one process
embedding the same faces in the same run:
- spread, including the worker processes' start (each loads its own dlib): what an evaluation's first batch pays;
- spread again, the workers already running: every later batch of that evaluation;
- a batch seen before (no change, its parrot gallery): not embedded again.
The faces are synthetic 64 px crops (dlib's cost per face does not depend on whose face it is).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epd_ray.core.precision import usable_cpus  # noqa: E402
from epd_ray.core.synthetic import make_synthetic_faces  # noqa: E402
from epd_ray.evaluate.judges import FaceRecogniser  # noqa: E402


def timed(embed, pixels) -> float:
    start = time.perf_counter()
    embed(pixels)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=256)
    parser.add_argument("--processes", type=int, default=usable_cpus(), help="default: the usable cores")
    args = parser.parse_args()

    from benchmarks.machine import describe

    print(describe(with_peaks=False))
    people = max(1, args.faces // 8)
    faces = make_synthetic_faces(people, 8, 64, seed=0).pixels[:args.faces]
    second = make_synthetic_faces(people, 8, 64, seed=1).pixels[:args.faces]
    one = FaceRecogniser()
    reference = timed(one.embed, faces)
    with FaceRecogniser(processes=args.processes) as spread:
        first = timed(spread.embed, faces)
        warm = timed(spread.embed, second)
        seen = timed(spread.embed, second)
    rows = [("one process (reference)", reference), (f"{args.processes} processes, with their start", first),
            (f"{args.processes} processes, running", warm), ("a batch seen before", seen)]
    print(f"\n{len(faces)} faces of 64 px through dlib's recogniser:")
    print(f"{'':<32} {'faces/s':>9} {'x reference':>12}")
    for name, seconds in rows:
        print(f"{name:<32} {len(faces) / seconds:>9.1f} {reference / seconds:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
