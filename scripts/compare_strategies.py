"""Compare head-pruning strategies: validation perplexity, generation speed and text quality at each pruning level.

The head metrics (attention entropy and |dL/dgate|) are measured once on calibration blocks of the training
split. Then, for every strategy (entropy, gradient, and random over several seeds) and every pruning level,
the gates are reset to dense and the strategy's top-scored heads are pruned (global scope); the pruned model's
perplexity on held-out validation blocks, its greedy generation speed and the lexical diversity and repetition
of its continuation of a prompt are measured. ``--recovery-steps N`` fine-tunes a copy of the pruned model for
N optimizer steps (gates frozen) before measuring.

Writes ``pruning_strategy_comparison.png``, ``results.json`` and ``results.md`` to ``--output-dir``.

Examples::

    python scripts/compare_strategies.py                      # the embedded SmolLM2-135M, about 20 min on 2 cores
    python scripts/compare_strategies.py --quick              # a tiny random model, seconds (used by the tests)
    python scripts/compare_strategies.py --recovery-steps 5 --levels 0.0 0.3 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from sentinel_lightning.callbacks import HeadPruning
from sentinel_lightning.data import LanguageModelingDataModule
from sentinel_lightning.evaluation import evaluate_model
from sentinel_lightning.gates import HeadGates, attach_gates, find_causal_lm, find_gates
from sentinel_lightning.measure.ablation import unit_ablation
from sentinel_lightning.measure.statistics import measure_head_metrics
from sentinel_lightning.pretrained import byte_level_tokenizer
from sentinel_lightning.standalone.families import family_of
from sentinel_lightning.strategies import SCOPES, STRATEGIES, UNITS, needs_ablation, resolve_strategy, select_heads
from sentinel_lightning.tiny import tiny_model

DEFAULT_LEVELS = [round(0.1 * index, 1) for index in range(10)]
QUICK_LEVELS = [0.0, 0.25, 0.5]
DEFAULT_PROMPT = "In Python, a function definition"
STRATEGY_NAMES = tuple(STRATEGIES)
# By default, the strategies that read the calibration metrics only; "ablation" measures one forward per head and
# calibration batch (on the embedded default: 270 x 4), so it runs when asked for: --strategies ablation ...
DEFAULT_STRATEGIES = [name for name in STRATEGY_NAMES if not needs_ablation(STRATEGIES[name](0))]
COMPENSATED = "+compensation"  # suffix of a run whose pruned heads write their mean output instead of zero
LINEAR = "+linear"  # suffix of a run whose pruned heads write their prediction from the kept heads (reconstruction.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (long only because it declares each of them, one call apiece), with --quick's defaults."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--model",
        default=None,
        help="Hub name or local path of a causal LM (default: the embedded SmolLM2-135M-Instruct).",
    )
    add("--gguf-file", default=None, help="GGUF file inside --model's folder.")
    add(
        "--data-files",
        nargs="+",
        default=None,
        help="Local text files (default: the embedded Python Language Reference).",
    )
    add(
        "--quick",
        action="store_true",
        help="A tiny random Llama and a byte-level tokenizer, 3 levels, 2 seeds: seconds.",
    )
    add("--strategies", nargs="+", default=DEFAULT_STRATEGIES, choices=STRATEGY_NAMES)
    add(
        "--compensate",
        nargs="*",
        default=[],
        choices=STRATEGY_NAMES,
        help="Strategies also measured with output compensation (pruned heads write their mean output).",
    )
    add(
        "--compensate-linear",
        nargs="*",
        default=[],
        choices=STRATEGY_NAMES,
        help="Strategies also measured with linear compensation (pruned heads write their least-squares "
        "prediction from the layer's kept heads).",
    )
    add(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="Seeds of the random strategy (default: 0 1 2; --quick: 0 1).",
    )
    add(
        "--levels",
        nargs="+",
        type=float,
        default=None,
        help="Fractions of all heads to prune (default: 0.0 0.1 ... 0.9).",
    )
    add("--min-active-heads-per-layer", type=int, default=1, help="No layer keeps fewer active heads (default: 1).")
    add("--unit", choices=UNITS, default="head", help="What is pruned: head, group (a key/value head and its query "
        "heads) or layer (default: head).")
    add("--scope", choices=SCOPES, default="global", help="global, layer or uniform (default: global).")
    add("--block-size", type=int, default=None, help="Tokens per block (default: 256; --quick: 32).")
    add("--batch-size", type=int, default=4)
    add(
        "--calibration-blocks",
        type=int,
        default=None,
        help="Training blocks the head metrics are measured on (default: 16; --quick: 8).",
    )
    add(
        "--validation-blocks",
        type=int,
        default=None,
        help="Validation blocks perplexity is measured on (default: 24; --quick: 8).",
    )
    add("--prompt", default=DEFAULT_PROMPT, help="Prompt continued greedily for speed and text quality.")
    add("--num-tokens", type=int, default=None, help="New tokens per generation run (default: 50; --quick: 8).")
    add("--num-runs", type=int, default=None, help="Timed generation runs, median reported (default: 3; --quick: 1).")
    add(
        "--generation-threads",
        type=int,
        default=1,
        help="Torch threads while generating (default: 1, steadier than 2 on small CPUs).",
    )
    add(
        "--recovery-steps",
        type=int,
        default=0,
        help="Fine-tune a copy of each pruned model this many optimizer steps first (default: 0).",
    )
    add("--recovery-learning-rate", type=float, default=5e-5)
    add("--output-dir", default="pruning_results")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(
        seeds=[0, 1] if quick else [0, 1, 2],
        levels=QUICK_LEVELS if quick else DEFAULT_LEVELS,
        block_size=32 if quick else 256,
        calibration_blocks=8 if quick else 16,
        validation_blocks=8 if quick else 24,
        num_tokens=8 if quick else 50,
        num_runs=1 if quick else 3,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for level in args.levels:
        if not 0.0 <= level < 1.0:
            parser.error(f"--levels contains {level}; a level is a fraction of all heads in [0, 1).")
    positive = ("block_size", "batch_size", "calibration_blocks", "validation_blocks", "num_tokens", "num_runs")
    for name in (*positive, "generation_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer.")
    if args.recovery_steps < 0:
        parser.error(f"--recovery-steps={args.recovery_steps} must be 0 or more.")
    args.levels = sorted(set(args.levels))
    return args


def load(args: argparse.Namespace):
    """The model (eval mode, gated), its tokenizer and the data module."""
    if args.quick:
        model, tokenizer = tiny_model("llama", seed=0), byte_level_tokenizer()
    else:
        from sentinel_lightning.pretrained import load_causal_lm, load_tokenizer

        model, tokenizer = load_causal_lm(args.model, args.gguf_file), load_tokenizer(args.model, args.gguf_file)
    model.eval()
    attach_gates(model)
    source = dict(source="text", train_files=args.data_files) if args.data_files else {}
    data = LanguageModelingDataModule(
        tokenizer=tokenizer, block_size=args.block_size, batch_size=args.batch_size, cache=not args.quick, **source
    )
    data.setup()
    return model, tokenizer, data


def batches_of(dataset, indices: list[int], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Collated batches of the blocks ``indices`` of ``dataset``, each ``[batch, block_size]``."""
    blocks = [dataset[index] for index in indices]
    return [
        LanguageModelingDataModule.collate(blocks[start : start + batch_size])
        for start in range(0, len(blocks), batch_size)
    ]


