"""Linear output compensation: a pruned head writes the best linear prediction of its output from the kept heads.

Output compensation by the mean (FLAP's bias compensation) replaces a pruned head's output by a constant. The
heads of a layer are correlated, so the kept heads' outputs say more: ``linear_compensation`` fits, by ridge
least squares over the positions ``HeadMetrics`` recorded, each pruned head's gated output as an affine function
of the kept heads' gated outputs,

    x_p  ~  c_p + R_p x,        x = [x_1, ..., x_H] the layer's gated head outputs (zero at pruned heads),

the closed form of "Optimal Brain Surgeon"-style structured pruning with a weight update, restricted to the input
of the output projection ``W_o``. The prediction is as cheap to remove as the mean: ``W_o (x + R x + c) =
W_o (I + R) x + W_o c``, so ``compaction.compact`` folds ``W_o R`` into the kept heads' columns and ``W_o c`` into
the bias, and the compacted model computes exactly what the gated one does.

Notation: ``H`` query heads, ``D`` head dim, ``o`` a head's output before its gate, ``x = g * o`` after it.
"""

from __future__ import annotations

import torch

DEFAULT_RIDGE = 1e-2


def linear_compensation(
    mean: torch.Tensor,
    second_moment: torch.Tensor,
    active: torch.Tensor,
    values: torch.Tensor,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine prediction of one layer's pruned heads from its kept heads, in the gated space.

    With ``mu`` and ``S`` the mean and covariance of the outputs ``o`` (``K`` kept, ``P`` pruned channels),
    ``A = S_PK (S_KK + lambda I)^-1`` predicts ``o_P - mu_P`` from ``o_K - mu_K``; ``lambda = ridge *
    mean(diag S_KK)``. A pruned head is to write what it wrote, ``g_p * o_p`` (``g_p`` its gate value before it
    was pruned), from the kept heads' ``x_K = g_K * o_K``.

    Args:
        mean: ``[H, D]``: each head's mean output ``o`` over the recorded positions.
        second_moment: ``[H, D, H * D]``: the mean of ``o o^T`` over the same positions (``o`` flattened to
            ``[H * D]``).
        active: ``[H]`` bool: the heads kept (after the pruning).
        values: ``[H]``: each head's gate value (a pruned head's value before it was pruned).
        ridge: Relative ridge ``lambda`` (>= 0).

    Returns:
        ``constants`` ``[H, D]`` (``c``: zero at kept heads) and ``matrix`` ``[H * D, H * D]`` (``R``: rows of
        kept heads and columns of pruned heads zero), in float64.
    """
    num_heads, head_dim = mean.shape
    mu = mean.double().flatten()  # [H * D]
    covariance = second_moment.double().reshape(num_heads * head_dim, -1) - torch.outer(mu, mu)
    covariance = (covariance + covariance.T) / 2
    channels = active.repeat_interleave(head_dim)  # [H * D]
    gains = values.double().repeat_interleave(head_dim)  # [H * D]
    kept, pruned = channels.nonzero().flatten(), (~channels).nonzero().flatten()
    constants = torch.zeros(num_heads * head_dim, dtype=torch.float64)
    matrix = torch.zeros(num_heads * head_dim, num_heads * head_dim, dtype=torch.float64)
    if len(pruned) == 0:
        return constants.view(num_heads, head_dim), matrix
    if len(kept) == 0:  # nothing to predict from: the mean
        constants[pruned] = gains[pruned] * mu[pruned]
        return constants.view(num_heads, head_dim), matrix
    kept_covariance = covariance[kept][:, kept]  # [k, k]
    strength = ridge * kept_covariance.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    regularised = kept_covariance + strength * torch.eye(len(kept), dtype=torch.float64)
    prediction = torch.linalg.solve(regularised, covariance[kept][:, pruned]).T  # A [p, k]
    constants[pruned] = gains[pruned] * (mu[pruned] - prediction @ mu[kept])
    kept_gains = gains[kept]
    usable = kept_gains.abs() > 1e-6  # a kept head gated at ~0 tells nothing
    scale = torch.where(usable, 1.0 / torch.where(usable, kept_gains, 1.0), 0.0)
    matrix[pruned.unsqueeze(1), kept.unsqueeze(0)] = gains[pruned].unsqueeze(1) * prediction * scale
    return constants.view(num_heads, head_dim), matrix
