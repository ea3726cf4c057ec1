"""The quality/cost frontier: which pruning recipe hands over a model that is cheaper to serve, at what quality?

Every recipe of ``RECIPES`` (a unit, a scope and a way to recover, stated as ``sentinel-lightning fit`` options on
top of the job's defaults) is fine-tuned at its budget, its last checkpoint exported (``export_checkpoint``), and
the export measured as a user receives it:

- validation perplexity (the job's own validation batches, ``val_ppl`` at the end of ``fit``) and perplexity on the
  held-out text (the validation split of the ``python_docstrings`` corpus: the standard library's docstrings, a
  text no recipe was tuned on), each divided by the dense fine-tune's of the same budget;
- key/value cache bytes per token and parameters, against the plain model;
- the bytes bound on decoding after 4,096 tokens, and with ``--time`` the speed-up measured by
  ``scripts/benchmark_speed.py --model_dir`` (paired, interleaved rounds against the plain model);
- whether plain ``AutoModelForCausalLM.from_pretrained`` (no ``trust_remote_code``, in a fresh process) opens the
  folder and computes the same logits as ``load_pruned``;
- the wall minutes of the fit (in the JSON only: on a shared machine they say little about the budget).

Each recipe's measurements go to ``runs/<recipe>/result.json`` under ``--output-dir``; a rerun measures only the
recipes that have none (so two commands with different ``--recipes`` can share one folder, one core each), and
with ``--time`` times the saved export of a recipe measured without it (no new fit). Then
every recipe measured in the folder goes into ``frontier.json``, ``frontier.md`` (the table, each pruned recipe
against the dense fine-tune of its budget, blank while that is not measured) and ``frontier.png`` (perplexity ratio
against cache ratio and against decoding speed-up, the shipped default starred, the issue's aims drawn).

    python scripts/frontier.py                                  # every recipe on the embedded default
    python scripts/frontier.py --recipes dense default "dense 4 epochs" "group uniform 4 epochs" --time
    python scripts/frontier.py --quick                          # a tiny model, for the tests
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sentinel_lightning.cli.export import export_checkpoint
from sentinel_lightning.cli.fit import run_fit
from sentinel_lightning.compaction import bytes_per_decoded_token, count_parameters, kv_cache_bytes_per_token
from sentinel_lightning.data import DOCSTRINGS_CORPUS, LanguageModelingDataModule
from sentinel_lightning.evaluation import perplexity
from sentinel_lightning.pretrained import load_causal_lm, load_tokenizer
from sentinel_lightning.saving import load_pruned

CONTEXT = 4096  # the context after which decoding is measured and bounded
HELD_OUT_BATCHES = 8  # as many batches of the held-out text as the job validates on


@dataclass(frozen=True)
class Recipe:
    """One point of the frontier: ``fit`` options on top of the job's defaults, and the budget they run at.

    ``budget`` options (trainer settings) are shared with the dense fine-tune the recipe is compared with, which
    runs under the name ``dense`` + the budget's label.
    """

    unit: str
    scope: str
    recovery: str
    options: tuple[str, ...] = ()
    budget: tuple[str, ...] = ()
    budget_label: str = ""

    @property
    def dense_name(self) -> str:
        return f"dense{self.budget_label}"


TWO_STEPS = "--pruning.schedule={0: 0.15, 1: 0.3}"
LEARNING_RATE_3E4 = ("--model.learning_rate=0.0003",)  # the job's learning rate until 2026-12-02
LEARNING_RATE_8E4 = ("--model.learning_rate=0.0008",)
LEARNING_RATE_1E3 = ("--model.learning_rate=0.001",)
SEED_1 = ("--seed_everything=1", "--data.seed=1")  # another order of the training blocks
SEED_2 = ("--seed_everything=2", "--data.seed=2")  # a third
FOUR_EPOCHS = ("--trainer.max_epochs=4", *LEARNING_RATE_3E4)  # the job's budget until 2026-12-02
DISTILLED = ("--model.distillation=0.5", "--model.distillation_teacher=before_pruning")
# LoRA on every linear layer but the head, at LoRA's usual learning rate (only the adapters and the gates train).
LORA = ('--model.lora={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}', "--model.learning_rate=0.001")
DENSE = ("--pruning.schedule={}",)
# One training batch more per epoch: what the job's streamed checkpoints leave room for within its 10 minutes.
SEVEN_BATCHES = ("--trainer.limit_train_batches=7",)
EPOCH_1 = "--pruning.schedule={1: 0.3333}"
PATIENCE_3 = "--reactivation.patience=3"
# The 15 layers whose cheapest group costs least lose it after epoch 0, the other 15 after epoch 1: the same uniform
# shape in two steps, each half the regression of one.
TWO_UNIFORM_STEPS = "--pruning.schedule={0: 0.1667, 1: 0.3333}"
# One query head in nine pruned per layer after epoch 0, then three key/value heads merged into two (8 query heads
# in two groups of 4: a uniform layout).
MERGED = ("--pruning.unit=head", "--pruning.scope=layer", "--pruning.schedule={0: 0.1111}",
          "--merging.num_key_value_heads=2", "--merging.epoch=1")
# Mixed precision: the weights and optimizer in float32, the matrix products in bfloat16 (about 1.7x faster training
# steps on this machine's AVX512-BF16 CPU); validation perplexity is then measured under bf16 autocast too.
BF16 = ("--trainer.precision=bf16-mixed",)
FLOAT32 = ("--trainer.precision=32-true",)
# Three epochs more than the job: what bf16's halved step time leaves room for within its 10 minutes.
TEN_EPOCHS = ("--trainer.max_epochs=10",)
# The pruned groups fade out over epoch 1's 6 steps instead of going at once (HeadPruning(fade_steps=6)).
FADED = "--pruning.fade_steps=6"
# The ablation measures each group writing what linear compensation will make it write, fitted for that group.
ABLATED_WITH_COMPENSATION = "--pruning.ablate_with=compensation"
RECIPES = {
    "dense": Recipe("none", "", "fine-tune only", DENSE),
    "default": Recipe("group", "uniform", "the job in float32: 1/3 after epoch 0 by measured ablation, linear "
                      "compensation, 7 epochs at learning rate 6e-4"),
    "default, pruned after epoch 1": Recipe("group", "uniform", "the same, pruned after epoch 1", (EPOCH_1,)),
    "default, 2 calibration batches": Recipe(
        "group", "uniform", "the same, the ablation measured on the last 2 training batches of epoch 0",
        ("--pruning.calibration_batches=2",)),
    "default, pruned after step 2": Recipe(
        "group", "uniform", "the same, pruned after the second training step",
        ("--pruning.interval=step", "--pruning.schedule={2: 0.3333}")),
    "default, pruned after epoch 2": Recipe(
        "group", "uniform", "the same, pruned after epoch 2", ("--pruning.schedule={2: 0.3333}",)),
    "fitted merge": Recipe(
        "head+merge", "layer", "1 head in 9 per layer after epoch 0 (compensated gradient, linear compensation), "
        "key/value heads merged to 2 per layer by the fitted merge before epoch 1",
        (*MERGED, "--pruning.strategy=gradient_compensated")),
    "dense lr 3e-4": Recipe("none", "", "fine-tune only", DENSE, LEARNING_RATE_3E4, " lr 3e-4"),
    "default lr 3e-4": Recipe("group", "uniform", "the job at learning rate 3e-4 (the default until 2026-12-02)",
                              (), LEARNING_RATE_3E4, " lr 3e-4"),
    "compensated gradient lr 3e-4": Recipe(
        "group", "uniform", "the same, groups chosen by the compensated gradient score (the default before the "
        "ablation)", ("--pruning.strategy=gradient_compensated",), LEARNING_RATE_3E4, " lr 3e-4"),
    "fitted merge lr 3e-4": Recipe("head+merge", "layer", "the fitted merge at learning rate 3e-4",
                                   (*MERGED, "--pruning.strategy=gradient_compensated"), LEARNING_RATE_3E4, " lr 3e-4"),
    "dense lr 8e-4": Recipe("none", "", "fine-tune only", DENSE, LEARNING_RATE_8E4, " lr 8e-4"),
    "default lr 8e-4": Recipe("group", "uniform", "the job at learning rate 8e-4", (), LEARNING_RATE_8E4,
                              " lr 8e-4"),
    "dense seed 1": Recipe("none", "", "fine-tune only", DENSE, SEED_1, " seed 1"),
    "default seed 1": Recipe("group", "uniform", "the job, seed 1", (), SEED_1, " seed 1"),
    "dense seed 2": Recipe("none", "", "fine-tune only", DENSE, SEED_2, " seed 2"),
    "default seed 2": Recipe("group", "uniform", "the job, seed 2", (), SEED_2, " seed 2"),
    "default, pruned after epoch 1, seed 1": Recipe("group", "uniform", "the same, pruned after epoch 1, seed 1",
                                                    (EPOCH_1,), SEED_1, " seed 1"),
    "default, pruned after epoch 1, patience 3": Recipe(
        "group", "uniform", "the same, pruned after epoch 1, groups back only after 3 worse validations in a row",
        (EPOCH_1, PATIENCE_3)),
    "default, pruned after epoch 1, patience 3, seed 1": Recipe(
        "group", "uniform", "the same, seed 1", (EPOCH_1, PATIENCE_3), SEED_1, " seed 1"),
    "default in two steps": Recipe(
        "group", "uniform", "the same shape in two steps: half the layers after epoch 0, the others after epoch 1",
        (TWO_UNIFORM_STEPS,)),
    "default in two steps, seed 1": Recipe("group", "uniform", "the same, seed 1", (TWO_UNIFORM_STEPS,), SEED_1,
                                           " seed 1"),
    "default, faded over epoch 1": Recipe(
        "group", "uniform", "the job, the pruned groups fading out over the 6 steps of epoch 1", (FADED,)),
    "default, faded over epoch 1, seed 1": Recipe(
        "group", "uniform", "the same, seed 1", (FADED,), SEED_1, " seed 1"),
    "default, faded over epoch 1, seed 2": Recipe(
        "group", "uniform", "the same, seed 2", (FADED,), SEED_2, " seed 2"),
    "default, ablated with its compensation": Recipe(
        "group", "uniform", "the job, each group measured writing its linear prediction from the layer's other "
        "heads", (ABLATED_WITH_COMPENSATION,)),
    "default, ablated with its compensation, seed 1": Recipe(
        "group", "uniform", "the same, seed 1", (ABLATED_WITH_COMPENSATION,), SEED_1, " seed 1"),
    "default, ablated with its compensation, seed 2": Recipe(
        "group", "uniform", "the same, seed 2", (ABLATED_WITH_COMPENSATION,), SEED_2, " seed 2"),
    "dense bf16": Recipe("none", "", "fine-tune only", DENSE, BF16, " bf16"),
    "default bf16": Recipe("group", "uniform", "the job in bf16-mixed precision", (), BF16, " bf16"),
    "dense bf16, seed 1": Recipe("none", "", "fine-tune only", DENSE, (*BF16, *SEED_1), " bf16, seed 1"),
    "default bf16, seed 1": Recipe("group", "uniform", "the same, seed 1", (), (*BF16, *SEED_1), " bf16, seed 1"),
    "dense bf16, seed 2": Recipe("none", "", "fine-tune only", DENSE, (*BF16, *SEED_2), " bf16, seed 2"),
    "default bf16, seed 2": Recipe("group", "uniform", "the same, seed 2", (), (*BF16, *SEED_2), " bf16, seed 2"),
    "default bf16, faded": Recipe("group", "uniform", "the job in bf16-mixed precision, the pruned groups fading out "
                                  "over the 6 steps of epoch 1", (FADED,), BF16, " bf16"),
    "default bf16, faded, seed 1": Recipe("group", "uniform", "the same, seed 1", (FADED,), (*BF16, *SEED_1),
                                          " bf16, seed 1"),
    "default bf16, faded, seed 2": Recipe("group", "uniform", "the same, seed 2", (FADED,), (*BF16, *SEED_2),
                                          " bf16, seed 2"),
    "dense 10 epochs": Recipe("none", "", "fine-tune only", DENSE, TEN_EPOCHS, " 10 epochs"),
    "default 10 epochs": Recipe("group", "uniform", "the job with 10 epochs", (), TEN_EPOCHS, " 10 epochs"),
    "dense bf16 10 epochs": Recipe("none", "", "fine-tune only", DENSE, (*BF16, *TEN_EPOCHS), " bf16 10 epochs"),
    "default bf16 10 epochs": Recipe("group", "uniform", "the job in bf16 with 10 epochs", (), (*BF16, *TEN_EPOCHS),
                                     " bf16 10 epochs"),
    "dense bf16 10 epochs, seed 1": Recipe("none", "", "fine-tune only", DENSE, (*BF16, *TEN_EPOCHS, *SEED_1),
                                           " bf16 10 epochs, seed 1"),
    "default bf16 10 epochs, seed 1": Recipe("group", "uniform", "the same, seed 1", (), (*BF16, *TEN_EPOCHS, *SEED_1),
                                             " bf16 10 epochs, seed 1"),
    "dense bf16 10 epochs, seed 2": Recipe("none", "", "fine-tune only", DENSE, (*BF16, *TEN_EPOCHS, *SEED_2),
                                           " bf16 10 epochs, seed 2"),
    "default bf16 10 epochs, seed 2": Recipe("group", "uniform", "the same, seed 2", (), (*BF16, *TEN_EPOCHS, *SEED_2),
                                             " bf16 10 epochs, seed 2"),
    "dense 7 batches": Recipe("none", "", "fine-tune only", DENSE, SEVEN_BATCHES, " 7 batches"),
    "default 7 batches": Recipe("group", "uniform", "the job with 7 training batches an epoch", (), SEVEN_BATCHES,
                                " 7 batches"),
    "dense lr 1e-3": Recipe("none", "", "fine-tune only", DENSE, LEARNING_RATE_1E3, " lr 1e-3"),
    "default lr 1e-3": Recipe("group", "uniform", "the job at learning rate 1e-3", (), LEARNING_RATE_1E3,
                              " lr 1e-3"),
    "dense 4 epochs": Recipe("none", "", "fine-tune only", DENSE, FOUR_EPOCHS, " 4 epochs"),
    "group uniform 4 epochs": Recipe("group", "uniform", "the job's recipe, 4 epochs", (), FOUR_EPOCHS,
                                     " 4 epochs"),
    "distilled 4 epochs": Recipe("group", "uniform", "the same + distillation from the model before pruning",
                                 DISTILLED, FOUR_EPOCHS, " 4 epochs"),
    "group global 4 epochs": Recipe("group", "global", "15% then 30%, linear compensation",
                                    ("--pruning.scope=global", TWO_STEPS), FOUR_EPOCHS, " 4 epochs"),
    "head global 4 epochs": Recipe("head", "global", "15% then 30%, linear compensation (the default until 2026-12-01)",
                                   ("--pruning.unit=head", "--pruning.scope=global", TWO_STEPS), FOUR_EPOCHS,
                                   " 4 epochs"),
    "merged 8q/2kv 4 epochs": Recipe("head+merge", "layer", "1 head in 9 per layer, key/value heads averaged to 2 "
                                     "per layer", (*MERGED, "--merging.fit=false"), FOUR_EPOCHS, " 4 epochs"),
    "dense LoRA": Recipe("none", "", "LoRA fine-tune only", DENSE, LORA, " LoRA"),
    "default LoRA": Recipe("group", "uniform", "the job as a LoRA fine-tune (r=16, all linear layers)", (),
                           LORA, " LoRA"),
}
SHIPPED = "default"  # in bf16-mixed ("default bf16") where the device computes bf16 natively
# --quick: a tiny grouped-query Llama (2 layers of 6 query heads in 3 groups) in short blocks.
QUICK_SETTINGS = (
    "--data.block_size=32", "--data.cache=false", "--model.learning_rate=0.001", "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2", "--trainer.max_epochs=2",
)
QUICK_SPEED = ("--prefill_length", "32", "--decode_contexts", "64", "--decode_tokens", "4", "--rounds", "1",
               "--warmup", "0", "--perplexity_batches", "1")
FULL_SPEED = ("--decode_contexts", str(CONTEXT), "--decode_tokens", "32", "--rounds", "3", "--perplexity_batches", "1")
# Plain transformers in a fresh process: opens the folder without trust_remote_code and saves one block's logits.
PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def save_quick_model(folder: str) -> str:
    """A tiny grouped-query Llama with the byte-level tokenizer, saved for ``--model.model``; returns ``folder``."""
    from sentinel_lightning.pretrained import byte_level_tokenizer
    from sentinel_lightning.tiny import tiny_model

    tiny_model("llama", num_layers=2, num_heads=6, num_kv_heads=3, width=48).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def held_out_batches(tokenizer, block_size: int, cache: bool) -> list[dict[str, torch.Tensor]]:
    """The held-out text's validation batches (``input_ids``, ``attention_mask``, ``labels``: ``[4, block_size]``)."""
    data = LanguageModelingDataModule(tokenizer=tokenizer, source=DOCSTRINGS_CORPUS, block_size=block_size, cache=cache)
    data.setup()
    return [batch for _, batch in zip(range(HELD_OUT_BATCHES), data.val_dataloader())]