def recover(model, data: LanguageModelingDataModule, steps: int, learning_rate: float):
    """A copy of ``model`` fine-tuned for ``steps`` optimizer steps with its gates frozen as they are."""
    import lightning as L

    from sentinel_lightning.module import GatedLanguageModel

    L.seed_everything(0, verbose=False)
    module = GatedLanguageModel(copy.deepcopy(model), learning_rate=learning_rate, learn_gates=False, warmup_ratio=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    return module.model.eval()


def measure(model, tokenizer, validation, args) -> dict:
    """Perplexity, generation speed and text quality of ``model`` as it is (``evaluation.evaluate_model``)."""
    return evaluate_model(
        model, tokenizer, validation, args.prompt, args.num_tokens, args.num_runs, num_threads=args.generation_threads
    )


def prune_to(
    gates: HeadGates, scores: torch.Tensor, count: int, min_active: int, compensation: torch.Tensor | None = None,
    unit: str = "head", scope: str = "global", group_size: int = 1,
) -> list[tuple[int, int]]:
    """Resets ``gates`` to dense, then prunes about ``count`` top-scored heads in whole units (``select_heads``).

    ``compensation`` ``[L, H, D]`` (the heads' mean outputs) is what pruned heads write instead of zero, or None.
    """
    gates.reactivate(gates.pruned_heads())
    heads = select_heads(scores, gates.active, count, scope=scope, min_active_heads_per_layer=min_active, unit=unit,
                         group_size=group_size)
    gates.prune(heads, compensation=compensation)
    return heads


def group_size_of(model) -> int:
    """``G``: query heads per key/value head of ``model`` (``families``)."""
    causal_lm = find_causal_lm(model)
    return family_of(causal_lm).group_size(causal_lm.config)


def calibration_and_validation(
    data: LanguageModelingDataModule, args: argparse.Namespace, console
) -> tuple[list, list]:
    """Calibration batches (random training blocks, seed 0) and validation batches (the first validation blocks)."""
    train, validation_set = data.blocks["train"], data.blocks["validation"]
    generator = torch.Generator().manual_seed(0)
    calibration_count = min(args.calibration_blocks, len(train))
    calibration_indices = sorted(torch.randperm(len(train), generator=generator)[:calibration_count].tolist())
    validation_count = min(args.validation_blocks, len(validation_set))
    if validation_count < args.validation_blocks:
        console.print(f"[yellow]The validation split has only {len(validation_set)} blocks; using them all.[/yellow]")
    calibration = batches_of(train, calibration_indices, args.batch_size)
    return calibration, batches_of(validation_set, list(range(validation_count)), args.batch_size)


def strategy_runs(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    """``(run name, seed)`` pairs: one per deterministic strategy, one per seed of the random one, and the same
    again for the strategies measured with compensation (named ``strategy+compensation``)."""
    names = run_names(args)
    return [(name, seed) for name in names for seed in (args.seeds if name.startswith("random") else [None])]


def run_names(args: argparse.Namespace) -> list[str]:
    """The run names in the tables: the strategies, then the compensated ones (mean, then linear)."""
    return [
        *args.strategies,
        *(name + COMPENSATED for name in args.compensate),
        *(name + LINEAR for name in args.compensate_linear),
    ]


def progress_bar(console):
    """A rich progress bar with the elapsed and remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, TimeRemainingColumn(), console=console)


def report_line(record: dict, label: str, started: float) -> str:
    """One line of progress: elapsed time, run, level and what was measured."""
    minutes, seconds = divmod(int(time.perf_counter() - started), 60)
    return (
        f"[{minutes:3d}:{seconds:02d}] {label:>17} {record['level']:4.0%}: {record['heads_pruned']:3d} heads pruned, "
        f"perplexity {record['perplexity']:10.2f}, {record['tokens_per_second']:6.2f} tokens/s, "
        f"diversity {record['lexical_diversity']:.2f}, repetition {record['repetition_score']:.2f}"
    )


def compare(
    model, tokenizer, data, metrics: dict, validation: list, args, progress, task, started: float
) -> list[dict]:
    """Every strategy run at every level: prune, optionally recover, measure; one record per run and level."""
    gates = find_gates(model)
    total_heads = gates.active.numel()
    records, measured = [], {}  # measured: pruned heads -> measurement, so identical prunings are measured once
    for level in args.levels:
        for name, seed in strategy_runs(args):
            label = name if seed is None else f"{name} (seed {seed})"
            progress.update(task, description=f"{label} at {level:.0%}")
            strategy = name.removesuffix(COMPENSATED).removesuffix(LINEAR)
            mode = "mean" if name.endswith(COMPENSATED) else "linear" if name.endswith(LINEAR) else "none"
            compensation = metrics["output_mean"] if mode != "none" else None
            scores = resolve_strategy(strategy, 0 if seed is None else seed)(metrics)
            heads = prune_to(gates, scores, round(level * total_heads), args.min_active_heads_per_layer, compensation,
                             args.unit, args.scope, group_size_of(model))
            if mode == "linear":
                HeadPruning.fit_linear_compensation(gates, metrics, sorted({layer for layer, _ in heads}))
            key = (frozenset(heads), mode)
            if key not in measured:
                evaluated = model
                if args.recovery_steps:
                    evaluated = recover(model, data, args.recovery_steps, args.recovery_learning_rate)
                measured[key] = measure(evaluated, tokenizer, validation, args)
                del evaluated
            record = {
                "strategy": name,
                "seed": seed,
                "level": level,
                "heads_pruned": len(heads),
                "sparsity": len(heads) / total_heads,
                **measured[key],
                "pruned": [list(pair) for pair in sorted(heads)],
            }
            records.append(record)
            progress.console.print(report_line(record, label, started), highlight=False, soft_wrap=True)
            progress.advance(task)
    gates.reactivate(gates.pruned_heads())
    return records


def describe(args: argparse.Namespace, gates: HeadGates, calibration: list, validation: list) -> dict:
    """The setting of a comparison: command, model, data, measurement options and machine."""
    embedded = "embedded SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised to fp32)"
    return {
        "command": " ".join(
            ["python scripts/compare_strategies.py", *(sys.argv[1:] if args.argv is None else args.argv)]
        ),
        "model": "tiny random Llama (--quick)" if args.quick else (args.model or embedded),
        "num_layers": gates.num_layers,
        "num_heads": gates.num_heads,
        "data": ", ".join(args.data_files) if args.data_files else "embedded corpus (Python Language Reference)",
        "block_size": args.block_size,
        "calibration_blocks": sum(len(batch["input_ids"]) for batch in calibration),
        "validation_blocks": sum(len(batch["input_ids"]) for batch in validation),
        "validation_tokens": sum(int(batch["labels"][:, 1:].numel()) for batch in validation),
        "prompt": args.prompt,
        "num_tokens": args.num_tokens,
        "num_runs": args.num_runs,
        "generation_threads": args.generation_threads,
        "recovery_steps": args.recovery_steps,
        "min_active_heads_per_layer": args.min_active_heads_per_layer,
        "unit": args.unit,
        "scope": args.scope,
        "strategies": run_names(args),
        "seeds": args.seeds,
        "levels": args.levels,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
    }


def run(args: argparse.Namespace) -> dict:
    """Runs the comparison and returns the results (see ``results.json``)."""
    from rich.console import Console

    console = Console(stderr=True)
    started = time.perf_counter()
    model, tokenizer, data = load(args)
    calibration, validation = calibration_and_validation(data, args, console)
    with progress_bar(console) as progress:
        task = progress.add_task("calibrating the head metrics", total=1 + len(args.levels) * len(strategy_runs(args)))
        metrics = measure_head_metrics(model, calibration, second_moment=bool(args.compensate_linear))
        if any(needs_ablation(STRATEGIES[name](0)) for name in args.strategies):  # the units pruned here
            metrics["ablation"] = unit_ablation(model, calibration, args.unit, group_size_of(model))
        calibration_seconds = time.perf_counter() - started
        progress.advance(task)
        records = compare(model, tokenizer, data, metrics, validation, args, progress, task, started)
    return {
        **describe(args, find_gates(model), calibration, validation),
        "calibration_seconds": calibration_seconds,
        "total_seconds": time.perf_counter() - started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "head_metrics": {name: value.tolist() for name, value in metrics.items()},
        "results": records,
    }


def summarise(results: dict) -> dict[str, dict[float, dict]]:
    """Per strategy and level: the median, min and max over seeds of each measured quantity."""
    summary: dict[str, dict[float, dict]] = {}
    for name in results["strategies"]:
        summary[name] = {}
        for level in results["levels"]:
            rows = [row for row in results["results"] if row["strategy"] == name and row["level"] == level]
            summary[name][level] = {
                quantity: {
                    "median": statistics.median(row[quantity] for row in rows),
                    "min": min(row[quantity] for row in rows),
                    "max": max(row[quantity] for row in rows),
                }
                for quantity in (
                    "perplexity",
                    "tokens_per_second",
                    "lexical_diversity",
                    "repetition_score",
                    "heads_pruned",
                )
            }
    return summary


def plot(results: dict, path: str) -> None:
    """Perplexity (log scale) and generation speed against the pruning level, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    summary = summarise(results)
    levels = results["levels"]
    percent = [100 * level for level in levels]
    figure = Figure(figsize=(13, 5), dpi=120, layout="constrained")
    perplexity_axes, speed_axes = figure.subplots(1, 2)
    palette = iter(matplotlib.colormaps["tab10"].colors)
    colours = {name: "tab:gray" if name == "random" else next(palette) for name in summary}
    for name, per_level in summary.items():
        for axes, quantity in ((perplexity_axes, "perplexity"), (speed_axes, "tokens_per_second")):
            median = [per_level[level][quantity]["median"] for level in levels]
            label = name if name != "random" else f"random (median, band: min-max over {len(results['seeds'])} seeds)"
            axes.plot(percent, median, marker="o", color=colours[name], label=label)
            if name == "random" and len(results["seeds"]) > 1:
                low = [per_level[level][quantity]["min"] for level in levels]
                high = [per_level[level][quantity]["max"] for level in levels]
                axes.fill_between(percent, low, high, color=colours[name], alpha=0.25, linewidth=0)
    recovery = f", {results['recovery_steps']} recovery steps" if results["recovery_steps"] else ", no fine-tuning"
    perplexity_axes.set_yscale("log")
    perplexity_axes.set_ylabel(
        f"validation perplexity (log scale, {results['validation_blocks']} blocks of {results['block_size']} tokens)"
    )
    perplexity_axes.set_title(f"Perplexity after pruning{recovery}")
    speed_axes.set_ylabel(
        f"generation speed (tokens/s, median of {results['num_runs']} runs of {results['num_tokens']} tokens)"
    )
    speed_axes.set_title("Generation speed (gated heads still cost compute)")
    speed_axes.set_ylim(bottom=0)
    for axes in (perplexity_axes, speed_axes):
        axes.set_xlabel(f"heads pruned (% of {results['num_layers']} layers x {results['num_heads']} heads)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.suptitle(f"Pruning strategies on {results['model']}")
    figure.savefig(path)


def markdown(results: dict) -> str:
    """``results.md``: the command, the setting and one table per measured quantity."""
    summary = summarise(results)
    names = results["strategies"]
    seeds = len(results["seeds"])

    def cell(stats: dict, digits: int, name: str) -> str:
        if name == "random" and seeds > 1:
            return f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]"
        return f"{stats['median']:.{digits}f}"

    header = ["level", "heads pruned"] + [
        name if name != "random" else f"random (median [min, max], {seeds} seeds)" for name in names
    ]
    lines = [
        "# Pruning strategy comparison",
        "",
        f"Command: `{results['command']}`",
        "",
        f"- model: {results['model']} ({results['num_layers']} layers x {results['num_heads']} heads)",
        f"- data: {results['data']}; head metrics on {results['calibration_blocks']} training blocks, perplexity on "
        f"{results['validation_blocks']} validation blocks of {results['block_size']} tokens",
        f"- pruning: unit {results.get('unit', 'head')}, {results.get('scope', 'global')} scope, at least "
        f"{results['min_active_heads_per_layer']} active head(s) per layer; "
        + (
            f"{results['recovery_steps']} recovery fine-tuning steps per level"
            if results["recovery_steps"]
            else "no fine-tuning"
        ),
        f"- generation: greedy, exactly {results['num_tokens']} new tokens, "
        f"median of {results['num_runs']} timed runs, "
        f"{results['generation_threads']} torch thread(s); prompt {results['prompt']!r}",
        f"- machine: {results['machine']['cpu_count']} CPU cores, torch {results['machine']['torch']}, "
        f"Python {results['machine']['python']}; total time {results['total_seconds'] / 60:.1f} min",
        "",
    ]
    for title, quantity, digits in (
        ("Validation perplexity (lower is better)", "perplexity", 2),
        ("Generation speed, tokens per second", "tokens_per_second", 2),
        ("Lexical diversity of the continuation (unique words / words)", "lexical_diversity", 2),
        ("Repetition score of the continuation (share of words recurring within 50 words)", "repetition_score", 2),
    ):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for level in results["levels"]:
            pruned = summary[names[0]][level]["heads_pruned"]["median"]
            row = [f"{level:.0%}", f"{pruned:.0f}"] + [
                cell(summary[name][level][quantity], digits, name) for name in names
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Runs the comparison and writes the PNG, JSON and markdown files; returns the results."""
    args = parse_args(argv)
    args.argv = argv
    results = run(args)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=1)
    with open(os.path.join(args.output_dir, "results.md"), "w") as file:
        file.write(markdown(results))
    plot(results, os.path.join(args.output_dir, "pruning_strategy_comparison.png"))
    print(
        f"Wrote {args.output_dir}/pruning_strategy_comparison.png, results.json and results.md "
        f"in {results['total_seconds'] / 60:.1f} min."
    )
    return results


if __name__ == "__main__":
    main()
