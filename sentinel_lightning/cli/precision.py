"""The job's precision: bf16-mixed where the device computes bf16 natively, float32 elsewhere.

bf16-mixed (float32 weights and optimizer, bf16 matrix products) trains the job about twice as fast as float32 on a
CPU with AVX512-BF16 or AMX and on a GPU from Ampere on, at the same quality (docs/results.md, "bf16 and fading").
Where bf16 is emulated (older CPUs) it is several times slower than float32, and GPUs before Ampere refuse it.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

BF16, FLOAT32 = "bf16-mixed", "32-true"


def device_kind(accelerator: Any) -> str:
    """``"cuda"``, ``"cpu"`` or ``"other"``: where a Trainer with ``accelerator`` runs. Matched on its text, so a
    name, an instance and the not yet instantiated ``class_path`` config the CLI holds all count."""
    name = str(accelerator).lower()
    if name in ("gpu", "cuda") or "cudaaccelerator" in name or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    if name == "cpu" or "cpuaccelerator" in name or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "other"


def native_bf16(kind: str) -> bool:
    """Whether a device of ``kind`` (``device_kind``) computes bf16 in hardware."""
    if kind == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def job_precision(precision: Any, accelerator: Any) -> tuple[str, str | None]:
    """The precision the job runs at, and a warning (or None).

    ``precision`` None (not given): bf16-mixed where ``native_bf16``, else 32-true. A given one is kept; bf16 on a
    CPU that emulates it is kept with a warning, bf16 on a GPU without bf16 is refused by name.
    """
    kind = device_kind(accelerator)
    if precision is None:
        return (BF16 if native_bf16(kind) else FLOAT32), None
    if not str(precision).startswith("bf16") or native_bf16(kind):
        return precision, None
    if kind == "cuda":
        raise ValueError(
            f"--trainer.precision={precision}: this GPU ({torch.cuda.get_device_name()}) has no bf16; pass "
            f"--trainer.precision=16-mixed or --trainer.precision={FLOAT32}."
        )
    if kind == "cpu":
        return precision, (
            f"--trainer.precision={precision} on a CPU without bf16 instructions (AVX512-BF16 or AMX): bf16 is "
            f"emulated here and several times slower than float32; leave it out (the job then picks {FLOAT32} here) "
            f"or pass --trainer.precision={FLOAT32}."
        )
    return precision, None


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` where there is one, else what ``platform`` says: which CPU a
    timing comes from, since whether it computes bf16 decides so much."""
    try:
        with open("/proc/cpuinfo") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()
