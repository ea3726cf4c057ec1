"""How much faster is a pruned model once its heads are physically removed?

For each pruning level (heads pruned by the gradient strategy, the same number in every layer) the script times,
in one process, in interleaved rounds (every round times every variant once), reporting medians over rounds:

- ``plain``: the model as loaded;
- ``gated``: the model with gates, pruned heads gated to 0 but still computed (nothing removed);
- ``compacted``: ``compact(gated)``, pruned heads removed from the weights;
- ``direct``: a model of the same class that transformers builds from a config with the compacted model's head
  counts (random weights; only its speed matters). Every layer keeps the same number of query heads, so one
  config with ``num_attention_heads`` = kept heads per layer describes the query side. Grouped-query layers
  may keep different numbers of key/value heads (``compact`` duplicates key/value heads when the kept groups
  are unequal), so the config takes the most common key/value head count and any layer that differs gets an
  attention module built by transformers from a config with that layer's counts. The two models then hold
  matrices of exactly the same shapes: the comparison isolates whatever compaction itself costs. It needs a
  config with an explicit ``head_dim`` (``AttentionFamily.config_has_head_dim``: Llama, Mistral, Qwen2); other
  families report no direct model.

Measured: prefill throughput (one forward pass over ``batch x length`` tokens, tokens/s) and decode speed (greedy
``generate`` from a short prompt with the key/value cache, batch 1, exactly ``decode_tokens`` new tokens, new
tokens/s), parameter counts, and the multiply-adds of the prefill shape (attention projections, attention scores
over the causal triangle, MLP and LM head), whose ratio predicts the compacted model's prefill speed-up.
Ratios between variants are medians over rounds of the ratio within each round, which cancels most of what other
processes on a shared machine do to the timings.

Usage::

    python scripts/benchmark_speed.py                 # the embedded default SmolLM2-135M-Instruct
    python scripts/benchmark_speed.py --model gpt2    # any supported causal LM
    python scripts/benchmark_speed.py --quick         # a tiny model built from a config, for tests

Writes ``<output_dir>/speed.json`` and ``<output_dir>/speed.md``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from sentinel_lightning.compaction import compact, count_parameters
from sentinel_lightning.families import family_of, head_shape, num_key_value_heads
from sentinel_lightning.gates import HeadGates, attach_gates
from sentinel_lightning.metrics import measure_head_metrics
from sentinel_lightning.strategies import resolve_strategy, select_heads
from sentinel_lightning.tiny import tiny_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hub name or local path; default: the embedded SmolLM2-135M")
    parser.add_argument("--gguf_file", default=None, help="GGUF file inside --model's folder")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7], help="shares of heads pruned")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--prefill_batch", type=int, default=4)
    parser.add_argument("--prefill_length", type=int, default=256)
    parser.add_argument("--prompt_length", type=int, default=32, help="prompt tokens before decoding")
    parser.add_argument("--decode_tokens", type=int, default=64)
    parser.add_argument("--calibration_blocks", type=int, default=4, help="blocks for measure_head_metrics")
    parser.add_argument("--attn_implementation", default=None, help="e.g. sdpa or eager; default: the model's")
    parser.add_argument("--threads", type=int, default=None, help="default: the cores available to this process")
    parser.add_argument("--output_dir", default="pruning_results")
    parser.add_argument("--quick", action="store_true", help="tiny model built from a config and few repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.prefill_batch, args.prefill_length = 2, 0, 2, 32
        args.prompt_length, args.decode_tokens, args.calibration_blocks = 8, 4, 2
    for level in args.levels:
        if not 0.0 <= level < 1.0:
            parser.error(f"--levels contains {level}; every level must lie in [0, 1).")
    for name in ("repeats", "prefill_batch", "prefill_length", "prompt_length", "decode_tokens", "calibration_blocks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be a positive integer.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Models and data


def quick_model(attn_implementation: str | None) -> PreTrainedModel:
    """A tiny grouped-query Llama (4 layers, 6 query heads of 16 in 2 groups, width 96) from ``tiny_model``."""
    model = tiny_model("llama", num_layers=4, num_heads=6, num_kv_heads=2, width=96)
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model


def corpus_blocks(args: argparse.Namespace, count: int, length: int) -> torch.Tensor:
    """``count`` blocks ``[count, length]`` of the embedded corpus (byte ids for --quick, else the model's tokens)."""
    if args.quick:
        from sentinel_lightning.data import python_reference_corpus

        text = "\n".join(python_reference_corpus()["train"]["text"][:200])
        ids = torch.tensor(list(text.encode()[: count * length]), dtype=torch.long)
        return ids.reshape(count, length)
    from sentinel_lightning.data import LanguageModelingDataModule
    from sentinel_lightning.pretrained import load_tokenizer

    tokenizer = load_tokenizer(args.model, args.gguf_file)
    data = LanguageModelingDataModule(tokenizer=tokenizer, block_size=length, batch_size=1)
    data.setup()
    return data.blocks["train"][:count]["input_ids"]


def per_layer_heads(model: PreTrainedModel) -> list[tuple[int, int]]:
    """``(query heads, key/value heads)`` of every layer, read from the config a compacted model records."""
    num_layers, num_heads, _ = head_shape(model)
    kept = getattr(model.config, "kept_heads", None)
    if kept is None:
        return [(num_heads, num_key_value_heads(model))] * num_layers
    return [(len(heads), len(kv)) for heads, kv in zip(kept, model.config.kept_key_value_heads)]


def build_direct(plain: PreTrainedModel, compacted: PreTrainedModel) -> PreTrainedModel | None:
    """The same class built by transformers from configs with the compacted model's per-layer head counts.

    Returns None for a family whose config has no explicit ``head_dim`` (fewer heads would change the width).
    """
    family = family_of(plain)
    shapes = per_layer_heads(compacted)
    if not family.config_has_head_dim or any(num_heads == 0 for num_heads, _ in shapes):
        return None
    _, _, head_dim = head_shape(plain)
    torch.manual_seed(0)

    def config_with(num_heads: int, num_kv_heads: int):
        config = copy.deepcopy(plain.config)
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = num_heads, num_kv_heads, head_dim
        for name in ("kept_heads", "kept_key_value_heads"):
            if hasattr(config, name):
                delattr(config, name)
        return config

    common = collections.Counter(shapes).most_common(1)[0][0]
    direct = AutoModelForCausalLM.from_config(config_with(*common), dtype=plain.dtype)
    for index, (layer, shape) in enumerate(zip(family.decoder_layers(direct), shapes)):
        if shape != common:
            attention = family.attention_of(layer)
            rebuilt = type(attention)(config_with(*shape), index).to(plain.dtype)
            rebuilt.config = direct.config  # the attention implementation is read from the model's config
            family.set_attention(layer, rebuilt)
    return direct.eval()


def set_pruned(gates: HeadGates, pruned: list[tuple[int, int]]) -> None:
    """Makes ``pruned`` (``(layer, head)`` pairs) exactly the gated model's pruned heads, through the gates' API."""
    gates.reactivate(gates.pruned_heads())
    gates.prune(pruned)


# ----------------------------------------------------------------------------------------------------------------
# Counting


def multiply_adds(model: PreTrainedModel, batch: int, length: int) -> int:
    """Matmul multiply-adds of one forward pass over ``[batch, length]`` tokens.

    Every linear map (attention projections, MLP, LM head) costs ``in * out`` per token; attention scores and the
    weighted sum of values cost ``2 * head_dim`` per query head and per (query, key) pair of the causal triangle,
    ``length * (length + 1) / 2`` pairs per sequence. Gates, norms, activations and embeddings are not counted.
    """
    tokens = batch * length
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += tokens * module.in_features * module.out_features
        elif isinstance(module, Conv1D):
            total += tokens * module.weight.shape[0] * module.weight.shape[1]
    _, _, head_dim = head_shape(model)
    pairs = batch * length * (length + 1) // 2
    for num_heads, _ in per_layer_heads(model):
        total += 2 * num_heads * head_dim * pairs
    return total


# ----------------------------------------------------------------------------------------------------------------
# Timing


@torch.inference_mode()
def time_prefill(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Tokens per second of one forward pass over ``input_ids`` ``[batch, length]``."""
    start = time.perf_counter()
    model(input_ids=input_ids, use_cache=False)
    return input_ids.numel() / (time.perf_counter() - start)


@torch.inference_mode()
def time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, pad_token_id: int) -> float:
    """New tokens per second of greedy ``generate`` from ``prompt`` ``[1, prompt_length]``, exactly ``new_tokens``."""
    start = time.perf_counter()
    output = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, use_cache=True, pad_token_id=pad_token_id,
    )
    elapsed = time.perf_counter() - start
    generated = output.shape[1] - prompt.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"generate produced {generated} tokens instead of {new_tokens}.")
    return new_tokens / elapsed


def paired_ratio(samples: dict, numerator: str, denominator: str, kind: str) -> float | None:
    """Median over rounds of the ratio of two variants' throughputs measured in the same round.

    Pairing by round cancels most of the slow-downs other processes cause on a shared machine (they hit both
    variants of a round alike), which per-variant medians do not when a slow spell spans several rounds.
    """
    if numerator not in samples or denominator not in samples:
        return None
    return statistics.median(a / b for a, b in zip(samples[numerator][kind], samples[denominator][kind]))


# ----------------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and writes ``speed.json`` and ``speed.md``; returns what ``speed.json`` holds."""
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if args.quick:
        plain = quick_model(args.attn_implementation)
        model_name = "tiny Llama built from a config (--quick)"
    else:
        from sentinel_lightning.pretrained import load_causal_lm

        kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
        plain = load_causal_lm(args.model, args.gguf_file, **kwargs)
        model_name = args.model or "SmolLM2-135M-Instruct (embedded default)"
    plain = plain.to(torch.float32).eval()  # not .float(): transformers refuses it on a de-quantised GGUF model
    num_layers, num_heads, _ = head_shape(plain)

    # Head scores: the gradient strategy on metrics measured on a few calibration blocks of the corpus.
    blocks = corpus_blocks(args, args.calibration_blocks + args.prefill_batch + 1, args.prefill_length)
    calibration = [{"input_ids": block[None]} for block in blocks[: args.calibration_blocks]]
    prefill_ids = blocks[args.calibration_blocks : args.calibration_blocks + args.prefill_batch]  # [batch, length]
    prompt = blocks[-1:, : args.prompt_length]  # [1, prompt_length]
    gated = copy.deepcopy(plain)
    gates = attach_gates(gated)
    scores = resolve_strategy("gradient")(measure_head_metrics(gated, calibration))  # [num_layers, num_heads]
    all_active = torch.ones(num_layers, num_heads, dtype=torch.bool)

    # One pruning mask per level; the same number of heads in every layer, so a config can describe the result.
    levels, variants = [], {"plain": (plain, None)}
    for level in args.levels:
        per_layer = min(round(level * num_heads), num_heads - 1)
        pruned = select_heads(scores, all_active, per_layer * num_layers, scope="layer", min_active_heads_per_layer=1)
        set_pruned(gates, pruned)
        compacted = compact(gated)
        direct = build_direct(plain, compacted)
        levels.append({
            "level": level, "heads_pruned_per_layer": per_layer, "heads_kept_per_layer": num_heads - per_layer,
            "sparsity": len(pruned) / (num_layers * num_heads), "pruned": pruned,
            "key_value_heads_per_layer": [kv for _, kv in per_layer_heads(compacted)],
        })
        variants[f"gated@{level}"] = (gated, pruned)
        variants[f"compacted@{level}"] = (compacted, None)
        if direct is not None:
            variants[f"direct@{level}"] = (direct, None)

    # Interleaved timing: every round times every variant once, starting from a different variant each round.
    names = list(variants)
    samples = {name: {"prefill": [], "decode": []} for name in names}
    pad_token_id = plain.config.pad_token_id if plain.config.pad_token_id is not None else 0
    rounds = args.warmup + args.repeats
    load_before = os.getloadavg()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("benchmark", total=rounds * len(names))
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                progress.update(task, description=f"round {round_index + 1}/{rounds}: {name}")
                model, pruned = variants[name]
                if pruned is not None:
                    set_pruned(gates, pruned)
                prefill = time_prefill(model, prefill_ids)
                decode = time_decode(model, prompt, args.decode_tokens, pad_token_id)
                if round_index >= args.warmup:
                    samples[name]["prefill"].append(prefill)
                    samples[name]["decode"].append(decode)
                progress.advance(task)

    results = {
        "command": " ".join(["python", "scripts/benchmark_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": model_name,
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "threads": threads,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "settings": {
            key: getattr(args, key)
            for key in ("levels", "repeats", "warmup", "prefill_batch", "prefill_length", "prompt_length",
                        "decode_tokens", "calibration_blocks", "quick")
        } | {"strategy": "gradient", "scope": "layer", "attn_implementation": plain.config._attn_implementation,
             "dtype": str(plain.dtype)},
        "variants": {},
        "levels": [],
    }
    for name in names:
        model, _ = variants[name]
        results["variants"][name] = {
            "parameters": count_parameters(model),
            "multiply_adds": multiply_adds(model, args.prefill_batch, args.prefill_length),
            "prefill_tokens_per_s": statistics.median(samples[name]["prefill"]),
            "decode_tokens_per_s": statistics.median(samples[name]["decode"]),
            "prefill_tokens_per_s_best": max(samples[name]["prefill"]),
            "decode_tokens_per_s_best": max(samples[name]["decode"]),
            "prefill_samples": samples[name]["prefill"],
            "decode_samples": samples[name]["decode"],
        }
    base = results["variants"]["plain"]
    for entry in levels:
        level = entry.pop("level")
        entry.pop("pruned")
        compacted, direct, gated = f"compacted@{level}", f"direct@{level}", f"gated@{level}"
        predicted = base["multiply_adds"] / results["variants"][compacted]["multiply_adds"]
        achieved = paired_ratio(samples, compacted, "plain", "prefill")
        results["levels"].append({
            "level": level, **entry,
            "parameters_compacted": results["variants"][compacted]["parameters"],
            "predicted_prefill_speedup": predicted,
            "compacted_vs_plain_prefill": achieved,
            "compacted_vs_plain_decode": paired_ratio(samples, compacted, "plain", "decode"),
            "achieved_over_predicted_speedup": achieved / predicted,
            "share_of_predicted_gain": None if predicted == 1 else (achieved - 1) / (predicted - 1),
            "compacted_vs_direct_prefill": paired_ratio(samples, compacted, direct, "prefill"),
            "compacted_vs_direct_decode": paired_ratio(samples, compacted, direct, "decode"),
            "gated_vs_plain_prefill": paired_ratio(samples, gated, "plain", "prefill"),
            "gated_vs_plain_decode": paired_ratio(samples, gated, "plain", "decode"),
        })

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "speed.json"), "w") as file:
        json.dump(results, file, indent=2)
    with open(os.path.join(args.output_dir, "speed.md"), "w") as file:
        file.write(markdown(results))
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    """Two markdown tables: throughput per variant, and the paired ratios per pruning level."""
    fmt = lambda value, spec=".3f": "n/a" if value is None else format(value, spec)  # noqa: E731
    settings = results["settings"]
    lines = [
        f"Command: `{results['command']}`",
        "",
        f"Model: {results['model']}; prefill {settings['prefill_batch']} x {settings['prefill_length']} tokens; "
        f"decode {settings['decode_tokens']} new tokens after a {settings['prompt_length']}-token prompt (batch 1, "
        f"greedy, key/value cache); {settings['attn_implementation']} attention, {settings['dtype']}; medians of "
        f"{settings['repeats']} interleaved rounds after {settings['warmup']} warm-up; "
        f"{results['machine']['threads']} threads, torch {results['machine']['torch']}; load average "
        f"{results['machine']['load_average_1min_before_after'][0]} before, "
        f"{results['machine']['load_average_1min_before_after'][1]} after.",
        "",
        "| variant | parameters | prefill multiply-adds (G) | prefill tokens/s (median, best) "
        "| decode tokens/s (median, best) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, variant in results["variants"].items():
        lines.append(
            f"| {name} | {variant['parameters']:,} | {variant['multiply_adds'] / 1e9:.2f} | "
            f"{variant['prefill_tokens_per_s']:.1f}, {variant['prefill_tokens_per_s_best']:.1f} | "
            f"{variant['decode_tokens_per_s']:.2f}, {variant['decode_tokens_per_s_best']:.2f} |"
        )
    lines += [
        "",
        "Ratios are medians over rounds of the two variants' ratio within each round.",
        "",
        "| pruned | heads kept/layer | parameters (compacted) | predicted prefill speed-up | compacted/plain prefill "
        "| achieved/predicted | share of predicted gain | compacted/plain decode | compacted/direct prefill "
        "| compacted/direct decode | gated/plain prefill | gated/plain decode |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["levels"]:
        lines.append(
            f"| {row['sparsity']:.3f} | {row['heads_kept_per_layer']} | {row['parameters_compacted']:,} | "
            f"{fmt(row['predicted_prefill_speedup'])} | {fmt(row['compacted_vs_plain_prefill'])} | "
            f"{fmt(row['achieved_over_predicted_speedup'])} | {fmt(row['share_of_predicted_gain'], '.2f')} | "
            f"{fmt(row['compacted_vs_plain_decode'])} | {fmt(row['compacted_vs_direct_prefill'])} | "
            f"{fmt(row['compacted_vs_direct_decode'])} | {fmt(row['gated_vs_plain_prefill'])} | "
            f"{fmt(row['gated_vs_plain_decode'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
