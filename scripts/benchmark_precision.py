"""Times the job's training step and validation forward in float32 and in bf16-mixed, on this machine's device.

Why the job's precision depends on the device (``sentinel_lightning/cli/precision.py``): bf16-mixed (float32
weights and AdamW, bf16 matrix products under ``torch.autocast``) is about twice as fast as float32 where the CPU
computes bf16 natively (AVX512-BF16 or AMX) and several times slower where it is emulated. Each round times one
training step (forward, backward, AdamW step; the job's batch of 4 blocks of 256 tokens) and one no-grad forward
in each precision (the order alternates); the report gives the medians, the median of the per-round ratios (float32
time over bf16 time: above 1, bf16 is faster), whether the CPU computes bf16 natively, what the job picks here, and
the load average before and after. Writes ``precision.json`` and ``precision.md`` under ``--output-dir``.

    python scripts/benchmark_precision.py --rounds 3               # the embedded default
    python scripts/benchmark_precision.py --quick                  # a tiny model, for the tests
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sentinel_lightning.cli.precision import BF16, FLOAT32, cpu_name, job_precision, native_bf16
from sentinel_lightning.pretrained import load_causal_lm
from sentinel_lightning.tiny import tiny_model

PRECISIONS = (FLOAT32, BF16)


def autocast(precision: str):
    """What Lightning's precision plugin wraps each step in on the CPU."""
    if precision == BF16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, precision: str) -> float:
    """Seconds of one training step: forward and loss under ``precision``, backward, AdamW step."""
    start = time.perf_counter()
    with autocast(precision):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def time_forward(model: torch.nn.Module, tokens: torch.Tensor, precision: str) -> tuple[float, torch.dtype]:
    """Seconds of one no-grad forward under ``precision``, and the dtype its logits come out in."""
    start = time.perf_counter()
    with autocast(precision):
        logits = model(input_ids=tokens).logits
    return time.perf_counter() - start, logits.dtype


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-dir", default="pruning_results")
    parser.add_argument("--quick", action="store_true", help="a tiny model in short blocks, for the tests")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1 round")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model = (tiny_model("llama") if args.quick else load_causal_lm(None)).to(torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch, length = (2, 32) if args.quick else (4, 256)  # the job's batches: 4 blocks of 256 tokens
    tokens = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    for precision in PRECISIONS:  # warm-up: the first call of each pays for allocations and kernel selection
        time_step(model, optimizer, tokens, precision)
    load_before = os.getloadavg()
    step: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    forward: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    logits_dtype: dict[str, str] = {}
    for round_index in range(args.rounds):
        for precision in PRECISIONS if round_index % 2 == 0 else reversed(PRECISIONS):
            step[precision].append(time_step(model, optimizer, tokens, precision))
            seconds, dtype = time_forward(model, tokens, precision)
            forward[precision].append(seconds)
            logits_dtype[precision] = str(dtype)

    def speed_up(times: dict[str, list[float]]) -> list[float]:
        return [slow / fast for slow, fast in zip(times[FLOAT32], times[BF16])]

    result = {
        "model": "tiny llama" if args.quick else "SmolLM2-135M-Instruct (embedded)",
        "batch": [batch, length],
        "step_seconds": step, "forward_seconds": forward, "logits_dtype": logits_dtype,
        "step_bf16_speedup_rounds": speed_up(step), "step_bf16_speedup": statistics.median(speed_up(step)),
        "forward_bf16_speedup_rounds": speed_up(forward),
        "forward_bf16_speedup": statistics.median(speed_up(forward)),
        "native_bf16": native_bf16("cpu"), "job_precision": job_precision(None, "cpu")[0],
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "machine": f"{cpu_name()}, {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
                   f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    (output / "precision.json").write_text(json.dumps(result, indent=2))
    (output / "precision.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    median = {key: {name: statistics.median(times) for name, times in result[key].items()}
              for key in ("step_seconds", "forward_seconds")}
    native = "computes bf16 natively" if result["native_bf16"] else "emulates bf16 (no AVX512-BF16 or AMX)"
    return "\n".join([
        "| model | batch | | float32 (median s) | bf16-mixed (median s) | float32 / bf16 |",
        "|---|---|---|---:|---:|---:|",
        *(f"| {result['model']} | {result['batch'][0]} x {result['batch'][1]} | {label} | "
          f"{median[key][FLOAT32]:.2f} | {median[key][BF16]:.2f} | {result[ratio]:.2f}x |"
          for label, key, ratio in (("training step", "step_seconds", "step_bf16_speedup"),
                                    ("forward", "forward_seconds", "forward_bf16_speedup"))),
        "",
        f"{len(result['step_bf16_speedup_rounds'])} interleaved rounds after a warm-up; per-round training-step "
        "ratios " + ", ".join(f"{r:.2f}" for r in result["step_bf16_speedup_rounds"])
        + f". This CPU {native}: the job picks {result['job_precision']} here. Load average "
        f"{result['load_average']['before'][0]:.1f} before, {result['load_average']['after'][0]:.1f} after; "
        f"{result['machine']}.",
        "",
    ])


if __name__ == "__main__":
    main()
