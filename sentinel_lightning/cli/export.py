"""``sentinel-lightning export``: a fine-tune-with-pruning checkpoint to a compact model folder."""

from __future__ import annotations

import os
import zipfile
from typing import Any

from rich.console import Console

from sentinel_lightning.callbacks.divergence import nonfinite_parameters
from sentinel_lightning.compaction import compact, count_parameters, weight_bytes
from sentinel_lightning.saving import save_pruned


def load_checkpoint(ckpt_path: str):
    """The ``GatedLanguageModel`` of a checkpoint, refused with an error naming the file when it is empty or
    truncated, or holds non-finite weights or gates (a diverged run: export its best or an earlier checkpoint).
    """
    from sentinel_lightning.module import GatedLanguageModel

    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist.")
    if os.path.getsize(ckpt_path) == 0:
        raise ValueError(f"ckpt_path={ckpt_path!r} is an empty file (0 bytes), not a Lightning checkpoint.")
    if not zipfile.is_zipfile(ckpt_path):  # what torch.save writes; a truncated one has lost its directory
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is not a readable Lightning checkpoint (a torch.save zip archive): it may be "
            "truncated by an interrupted save or copy, or be another kind of file."
        )
    module = GatedLanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu")
    names = nonfinite_parameters(module)
    if names:
        raise ValueError(
            f"ckpt_path={ckpt_path!r} holds non-finite (NaN or infinite) values in {len(names)} weight or gate "
            f"tensor(s) ({', '.join(names[:5])}): the run diverged. Export its best checkpoint or an earlier one."
        )
    return module


def export_checkpoint(ckpt_path: str, output_dir: str) -> dict[str, Any]:
    """Turns a fine-tune-with-pruning checkpoint into a compact model folder that loads and serves on its own.

    The ``GatedLanguageModel`` of the checkpoint is rebuilt, its pruned heads are removed and its gates folded
    into the weights (``compact``), and the result is written with ``save_pruned``, together with the model's
    tokenizer when it can be loaded (models built from a config have none). Prints one line of what it saved.

    Args:
        ckpt_path: Path of a Lightning checkpoint of a ``GatedLanguageModel``.
        output_dir: Folder to write the config, the safetensors weights and the tokenizer into.

    Returns:
        ``{"output_dir", "tokenizer_saved", "heads_before", "heads_after", "parameters_before",
        "parameters_after", "bytes_before", "bytes_after"}``: head and weight counts and the bytes of the weights
        before and after compaction (gates excluded, tied weights once).
    """
    from sentinel_lightning.pretrained import load_tokenizer

    module = load_checkpoint(ckpt_path)
    hparams = module.hparams
    tokenizer = None
    if hparams.get("model") is not None or hparams.get("model_config") is None:
        try:
            tokenizer = load_tokenizer(hparams.get("model"), hparams.get("gguf_file"))
        except Exception as error:  # the model folder may have no tokenizer; the weights are what matters
            Console().print(f"export: no tokenizer saved ({error})", highlight=False, soft_wrap=True)
    compacted = compact(module)
    save_pruned(compacted, output_dir, tokenizer)
    summary = {
        "output_dir": output_dir,
        "tokenizer_saved": tokenizer is not None,
        "heads_before": module.gates.active.numel(),
        "heads_after": module.gates.num_active,
        "parameters_before": count_parameters(module.model),
        "parameters_after": count_parameters(compacted),
        "bytes_before": weight_bytes(module.model),
        "bytes_after": weight_bytes(compacted),
    }
    Console().print(
        f"export: {summary['heads_after']}/{summary['heads_before']} heads kept; parameters "
        f"{summary['parameters_before']:,} -> {summary['parameters_after']:,}; weights {summary['bytes_before']:,} -> "
        f"{summary['bytes_after']:,} bytes; written to {output_dir}",
        highlight=False, soft_wrap=True,
    )
    return summary
