"""The one check that a model holds only finite numbers, shared by every step that refuses a diverged model.

``save_pruned``, ``sentinel-lightning export``, ``HeadPruning``, ``HeadReactivation`` and ``DivergenceGuard`` take no
decision on (and write nothing of) a model whose weights or gates are NaN or infinite; each raises its own error
(a ``ValueError`` for a bad input, a ``DivergenceError`` during training) around the names found here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

SHOWN_NAMES = 5  # parameters named in a message; the count says how many there are


def nonfinite_parameters(module: nn.Module) -> list[str]:
    """The names of ``module``'s parameters (the gates' values included) holding a NaN or an infinite value."""
    return [name for name, parameter in module.named_parameters() if not parameter.detach().isfinite().all()]


def describe_nonfinite(names: Sequence[str]) -> str:
    """``names`` (from ``nonfinite_parameters``) in words: ``"non-finite (NaN or infinite) values in 2 weight or
    gate tensor(s) (model.lm_head.weight, gates.values)"``, the first ``SHOWN_NAMES`` of them named."""
    shown = ", ".join(names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "")
    return f"non-finite (NaN or infinite) values in {len(names)} weight or gate tensor(s) ({shown})"
