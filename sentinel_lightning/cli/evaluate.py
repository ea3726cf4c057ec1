"""``sentinel-lightning evaluate``: loads a model or a checkpoint and its validation data, runs the library's
``evaluation.evaluate`` on them and prints the results as a rich table."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sentinel_lightning import evaluation
from sentinel_lightning.evaluation import DEFAULT_PROMPT


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
    output_file: str | None = None,
    print_table: bool = True,
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
        output_file: A JSON file to write the results to; None writes none.
        print_table: Whether to print the results as a table.

    Returns:
        ``evaluation.evaluate``'s results: ``{column: {"perplexity", "tokens_per_second", ...}}``, columns
        ``"before"`` and ``"after"`` for a checkpoint, ``"model"`` otherwise.
    """
    evaluated, loaded_tokenizer = load_for_evaluation(model, ckpt_path, gguf_file, tokenizer)
    loader = validation_loader(loaded_tokenizer, data_files, block_size, batch_size, cache)
    results = evaluation.evaluate(
        evaluated.to(device), loaded_tokenizer, loader, prompt, num_tokens, num_runs, max_batches, num_threads
    )
    if output_file is not None:
        with open(output_file, "w") as file:
            json.dump(results, file, indent=1)
    if print_table:
        print_results(results, title=f"Evaluation of {ckpt_path or model or 'the embedded default model'}")
    return results


def load_for_evaluation(
    model: str | None = None, ckpt_path: str | None = None, gguf_file: str | None = None, tokenizer: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM to evaluate (a checkpoint's gated model, or ``model``) and its tokenizer; see ``evaluate``."""
    from sentinel_lightning.module import GatedLanguageModel
    from sentinel_lightning.pretrained import load_causal_lm, load_tokenizer

    module = None
    if ckpt_path is not None:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path!r} is not a file; give a GatedLanguageModel checkpoint (.ckpt)."
            )
        module = GatedLanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu")
    causal_lm = load_causal_lm(model, gguf_file) if module is None else module.model
    if tokenizer is not None:
        return causal_lm, load_tokenizer(tokenizer)
    if model is not None or module is None:
        return causal_lm, load_tokenizer(model, gguf_file)
    # The tokenizer of the model the checkpoint was trained from.
    return causal_lm, load_tokenizer(module.hparams.get("model"), module.hparams.get("gguf_file"))


def validation_loader(
    tokenizer: PreTrainedTokenizerBase, data_files: list[str] | None, block_size: int, batch_size: int, cache: bool
) -> Iterable[dict[str, torch.Tensor]]:
    """Validation batches (``input_ids``, ``attention_mask``, ``labels``, each ``[batch, block_size]``).

    From ``data_files`` when given, else from the validation split of the embedded corpus.
    """
    from sentinel_lightning.data import LanguageModelingDataModule

    source = dict(source="text", train_files=data_files, val_files=data_files) if data_files else {}
    data = LanguageModelingDataModule(
        tokenizer=tokenizer, block_size=block_size, batch_size=batch_size, cache=cache, **source
    )
    data.setup()
    return data.val_dataloader()


def print_results(results: dict[str, dict], title: str = "Evaluation") -> None:
    """Prints ``evaluate``'s results as a rich table, one column per evaluated variant, then each continuation."""
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
