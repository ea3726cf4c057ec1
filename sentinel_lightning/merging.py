"""Merging key/value heads: fewer key/value heads for the same query heads, so a smaller key/value cache.

Pruning a query head frees nothing in the cache until its whole group is gone. Merging instead lets several
groups share one key/value head, as grouped-query conversion does (Ainslie et al., 2023, mean-pooled heads): the
``n`` query heads of a merged group read ``sum_k w_k kv_k``, the mean of the original key/value heads they read,
weighted by how many of them read each (``w_k = members from group k / n``). Keys and values are linear in the
projections and the rotary embedding rotates every head alike, so a mix of heads is exactly a key/value head whose
projections are the same mix of the originals: ``compaction.compact`` folds it (``W_kv' = sum_k w_k W_kv[k]``) and
the merged model has ``K'`` key/value heads in equal groups, a uniform layout plain transformers loads.

A mean serves no query head well: a query head was trained against its own keys, not an average. The fitted merge
(``fit_merged_layer``) instead keeps one key/value head per merged group, its anchor's, rewritten as the best single
head for everybody who reads it (keys per rotary pair, values by the directions the output projection uses), and
rewrites the queries and output columns of the heads that move to it so that they read it as they read their own;
where heads were redundant it is exact. Its mix is one-hot: every query head reads one of the layer's key/value
heads.

While training the mix is ``HeadGates.key_value_mix`` ``[L, H, K]`` (see ``gates``), fine-tuned through: the
original projections keep learning and the merged head is their mix at every step.

Notation as in ``families.py``: ``H`` query heads, ``K`` key/value heads, ``G = H // K``, ``K'`` merged heads.
"""

from __future__ import annotations

import torch
from torch import nn