def opens_in_plain_transformers(folder: str, model: torch.nn.Module, block: torch.Tensor, work: Path) -> bool:
    """Whether plain ``from_pretrained`` opens ``folder`` in a fresh process and gives ``model``'s logits on
    ``block`` ``[1, seq]`` (to 1e-4); False when it refuses the folder."""
    inputs, logits = work / "plain_load_input.pt", work / "plain_load_logits.pt"
    torch.save(block, inputs)
    loaded = subprocess.run([sys.executable, "-c", PLAIN_LOAD, folder, str(inputs), str(logits)], capture_output=True,
                            text=True)
    if loaded.returncode != 0:
        return False
    with torch.no_grad():
        expected = model(block).logits
    return bool(torch.allclose(torch.load(logits), expected, atol=1e-4, rtol=1e-4))


def measured_speed(folder: str, model: str | None, work: Path, quick: bool) -> dict:
    """Decode (and prefill) speed-ups of ``folder`` over ``model`` from ``scripts/benchmark_speed.py --model_dir``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_speed", Path(__file__).with_name("benchmark_speed.py"))
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    options = ["--model_dir", folder, "--output_dir", str(work / "speed"), *(QUICK_SPEED if quick else FULL_SPEED)]
    measured = benchmark.main([*options, *(["--model", model] if model else [])])
    entry = measured["configurations"][0]
    context = max(entry["decode_speedup"], key=int)
    return {"decode_speedup": entry["decode_speedup"][context], "prefill_speedup": entry["prefill_speedup"],
            "speed_context": int(context), "speed_machine": measured["machine"]}


def measure(name: str, recipe: Recipe, common: list[str], folder: Path, model: str | None, args) -> dict:
    """Runs ``recipe``'s fit in ``folder``, exports its last checkpoint and measures the export (see the module
    docstring)."""
    start = time.perf_counter()
    report = run_fit([*common, f"--trainer.default_root_dir={folder}", *recipe.budget, *recipe.options])
    minutes = (time.perf_counter() - start) / 60
    export_checkpoint(report["checkpoint"], str(folder / "export"), overwrite=True)
    exported = load_pruned(str(folder / "export"), dtype=torch.float32).eval()
    plain = load_causal_lm(model).to(torch.float32)
    tokenizer = load_tokenizer(model)  # None: the embedded default's
    held_out = held_out_batches(tokenizer, args.block_size, cache=not args.quick)
    cache_bytes, parameters = kv_cache_bytes_per_token(exported), count_parameters(exported)
    result = {
        "unit": recipe.unit, "scope": recipe.scope, "recovery": recipe.recovery,
        "options": [*recipe.budget, *recipe.options], "dense": recipe.dense_name,
        "pruned_fraction": report["pruned_fraction"], "val_ppl": report["val_ppl_after"],
        "held_out_ppl": perplexity(exported, held_out),
        # Against the plain model the recipe started from.
        "kv_cache_ratio": cache_bytes / kv_cache_bytes_per_token(plain),
        "parameters_ratio": parameters / count_parameters(plain),
        "kv_cache_bytes_per_token": cache_bytes, "parameters": parameters,
        "decode_bound": bytes_per_decoded_token(plain, CONTEXT) / bytes_per_decoded_token(exported, CONTEXT),
        "plain_transformers_loads": opens_in_plain_transformers(
            str(folder / "export"), exported, held_out[0]["input_ids"][:1], folder),
        "fit_minutes": minutes,
    }
    if args.time:
        result |= measured_speed(str(folder / "export"), model, folder, args.quick)
    del exported, plain
    gc.collect()
    return result


def ratios(runs: dict) -> dict:
    """Each pruned run's perplexities over its dense fine-tune's (``None`` while that one is not measured)."""
    out = {}
    for name, run in runs.items():
        dense = runs.get(run["dense"])
        out[name] = {key: (run[key] / dense[key] if dense else None) for key in ("val_ppl", "held_out_ppl")}
    return out


def markdown(results: dict) -> str:
    """The frontier as a table, one row per recipe, and the command and machine."""
    relative = ratios(results["runs"])
    lines = [
        *(f"Command: `{command}`  " for command in results["commands"]),
        *(f"Machine ({name}): {run['machine']}.  " for name, run in results["runs"].items()),
        "",
        "| recipe | unit | scope | recovery | pruned | val ppl (/ dense) | held-out ppl (/ dense) | kv cache | "
        f"parameters | decode @{CONTEXT} (bound) | plain transformers loads |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def ratio(value):
        return "" if value is None else f" ({value:.3f}x)"

    for name, run in results["runs"].items():
        speed = "not timed"
        if "decode_speedup" in run:
            at = "" if run["speed_context"] == CONTEXT else f" @{run['speed_context']}"
            speed = f"{run['decode_speedup']:.3f}{at}"
        shipped = " **(shipped)**" if name == SHIPPED else ""
        lines.append(
            f"| {name}{shipped} | {run['unit']} | {run['scope']} | {run['recovery']} | {run['pruned_fraction']:.3f} | "
            f"{run['val_ppl']:.3f}{ratio(relative[name]['val_ppl'])} | "
            f"{run['held_out_ppl']:.3f}{ratio(relative[name]['held_out_ppl'])} | {run['kv_cache_ratio']:.3f}x | "
            f"{run['parameters_ratio']:.3f}x | {speed} ({run['decode_bound']:.3f}) | "
            f"{'yes' if run['plain_transformers_loads'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Perplexity ratio against cache ratio (validation; held-out text as triangles) and against decoding speed-up
    (measured where timed, else the bound, hollow), one colour per unit, the shipped default starred, the aims of
    issue 15 drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = ratios(results["runs"])
    figure, (by_cache, by_speed) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    colours = {}
    for name, run in results["runs"].items():
        ppl = relative[name]["val_ppl"]
        if ppl is None or run["unit"] == "none":
            continue
        timed = "decode_speedup" in run
        colour = colours.setdefault(run["unit"], f"C{len(colours)}")  # one colour per unit
        style = {"marker": "*" if name == SHIPPED else "o", "s": 160 if name == SHIPPED else 50}
        by_cache.scatter(run["kv_cache_ratio"], ppl, color=colour, **style)
        held_out = relative[name]["held_out_ppl"]
        by_cache.scatter(run["kv_cache_ratio"], held_out, marker="^", facecolors="none", edgecolors=colour,
                         label="held-out text" if not by_cache.get_legend_handles_labels()[1].count("held-out text")
                         else None)
        by_cache.annotate(name, (run["kv_cache_ratio"], ppl), textcoords="offset points", xytext=(5, 4), fontsize=8)
        speed = run["decode_speedup"] if timed else run["decode_bound"]
        by_speed.scatter(speed, ppl, facecolors=colour if timed else "none", edgecolors=colour, **style)
        by_speed.annotate(name, (speed, ppl), textcoords="offset points", xytext=(5, 4), fontsize=8)
    by_cache.axhline(1.10, color="green", linestyle=":", label="aim: 1.10x dense")
    by_cache.axvline(0.67, color="green", linestyle="--", label="aim: cache 0.67x")
    by_speed.axhline(1.10, color="green", linestyle=":")
    by_speed.axvline(1.2, color="green", linestyle="--", label="aim: 1.2x decoding")
    by_cache.set(xlabel="key/value cache / plain model", ylabel="perplexity / dense fine-tune of the same budget")
    by_speed.set(xlabel=f"decode speed-up after {CONTEXT} tokens (filled: measured; hollow: bytes bound)")
    by_cache.legend(fontsize=8)
    by_speed.legend(fontsize=8)
    figure.suptitle("Pruning recipes at the job's budget: quality against serving cost (star: shipped default)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_folder(output: Path, name: str) -> Path:
    """Where recipe ``name``'s fit, export and ``result.json`` go."""
    return output / "runs" / name.replace(" ", "_").replace("/", "-")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--time", action="store_true", help="measure decoding speed too (benchmark_speed.py)")
    parser.add_argument("--output-dir", default="pruning_results/frontier")
    parser.add_argument("--quick", action="store_true", help="a tiny model in short blocks (for the tests)")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # Float32 unless a recipe's budget says bf16, whatever the job picks on this device (cli/precision.py).
    common, model, args.block_size = ["--trainer.enable_progress_bar=false", *FLOAT32], None, 256
    if args.quick:
        model, args.block_size = save_quick_model(str(output / "quick_model")), 32
        common += [*QUICK_SETTINGS, f"--model.model={model}"]
    command = " ".join(["python scripts/frontier.py", *(sys.argv[1:] if argv is None else argv)])
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
               f"{torch.__version__}; load average {os.getloadavg()[0]:.1f} at the start")
    for name in args.recipes:  # one result.json per recipe: reruns skip it, parallel runs of other recipes can share
        folder = run_folder(output, name)
        result_file = folder / "result.json"
        if not result_file.is_file():
            result = measure(name, RECIPES[name], common, folder, model, args)
            result_file.write_text(json.dumps({**result, "command": command, "machine": machine}, indent=2))
        elif args.time and "decode_speedup" not in (result := json.loads(result_file.read_text())):
            result |= {**measured_speed(str(folder / "export"), model, folder, args.quick), "speed_command": command}
            result_file.write_text(json.dumps(result, indent=2))  # the export measured before, now timed too
    results = {"runs": {}}
    for name in RECIPES:  # every recipe measured so far in this folder, by this or an earlier command
        result_file = run_folder(output, name) / "result.json"
        if result_file.is_file():
            results["runs"][name] = json.loads(result_file.read_text())
    results["commands"] = sorted({run["command"] for run in results["runs"].values()})
    (output / "frontier.json").write_text(json.dumps(results, indent=2))
    (output / "frontier.md").write_text(markdown(results))
    plot(results, output / "frontier.png")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
