"""What do pruned heads, key/value groups and layers buy once ``compact`` removes them? Speed against perplexity.

For every pruning unit (``head``, ``group``, ``layer``) at matched fractions of query heads (default 0.33 and
0.67), the gradient strategy (``|dL/dgate|`` from ``measure_head_metrics`` on a few calibration blocks) chooses the
heads with the package's ``select_heads``: ``scope="uniform"`` for ``head`` and ``group`` where a uniform shape
reaches the fraction (to within half a layer of heads, the rounding the ``layer`` unit needs too), else
``"global"``; ``"global"`` for ``layer``. ``--unequal_fractions`` (default 0.3) adds single heads pruned with
``scope="global"``, the layout of unequal key/value groups that fine-tuning with head pruning leaves, run in query
slots (``pruned_modeling.QuerySlots``). The table notes the scope. Each configuration is the gated model pruned
that way and its ``compact``-ed model. ``--model_dir FOLDER`` measures a saved folder instead (a real job's
export, loaded with ``load_pruned``) against the plain model it came from (``--model``, default the embedded
model). Per configuration the script reports:

- parameters (``count_parameters``), weight bytes, key/value-cache bytes per token (``kv_cache_bytes_per_token``)
  and at each decoding context (``kv_cache_bytes``: a sliding-window layer holds only its window);
- validation perplexity without fine-tuning (``evaluation.perplexity`` on the validation blocks of the embedded
  corpus) of the gated and of the compacted model, which must agree (they compute the same function);
- prefill tokens/s (one forward pass over ``batch x length`` tokens) and decode tokens/s with the key/value cache
  (batch 1, greedy, ``decode_tokens`` new tokens timed after a prompt of each ``decode_contexts`` length, the
  prompt itself prefilled once, untimed, and its cache copied for every timed run);
- speed-ups over the plain model and the bounds that what each pass moves or computes predicts. Prefill: the ratio
  of multiply-adds (``multiply_adds``). Decode: bytes moved per decoded token, the weights plus the key/value cache
  at that context, ``(W + c * S) / (W' + c' * S)`` for weight bytes ``W``, cache bytes per token ``c`` and context
  ``S`` (the prompt length), plain over compacted.

All models are timed in one process in interleaved rounds: every round times the plain model and every compacted
model once, in an order that rotates and reverses from round to round. A speed-up is the median over rounds of the
compacted/plain ratio measured within each round, which cancels most of what other processes on a shared machine
do to the timings.

The gated model is not timed (it computes every head); it only checks perplexity. ``compact`` builds its layers
with the same functions that load a compacted config (``pruned_modeling.resize_attention``, ``rebuild_layers``),
so a saved and reloaded model has the compacted model's classes and shapes.

Usage::

    python scripts/benchmark_speed.py                 # the embedded default SmolLM2-135M-Instruct
    python scripts/benchmark_speed.py --model gpt2    # any supported causal LM
    python scripts/benchmark_speed.py --model_dir pruned/   # a saved folder against the embedded default
    python scripts/benchmark_speed.py --quick         # a tiny model built from a config, for tests

Writes ``<output_dir>/speed.json`` and ``<output_dir>/speed.md``.
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
from collections import Counter
from collections.abc import Iterable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from sentinel_lightning.cli.precision import cpu_name
from sentinel_lightning.compaction import (
    compact,
    count_parameters,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    weight_bytes,
)
from sentinel_lightning.evaluation import perplexity
from sentinel_lightning.gates import HeadGates, attach_gates
from sentinel_lightning.measure.statistics import measure_head_metrics
from sentinel_lightning.standalone.families import family_of, head_shape
from sentinel_lightning.standalone.pruned_modeling import equal_groups, key_value_indices, stock_describes
from sentinel_lightning.strategies import UNITS, prunable_per_layer, reachable_count, resolve_strategy, select_heads
from sentinel_lightning.tiny import tiny_model

DEFAULTS = {  # (full run, --quick)
    "fractions": ([0.33, 0.67], [0.33, 0.67]),
    "units": (list(UNITS), list(UNITS)),
    "unequal_fractions": ([0.3], [0.33]),
    "rounds": (5, 2),
    "warmup": (1, 0),
    "prefill_batch": (4, 2),
    "prefill_length": (256, 32),
    "decode_contexts": ([256, 4096], [16, 64]),
    "decode_tokens": (64, 4),
    "calibration_blocks": (4, 2),
    "perplexity_batches": (None, 2),
}
POSITIVE = ("rounds", "prefill_batch", "prefill_length", "decode_tokens", "calibration_blocks", "perplexity_batches",
            "threads")  # None (unset) is allowed for the last two
PERPLEXITY_BATCH = 4  # validation blocks per perplexity batch
PERPLEXITY_TOLERANCE = 1e-3  # gated and compacted perplexity agree to this relative difference


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every option is spelled with ``_`` or ``-``, unset ones take the mode's default."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def option(*names: str, **kwargs) -> None:
        """Adds ``--name`` and ``--name-with-hyphens`` for every name (aliases after the first), stored as the first."""
        flags = dict.fromkeys(f"--{spelling}" for name in names for spelling in (name, name.replace("_", "-")))
        parser.add_argument(*flags, dest=names[0], **kwargs)

    option("model", help="hub name or local path; default: the embedded SmolLM2-135M-Instruct")
    option("gguf_file", help="GGUF file inside --model's folder")
    option("fractions", type=float, nargs="+", help="shares of query heads pruned (default 0.33 0.67)")
    option("units", nargs="+", choices=UNITS, help="pruning units (default: head group layer)")
    option("unequal_fractions", type=float, nargs="*", help="shares of query heads pruned one by one with the global "
           "scope, leaving unequal key/value groups (default 0.3; none: leave out)")
    option("model_dir", help="a folder saved by save_pruned / export: measure it against --model instead")
    option("rounds", "repeats", type=int, help="timed rounds; speed-ups are medians over rounds (default 5)")
    option("warmup", type=int, help="untimed rounds first (default 1)")
    option("prefill_batch", type=int, help="sequences per prefill pass (default 4)")
    option("prefill_length", type=int, help="tokens per prefill sequence (default 256)")
    option("decode_contexts", type=int, nargs="+", help="prompt lengths before decoding (default 256 4096)")
    option("decode_tokens", type=int, help="new tokens timed per decode run (default 64)")
    option("calibration_blocks", type=int, help="blocks of prefill_length tokens for the head scores (default 4)")
    option("perplexity_batches", type=int, help=f"batches of {PERPLEXITY_BATCH} validation blocks of prefill_length "
           "tokens for the perplexity (default all)")
    option("attn_implementation", help="e.g. sdpa or eager; default: the model's")
    option("threads", type=int, help="torch threads; default: the cores available to this process")
    option("output_dir", default="pruning_results", help="where speed.json and speed.md go")
    option("quick", action="store_true", help="a tiny model built from a config and tiny sizes (for tests)")
    args = parser.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, copy.copy(quick if args.quick else full))
    for name in ("fractions", "unequal_fractions"):
        for fraction in getattr(args, name):
            if not 0.0 < fraction < 1.0:
                parser.error(f"--{name} contains {fraction}; every fraction must lie in (0, 1).")
    if args.model_dir is not None and not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        parser.error(f"--model_dir {args.model_dir!r} holds no config.json; give a folder written by save_pruned.")
    for name in POSITIVE:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}={value} must be a positive integer.")
    if args.warmup < 0 or min(args.decode_contexts) < 1:
        parser.error("--warmup must be >= 0 and every --decode_contexts length >= 1.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Models and data


def quick_model(attn_implementation: str | None) -> PreTrainedModel:
    """A tiny grouped-query Llama shaped like SmolLM2's attention: 3 layers of 9 query heads of 16 in 3 groups.

    With 3 layers and 3 groups, 1/3 and 2/3 of the query heads are whole layers, whole groups in every layer and
    one or two heads of every group: every unit reaches the default fractions uniformly.
    """
    model = tiny_model("llama", num_layers=3, num_heads=9, num_kv_heads=3, width=144)
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model


def load_model(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The plain model in fp32 eval mode, its tokenizer and its name for the report."""
    if args.quick:
        from sentinel_lightning.pretrained import byte_level_tokenizer

        model, tokenizer = quick_model(args.attn_implementation), byte_level_tokenizer()
        name = "tiny Llama built from a config (--quick), byte-level tokens"
    else:
        from sentinel_lightning.pretrained import load_causal_lm, load_tokenizer

        kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
        model = load_causal_lm(args.model, args.gguf_file, **kwargs)
        tokenizer = load_tokenizer(args.model, args.gguf_file)
        name = args.model or "SmolLM2-135M-Instruct (embedded default)"
    longest = max(args.decode_contexts) + args.decode_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ValueError(
            f"--decode_contexts {max(args.decode_contexts)} plus --decode_tokens {args.decode_tokens} is {longest} "
            f"positions, more than the model's max_position_embeddings={limit}; lower them."
        )
    return model.to(torch.float32).eval(), tokenizer, name  # not .float(): refused on a de-quantised GGUF model


