"""AtomicCheckpointIO: checkpoints written to a temporary file beside the target, fsynced, then renamed into place;
read back (resume) without unpickling code."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.plugins.io import TorchCheckpointIO

from esq_lightning.artifacts.checkpoint import safe_torch_load
from esq_lightning.atomic import atomic_torch_save

# Why not Lightning's own writer: TorchCheckpointIO saves through an fsspec transaction, which on a
# local disk writes the bytes to a temporary file in the *system* temp folder and then
# shutil.move()s it to the target. When /tmp is another filesystem than the run directory (a tmpfs,
# a container overlay, a network home), that move is a copy, and a kill -9 or a full disk in the
# middle leaves a truncated last.ckpt where the good one was. Nothing is fsynced either, so after a
# power loss the rename may reach the disk before the data. Here the temporary file lives next to
# the target (same filesystem, so os.replace is an atomic rename), its data is fsynced before the
# rename and the folder after it: a reader sees the old checkpoint or the new one, never a mix.


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with an atomic, durable write for local paths.

    Remote URLs (s3://, gs://, ...) keep Lightning's fsspec path: object stores publish an object
    only once its upload completes, which is atomic already.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for local paths")
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's resume read (Trainer.fit(ckpt_path=...)), safe like every other checkpoint read.

        weights_only=True with the project's allowlist unless trust_checkpoint=true
        (checkpoint.safe_torch_load); a file that needs anything else stops with one line naming it.
        """
        from lightning_fabric.utilities.cloud_io import get_filesystem

        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        opener = None if "://" not in str(path) or str(path).startswith("file://") else (lambda: fs.open(path, "rb"))
        local = str(path).removeprefix("file://")
        return safe_torch_load(local if opener is None else path, map_location=map_location, opener=opener)
