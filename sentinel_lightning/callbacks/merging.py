"""``KeyValueMerging``: merges each layer's key/value heads into fewer before a scheduled epoch (see ``merging``)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from sentinel_lightning.gates import HeadGates, find_causal_lm, find_or_attach_gates
from sentinel_lightning.merging import merge_groups, merge_mix
from sentinel_lightning.standalone.families import family_of


class KeyValueMerging(L.Callback):
    """Before training epoch ``epoch``, every layer's active query heads come to read ``num_key_value_heads``
    merged key/value heads in equal groups, each the weighted mean of the heads its members read (``merging``).

    The fine-tuning that follows recovers from the merge; ``compaction.compact`` then keeps ``num_key_value_heads``
    key/value heads per layer, so the key/value cache shrinks by ``num_key_value_heads / K`` while the query heads
    stay. Prune first so that every layer's active heads split into equal groups (``HeadPruning(scope="layer")``
    to a multiple of ``num_key_value_heads`` heads per layer): the layout is then uniform and plain transformers
    loads the export; otherwise the groups differ by one head (warned) and the export needs its modeling code.
    Layers with no active head are left as they are. A pruned head of a merged layer cannot be reactivated
    afterwards (``HeadReactivation`` skips it). Every rank merges alike: the plan depends only on the
    gates, which ranks share. The merge lives in the gates (``HeadGates.key_value_mix``), so checkpoints carry it
    and a resumed run does not merge again.

    Args:
        num_key_value_heads: ``K'``, key/value heads per layer after the merge, in ``[1, K)``; None merges nothing
            (so that the command line can switch it off).
        epoch: The training epoch before which to merge (0: before training).
    """

    def __init__(self, num_key_value_heads: int | None = None, epoch: int = 1) -> None:
        if num_key_value_heads is not None and (
            not isinstance(num_key_value_heads, int) or isinstance(num_key_value_heads, bool) or num_key_value_heads < 1
        ):
            raise ValueError(f"num_key_value_heads={num_key_value_heads!r} must be a positive integer or None.")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative integer (the epoch before which to merge).")
        self.num_key_value_heads = num_key_value_heads
        self.epoch = epoch
        self._gates: HeadGates | None = None
        self._group_size = 1

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.num_key_value_heads is None:
            return
        if isinstance(trainer.strategy, ModelParallelStrategy):
            raise ValueError(
                f"KeyValueMerging(num_key_value_heads={self.num_key_value_heads}) does not run under "
                "ModelParallelStrategy (FSDP2): it rewrites the key/value projections, which FSDP shards. Merge in "
                "a single-process or DDP run."
            )
        self._gates = find_or_attach_gates(pl_module)
        causal_lm = find_causal_lm(pl_module)
        family = family_of(causal_lm)
        num_kv_heads = family.num_key_value_heads(causal_lm.config)
        if not family.merges_key_values:
            raise ValueError(
                f"KeyValueMerging: model_type={causal_lm.config.model_type!r} cannot merge key/value heads; the "
                "families that can: those with separate key and value projections and nothing per head after them "
                "but the rotary embedding (Llama, Mistral, Qwen2)."
            )
        if self.num_key_value_heads >= num_kv_heads:
            raise ValueError(
                f"KeyValueMerging(num_key_value_heads={self.num_key_value_heads}): the model has {num_kv_heads} "
                f"key/value heads per layer; merging needs fewer, in [1, {num_kv_heads - 1}]."
            )
        self._group_size = family.group_size(causal_lm.config)
        if stage == "fit" and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.epoch:
            rank_zero_warn(
                f"KeyValueMerging(epoch={self.epoch}) will not merge: the run has max_epochs={trainer.max_epochs}."
            )

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._gates is None or trainer.current_epoch < self.epoch or bool(self._gates.merged_layers().any()):
            return
        active = self._gates.active.cpu()  # [L, H]
        sizes = {}
        for layer in range(self._gates.num_layers):
            groups = merge_groups(active[layer], self._group_size, self.num_key_value_heads)
            if groups:
                mix = merge_mix(groups, self._gates.num_heads, self._group_size)
                self._gates.set_key_value_mix(layer, mix, self._group_size)
                sizes[layer] = [len(group) for group in groups]
        rank_zero_info(
            f"sentinel-lightning: epoch {trainer.current_epoch}, step {trainer.global_step}: merged the key/value "
            f"heads of {len(sizes)} layer(s) into {self.num_key_value_heads} each"
        )
        unequal = {layer: counts for layer, counts in sizes.items() if len(set(counts)) > 1}
        if unequal:
            rank_zero_warn(
                f"KeyValueMerging: the active query heads of {len(unequal)} layer(s) do not split into "
                f"{self.num_key_value_heads} equal groups (query heads per merged key/value head: {unequal}); they "
                "run in query slots, and the export loads with trust_remote_code=True only. For a uniform layout "
                f"prune to a multiple of {self.num_key_value_heads} heads in every layer first (HeadPruning(scope="
                "'layer'))."
            )
