"""Merging key/value heads: fewer key/value heads for the same query heads, so a smaller key/value cache.

Pruning a query head frees nothing in the cache until its whole group is gone. Merging instead lets several
groups share one key/value head, as grouped-query conversion does (Ainslie et al., 2023, mean-pooled heads): the
``n`` query heads of a merged group read ``sum_k w_k kv_k``, the mean of the original key/value heads they read,
weighted by how many of them read each (``w_k = members from group k / n``). Keys and values are linear in the
projections and the rotary embedding rotates every head alike, so a mix of heads is exactly a key/value head whose
projections are the same mix of the originals: ``compaction.compact`` folds it (``W_kv' = sum_k w_k W_kv[k]``) and
the merged model has ``K'`` key/value heads in equal groups, a uniform layout plain transformers loads.

While training the mix is ``HeadGates.key_value_mix`` ``[L, H, K]`` (see ``gates``), fine-tuned through: the
original projections keep learning and the merged head is their mix at every step.

Notation as in ``families.py``: ``H`` query heads, ``K`` key/value heads, ``G = H // K``, ``K'`` merged heads.
"""

from __future__ import annotations

import torch


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