def corpus_tokens(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> dict:
    """The embedded corpus in blocks of ``prefill_length`` tokens: what calibrates, prefills, prompts and validates.

    Returns:
        ``{"calibration": [{"input_ids": [1, length]}], "prefill": [batch, length], "prompts": {context:
        [1, context]}, "validation": DataLoader}``: calibration blocks, prefill blocks and then the prompts (the
        text that follows, concatenated) from the training split; the validation split's blocks for perplexity.
    """
    from sentinel_lightning.data import LanguageModelingDataModule

    data = LanguageModelingDataModule(tokenizer=tokenizer, block_size=args.prefill_length, batch_size=PERPLEXITY_BATCH)
    data.setup()
    train = data.blocks["train"]["input_ids"]  # [blocks, length]
    needed = args.calibration_blocks + args.prefill_batch
    stream = train[needed:].flatten()  # the prompts: the training text after those blocks
    if len(train) < needed or len(stream) < max(args.decode_contexts):
        raise ValueError(
            f"The embedded corpus is too short for {needed} blocks of {args.prefill_length} tokens and a prompt of "
            f"{max(args.decode_contexts)} tokens; lower --calibration_blocks, --prefill_batch or --decode_contexts."
        )
    return {
        "calibration": [{"input_ids": block[None]} for block in train[: args.calibration_blocks]],
        "prefill": train[args.calibration_blocks : needed],
        "prompts": {context: stream[None, :context] for context in args.decode_contexts},
        "validation": data.val_dataloader(),
    }


def log(message: str) -> None:
    """A progress line on stderr (the long untimed steps: perplexity, prompt prefill)."""
    print(message, file=sys.stderr, flush=True)


def set_pruned(gates: HeadGates, pruned: list[tuple[int, int]]) -> None:
    """Makes ``pruned`` (``(layer, head)`` pairs) exactly the gated model's pruned heads, through the gates' API."""
    gates.reactivate(gates.pruned_heads())
    gates.prune(pruned)


# ----------------------------------------------------------------------------------------------------------------
# Choosing the heads


def unit_scope(unit: str, fraction: float, num_layers: int, num_heads: int, group_size: int) -> tuple[str, int]:
    """The scope a unit prunes ``fraction`` of the query heads with, and the number of query heads it reaches.

    ``"uniform"`` for ``head`` and ``group`` when the uniform shape nearest the fraction (``reachable_count``) is
    within half a layer of heads of it (as near as whole layers get) and keeps the default per-layer minimum of
    one head; otherwise ``"global"``, which ``layer`` always uses.
    """
    goal = fraction * num_layers * num_heads
    if unit != "layer":
        count = reachable_count(goal, num_layers, num_heads, unit, "uniform", group_size)
        prunable = num_layers * prunable_per_layer(num_heads, unit, "uniform", group_size, 1)
        if count <= prunable and 2 * abs(count - goal) <= num_heads:
            return "uniform", count
    return "global", reachable_count(goal, num_layers, num_heads, unit, "global", group_size)


def configurations(args: argparse.Namespace, plain: PreTrainedModel, scores: torch.Tensor) -> list[dict]:
    """One entry per (unit, fraction): ``unit``, ``fraction``, ``scope``, ``pruned`` heads and their share."""
    num_layers, num_heads, _ = head_shape(plain)
    group_size = family_of(plain).group_size(plain.config)
    all_active = torch.ones(num_layers, num_heads, dtype=torch.bool)
    planned = [(unit, fraction, *unit_scope(unit, fraction, num_layers, num_heads, group_size))
               for unit in args.units for fraction in args.fractions]
    for fraction in args.unequal_fractions:
        planned.append(("head", fraction, "global", reachable_count(
            fraction * num_layers * num_heads, num_layers, num_heads, "head", "global", group_size)))
    entries = []
    for unit, fraction, scope, count in planned:
        pruned = select_heads(scores, all_active, count, scope, None, None, unit, group_size)
        name = f"{unit}@{fraction:g}" + ("" if scope == "uniform" or unit == "layer" else f" {scope}")
        entries.append({
            "name": name, "unit": unit, "fraction": fraction, "scope": scope, "pruned": pruned,
            "sparsity": len(pruned) / (num_layers * num_heads),
        })
    return entries


# ----------------------------------------------------------------------------------------------------------------
# Counting


def per_layer_heads(model: PreTrainedModel) -> list[tuple[int, int]]:
    """``(query heads, key/value heads)`` of every layer, read from the layout a compacted model's config records."""
    num_layers, num_heads, _ = head_shape(model)
    indices = key_value_indices(model.config)
    if indices is None:
        return [(num_heads, family_of(model).num_key_value_heads(model.config))] * num_layers
    return [(len(kv_index), len(set(kv_index))) for kv_index in indices]


def multiply_adds(model: PreTrainedModel, batch: int, length: int) -> int:
    """Matmul multiply-adds of one forward pass over ``[batch, length]`` tokens.

    Every linear map (attention projections, MLP, LM head) costs ``in * out`` per token; attention scores and the
    weighted sum of values cost ``2 * head_dim`` per query head (per query slot, for a layer of unequal groups:
    ``query_slots_per_layer``) and per (query, key) pair of the causal triangle,
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
    for num_slots in query_slots_per_layer(model):
        total += 2 * num_slots * head_dim * pairs
    return total


def query_slots_per_layer(model: PreTrainedModel) -> list[int]:
    """The query heads each layer's attention computes: its kept heads, or ``k * g`` slots for unequal groups."""
    indices = key_value_indices(model.config)
    if indices is None:
        return [heads for heads, _ in per_layer_heads(model)]
    return [len(set(kv_index)) * max(Counter(kv_index).values(), default=0) for kv_index in indices]


def sizes(model: PreTrainedModel, args: argparse.Namespace) -> dict:
    """Parameters, weight bytes, key/value-cache bytes per token, prefill multiply-adds and the layout."""
    layout = per_layer_heads(model)
    return {
        "parameters": count_parameters(model), "weight_bytes": weight_bytes(model),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model),
        "kv_cache_bytes": {str(S): kv_cache_bytes(model, S) for S in args.decode_contexts},
        "multiply_adds": multiply_adds(model, args.prefill_batch, args.prefill_length),
        "heads_per_layer": [heads for heads, _ in layout], "key_value_heads_per_layer": [kv for _, kv in layout],
        "stock_modules": stock_describes(model),
        "equal_groups": all(equal_groups(kv_index) for kv_index in key_value_indices(model.config) or []),
    }


