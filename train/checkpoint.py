"""Crash-safe training checkpoints on top of ``Accelerator.save_state`` / ``load_state``.

Layout of ``<run>/checkpoints/``::

    checkpoint_00001000/        complete checkpoints only (renamed into place when finished)
        model/                  the trained weights in the otseg export format (loadable as is)
        optimizer.bin, scheduler.bin, random_states_<rank>.pkl   (Accelerate)
        meta.json               step, micro-batches consumed, run facts; written last
    .tmp-checkpoint_00002000/   a save in progress; never read, removed on the next start

A checkpoint is written into a temporary folder by every process, flushed to disk, then renamed
(atomic on one file system). A SIGKILL at any point leaves either the old set of checkpoints or
the new one, so ``--resume-from latest`` always finds a complete checkpoint. Old checkpoints are
rotated (renamed away first, then deleted) to keep the newest ``keep`` plus the ``keep_steps``
(those a later stage of the protocol starts from).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file

from otseg.errors import UserError
from otseg.weights.hub import WEIGHTS_NAME
from otseg.weights.store import load_weights

PREFIX = "checkpoint_"
META = "meta.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass
class TrainState:
    """Progress of a run; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # batches this process has consumed (step × accumulation steps)
    num_processes: int = 1
    per_device_batch: int = 1
    accumulation_steps: int = 1
    best_score: float | None = None  # best periodic-evaluation hIoU (mIoU when nothing unseen)
    best_step: int | None = None


def checkpoint_dir(folder: Path, step: int) -> Path:
    return folder / f"{PREFIX}{step:08d}"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (a folder without meta.json is skipped)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)]
    found = [p for p in found if (p / META).is_file() and (p / "model" / WEIGHTS_NAME).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(folder: Path) -> Path | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder below ``root`` (a rename is only durable after this)."""
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    """Delete a folder so that no half-deleted folder keeps a checkpoint name."""
    if path.exists():
        doomed = path.with_name(f".deleting-{path.name}")
        os.replace(path, doomed)
        shutil.rmtree(doomed)


class CheckpointManager:
    """Saves, rotates and restores checkpoints of the objects prepared by ``accelerator``."""

    def __init__(
        self,
        accelerator: Accelerator,
        folder: Path,
        keep: int | None = 3,
        keep_steps: tuple[int, ...] = (),
    ) -> None:
        if keep is not None and keep < 1:
            raise UserError("keep must be ≥ 1 (or None to keep all checkpoints)")
        self.accelerator, self.folder, self.keep = accelerator, Path(folder), keep
        self.keep_steps = {checkpoint_dir(self.folder, s).name for s in keep_steps}
        accelerator.register_save_state_pre_hook(self._save_model)
        accelerator.register_load_state_pre_hook(self._load_model)
        if accelerator.is_main_process and self.folder.is_dir():
            for stale in self.folder.glob(".*-" + PREFIX + "*"):  # interrupted saves/deletes
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()

    # Accelerate would save the full state dict, frozen CLIP included (~600 MB for ViT-B/16);
    # the hooks store only the trained weights, in the otseg format.
    def _save_model(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            for model in models:
                self.accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / "model")
        weights.clear()

    def _load_model(self, models: list, input_dir: str) -> None:
        path = Path(input_dir) / "model" / WEIGHTS_NAME
        while models:
            model = self.accelerator.unwrap_model(models.pop())
            load_weights(model, load_file(str(path)), str(path))

    def save(self, state: TrainState) -> Path:
        """Write the checkpoint of ``state.step`` atomically (collective: call on every process)."""
        acc = self.accelerator
        final = checkpoint_dir(self.folder, state.step)
        tmp = final.with_name(f".tmp-{final.name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / META).write_text(json.dumps(asdict(state), indent=2))
            _fsync_tree(tmp)
            _remove(final)  # the same step saved again (e.g. at the end of a resumed run)
            os.replace(tmp, final)
            self.rotate()
        acc.wait_for_everyone()
        return final

    def rotate(self) -> None:
        if self.keep is not None:
            rotating = [
                p for p in complete_checkpoints(self.folder) if p.name not in self.keep_steps
            ]
            for old in rotating[: -self.keep]:
                _remove(old)

    def resolve(self, resume_from: str | None) -> Path | None:
        """``latest`` → the newest complete checkpoint of this run (None: start fresh);
        a path → that checkpoint, which must be complete."""
        if not resume_from:
            return None
        if resume_from == "latest":
            return latest_checkpoint(self.folder)
        path = Path(resume_from)
        if not (path / META).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META})")
        return path

    def load(self, path: Path) -> TrainState:
        """Restore model, optimizer, scheduler, RNG states and the step counters."""
        self.accelerator.load_state(str(path))
        return TrainState(**json.loads((path / META).read_text()))
