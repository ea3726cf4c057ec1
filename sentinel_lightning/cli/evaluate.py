"""``sentinel-lightning evaluate``: the library's ``evaluation.evaluate``, printed as a rich table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from sentinel_lightning import evaluation


def evaluate(print_table: bool = True, **kwargs: Any) -> dict:
    """Reports perplexity, generation speed and text quality of a model, or of a checkpoint before and after pruning.

    Args:
        print_table: Whether to print the results as a table.
        **kwargs: The options of ``sentinel_lightning.evaluation.evaluate`` (model, ckpt_path, tokenizer, ...).

    Returns:
        ``evaluation.evaluate``'s results: ``{column: {"perplexity", "tokens_per_second", ...}}``.
    """
    results = evaluation.evaluate(**kwargs)
    if print_table:
        subject = kwargs.get("ckpt_path") or kwargs.get("model") or "the embedded default model"
        print_results(results, title=f"Evaluation of {subject}")
    return results


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