def bytes_per_decoded_token(entry: dict, context: int) -> int:
    """``compaction.bytes_per_decoded_token`` from an entry's sizes: every weight once, plus the whole cache."""
    return entry["weight_bytes"] + entry["kv_cache_bytes"][str(context)]


# ----------------------------------------------------------------------------------------------------------------
# Timing


@torch.inference_mode()
def time_prefill(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Tokens per second of one forward pass over ``input_ids`` ``[batch, length]``."""
    start = time.perf_counter()
    model(input_ids=input_ids, use_cache=False)
    return input_ids.numel() / (time.perf_counter() - start)


@torch.inference_mode()
def prefill_prompt(model: nn.Module, prompt: torch.Tensor) -> tuple:
    """The key/value cache of ``prompt`` ``[1, S]`` and the greedy next token ``[1, 1]`` (untimed setup)."""
    output = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    return output["cache"], output.logits[:, -1].argmax(dim=-1, keepdim=True)


@torch.inference_mode()
def time_decode(model: nn.Module, prompt_state: tuple, new_tokens: int) -> float:
    """New tokens per second of greedy decoding with the key/value cache, continuing a prefilled prompt.

    The prompt's cache is copied first (untimed), so every run starts from the same ``S`` cached tokens.
    """
    cache, token = copy.deepcopy(prompt_state[0]), prompt_state[1]
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(input_ids=token, cache=cache, use_cache=True).logits  # [1, 1, vocab]
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
    return new_tokens / (time.perf_counter() - start)


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order of one round: rotated by the round's index, reversed every other round."""
    shift = round_index % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if round_index % 2 else order


def time_rounds(models: dict[str, nn.Module], data: dict, args: argparse.Namespace) -> dict:
    """Interleaved rounds: every round times every model once (prefill, then decode at every context).

    Returns:
        ``{name: {"prefill": [tokens/s per timed round], "decode@S": [...] for every context S}}``.
    """
    names = list(models)
    log(f"prefilling prompts of {', '.join(map(str, args.decode_contexts))} tokens for {len(names)} models")
    states = {(name, context): prefill_prompt(models[name], prompt)
              for name in names for context, prompt in data["prompts"].items()}
    kinds = ["prefill"] + [f"decode@{context}" for context in args.decode_contexts]
    samples = {name: {kind: [] for kind in kinds} for name in names}
    rounds = args.warmup + args.rounds
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("benchmark", total=rounds * len(names))
        for round_index in range(rounds):
            for name in round_order(names, round_index):
                progress.update(task, description=f"round {round_index + 1}/{rounds}: {name}")
                timings = [time_prefill(models[name], data["prefill"])] + [
                    time_decode(models[name], states[name, context], args.decode_tokens)
                    for context in args.decode_contexts
                ]
                if round_index >= args.warmup:
                    for kind, value in zip(kinds, timings):
                        samples[name][kind].append(value)
                progress.advance(task)
    return samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the ratio of two models' throughputs measured in the same round.

    Pairing by round cancels most of the slow-downs other processes cause on a shared machine (they hit both
    models of a round alike), which per-model medians do not when a slow spell spans several rounds.
    """
    return statistics.median(a / b for a, b in zip(numerator, denominator))


# ----------------------------------------------------------------------------------------------------------------
# Building and measuring


def build_models(args: argparse.Namespace, plain: PreTrainedModel, data: dict) -> tuple[dict, dict, list[dict]]:
    """Scores the heads, prunes a gated copy of ``plain`` for every configuration and compacts it.

    Returns:
        ``(models, plain entry, configuration entries)``: ``models`` maps ``"plain"`` and every configuration's
        name to the model to time; the entries hold sizes and perplexities (``perplexity_gated`` too for
        configurations).
    """
    validation, batches = data["validation"], args.perplexity_batches
    log("perplexity of the plain model")
    plain_entry = {"name": "plain", **sizes(plain, args), "perplexity": perplexity(plain, validation, batches)}
    if args.model_dir is not None:
        return saved_folder(args, plain, plain_entry, validation)
    gated = copy.deepcopy(plain)
    gates = attach_gates(gated)
    scores = resolve_strategy("gradient")(measure_head_metrics(gated, data["calibration"]))  # [num_layers, num_heads]
    models, entries = {"plain": plain}, configurations(args, plain, scores)
    for entry in entries:
        log(f"{entry['name']}: {len(entry['pruned'])} query heads pruned ({entry['scope']}), compacting, perplexity")
        set_pruned(gates, entry["pruned"])
        models[entry["name"]] = compacted = compact(gated)
        gated_perplexity, compacted_perplexity = perplexity(gated, validation, batches), perplexity(
            compacted, validation, batches
        )
        difference = abs(gated_perplexity - compacted_perplexity) / compacted_perplexity
        entry.update(
            sizes(compacted, args), perplexity_gated=gated_perplexity, perplexity=compacted_perplexity,
            perplexity_relative_difference=difference, perplexity_agrees=difference <= PERPLEXITY_TOLERANCE,
        )
    return models, plain_entry, entries


def saved_folder(args: argparse.Namespace, plain: PreTrainedModel, plain_entry: dict, validation) -> tuple:
    """``build_models`` for ``--model_dir``: the saved folder as the one configuration (no gated model)."""
    from sentinel_lightning.saving import load_pruned

    log(f"loading {args.model_dir} and its perplexity")
    kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    folder = load_pruned(args.model_dir, **kwargs).to(torch.float32).eval()
    num_layers, num_heads, _ = head_shape(plain)
    if head_shape(folder)[0] != num_layers:
        raise ValueError(f"--model_dir {args.model_dir!r} has {head_shape(folder)[0]} layers, --model {num_layers}: "
                         "give the plain model it was pruned from.")
    layout = sizes(folder, args)
    kept = sum(layout["heads_per_layer"])
    entry = {
        "name": "saved", "unit": "saved", "scope": "uniform" if layout["stock_modules"] else "per-layer",
        "fraction": 1 - kept / (num_layers * num_heads), "sparsity": 1 - kept / (num_layers * num_heads),
        "pruned": [], **layout, "perplexity": perplexity(folder, validation, args.perplexity_batches),
        "perplexity_gated": None, "perplexity_relative_difference": None, "perplexity_agrees": True,
    }
    return {"plain": plain, "saved": folder}, plain_entry, [entry]


def speeds(args: argparse.Namespace, plain: dict, entries: list[dict], samples: dict) -> None:
    """Adds medians, paired speed-ups over the plain model and their bounds to the entries (in place).

    The prefill bound is the ratio of multiply-adds; the decode bound at context ``S`` the ratio of bytes moved
    per decoded token (``bytes_per_decoded_token``).
    """
    for entry in [plain, *entries]:
        own = samples[entry["name"]]
        entry["prefill_tokens_per_s"] = statistics.median(own["prefill"])
        entry["decode_tokens_per_s"] = {str(S): statistics.median(own[f"decode@{S}"]) for S in args.decode_contexts}
        entry["samples"] = own
    for entry in entries:
        own, base = samples[entry["name"]], samples["plain"]
        entry["prefill_speedup"] = paired_ratio(own["prefill"], base["prefill"])
        entry["prefill_bound"] = plain["multiply_adds"] / entry["multiply_adds"]
        entry["decode_speedup"] = {
            str(S): paired_ratio(own[f"decode@{S}"], base[f"decode@{S}"]) for S in args.decode_contexts
        }
        entry["decode_bound"] = {
            str(S): bytes_per_decoded_token(plain, S) / bytes_per_decoded_token(entry, S) for S in args.decode_contexts
        }


def trade_off(entries: list[dict], context: int) -> str:
    """One factual line: per fraction, the unit with the lowest perplexity and the fastest decoding at ``context``,
    and the configurations that no other beats on both (decode speed-up at ``context``, perplexity)."""
    speed = {entry["name"]: entry["decode_speedup"][str(context)] for entry in entries}

    def beats(other: dict, entry: dict) -> bool:
        """Whether ``other`` is at least as fast and at most as perplexed as ``entry``, and differs from it."""
        at_least = speed[other["name"]] >= speed[entry["name"]] and other["perplexity"] <= entry["perplexity"]
        return at_least and (speed[other["name"]], other["perplexity"]) != (speed[entry["name"]], entry["perplexity"])

    parts = []
    for fraction in dict.fromkeys(entry["fraction"] for entry in entries):
        group = [entry for entry in entries if entry["fraction"] == fraction]
        best = min(group, key=lambda entry: entry["perplexity"])
        fastest = max(group, key=lambda entry: speed[entry["name"]])
        part = f"at {fraction:g}, {best['unit']} keeps the lowest perplexity ({best['perplexity']:.2f}, " \
               f"{speed[best['name']]:.2f}x)"
        if fastest is not best:
            part += f" and {fastest['unit']} decodes fastest ({speed[fastest['name']]:.2f}x, " \
                    f"perplexity {fastest['perplexity']:.2f})"
        parts.append(part)
    front = [entry["name"] for entry in entries if not any(beats(other, entry) for other in entries)]
    return (f"Trade-off (decode speed-up at {context} tokens of context against perplexity): {'; '.join(parts)}. "
            f"Not beaten on both by another configuration: {', '.join(front)}.")


# ----------------------------------------------------------------------------------------------------------------
# Report


def machine(threads: int, load_before: tuple[float, ...]) -> dict:
    """The machine and software the timings come from."""
    return {
        "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "threads": threads,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def settings(args: argparse.Namespace, plain: PreTrainedModel, validation: Iterable) -> dict:
    """The options the run used, with the scoring strategy, attention implementation, dtype and validation size."""
    names = ("fractions", "units", "unequal_fractions", "model_dir", "rounds", "warmup", "prefill_batch",
             "prefill_length", "decode_contexts",
             "decode_tokens", "calibration_blocks", "perplexity_batches", "quick")
    batches = len(validation) if args.perplexity_batches is None else min(len(validation), args.perplexity_batches)
    return {name: getattr(args, name) for name in names} | {
        "strategy": "gradient", "attn_implementation": plain.config._attn_implementation, "dtype": str(plain.dtype),
        "perplexity_blocks": min(len(validation.dataset), batches * PERPLEXITY_BATCH),
    }


def write_outputs(output_dir: str, results: dict) -> None:
    """Writes ``speed.json`` and ``speed.md`` into ``output_dir`` and prints the markdown."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "speed.json"), "w") as file:
        json.dump(results, file, indent=2)
    text = markdown(results)
    with open(os.path.join(output_dir, "speed.md"), "w") as file:
        file.write(text)
    print(text)


def markdown(results: dict) -> str:
    """The header (command, model, machine, settings), both tables and the trade-off line."""
    machine_, settings_ = results["machine"], results["settings"]
    contexts = settings_["decode_contexts"]
    lines = [
        f"Command: `{results['command']}`",
        "",
        f"Model: {results['model']}. Machine: {machine_['cpu']}, {machine_['cores']} cores, {machine_['threads']} "
        f"torch threads; torch {machine_['torch']}, transformers {machine_['transformers']}, Python "
        f"{machine_['python']}; load average {machine_['load_average_1min_before_after'][0]} before, "
        f"{machine_['load_average_1min_before_after'][1]} after.",
        "",
        f"Prefill {settings_['prefill_batch']} x {settings_['prefill_length']} tokens; decode "
        f"{settings_['decode_tokens']} new tokens (batch 1, greedy, key/value cache) after prompts of "
        f"{', '.join(map(str, contexts))} tokens; perplexity on {settings_['perplexity_blocks']} validation blocks "
        f"of {settings_['prefill_length']} tokens, "
        + (f"the saved folder {settings_['model_dir']} as it is; " if settings_.get("model_dir") else
           f"no fine-tuning; heads scored by {settings_['strategy']} on {settings_['calibration_blocks']} calibration "
           "blocks; ")
        + f"{settings_['attn_implementation']} attention, "
        f"{settings_['dtype']}; speed-ups are medians over {settings_['rounds']} interleaved rounds (after "
        f"{settings_['warmup']} warm-up) of the compacted/plain ratio within each round; bounds in parentheses.",
        "",
        *tradeoff_table(results, contexts),
        "",
        *throughput_table(results, contexts),
        "",
        results["trade_off"],
    ]
    return "\n".join(lines) + "\n"


def tradeoff_table(results: dict, contexts: list[int]) -> list[str]:
    """Perplexity against measured speed-up (and its bound), one row per configuration after the plain model."""
    decode = " | ".join(f"decode speed-up @{context} (bound)" for context in contexts)
    lines = [
        f"| unit | scope | query heads pruned | parameters | kv cache bytes/token | perplexity (gated / compacted) "
        f"| prefill speed-up (bound) | {decode} |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(contexts),
    ]
    plain = results["plain"]
    ones = " | ".join("1" for _ in contexts)
    lines.append(f"| plain | | 0 | {plain['parameters']:,} | {plain['kv_cache_bytes_per_token']:,} | "
                 f"{plain['perplexity']:.3f} | 1 | {ones} |")
    for entry in results["configurations"]:
        flag = "" if entry["perplexity_agrees"] else " (!)"
        speeds_ = " | ".join(f"{entry['decode_speedup'][str(S)]:.3f} ({entry['decode_bound'][str(S)]:.3f})"
                             for S in contexts)
        gated = "-" if entry["perplexity_gated"] is None else f"{entry['perplexity_gated']:.3f}"
        lines.append(
            f"| {entry['unit']} | {entry['scope']} | {entry['sparsity']:.3f} | {entry['parameters']:,} | "
            f"{entry['kv_cache_bytes_per_token']:,} | {gated} / {entry['perplexity']:.3f}"
            f"{flag} | {entry['prefill_speedup']:.3f} ({entry['prefill_bound']:.3f}) | {speeds_} |"
        )
    return lines


def throughput_table(results: dict, contexts: list[int]) -> list[str]:
    """Median throughputs of every timed model."""
    decode = " | ".join(f"decode tokens/s @{context}" for context in contexts)
    lines = [f"| model | prefill tokens/s | {decode} |", "|---|---:|" + "---:|" * len(contexts)]
    for entry in [results["plain"], *results["configurations"]]:
        decoded = " | ".join(f"{entry['decode_tokens_per_s'][str(S)]:.2f}" for S in contexts)
        lines.append(f"| {entry['name']} | {entry['prefill_tokens_per_s']:.1f} | {decoded} |")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and writes ``speed.json`` and ``speed.md``; returns what ``speed.json`` holds."""
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    plain, tokenizer, model_name = load_model(args)
    data = corpus_tokens(args, tokenizer)
    models, plain_entry, entries = build_models(args, plain, data)
    load_before = os.getloadavg()
    samples = time_rounds(models, data, args)
    speeds(args, plain_entry, entries, samples)
    for entry in entries:
        entry["pruned"] = [list(pair) for pair in entry["pruned"]]
    results = {
        "command": " ".join(["python", "scripts/benchmark_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": model_name,
        "machine": machine(threads, load_before),
        "settings": settings(args, plain, data["validation"]),
        "plain": plain_entry,
        "configurations": entries,
        "trade_off": trade_off(entries, max(args.decode_contexts)),
    }
    write_outputs(args.output_dir, results)
    return results


if __name__ == "__main__":
    main()
