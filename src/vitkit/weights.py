"""Reading and writing raw weight files safely: nothing in a file ever runs as code.

safetensors holds only tensors; `.npz` is read with `allow_pickle=False`; PyTorch pickles load
only through `torch.load(weights_only=True)`, which refuses any object that is not plain data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import CheckpointError, first_line

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a flat name -> tensor mapping from .safetensors, .pth/.pt/.bin/.ckpt or .npz.

    PyTorch files that wrap the weights (`{"model": ...}`, `{"state_dict": ...}`) are unwrapped.
    Raises CheckpointError naming the file for anything missing, unreadable or unsafe.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix == ".npz":
        return {k: torch.from_numpy(v.copy()) for k, v in read_npz(path).items()}
    if suffix in PICKLE_SUFFIXES:
        return _read_torch_pickle(path)
    raise CheckpointError(path, f"unknown weights format {suffix!r}; expected .safetensors, .npz, "
                                f"or a PyTorch file ({', '.join(PICKLE_SUFFIXES)})")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, Exception) as error:  # any parse failure of untrusted bytes
        raise CheckpointError(path, f"not a readable safetensors file ({first_line(error)})") from None
    if not state:
        raise CheckpointError(path, "holds no tensors")
    return state


def load_torch_file(path: Path, *, what: str = "PyTorch checkpoint") -> Any:
    """torch.load(weights_only=True) on the CPU: a file whose pickle asks for code is refused,
    and one that cannot be read is "not a readable <what>", each a one-line CheckpointError."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the error below says it
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  refusals, and garbage reaching the unpickler's KeyError, struct.error...
        if refused_by_weights_only(error):
            raise CheckpointError(path, refusal_message(error)) from None
        raise CheckpointError(path, f"not a readable {what} ({_unpickler_fault(error, path)})") from None


def _unpickler_fault(error: BaseException, path: Path) -> str:
    """The cause of a failed torch.load in one line. torch's own first line advises retrying with
    weights_only=False, which would run whatever code the file holds: never repeated here."""
    text = str(error)
    if "Weights only load failed" not in text:
        return first_line(error)
    cause = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    cause = cause[0][:200] if cause and "WeightsUnpickler error:" in text else "the weights-only unpickler stopped"
    # Protocols 2 and 3 load; 4 and 5 stop at their FRAME opcode, as damaged bytes can stop too.
    if "Unsupported operand" in cause and (_pickle_protocol(path) or 0) >= 4:
        cause += ("; pickle protocol 4 or above, which the weights-only unpickler does not read: if you trust "
                  "the file, re-save it as safetensors")
    return cause


def _pickle_protocol(path: Path) -> int | None:
    """The protocol of a torch file's pickle (inside the zip torch.save writes, or the whole file
    in the legacy format); None if the file does not open with a protocol-2+ pickle."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                head = archive.open(name).read(2) if name else b""
        else:
            with open(path, "rb") as handle:
                head = handle.read(2)
    except Exception:  # noqa: BLE001  unreadable in any way (encrypted, odd compression): no protocol to name
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def _read_torch_pickle(path: Path) -> dict[str, Tensor]:
    obj = load_torch_file(path)
    for wrapper in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(path, "does not hold a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(path, f"entries that are not tensors: {bad[:5]}")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an .npz file, never unpickling (allow_pickle=False)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError as error:
        raise CheckpointError(path, f"cannot be read ({error.strerror or error})") from None
    if head != b"PK":
        # np.load takes any file that is neither a zip nor a .npy for a pickle: a text file or a
        # damaged header would be "refused: pickled objects", with numpy's advice to load it unsafely.
        raise CheckpointError(path, "not a .npz archive (a .npz is a zip file, and this one does not start like one)")
    try:
        with np.load(str(path), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise CheckpointError(path, f"refused: the archive holds pickled objects ({first_line(error)})") from None
        raise CheckpointError(path, f"not a readable .npz archive ({first_line(error)})") from None
    except Exception as error:  # noqa: BLE001  any parse failure of untrusted bytes
        raise CheckpointError(path, f"not a readable .npz archive ({first_line(error)})") from None


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path), fsync, then rename onto `path`: a crash leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp (and some writers, safetensors among them) make the file private; give it the usual mode.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refused_by_weights_only(error: BaseException) -> bool:
    """Whether torch.load(weights_only=True) refused the file because its pickle asks for a
    function or class (torch words this "Unsupported global ..." or "unsupported GLOBAL ...")."""
    # Only the refusal itself: torch starts every weights_only failure, a damaged file's too,
    # with "Weights only load failed".
    return "unsupported global" in str(error).lower()


def refusal_message(error: BaseException) -> str:
    """One line for a refused pickle, naming what it asked for; never torch's advice to retry
    with weights_only=False, which would run the file's code."""
    import re

    asked = re.search(r"global:?\s+(?:GLOBAL\s+)?([\w.]+)", str(error), flags=re.IGNORECASE)
    return ("refused: the file holds Python objects beyond plain tensors and loading it could run code"
            + (f" (it asks for {asked.group(1)})" if asked else "")
            + "; convert it to safetensors in a trusted environment")
