"""The machine a benchmark ran on, in one place: CPU, cores, GPU, versions, load, and a measured matmul peak.

    python -m benchmarks.machine            # print the machine and its fp32 / bf16 matmul peaks

Every benchmark prints `describe()` with its figures, so a table is never read without knowing where it
came from. The load average is part of it: other jobs sharing the cores lower every figure, and a ratio
measured in one process run (reference and candidate alternating) is the figure that survives them best.

The matmul peak is measured, not looked up: the best of repeated square `torch.mm` calls (2 n^3 FLOPs each)
on this device with the current torch thread count, in fp32 and in bf16. It is the ceiling that the
benchmarks' achieved FLOP/s are compared with (a convolution network reaches a fraction of it).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

from epd_ray.core.precision import usable_cpus

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_average() -> tuple[float, float, float]:
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def load_line() -> str:
    one, five, fifteen = load_average()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {usable_cpus()} cores"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("ray", "torchvision"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except ImportError:
            found[name] = "not installed"
    return found


def bf16_support() -> str:
    """What bf16 runs on here: AMX tiles, AVX512-BF16 dot products, or emulation (slower than fp32)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16 (no AMX)"
    return "none (emulated)"


def bf16_native(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 has hardware behind it on `device`: any CUDA GPU torch can use bf16 on, or a CPU with
    AVX512-BF16 or AMX. Elsewhere (AVX2-only CPUs) torch emulates it, several times slower than fp32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return not bf16_support().startswith("none")


def runnable_precisions(requested: list[str], device: str | torch.device, force_bf16: bool) -> tuple[list[str], str]:
    """`requested` less bf16 where it is emulated (unless `force_bf16`), and a line saying what was skipped.

    Emulated bf16 measures the emulation, not the hardware, and costs most of a benchmark's time on a 2-core
    CPU; `--bf16` measures it anyway."""
    if "bf16" not in requested or force_bf16 or bf16_native(device):
        return list(requested), ""
    kept = [p for p in requested if p != "bf16"]
    return kept, (f"bf16 skipped: {device} has no bf16 hardware ({cpu_model()}: bf16 {bf16_support()}), so bf16 "
                  "would only measure torch's emulation; --bf16 runs it anyway")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@lru_cache(maxsize=None)
def matmul_peak(device: str = "cpu", precision: str = "fp32", seconds: float = 1.0, n: int | None = None) -> float:
    """Best FLOP/s of square matmuls on `device` in `precision` ('fp32' or 'bf16'), over about `seconds`.

    CPU: n = 2048 (17 GFLOP per call, large enough for the BLAS to reach its blocked steady state);
    CUDA: n = 8192. fp32 on CUDA is measured with TF32 as torch has it set (off by default
    for matmul), which is what an fp32 training step gets. Cached per process.
    """
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    dtype = DTYPES[precision]
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dev, dtype)
    b = torch.randn(n, n, generator=gen).to(dev, dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, page faults of `out`
        torch.mm(a, b, out=out)
    _sync(dev)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(dev)
        elapsed = time.perf_counter() - start
        best = max(best, 2.0 * n**3 / elapsed)
        if time.perf_counter() >= deadline:
            return best


def peaks(device: str = "cpu", precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, float]:
    return {p: matmul_peak(device, p) for p in precisions}


def describe(device: str | torch.device | None = None, with_peaks: bool = True) -> str:
    """A few lines naming the machine; with the measured matmul peaks of `device` (default: cuda if any)."""
    dev = torch.device(device) if device is not None else default_device()
    v = versions()
    gpu = gpu_name()
    lines = [
        f"machine: CPU {cpu_model()}, {usable_cpus()} cores usable, torch threads {torch.get_num_threads()}, "
        f"bf16 hardware: {bf16_support()}; GPU: {gpu or 'none'}; "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB memory",
        f"versions: torch {v['torch']}, ray {v['ray']}, torchvision {v['torchvision']}, python {v['python']}",
        load_line() + ": other work on the cores lowers every figure; ratios measured in one run hold up best",
    ]
    if with_peaks:
        native = bf16_native(dev)
        measured = peaks(str(dev), ("fp32", "bf16") if native else ("fp32",))
        lines.append(f"measured matmul peak on {dev}: " + ", ".join(
            f"{p} {flops / 1e9:,.0f} GFLOP/s" for p, flops in measured.items())
            + (f" (bf16 / fp32 = {measured['bf16'] / measured['fp32']:.2f})" if native else
               " (bf16 not measured: emulated here, ~15 s for a figure of no use; "
               "python -m benchmarks.machine measures it)"))
    return "\n".join(lines)


def print_machine(device: str | torch.device | None = None, with_peaks: bool = True) -> None:
    print(describe(device, with_peaks), flush=True)


def fmt_flops(flops: float) -> str:
    return f"{flops / 1e9:,.1f} G" if flops < 1e12 else f"{flops / 1e12:,.2f} T"


def main() -> None:
    print_machine()
    if not bf16_native(default_device()):
        bf16 = matmul_peak(str(default_device()), "bf16")
        print(f"emulated bf16 matmul: {bf16 / 1e9:,.1f} GFLOP/s "
              f"(bf16 / fp32 = {bf16 / matmul_peak(str(default_device()), 'fp32'):.2f})")


if __name__ == "__main__":
    sys.exit(main())
