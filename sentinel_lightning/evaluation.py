"""Evaluating a (pruned) causal LM: perplexity, generation speed and the quality of generated text.

``evaluate`` reports all three for a model, or for a ``GatedLanguageModel`` checkpoint before and after its
pruning, and prints them as a table. The ``sentinel-lightning evaluate`` subcommand calls it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from sentinel_lightning.gates import find_gates
from sentinel_lightning.metrics import IGNORE_INDEX, causal_lm_token_losses

DEFAULT_PROMPT = "In Python, a function definition"
REPETITION_WINDOW = 50


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """Returns the Hugging Face causal LM of ``model``: itself, or the ``.model`` of a ``GatedLanguageModel``."""
    if isinstance(model, PreTrainedModel):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, PreTrainedModel):
        return inner
    raise TypeError(
        f"model is a {type(model).__name__}; expected a Hugging Face PreTrainedModel or a module whose .model "
        "is one (such as GatedLanguageModel)."
    )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _num_threads(num_threads: int | None) -> Iterator[None]:
    if num_threads is None:
        yield
        return
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r} must be a positive integer or None.")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def perplexity(model: nn.Module, dataloader: Iterable[dict[str, torch.Tensor]], max_batches: int | None = None) -> float:
    """Token-weighted perplexity: ``exp(total next-token NLL / number of predicted tokens)``.

    Padding is excluded: positions whose label is -100 or whose ``attention_mask`` is 0 are not predicted.

    Args:
        model: A Hugging Face causal LM or a ``GatedLanguageModel`` (gated or not); run in eval mode.
        dataloader: Batches (dicts) with ``input_ids`` ``[batch, seq]`` and optionally ``attention_mask``
            ``[batch, seq]`` and ``labels`` ``[batch, seq]`` (default: ``input_ids``).
        max_batches: Use at most this many batches; None uses them all.

    Returns:
        The perplexity, a float.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches} must be a positive integer or None.")
    causal_lm = unwrap_model(model)
    device = next(causal_lm.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with _eval_mode(causal_lm):
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            if not isinstance(batch, dict) or "input_ids" not in batch:
                raise TypeError(f"perplexity needs dict batches with 'input_ids'; got a {type(batch).__name__}.")
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            labels = batch.get("labels", batch["input_ids"]).to(device)
            if attention_mask is not None:
                attention_mask = attention_mask.to(device)
                labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
            logits = causal_lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            nll_sum, tokens = causal_lm_token_losses(logits, labels)
            total_nll += float(nll_sum)
            total_tokens += int(tokens)
    if total_tokens == 0:
        raise ValueError("perplexity found no token to predict in the dataloader (every label is -100 or padding).")
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def measure_inference_speed(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str = DEFAULT_PROMPT,
    num_tokens: int = 50,
    num_runs: int = 3,
    warmup_tokens: int = 8,
    num_threads: int | None = None,
) -> dict:
    """Measures greedy generation speed: exactly ``num_tokens`` new tokens per run, after an untimed warm-up.

    Every run generates greedily with ``min_new_tokens = max_new_tokens = num_tokens``, so an end-of-sequence
    token never stops it early and every run does the same work.

    Args:
        model: A Hugging Face causal LM or a ``GatedLanguageModel``.
        tokenizer: The model's tokenizer.
        prompt: The text to continue.
        num_tokens: New tokens generated in every timed run.
        num_runs: Timed runs; the median is reported.
        warmup_tokens: New tokens generated by the untimed warm-up run (0 skips it).
        num_threads: Torch CPU threads during the measurement (restored afterwards); None keeps the current
            setting. On small CPUs one thread is often faster and steadier for single-sequence decoding.

    Returns:
        ``{"tokens_per_second": median over runs, "runs": [tokens per second of each run],
        "seconds": [duration of each run], "num_tokens": num_tokens, "text": the generated continuation}``.
    """
    for name, value, low in (("num_tokens", num_tokens, 1), ("num_runs", num_runs, 1), ("warmup_tokens", warmup_tokens, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
    causal_lm = unwrap_model(model)
    device = next(causal_lm.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    prompt_length = encoded["input_ids"].shape[1]
    if prompt_length == 0:
        raise ValueError(f"prompt={prompt!r} has no tokens; give a non-empty prompt.")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(count: int) -> torch.Tensor:
        config = GenerationConfig(
            max_new_tokens=count, min_new_tokens=count, do_sample=False, num_beams=1,
            pad_token_id=pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        return causal_lm.generate(**encoded, generation_config=config)

    seconds, output = [], None
    with _eval_mode(causal_lm), _num_threads(num_threads):
        if warmup_tokens:
            generate(warmup_tokens)
        for _ in range(num_runs):
            start = time.perf_counter()
            output = generate(num_tokens)
            seconds.append(time.perf_counter() - start)
            generated = output.shape[1] - prompt_length
            if generated != num_tokens:
                raise RuntimeError(f"Generation produced {generated} new tokens instead of num_tokens={num_tokens}.")
    runs = [num_tokens / max(duration, 1e-9) for duration in seconds]
    return {
        "tokens_per_second": statistics.median(runs),
        "runs": runs,
        "seconds": seconds,
        "num_tokens": num_tokens,
        "text": tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True),
    }


def words_of(text: str) -> list[str]:
    """The words of ``text``, lower-cased: maximal runs of letters, digits and underscores."""
    return re.findall(r"\w+", text.lower())


def text_quality(text: str, window: int = REPETITION_WINDOW) -> dict[str, float]:
    """Two simple signals of degenerate text.

    Args:
        text: The text (typically a generated continuation).
        window: A word counts as repeated when it occurs again within this many following words.

    Returns:
        ``{"lexical_diversity": unique words / words, "repetition_score": share of words that occur again
        within the next ``window`` words, "num_words": number of words}``; both scores are 0.0 for text
        without words. Words are lower-cased runs of letters, digits and underscores.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be a positive integer.")
    words = words_of(text)
    if not words:
        return {"lexical_diversity": 0.0, "repetition_score": 0.0, "num_words": 0}
    repeated = sum(word in words[index + 1 : index + 1 + window] for index, word in enumerate(words))
    return {
        "lexical_diversity": len(set(words)) / len(words),
        "repetition_score": repeated / len(words),
        "num_words": len(words),
    }


def evaluate_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataloader: Iterable[dict[str, torch.Tensor]],
    prompt: str = DEFAULT_PROMPT,
    num_tokens: int = 50,
    num_runs: int = 3,
    max_batches: int | None = None,
    num_threads: int | None = None,
) -> dict:
    """Perplexity, generation speed and text quality of one model, as one flat dict (see ``evaluate``)."""
    result = {"perplexity": perplexity(model, dataloader, max_batches)}
    speed = measure_inference_speed(model, tokenizer, prompt, num_tokens, num_runs, num_threads=num_threads)
    result.update(tokens_per_second=speed["tokens_per_second"], tokens_per_second_runs=speed["runs"])
    result.update(text_quality(speed["text"]))
    gates = find_gates(model)
    if gates is not None:
        result.update(active_heads=gates.num_active, total_heads=gates.active.numel(), sparsity=gates.sparsity)
    result["text"] = speed["text"]
    return result


def evaluate(
    model: str | None = None,
    ckpt_path: str | None = None,
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    num_tokens: int = 50,
    num_runs: int = 3,
    block_size: int = 256,
    batch_size: int = 4,
    max_batches: int | None = 6,
    data_files: list[str] | None = None,
    cache: bool = True,
    num_threads: int | None = None,
    device: str = "cpu",
    print_table: bool = True,
    output_file: str | None = None,
) -> dict:
    """Reports perplexity, generation speed and text quality of a model, or of a checkpoint before and after pruning.

    For a ``GatedLanguageModel`` checkpoint there are two columns: ``"before"`` (the same weights with every
    pruned gate reactivated to the value it had when pruned) and ``"after"`` (the gates as saved). For a plain
    model there is one column, ``"model"``.

    Args:
        model: Hub name or local path of a causal LM to evaluate; None means the embedded default
            (SmolLM2-135M-Instruct). With ``ckpt_path`` it only chooses the tokenizer.
        ckpt_path: A ``GatedLanguageModel`` checkpoint (``.ckpt``) to evaluate before and after its pruning.
        gguf_file: GGUF file inside ``model``'s folder, when the weights come from one.
        tokenizer: Tokenizer name or path; None means ``model``'s, or the checkpoint's model's.
        prompt: Text that generation continues (speed and text quality).
        num_tokens: New tokens generated in every timed generation run.
        num_runs: Timed generation runs (the median speed is reported).
        block_size: Tokens per perplexity block.
        batch_size: Blocks per perplexity batch.
        max_batches: Perplexity uses at most this many validation batches; None uses them all.
        data_files: Local text files to measure perplexity on; None means the validation split of the
            embedded corpus (the Python Language Reference).
        cache: Whether the tokenised perplexity blocks are cached on disk (see ``LanguageModelingDataModule``).
        num_threads: Torch CPU threads while generating; None keeps the current setting.
        device: Device to evaluate on (``"cpu"``, ``"cuda"``, ...).
        print_table: Whether to print the results as a table.
        output_file: A JSON file to write the results to; None writes none.

    Returns:
        ``{column: {"perplexity", "tokens_per_second", "tokens_per_second_runs", "lexical_diversity",
        "repetition_score", "num_words", "text", and for gated models "active_heads", "total_heads",
        "sparsity"}}`` with columns ``"before"`` and ``"after"`` for a checkpoint, ``"model"`` otherwise.
    """
    from sentinel_lightning.data import LanguageModelingDataModule
    from sentinel_lightning.pretrained import load_causal_lm, load_tokenizer

    if ckpt_path is not None:
        from sentinel_lightning.module import GatedLanguageModel

        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r} is not a file; give a GatedLanguageModel checkpoint (.ckpt).")
        module = GatedLanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu")
        evaluated = module.model
    else:
        evaluated = load_causal_lm(model, gguf_file)
    if tokenizer is not None:
        loaded_tokenizer = load_tokenizer(tokenizer)
    elif model is not None or ckpt_path is None:
        loaded_tokenizer = load_tokenizer(model, gguf_file)
    else:  # the tokenizer of the model the checkpoint was trained from
        loaded_tokenizer = load_tokenizer(module.hparams.get("model"), module.hparams.get("gguf_file"))
    evaluated = evaluated.to(device)
    if data_files:
        data = LanguageModelingDataModule(
            tokenizer=loaded_tokenizer, source="text", train_files=data_files, val_files=data_files,
            block_size=block_size, batch_size=batch_size, cache=cache,
        )
    else:
        data = LanguageModelingDataModule(
            tokenizer=loaded_tokenizer, block_size=block_size, batch_size=batch_size, cache=cache
        )
    data.setup()
    loader = data.val_dataloader()

    def run() -> dict:
        return evaluate_model(evaluated, loaded_tokenizer, loader, prompt, num_tokens, num_runs, max_batches, num_threads)

    if ckpt_path is None:
        results = {"model": run()}
    else:
        gates = find_gates(evaluated)
        after = run()
        gates.reactivate(gates.pruned_heads())
        results = {"before": run(), "after": after}
    if print_table:
        print_results(results, title=f"Evaluation of {ckpt_path or model or 'the embedded default model'}")
    if output_file is not None:
        with open(output_file, "w") as file:
            json.dump(results, file, indent=1)
    return results


def print_results(results: dict[str, dict], title: str = "Evaluation") -> None:
    """Prints ``evaluate``'s results as a rich table, one column per evaluated variant."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for column in results:
        table.add_column(column, justify="right")
    rows = [
        ("active heads", lambda r: f"{r['active_heads']}/{r['total_heads']}" if "active_heads" in r else "-"),
        ("perplexity", lambda r: f"{r['perplexity']:.3f}"),
        ("tokens / s (median)", lambda r: f"{r['tokens_per_second']:.2f}"),
        ("lexical diversity", lambda r: f"{r['lexical_diversity']:.3f}"),
        ("repetition score", lambda r: f"{r['repetition_score']:.3f}"),
    ]
    for name, show in rows:
        table.add_row(name, *(show(result) for result in results.values()))
    console = Console()
    console.print(table)
    for column, result in results.items():
        console.print(f"[bold]{column}[/bold] continuation: {result['text']!r}", highlight=False)
