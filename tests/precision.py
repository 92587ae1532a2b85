"""The precision the pipeline tests train the smoke grid in. Where the CPU has a native bf16 path, the grid's own
bf16; where PyTorch emulates bf16 (x86 without AVX512 or AMX), fp32, which is an order of magnitude faster there.
What these tests check (the store, kills, resumes, locks, jobs) is the same in either precision, and without this
the emulation alone would take most of CI's time on such a runner."""
from runners.devices import native_bf16

FAST_PRECISION: tuple[str, ...] = () if native_bf16("cpu") else ("--precision", "fp32")
FAST_OVERRIDES: dict[str, str] = {} if native_bf16("cpu") else {"precision": "fp32"}  # the same, for plan()
