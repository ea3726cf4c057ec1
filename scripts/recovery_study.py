"""Recovery study: how close to a dense fine-tune does fine-tune-with-pruning end, with each recovery lever?

Runs the default job (``sentinel-lightning fit``, the same budget: epochs, batches, tokens, learning rate) once
dense and then, for each target fraction of heads, with each recovery recipe of ``VARIANTS``: plain fine-tuning,
distillation from the model as loaded, mean output compensation, both, the compensated gradient score, distillation
from the model before each pruning (``snapshot``), linear compensation, and linear compensation with the snapshot
teacher. Pruning reaches the target in ``--steps`` equal steps after epochs 0, 1, ... (2 as the job does; 3 as the
first study did), and reactivation is switched off (``--reactivation.tolerance`` very large) so that every pruned
run ends at its target and all are compared at the same fraction. Writes ``recovery.json`` and ``recovery.md``
(validation perplexity of each run and its ratio to the dense fine-tune) to ``--output-dir``.

    python scripts/recovery_study.py                                  # the embedded default: about 7 min a run
    python scripts/recovery_study.py --targets 0.3 --variants plain both
    python scripts/recovery_study.py --targets 0.5 --reuse-dense pruning_results/recovery.json --output-dir more/
    python scripts/recovery_study.py --targets 0.3 --variants linear --lora   # LoRA instead of full fine-tunes
    python scripts/recovery_study.py --quick                          # a tiny model, for the tests
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from sentinel_lightning.cli.fit import TRAINER_DEFAULTS, run_fit
from sentinel_lightning.tiny import save_tiny_model


def _variant(strategy: str, compensate: str, distillation: float = 0.0, teacher: str = "loaded") -> list[str]:
    """The options of one recovery recipe, every lever stated (whatever the job's defaults are)."""
    return [
        f"--pruning.strategy={strategy}",
        f"--pruning.compensate={compensate}",
        f"--model.distillation={distillation}",
        f"--model.distillation_teacher={teacher}",
    ]


VARIANTS = {
    "plain": _variant("gradient", "none"),
    "distillation": _variant("gradient", "none", 0.5),  # from the model as loaded
    "compensation": _variant("gradient", "mean"),
    "both": _variant("gradient", "mean", 0.5),
    "compensated_score": _variant("gradient_compensated", "mean"),
    "snapshot": _variant("gradient_compensated", "mean", 0.5, "before_pruning"),
    "linear": _variant("gradient_compensated", "linear"),
    "linear+snapshot": _variant("gradient_compensated", "linear", 0.5, "before_pruning"),
}
# ``--lora``: every run a LoRA fine-tune, adapters on every linear layer but the head, at LoRA's usual learning
# rate (higher than a full fine-tune's: only the adapters and the gates train).
LORA = [
    '--model.lora={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}',
    "--model.learning_rate=0.001",
]
HOLD_TARGET = ["--reactivation.tolerance=1000000"]  # no reactivation: every run ends at its target
QUICK_SETTINGS = [
    "--data.block_size=32",
    "--data.cache=false",
    "--model.learning_rate=0.001",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.max_epochs=3",
]


def schedule_for(target: float, steps: int = 2) -> str:
    """The schedule of ``steps`` equal steps after epochs 0, 1, ... that ends at ``target``, as a CLI value."""
    return json.dumps({epoch: round(target * (epoch + 1) / steps, 4) for epoch in range(steps)})


def runs(
    targets: list[float], variants: list[str], dense: bool = True, steps: int = 2, lora: bool = False
) -> dict[str, list[str]]:
    """Each run's name and its ``fit`` options (besides the common ones); the dense run first when ``dense``;
    with ``lora`` every run is a LoRA fine-tune (``LORA``) and its name starts with ``lora``."""
    prefix, extra = ("lora ", LORA) if lora else ("", [])
    planned = {f"{prefix}dense": ["--pruning.schedule={}", *extra]} if dense else {}
    for target in targets:
        for variant in variants:
            planned[f"{prefix}{variant} {target:.0%}"] = [
                f"--pruning.schedule={schedule_for(target, steps)}",
                *HOLD_TARGET,
                *VARIANTS[variant],
                *extra,
            ]
    return planned


def run_one(name: str, options: list[str], common: list[str], root: str) -> dict:
    """Runs one ``fit`` and returns its report with the wall time."""
    folder = os.path.join(root, name.replace(" ", "_").replace("%", "pct"))
    start = time.perf_counter()
    report = run_fit([*common, f"--trainer.default_root_dir={folder}", *options])
    report = {key: report[key] for key in ("val_ppl_before", "val_ppl_after", "pruned_fraction")}
    report["seconds"] = time.perf_counter() - start
    gc.collect()
    return report


def markdown(results: dict, command: str) -> str:
    """The results as a table: perplexity after each run and its ratio to the dense fine-tune."""
    dense_name = "dense" if "dense" in results["runs"] else "lora dense"
    dense = results["runs"][dense_name]["val_ppl_after"]
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {results['machine']}; before fine-tuning, validation perplexity "
        f"{results['runs'][dense_name]['val_ppl_before']:.2f}.",
        "",
        f"| run | pruned fraction | validation perplexity | / {dense_name} fine-tune | minutes |",
        "|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        lines.append(
            f"| {name} | {run['pruned_fraction']:.3f} | {run['val_ppl_after']:.2f} | "
            f"{run['val_ppl_after'] / dense:.3f}x | {run['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5], help="fractions of heads pruned")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2, help="pruning steps, after epochs 0, 1, ... (default: 2)")
    parser.add_argument("--output-dir", default="pruning_results")
    parser.add_argument("--reuse-dense", help="recovery.json of an earlier run of this study: take its dense run")
    parser.add_argument("--lora", action="store_true", help="LoRA fine-tunes (adapters and gates) instead of full ones")
    parser.add_argument("--quick", action="store_true", help="a tiny random model in short blocks (for the tests)")
    args = parser.parse_args(argv)
    for target in args.targets:
        if not 0.0 < target < 1.0:
            parser.error(f"--targets contains {target}; a target is a fraction of all heads in (0, 1).")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    common = ["--trainer.enable_progress_bar=false"]
    if args.quick:
        common += [*QUICK_SETTINGS, f"--model.model={save_tiny_model(str(output / 'quick_model'))}"]
    reused = (
        {} if args.reuse_dense is None else {"dense": json.loads(Path(args.reuse_dense).read_text())["runs"]["dense"]}
    )
    epochs = TRAINER_DEFAULTS["max_epochs"]
    if not 1 <= args.steps < epochs:
        parser.error(f"--steps={args.steps} must lie in [1, {epochs - 1}]: the job trains {epochs} epochs and prunes "
                     "at epoch ends.")
    planned = runs(args.targets, args.variants, dense=not reused, steps=args.steps, lora=args.lora)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "targets": args.targets,
        "runs": {
            **reused,
            **{name: run_one(name, options, common, str(output / "runs")) for name, options in planned.items()},
        },
    }
    command = "python scripts/recovery_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (output / "recovery.json").write_text(json.dumps(results, indent=2))
    (output / "recovery.md").write_text(markdown(results, command.strip()))
    print(markdown(results, command.strip()))
    return results


if __name__ == "__main__":
    main()
