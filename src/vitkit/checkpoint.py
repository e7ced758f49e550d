"""Checkpoints of a training run that survive a crash at any instant.

A run directory keeps two checkpoints, each a vitkit model directory (so `load_pretrained(RUN)`
and `vitkit eval RUN` read them):

  RUN/last/   the model being trained + train_state.pt (optimizer, scaler, EMA, RNG, progress)
  RUN/best/   the weights that scored best on the validation split (the EMA's, when enabled)

A checkpoint is written whole into RUN/.<tag>.tmp/, every file fsynced, and only then swapped in
by two renames (RUN/<tag> -> RUN/.<tag>.old, RUN/.<tag>.tmp -> RUN/<tag>). A SIGKILL before the
swap leaves the old checkpoint in place; one between the renames leaves a complete .tmp that
`recover` promotes. A full disk fails while writing .tmp, so the old checkpoint stays.
train_state.pt is read with `torch.load(weights_only=True)`: plain tensors and containers only.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .errors import CheckpointError, VitkitError, first_line
from .model import VisionTransformer
from .pretrained import CONFIG_FILE, WEIGHTS_FILE, save_pretrained
from .weights import _fsync_dir, atomic_write, load_torch_file

STATE_FILE = "train_state.pt"
TAGS = ("last", "best")


class CheckpointSaveError(VitkitError):
    """A checkpoint could not be written (a full disk, say); the previous one is intact."""


def _complete(directory: Path, *, with_state: bool) -> bool:
    files = [CONFIG_FILE, WEIGHTS_FILE] + ([STATE_FILE] if with_state else [])
    return all((directory / name).is_file() for name in files)


def recover(run_dir: str | Path) -> None:
    """Bring a run directory back to a consistent state after a crash: promote a complete
    checkpoint caught between its two renames, and delete half-written leftovers."""
    run_dir = Path(run_dir)
    for tag in TAGS:
        final, tmp, old = run_dir / tag, run_dir / f".{tag}.tmp", run_dir / f".{tag}.old"
        # The swap renames final -> old only after tmp is complete, so a missing final with a
        # present old means tmp is the newest whole checkpoint.
        try:
            if not final.exists() and old.exists() and tmp.exists():
                os.rename(tmp, final)
            elif not final.exists() and old.exists():
                os.rename(old, final)
        except OSError:
            # Several processes of one job recover together: another one got there first (the
            # rename's source is gone, or its target now exists and is not replaced).
            if not final.exists():
                raise
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    _fsync_dir(run_dir)


def save_checkpoint(run_dir: str | Path, *, tag: str, model: VisionTransformer,
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write `model` (a vitkit directory) and optionally `train_state` as RUN/<tag>, atomically.

    model: a plain VisionTransformer whose state_dict holds full tensors (not a DDP/FSDP wrapper).
    Raises CheckpointSaveError when writing fails; the previous RUN/<tag> is then left as it was.
    """
    if tag not in TAGS:
        raise ValueError(f"tag must be one of {TAGS}, got {tag!r}")
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / tag, run_dir / f".{tag}.tmp", run_dir / f".{tag}.old"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        save_pretrained(model, tmp)
        if train_state is not None:
            atomic_write(tmp / STATE_FILE, lambda path: torch.save(train_state, path))
        _fsync_dir(tmp)
    except (OSError, RuntimeError, SafetensorError) as error:
        # torch.save and safetensors report a failed write as RuntimeError / SafetensorError, not OSError.
        reason = write_failure(error, where=run_dir)  # before the partial files go, or the disk looks roomy
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"; the previous checkpoint {final} is kept" if final.exists() else ""
        raise CheckpointSaveError(f"could not save the checkpoint {final}: {reason}{kept}") from None
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_failure(error: BaseException, *, where: str | Path | None = None) -> str:
    """Why a write failed, in a few words (`where`: a path on the disk written to)."""
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
        return "the disk is full"
    if where is not None and "unexpected pos" in text and _nearly_full(where):
        return "the disk is full"  # torch.save's zip writer words a short write so
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return first_line(error)


def _nearly_full(path: str | Path) -> bool:
    try:
        return shutil.disk_usage(Path(path)).free < 64 * 2 ** 20
    except OSError:
        return False


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG streams a resumed run must continue: the CPU's, and `device`'s if a GPU."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set the streams `rng_state` saved. MAE checkpoints written before it shared this pair
    call the CPU's stream "cpu" and may hold "cuda": None."""
    torch.set_rng_state(state["torch"] if "torch" in state else state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_train_state(run_dir: str | Path) -> dict[str, Any]:
    """Read RUN/last/train_state.pt safely (weights_only); CheckpointError names what is wrong."""
    run_dir = Path(run_dir)
    recover(run_dir)
    last = run_dir / "last"
    if not _complete(last, with_state=True):
        raise CheckpointError(last, f"no complete checkpoint to resume from (needs {CONFIG_FILE}, "
                                    f"{WEIGHTS_FILE} and {STATE_FILE})")
    path = last / STATE_FILE
    state = load_torch_file(path, what="training state")
    if not isinstance(state, dict) or "progress" not in state:
        raise CheckpointError(path, "not a vitkit training state (no 'progress' entry)")
    return state


__all__ = ["save_checkpoint", "load_train_state", "recover", "CheckpointSaveError", "STATE_FILE"]
