"""``StreamingCheckpointIO``: Lightning checkpoints written straight to local disk, still atomically.

Lightning 2.6's ``TorchCheckpointIO`` serialises every checkpoint into an in-memory buffer and then copies the
buffer to the file, so a full fine-tune's checkpoint (weights plus Adam's two moments: 1.6 GB for a 135M model)
is held, grown and copied in memory before it reaches the disk, several times slower than streaming it
(docs/speed.md, "Checkpoint writes"); the job writes one or two per epoch. Lightning's main branch streams local
saves since July 2026 (pull request 21824); until a release carries it, this plugin does the same.

A reader never sees a partial file: the checkpoint is written to a temporary file beside its target and renamed
over it (atomic on POSIX); a failed write leaves the previous file as it was. Remote paths (``s3://``...) go
through Lightning's own path.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override


class StreamingCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that streams local checkpoints to disk (temporary file, then rename) instead of
    buffering them in memory; loading and remote saves are Lightning's own.

    Use it in any Trainer: ``L.Trainer(plugins=[StreamingCheckpointIO()])`` (``sentinel-lightning fit`` does,
    unless ``--trainer.plugins`` names a ``CheckpointIO`` of its own).
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        filesystem, local_path = url_to_fs(str(path))  # "file://..." and plain paths alike, as Lightning reads them
        if storage_options is not None or not isinstance(filesystem, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = local_path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"  # beside the target: the rename stays on one filesystem
        try:
            torch.save(checkpoint, temporary)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
