"""Measures what ``HeadMetrics`` adds to a training step: the recordings it keeps open around the module's own step.

On every step ``HeadMetrics`` keeps a ``HeadOutputRecording`` open (each head's mean output and per-example gate
gradients); on one batch in ``entropy_every_n_steps`` the step also runs with the entropy-recording (eager)
attention instead of the model's fast kernel (``EntropyRecording``). This script times a plain training step
(forward, backward, AdamW) of the gated model, the same step with the output recording, and with both, in
interleaved rounds (the order alternates), and reports the medians of the per-round ratios to the plain step. The
amortised overhead is ``(every - 1) + (entropy - every) / entropy_every_n_steps``, ``every`` and ``entropy`` the
two ratios. Writes ``pruning_results/callback_overhead.json`` and ``.md``.

With ``--distillation`` it measures instead what ``GatedLanguageModel(distillation=...)`` adds: the same module's
training step without and with distillation (the teacher's no-grad forward and the KL), in interleaved pairs,
and the teacher's weight memory; it writes ``distillation_overhead.json`` and ``.md``. Both report the machine's
load average (``os.getloadavg()``) before and after, since the machine may be shared.

    python scripts/measure_callback_overhead.py               # the embedded default, batch 4 x 256
    python scripts/measure_callback_overhead.py --quick       # a tiny model, for the tests
    python scripts/measure_callback_overhead.py --distillation --repeats 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.progress import track

from sentinel_lightning import GatedLanguageModel, HeadMetrics
from sentinel_lightning.measure.attention_entropy import EntropyRecording
from sentinel_lightning.measure.head_outputs import HeadOutputRecording
from sentinel_lightning.tiny import tiny_model


def training_step(module: GatedLanguageModel, batch: torch.Tensor) -> Callable[[], None]:
    """One training step of ``module`` on ``batch`` ``[batch, seq]``: forward, backward, AdamW."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    module.train()

    def step() -> None:
        loss = module.training_step({"input_ids": batch}, 0)
        loss.backward()
        module.gates.values.grad.abs()  # what HeadMetrics reads before each optimizer step
        optimizer.step()
        optimizer.zero_grad()

    return step