def merge_groups(active: torch.Tensor, group_size: int, num_merged: int) -> list[list[int]]:
    """The query heads of each merged key/value head of one layer: ``num_merged`` groups of its active heads, equal
    when their number allows (else sizes differing by one, the larger first: a layout that needs query slots).

    The ``num_merged`` original groups with the most active heads (the lower index on ties) each anchor a merged
    group and keep their heads in it; the heads of the other groups fill the anchors' free places, the anchor with
    the most free places first, so that as few query heads as possible read another key/value head than before.

    Args:
        active: Bool ``[H]``: the layer's active query heads.
        group_size: ``G``.
        num_merged: ``K'``, the key/value heads the layer keeps.
        layer: The layer's index, for the error message.

    Returns:
        ``K'`` lists of query heads (ascending), ordered by their anchor's original group; none without active heads.

    Raises:
        ValueError: When ``K'`` is out of range.
    """
    num_heads = active.numel()
    num_kv_heads = num_heads // group_size
    heads = active.nonzero().flatten().tolist()
    if not 1 <= num_merged <= num_kv_heads:
        raise ValueError(f"num_key_value_heads={num_merged} must lie in [1, {num_kv_heads}] (the model's K).")
    if not heads:
        return []
    members = [[head for head in heads if head // group_size == group] for group in range(num_kv_heads)]
    ranked = sorted(range(num_kv_heads), key=lambda group: -len(members[group]))[:num_merged]
    larger = len(heads) % num_merged  # this many merged groups take one head more
    size = {anchor: len(heads) // num_merged + (rank < larger) for rank, anchor in enumerate(ranked)}
    anchors = sorted(ranked)
    merged = {anchor: members[anchor][: size[anchor]] for anchor in anchors}
    pool = [head for group in range(num_kv_heads) for head in members[group] if head not in merged.get(group, ())]
    for head in pool:
        anchor = max(anchors, key=lambda group: (size[group] - len(merged[group]), -group))
        merged[anchor].append(head)
    return [sorted(merged[anchor]) for anchor in anchors if merged[anchor]]


def merge_mix(groups: list[list[int]], num_heads: int, group_size: int) -> torch.Tensor:
    """The ``[H, K]`` mix of one layer: each query head of a merged group reads its members' weighted mean.

    Heads in no group (pruned ones) keep reading their own key/value head.
    """
    num_kv_heads = num_heads // group_size
    mix = torch.nn.functional.one_hot(torch.arange(num_heads) // group_size, num_kv_heads).double()  # [H, K]
    for group in groups:
        origins = torch.tensor(group) // group_size
        row = torch.bincount(origins, minlength=num_kv_heads).double() / len(group)  # [K]
        mix[group] = row
    return mix


def merged_layout(mix: torch.Tensor, kept: list[int]) -> tuple[list[int], list[int], torch.Tensor]:
    """The merged key/value heads a layer's kept query heads read, from its mix (what ``compact`` builds).

    Args:
        mix: ``[H, K]``: the layer's ``HeadGates.key_value_mix``.
        kept: The layer's kept query heads, ascending.

    Returns:
        ``(order, kv_index, rows)``: the kept heads ordered by the merged head they read (then by index); which
        merged head each reads (ascending); and the merged heads' mixes ``[K', K]``, in order of their first
        reader.
    """
    rows: list[torch.Tensor] = []
    reads = {}
    for head in kept:
        row = mix[head]
        match = next((index for index, seen in enumerate(rows) if torch.equal(seen, row)), None)
        if match is None:
            rows.append(row)
            match = len(rows) - 1
        reads[head] = match
    order = sorted(kept, key=lambda head: (reads[head], head))
    return order, [reads[head] for head in order], torch.stack(rows) if rows else mix.new_zeros(0, mix.shape[1])


def reads_own_groups(mix: torch.Tensor, kept: list[int], group_size: int) -> bool:
    """Whether every kept query head of a layer reads exactly its own key/value head (no merge to fold)."""
    own = torch.nn.functional.one_hot(torch.arange(mix.shape[0]) // group_size, mix.shape[1]).to(mix)
    return all(torch.equal(mix[head], own[head]) for head in kept)


def anchor_of(group: list[int], group_size: int) -> int:
    """The key/value head a merged group keeps (``merge_groups``' anchor): the one most of its heads read, the lower
    index on ties."""
    origins = [head // group_size for head in group]
    return max(sorted(set(origins)), key=origins.count)


def _root(matrix: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The symmetric square root (or its inverse) of a positive semi-definite ``[n, n]`` matrix, with eigenvalues
    below ``1e-10`` of the largest raised to it."""
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    eigenvalues = eigenvalues.clamp_min(1e-10 * float(eigenvalues.max().clamp_min(1e-300)))
    return vectors @ torch.diag(eigenvalues.rsqrt() if inverse else eigenvalues.sqrt()) @ vectors.T


@torch.no_grad()
def fit_merged_layer(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    head_scales: torch.Tensor,
    query_power: torch.Tensor,
    key_moments: torch.Tensor,
    value_moments: torch.Tensor,
    groups: list[list[int]],
    group_size: int,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Fits the merged key/value heads of one layer to what its heads computed, in place: a merged head is not a mean
    of the originals but the best one head for the queries that read it, and those queries and their output
    projections are changed so that they read it as they read their own (grouped-query conversion, fitted).

    Each merged group keeps its anchor's key/value head (``anchor_of``), rewritten; its query heads come to read it.

    - Keys, per rotary pair ``j``: the group's original keys ``z_g`` (complex, ``key_statistics.as_pairs``) are
      replaced by one key ``s``, their principal direction weighted by the power of the queries reading each
      (``w_g = sum E|q_hj|^2``), and ``z_g ~ c_g s`` by regression. A query head that read ``z_g`` then reads ``s``
      through ``conj(c_g) q``, exact wherever the fit is, because a complex scale commutes with the rotary
      embedding. ``s`` is scaled so that the anchor's ``c`` is 1 (its own queries stay), or where the anchor weighs
      too little in ``s`` for that to keep the weights' scale, to the anchor's key power.
    - Values: the group's original values (``D`` each) are replaced by the ``D`` directions that keep the most of
      what the output projection makes of them (PCA of the values weighted by ``sqrt(W_o^T W_o)`` of their readers);
      a query head that read ``v_g ~ B_g v'`` (regression) gets the output columns ``W_o B_g``; the anchor's ``B``
      is the identity where that is well conditioned. Regressions, not inverses, so no weight grows: fine-tuning
      goes on from weights of the scale it trained.

    A group whose heads all read one key/value head already is left as it is.

    Args:
        query: ``[H, D, C']`` query projection rows (``C'``: the width, plus 1 with the bias as a last column).
        key: ``[K, D, C']``; value: ``[K, D, C']``; output: ``[C, H, D]`` output projection columns.
        head_scales: ``[H]``: what scales each head's output before the output projection (its gate).
        query_power: ``[H, D/2]``; key_moments: ``[D/2, K, K]`` complex; value_moments: ``[K * D, K * D]``
            (``KeyValueStatistics`` of the layer).
        groups: The merged groups of query heads (``merge_groups``).
        group_size: ``G`` of the model.

    Returns:
        ``(mix, value_maps)``: the layer's ``[H, K]`` one-hot mix (each merged head's readers read its anchor;
        other heads their own), and for every query head whose values changed the ``[D, D]`` map ``B``: its old
        output (the output projection's input) is about ``B @`` its new one, which its output columns now apply.
    """
    num_heads, head_dim = query.shape[:2]
    num_kv_heads = key.shape[0]
    dtype = query.dtype
    mix = nn.functional.one_hot(torch.arange(num_heads) // group_size, num_kv_heads).double()  # [H, K]
    value_maps: dict[int, torch.Tensor] = {}
    tiny = torch.finfo(torch.float64).tiny
    for group in groups:
        anchor = anchor_of(group, group_size)
        mix[group] = nn.functional.one_hot(torch.tensor(anchor), num_kv_heads).double()
        origins = sorted({head // group_size for head in group})
        if len(origins) == 1:
            continue
        readers = {origin: [head for head in group if head // group_size == origin] for origin in origins}
        at = origins.index(anchor)
        # keys, per rotary pair: the shared key is the weighted principal direction, each origin its regression on it
        weight = torch.stack([query_power[readers[origin]].sum(0) for origin in origins]).double()  # [n, P]
        root = (weight + 1e-12 * weight.max().clamp_min(tiny)).sqrt()
        moments = key_moments[:, origins][:, :, origins]  # [P, n, n]: E[z_g conj(z_g')]
        _, vectors = torch.linalg.eigh(moments * (root.T[:, :, None] * root.T[:, None, :]))
        mixing = vectors[..., -1].conj() * root.T  # [P, n]: s = sum_g mixing_g z_g
        power = torch.einsum("jg,jgh,jh->j", mixing, moments, mixing.conj()).real.clamp_min(tiny)  # E|s|^2
        scale = torch.einsum("jgh,jh->jg", moments, mixing.conj()) / power[:, None]  # [P, n]: z_g ~ scale_g s
        # s is rescaled to the anchor's key (its queries stay) where the anchor weighs in enough for that to be tame
        anchor_scale = scale[:, at]
        same_power = (moments[:, at, at].real.clamp_min(tiny) / power).sqrt()  # else E|s|^2 = E|z_anchor|^2
        anchor_scale = torch.where(anchor_scale.abs() >= 0.1 * scale.abs().amax(1), anchor_scale, same_power)
        mixing, scale = mixing * anchor_scale[:, None], scale / anchor_scale[:, None]
        rows = as_complex_rows(key.double())  # [K, P, C']
        key[anchor] = as_real_rows((mixing.T[:, :, None] * rows[origins]).sum(0)).to(dtype)
        for origin, coefficient in zip(origins, scale.conj().T):  # [P] each: q . z_g ~ (conj(scale_g) q) . s
            for head in readers[origin]:
                query[head] = as_real_rows(as_complex_rows(query[head].double()) * coefficient[:, None]).to(dtype)
        # values: the D directions that keep the most of what the output makes of them, each origin's regression
        output64 = output.double() * head_scales.double()[None, :, None]  # [C, H, D]: what each head's output meets
        reach = {origin: sum(output64[:, head].T @ output64[:, head] for head in readers[origin]) for origin in origins}
        whitening = torch.block_diag(*[_root(reach[origin]) for origin in origins])  # [n D, n D]
        index = torch.cat([torch.arange(origin * head_dim, (origin + 1) * head_dim) for origin in origins])
        joint = value_moments[index][:, index].double()  # [n D, n D]: E[y y^T], y the origins' values stacked
        _, vectors = torch.linalg.eigh(whitening @ joint @ whitening.T)
        # v' = projection @ y: orthonormal functionals spanning the chosen directions (no direction comes out tiny)
        projection = torch.linalg.qr((vectors[:, -head_dim:].T @ whitening).T).Q.T  # [D, n D]
        shared = projection @ joint @ projection.T  # E[v' v'^T]
        ridge = 1e-4 * shared.diagonal().mean().clamp_min(tiny) * torch.eye(head_dim, dtype=shared.dtype)
        maps = torch.linalg.solve(shared + ridge, projection @ joint).T.split(head_dim)  # v_g ~ maps_g @ v'
        if torch.linalg.cond(maps[at]) < 10:  # well conditioned: v' becomes the anchor's values, its map the identity
            projection, maps = maps[at] @ projection, [block @ torch.linalg.inv(maps[at]) for block in maps]
        value[anchor] = (projection @ torch.cat([value[origin].double() for origin in origins])).to(dtype)
        for origin, block in zip(origins, maps):
            for head in readers[origin]:
                value_maps[head] = block
                output[:, head] = (output[:, head].double() @ block).to(dtype)
    return mix, value_maps


def as_complex_rows(rows: torch.Tensor) -> torch.Tensor:
    """``[..., D, C']`` projection rows -> ``[..., D/2, C']`` complex: row pairs ``(j, j + D/2)``."""
    half = rows.shape[-2] // 2
    return torch.complex(rows[..., :half, :], rows[..., half:, :])


def as_real_rows(rows: torch.Tensor) -> torch.Tensor:
    """The inverse of ``as_complex_rows``."""
    return torch.cat([rows.real, rows.imag], dim=-2)
