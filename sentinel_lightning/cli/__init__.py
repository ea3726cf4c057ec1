"""The ``sentinel-lightning`` command line: the CLI layer, the only part of the package that prints.

- ``fit``, ``validate``, ``test``, ``predict``: Lightning's ``LightningCLI`` over the job (``cli.fit``).
- ``export``: a checkpoint to a compact model folder (``cli.export``).
- ``evaluate``: perplexity, generation speed and text quality before and after pruning (``cli.evaluate``).

``--config`` takes a YAML file or the name of a config shipped in the package (``--config entropy.yaml``; see
``cli.configs``). A run that diverges ends with the ``DivergenceError``'s message and exit code
``EXIT_DIVERGED`` (3).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from jsonargparse import ArgumentParser

from sentinel_lightning.callbacks.divergence import DivergenceError
from sentinel_lightning.cli.configs import resolve_config_arguments
from sentinel_lightning.cli.evaluate import evaluate
from sentinel_lightning.cli.export import export_checkpoint
from sentinel_lightning.cli.fit import lightning_cli

# Subcommands that are plain functions rather than Trainer methods.
FUNCTION_COMMANDS: dict[str, Callable[..., dict]] = {"export": export_checkpoint, "evaluate": evaluate}
EXIT_DIVERGED = 3


def run_function(function: Callable[..., dict], argv: list[str]) -> dict:
    """Parses ``--name value`` options (or a ``--config`` YAML) for ``function`` and calls it.

    Args:
        function: One of ``FUNCTION_COMMANDS``.
        argv: The subcommand's name, then its options.

    Returns:
        What ``function`` returns.
    """
    parser = ArgumentParser(prog=f"sentinel-lightning {argv[0]}", description=function.__doc__.split("\n")[0])
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(function, as_positional=False)
    config = parser.parse_args(argv[1:])
    return function(**{key: value for key, value in vars(config).items() if key != "config"})


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sentinel-lightning`` console script; ``args`` default to ``sys.argv[1:]``."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        argv = resolve_config_arguments(argv)
    except ValueError as error:
        raise SystemExit(f"sentinel-lightning: error: {error}") from error
    if argv and argv[0] in FUNCTION_COMMANDS:
        run_function(FUNCTION_COMMANDS[argv[0]], argv)
        return
    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = argv
    try:
        lightning_cli(None if args is None else argv)
    except DivergenceError as error:
        print(f"sentinel-lightning: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_DIVERGED) from error
