"""Device helpers: which device, what it is called, what a run records about where and with what it ran, and the
allocator setting that keeps CPU training from faulting its buffers back in every step."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

import torch

from ablations.spec import RunSpec
from runners.data import CifarData
from runners.evaluate import EVAL_BATCH, Evaluation, autocast, evaluate, evaluate_split, lrn_activity  # noqa: F401
from runners.provenance import git_state, suite_version
from runners.metrics import (CHANCE_LOSS, TRACE_POINTS, converged, end_of_run, learned, summarise,  # noqa: F401
                             target_time, trace_rows, trace_segments)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of handing it back to the OS after each training step.

    By default, large freed blocks (activations) are unmapped or trimmed and faulted back in page by page
    (4 KB) at the next allocation, and a step frees and reallocates the same buffers every time: thousands
    of page faults per smoke run (tests/e2e/test_run.py shows the effect on a 4 MB buffer). CPU training guides
    suggest jemalloc or tcmalloc; this gets the same effect with no extra dependency. The cost is that the
    process keeps its peak memory. Linux/glibc only; elsewhere it does nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ablations.errors import UserError
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but no CUDA device is available; use --device cpu or auto")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


@functools.cache
def _cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_capability() -> str:
    """The vector instruction set PyTorch's CPU kernels use here ("AVX2", "AVX512", ...): two CPUs of one model
    name (every "AMD EPYC" of a cloud runner) can differ in it, and with it in every rate."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return ""


EMULATED_BF16 = ("this CPU has no native bf16 (no AVX512-BF16 or AMX instructions), so PyTorch emulates it, slower "
                 "than fp32 (an order of magnitude with AVX2 only)")


@functools.cache
def native_bf16(device_type: str = "cpu") -> bool:
    """Whether bf16 convolutions and matmuls have a hardware path here. On an x86 CPU that takes AVX512-BF16 or AMX:
    oneDNN also reports bf16 support on plain AVX512, where it emulates bf16 slower than fp32 (and without AVX512 an
    order of magnitude slower), so a bf16 run or benchmark there measures the emulation, not the suite. Where
    PyTorch cannot say, assume native."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return onednn  # an Arm CPU: oneDNN's answer is the hardware's
        return onednn and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return True


def emulated_bf16_note(specs: list[RunSpec], device: torch.device, grid: str) -> str:
    """One line when bf16 runs are about to train on a CPU without native bf16: they run, an order of magnitude
    slower than fp32; fp32 makes different runs (their own ids), so the choice is the user's."""
    n = sum(s.precision == "bf16" for s in specs)
    if not n or device.type != "cpu" or native_bf16("cpu"):
        return ""
    return (f"note: {n} bf16 runs of grid {grid} are about to train, and {EMULATED_BF16}; `--precision fp32` "
            f"trains fast here but makes different runs (their own ids), not the grid's recorded ones")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and core count: what a run (and a bench row) records it ran on."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def environment(spec: RunSpec, data: CifarData, device: torch.device, context: dict) -> dict:
    return {"torch_version": torch.__version__, "device": str(device), "device_name": device_name(device),
            "precision": spec.precision, "devices": spec.devices, "threads": torch.get_num_threads(),
            "dataset": spec.dataset, "dataset_label": data.meta.get("label", spec.dataset),
            "dataset_sha256": data.meta.get("sha256", ""), "dataset_source": data.meta.get("source", ""),
            "python": platform.python_version(), "host": platform.node(), **provenance(), **context}


@functools.cache
def provenance() -> dict:
    """The suite's version and git commit (with a dirty flag) and the versions that decide the numbers."""
    import numpy
    import torchvision

    commit, dirty = git_state()
    return {"suite_version": suite_version(), "git_commit": commit, "git_dirty": dirty,
            "torchvision_version": torchvision.__version__, "numpy_version": numpy.__version__}

