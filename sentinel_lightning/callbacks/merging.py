"""``KeyValueMerging``: merges each layer's key/value heads into fewer before a scheduled epoch (see ``merging``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from sentinel_lightning.gates import HeadGates, find_causal_lm, find_or_attach_gates
from sentinel_lightning.measure.key_value_statistics import KeyValueStatistics, record_key_value_statistics
from sentinel_lightning.merging import fit_merged_layer, merge_groups, merge_mix
from sentinel_lightning.standalone.families import AttentionFamily, family_of

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class KeyValueMerging(L.Callback):
    """Before training epoch ``epoch``, every layer's active query heads come to read ``num_key_value_heads``
    merged key/value heads in equal groups: fitted to what the heads computed on the last training batches
    (``merging.fit_merged_layer``: keys per rotary pair, values by the directions the output uses; the queries and
    output projections of the heads that move are rewritten to read them), or with ``fit=False`` the weighted mean
    of the heads its members read (``merge_mix``). The fit leaves the model far closer to what it was before the
    merge than the mean does (docs/results.md, "Learning rate, fitted key/value merges").

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
        fit: Fit the merged heads (True) or take the weighted mean of the originals (False).
        calibration_batches: How many of the last training batches before the merge (per rank; dicts with
            ``input_ids``) the fit measures; they travel in checkpoints, so a resumed run fits alike. A merge
            before the first epoch measures the first batch.
    """

    def __init__(
        self, num_key_value_heads: int | None = None, epoch: int = 1, fit: bool = True, calibration_batches: int = 4
    ) -> None:
        if num_key_value_heads is not None and (
            not isinstance(num_key_value_heads, int) or isinstance(num_key_value_heads, bool) or num_key_value_heads < 1
        ):
            raise ValueError(f"num_key_value_heads={num_key_value_heads!r} must be a positive integer or None.")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative integer (the epoch before which to merge).")
        if not isinstance(fit, bool):
            raise ValueError(f"fit={fit!r} must be True (fit the merged heads) or False (mean of the originals).")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches!r} must be a positive integer.")
        self.num_key_value_heads = num_key_value_heads
        self.epoch = epoch
        self.fit = fit
        self.calibration_batches = calibration_batches
        self._recent_batches: deque[dict[str, torch.Tensor]] = deque(maxlen=calibration_batches)
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
        if self.fit:
            _check_fittable(family, causal_lm)
        if stage == "fit" and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.epoch:
            rank_zero_warn(
                f"KeyValueMerging(epoch={self.epoch}) will not merge: the run has max_epochs={trainer.max_epochs}."
            )

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._gates is not None and self.fit and trainer.current_epoch == self.epoch - 1:
            self._recent_batches.append(_calibration_batch(batch))

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._gates is None or trainer.current_epoch < self.epoch or bool(self._gates.merged_layers().any()):
            return
        statistics = None
        if self.fit:
            calibration = list(self._recent_batches) or [_calibration_batch(batch)]
            statistics = record_key_value_statistics(pl_module, calibration)
            moments = (statistics.query_power, statistics.key_moments, statistics.value_moments)
            if not all(bool(torch.isfinite(moment).all()) for moment in moments):
                raise ValueError(
                    f"KeyValueMerging(fit=True): the heads' statistics on the calibration batches are not finite at "
                    f"epoch {trainer.current_epoch}; the model has diverged, so no merge is fitted to it."
                )
            self._recent_batches.clear()
        active = self._gates.active.cpu()  # [L, H]
        sizes = {}
        for layer in range(self._gates.num_layers):
            groups = merge_groups(active[layer], self._group_size, self.num_key_value_heads)
            if groups:
                if statistics is None:
                    mix = merge_mix(groups, self._gates.num_heads, self._group_size)
                else:
                    mix = _fit_layer(pl_module, self._gates, layer, statistics, groups, self._group_size)
                self._gates.set_key_value_mix(layer, mix, self._group_size)
                sizes[layer] = [len(group) for group in groups]
        rank_zero_info(
            f"sentinel-lightning: epoch {trainer.current_epoch}, step {trainer.global_step}: merged the key/value "
            f"heads of {len(sizes)} layer(s) into {self.num_key_value_heads} each"
            + (f", fitted on {statistics.tokens} tokens" if statistics is not None else " (means)")
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

    @override
    def state_dict(self) -> dict[str, Any]:
        batches = [{key: value.cpu() for key, value in batch.items()} for batch in self._recent_batches]
        return {"recent_batches": batches}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._recent_batches.clear()
        self._recent_batches.extend(state_dict.get("recent_batches", []))


def _calibration_batch(batch: Any) -> dict[str, torch.Tensor]:
    """The tensors of a training batch, detached, for the fit (which runs the model on ``input_ids``)."""
    if not (isinstance(batch, Mapping) and "input_ids" in batch):
        raise ValueError(
            "KeyValueMerging(fit=True) measures the heads on training batches, which must be dicts with 'input_ids' "
            f"(and optionally 'attention_mask'); got {type(batch).__name__}. Pass fit=False to merge by means."
        )
    return {key: value.detach() for key, value in batch.items() if isinstance(value, torch.Tensor)}


def _check_fittable(family: AttentionFamily, causal_lm: nn.Module) -> None:
    """A fitted merge rewrites plain linear projections whose keys rotate over the whole head (rotate-half pairs)."""
    attention = family.attention_of(family.decoder_layers(causal_lm)[0])
    for name in (*PROJECTIONS, family.output_projection):
        projection = getattr(attention, name)
        if type(projection) is not nn.Linear:
            raise ValueError(
                f"KeyValueMerging(fit=True) rewrites the {name} weights, which are a {type(projection).__name__} "
                "here (LoRA adapters?), not an nn.Linear. Pass fit=False to merge by means."
            )
    rope = getattr(causal_lm.config, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(causal_lm.config, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(
            f"KeyValueMerging(fit=True) fits keys per rotary pair over the whole head; this model rotates a part "
            f"(partial_rotary_factor={partial}). Pass fit=False to merge by means."
        )


def _rows(projection: nn.Linear, num_heads: int, head_dim: int) -> torch.Tensor:
    """``[heads, D, C']`` rows of a projection, its bias as a last column when it has one (float64)."""
    weight = projection.weight.detach().to("cpu", torch.float64, copy=True)
    if projection.bias is not None:
        weight = torch.cat([weight, projection.bias.detach().to("cpu", torch.float64)[:, None]], dim=1)
    return weight.view(num_heads, head_dim, -1)


def _write_rows(projection: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.flatten(0, 1)  # [heads * D, C']
    if projection.bias is not None:
        projection.bias.copy_(rows[:, -1])
        rows = rows[:, :-1]
    projection.weight.copy_(rows)


@torch.no_grad()
def _fit_layer(
    pl_module: L.LightningModule, gates: HeadGates, layer: int, statistics: KeyValueStatistics,
    groups: list[list[int]], group_size: int,
) -> torch.Tensor:
    """Fits ``layer``'s merge in its projections (``fit_merged_layer``) and maps what its linear compensation reads
    (the heads' outputs change basis); returns its ``[H, K]`` mix."""
    causal_lm = find_causal_lm(pl_module)
    family = family_of(causal_lm)
    attention = family.attention_of(family.decoder_layers(causal_lm)[layer])
    num_heads, head_dim = gates.num_heads, gates.head_dim
    num_kv_heads = num_heads // group_size
    query = _rows(attention.q_proj, num_heads, head_dim)
    key = _rows(attention.k_proj, num_kv_heads, head_dim)
    value = _rows(attention.v_proj, num_kv_heads, head_dim)
    output_projection = family.output_projection_of(attention)
    output = output_projection.weight.detach().to("cpu", torch.float64, copy=True).view(-1, num_heads, head_dim)
    mix, value_maps = fit_merged_layer(
        query, key, value, output, gates.effective()[layer].detach().cpu(), statistics.query_power[layer],
        statistics.key_moments[layer], statistics.value_moments[layer], groups, group_size,
    )
    for name, rows in (("q_proj", query), ("k_proj", key), ("v_proj", value)):
        _write_rows(getattr(attention, name), rows.to(attention.q_proj.weight))
    output_projection.weight.copy_(output.flatten(1))  # [C, H * D]
    if gates.reconstruction is not None:
        for head, block in value_maps.items():
            columns = slice(head * head_dim, (head + 1) * head_dim)
            gates.reconstruction[layer, :, :, columns] = gates.reconstruction[layer, :, :, columns] @ block.to(
                gates.reconstruction)
    return mix