def time_pairs(pair: tuple[tuple[str, Callable[[], None]], ...], repeats: int) -> dict[str, list[float]]:
    """Seconds of each named step in ``repeats`` interleaved rounds (after one warm-up of each)."""
    for _, run in pair:
        run()
    times: dict[str, list[float]] = {name: [] for name, _ in pair}
    for index in track(range(repeats), description="timing"):
        for name, run in pair if index % 2 == 0 else pair[::-1]:  # alternate which goes first
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def measure(module: GatedLanguageModel, batch: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds of ``repeats`` interleaved rounds of a plain step, a step with the output recording (every step of
    ``HeadMetrics``) and one with the entropy recording too (its sampled steps), on ``batch``."""
    step = training_step(module, batch)

    def recorded_step() -> None:
        with HeadOutputRecording(module.model):
            step()

    def entropy_step() -> None:
        with HeadOutputRecording(module.model), EntropyRecording(module.model):
            step()

    return time_pairs((("step", step), ("recorded_step", recorded_step), ("entropy_step", entropy_step)), repeats)


def ratios_to_plain(times: dict[str, list[float]], name: str) -> list[float]:
    """The ratio of step ``name`` to the plain step within each round."""
    return [other / plain for plain, other in zip(times["step"], times[name])]


def measure_distillation(module: GatedLanguageModel, batch: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds of ``repeats`` interleaved pairs of ``module``'s step without and with its distillation.

    Args:
        module: Built with ``distillation`` > 0 (so it holds its teacher); the plain step sets it to 0 meanwhile.
        batch: ``[batch, seq]`` token ids.
        repeats: Number of pairs.
    """
    weight = module.hparams.distillation
    step = training_step(module, batch)

    def plain_step() -> None:
        module.hparams.distillation = 0.0
        try:
            step()
        finally:
            module.hparams.distillation = weight

    return time_pairs((("step", plain_step), ("distilled_step", step)), repeats)


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (``os.getloadavg()``)."""
    return [round(value, 2) for value in os.getloadavg()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="hub name or local path; default: the embedded model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repeats (for the tests)")
    parser.add_argument(
        "--distillation", action="store_true", help="measure distillation's teacher instead of HeadMetrics"
    )
    parser.add_argument("--output-dir", default="pruning_results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    distillation = {"distillation": 0.5} if args.distillation else {}
    if args.quick:
        module, args.repeats, args.block_size = GatedLanguageModel(tiny_model("llama"), **distillation), 2, 32
    else:
        module = GatedLanguageModel(args.model, **distillation)
    batch = torch.randint(0, module.model.config.vocab_size, (args.batch_size, args.block_size))
    if args.distillation:
        return distillation_main(args, module, batch)
    load_before = load_average()
    times = measure(module, batch, args.repeats)
    every_step, entropy_step = (
        statistics.median(ratios_to_plain(times, name)) for name in ("recorded_step", "entropy_step")
    )
    every = HeadMetrics().entropy_every_n_steps
    result = {
        "model": args.model or ("tiny llama" if args.quick else "embedded SmolLM2-135M-Instruct"),
        "batch": [args.batch_size, args.block_size],
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "repeats": args.repeats,
        "step_seconds": statistics.median(times["step"]),
        "recorded_step_seconds": statistics.median(times["recorded_step"]),
        "entropy_step_seconds": statistics.median(times["entropy_step"]),
        "recorded_over_plain": every_step,
        "recorded_over_plain_rounds": ratios_to_plain(times, "recorded_step"),
        "entropy_over_plain": entropy_step,
        "entropy_over_plain_rounds": ratios_to_plain(times, "entropy_step"),
        "entropy_every_n_steps": every,
        "amortised_overhead": (every_step - 1.0) + (entropy_step - every_step) / every,
        "load_average": {"before": load_before, "after": load_average()},
    }
    return write_results(
        args.output_dir,
        "callback_overhead",
        result,
        "| model | batch | plain step (s) | every step / plain | entropy step / plain | entropy every n steps "
        "| amortised overhead | load average (1 min, before / after) |\n|---|---|---|---|---|---|---|---|\n"
        f"| {result['model']} | {args.batch_size} x {args.block_size} | {result['step_seconds']:.3f} | "
        f"{every_step:.3f} | {entropy_step:.3f} | {every} | {result['amortised_overhead']:.2%} | "
        f"{load_before[0]:.2f} / {result['load_average']['after'][0]:.2f} |\n",
    )


def write_results(output_dir: str, name: str, result: dict, table: str) -> dict:
    """Writes ``result`` to ``<name>.json`` and ``table`` to ``<name>.md`` in ``output_dir``; prints and returns it."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(result, indent=2))
    (output / f"{name}.md").write_text(table)
    print(json.dumps(result, indent=2))
    return result


def distillation_main(args: argparse.Namespace, module: GatedLanguageModel, batch: torch.Tensor) -> dict:
    """Times ``module``'s step without and with distillation; writes ``distillation_overhead.json`` and ``.md``."""
    load_before = load_average()
    times = measure_distillation(module, batch, args.repeats)
    ratios = [distilled / plain for plain, distilled in zip(times["step"], times["distilled_step"])]
    teacher_bytes = sum(p.numel() * p.element_size() for p in module.teacher.parameters())
    result = {
        "model": args.model or ("tiny llama" if args.quick else "embedded SmolLM2-135M-Instruct"),
        "batch": [args.batch_size, args.block_size],
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} torch threads",
        "repeats": args.repeats,
        "step_seconds": statistics.median(times["step"]),
        "distilled_step_seconds": statistics.median(times["distilled_step"]),
        "distilled_over_plain": statistics.median(ratios),
        "distilled_over_plain_pairs": ratios,
        "teacher_parameters": sum(p.numel() for p in module.teacher.parameters()),
        "teacher_megabytes": teacher_bytes / 1e6,
        "load_average": {"before": load_before, "after": load_average()},
    }
    return write_results(
        args.output_dir,
        "distillation_overhead",
        result,
        "| model | batch | plain step (s) | distilled step (s) | distilled / plain (median of pairs) "
        "| teacher weights (MB) | load average (1 min, before / after) |\n|---|---|---|---|---|---|---|\n"
        f"| {result['model']} | {args.batch_size} x {args.block_size} | {result['step_seconds']:.3f} | "
        f"{result['distilled_step_seconds']:.3f} | {result['distilled_over_plain']:.3f} | "
        f"{result['teacher_megabytes']:.0f} | {load_before[0]:.2f} / {result['load_average']['after'][0]:.2f} |\n",
    )


if __name__ == "__main__":
    main()
