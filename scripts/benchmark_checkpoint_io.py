"""Times one checkpoint write of the job: Lightning's ``TorchCheckpointIO`` against ``StreamingCheckpointIO``.

The checkpoint is what the job's ``last.ckpt`` holds for the embedded default: the gated model's weights and
AdamW's state after one training step (two moments per parameter). Each round writes it once with each plugin to
the same folder (the order alternates), reads nothing back, and deletes both files; the report gives the seconds
of each write, the median of the per-round ratios (Lightning's over the streamed) and the load average before and
after, since the machine may be shared. Writes ``checkpoint_io.json`` and ``checkpoint_io.md`` under
``--output-dir``.

    python scripts/benchmark_checkpoint_io.py --rounds 5          # the embedded default, 1.6 GB a write
    python scripts/benchmark_checkpoint_io.py --quick              # a tiny model, for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from sentinel_lightning import GatedLanguageModel
from sentinel_lightning.checkpoint_io import StreamingCheckpointIO
from sentinel_lightning.tiny import tiny_model

PLUGINS = {"lightning": TorchCheckpointIO, "streamed": StreamingCheckpointIO}


def job_checkpoint(module: GatedLanguageModel) -> dict:
    """The weights and the AdamW state of ``module`` after one step on random tokens, as a checkpoint holds them."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    tokens = torch.randint(0, module.model.config.vocab_size, (1, 16))
    module.model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    return {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()], "epoch": 0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output-dir", default="pruning_results")
    parser.add_argument("--quick", action="store_true", help="a tiny model, for the tests")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1 round")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    module = GatedLanguageModel(tiny_model("llama") if args.quick else None)
    checkpoint = job_checkpoint(module)
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {name: [] for name in PLUGINS}
    for round_index in range(args.rounds):
        order = list(PLUGINS) if round_index % 2 == 0 else list(reversed(PLUGINS))
        for name in order:
            path = output / f"benchmark_{name}.ckpt"
            start = time.perf_counter()
            PLUGINS[name]().save_checkpoint(checkpoint, path)
            seconds[name].append(time.perf_counter() - start)
            path.unlink()
    ratios = [slow / fast for slow, fast in zip(seconds["lightning"], seconds["streamed"])]
    result = {
        "model": "tiny llama" if args.quick else "SmolLM2-135M-Instruct (embedded)",
        "checkpoint_megabytes": stored_bytes(checkpoint) / 1e6,
        "seconds": seconds,
        "lightning_over_streamed_rounds": ratios,
        "lightning_over_streamed": statistics.median(ratios),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    (output / "checkpoint_io.json").write_text(json.dumps(result, indent=2))
    (output / "checkpoint_io.md").write_text(markdown(result))
    print(markdown(result))
    return result


def stored_bytes(checkpoint: dict) -> int:
    """The bytes of the tensors a checkpoint stores, each storage once (tied weights share one)."""
    storages: dict[int, int] = {}
    apply_to_collection(checkpoint, torch.Tensor, lambda t: storages.setdefault(
        t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
    return sum(storages.values())


def markdown(result: dict) -> str:
    median = {name: statistics.median(times) for name, times in result["seconds"].items()}
    return "\n".join([
        "| model | checkpoint | Lightning's write (median s) | streamed write (median s) | Lightning / streamed |",
        "|---|---:|---:|---:|---:|",
        f"| {result['model']} | {result['checkpoint_megabytes']:.1f} MB | {median['lightning']:.2f} | "
        f"{median['streamed']:.2f} | {result['lightning_over_streamed']:.2f}x |",
        "",
        f"{len(result['lightning_over_streamed_rounds'])} interleaved rounds; per-round ratios "
        + ", ".join(f"{r:.2f}" for r in result["lightning_over_streamed_rounds"])
        + f"; load average {result['load_average']['before'][0]:.1f} before, "
        f"{result['load_average']['after'][0]:.1f} after; {result['machine']}.",
        "",
    ])


if __name__ == "__main__":
    main()
