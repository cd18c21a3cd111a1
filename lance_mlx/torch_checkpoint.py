"""Read PyTorch `.pth` state dicts (zip format) into numpy arrays without torch and without running pickle code."""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .errors import WeightsError, WeightsNotFoundError

__all__ = ["CheckpointError", "UnsafeCheckpointError", "check_torch_checkpoint", "load_torch_checkpoint"]


class CheckpointError(WeightsError):
    """A weight file that cannot be read (missing pieces, truncated, corrupt, unsupported): a `WeightsError`, so the
    command-line scripts report it in one line (exit 2) and a server as its error."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for something other than tensors, storages and dicts."""


# torch.<X>Storage -> numpy dtype of its elements. bfloat16 has no numpy dtype: it is read as raw uint16 and
# widened to float32 (exact: bf16 is the top half of an fp32).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

# Top-level keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")

# The first bytes of a Git LFS pointer file (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md), what a clone
# without `git lfs` leaves in place of a large file.
LFS_POINTER = b"version https://git-lfs"

_FIX = ("save the weights with `torch.save(model.state_dict(), path)` (tensors only) or convert them to "
        ".safetensors, then load that file")


class _StorageType:
    """Stand-in for `torch.<X>Storage` classes: only records the element type."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage's flat element array (bfloat16 kept as uint16 until a tensor is built); `data` is None when only
    the archive's structure is checked (`check_torch_checkpoint`)."""

    def __init__(self, data: Optional[np.ndarray], bf16: bool, numel: int):
        self.data = data
        self.bf16 = bf16
        self.numel = numel


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Tensor view (offset, size, stride in elements) of a storage, as a contiguous numpy array."""
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("tensor rebuilt from something that is not a checkpoint storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and _is_int(storage_offset) and all(_is_int(v) for v in size + stride)):
        raise CheckpointError(f"malformed tensor header: offset={storage_offset!r} size={size!r} stride={stride!r}")
    if storage_offset < 0 or any(v < 0 for v in size + stride):
        raise CheckpointError(f"negative tensor offset/size/stride: {storage_offset}, {size}, {stride}")
    data = storage.data
    numel = int(np.prod(size, dtype=np.int64))
    # as_strided does no bounds checking: refuse any view that would reach past the storage.
    if numel and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        raise CheckpointError(f"tensor view (offset {storage_offset}, size {size}, stride {stride}) "
                              f"reaches past its storage of {storage.numel} elements")
    if data is None:  # structure check only: nothing was read
        return np.empty(0, np.uint8)
    if numel:
        view = np.lib.stride_tricks.as_strided(
            data[storage_offset:], shape=size, strides=[s * data.itemsize for s in stride], writeable=False)
    else:
        view = np.empty(size, data.dtype)
    if storage.bf16:
        return _bf16_to_f32(np.ascontiguousarray(view))
    # A tensor that is its whole storage in order shares its buffer; any other view gets its own copy so that
    # it does not keep a larger shared storage alive.
    if view.size == data.size and view.flags.c_contiguous:
        return data.reshape(size)
    return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    if not isinstance(data, np.ndarray):
        raise UnsafeCheckpointError("parameter rebuilt from something that is not a tensor")
    return data


_ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose only reachable globals are the allow-list above; storages come from the zip archive."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path, big_endian: bool,
                 read_records: bool = True):
        super().__init__(file)
        self._read_records = read_records
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._big_endian = big_endian
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        obj = _ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load global '{module}.{name}' from the pickle: the file is not a plain "
                f"PyTorch state dict, and loading it could run arbitrary code. Fix: {_FIX}.")
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])):
            raise UnsafeCheckpointError(f"{self._path}: unexpected persistent id {pid!r} in the pickle. Fix: {_FIX}.")
        _, stype, key, _location, numel = pid[:5]
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        if not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise UnsafeCheckpointError(f"{self._path}: storage key {key!r} is not a plain record name")
        member = f"{self._prefix}/data/{key}"
        bf16 = stype.dtype == "bfloat16"
        dtype = np.dtype(np.uint16 if bf16 else stype.dtype)
        if self._big_endian:
            dtype = dtype.newbyteorder(">")
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise CheckpointError(f"{self._path}: record '{member}' is missing from the archive; the file is "
                                  "truncated or corrupt. Fix: re-download or re-save it.") from None
        if info.file_size != numel * dtype.itemsize:
            raise CheckpointError(f"{self._path}: record '{member}' holds {info.file_size} bytes, expected "
                                  f"{numel} x {dtype.itemsize}; the file is corrupt. Fix: re-download or re-save it.")
        if not self._read_records:
            storage = self._storages[key] = _Storage(None, bf16, numel)
            return storage
        buf = np.empty(info.file_size, np.uint8)
        with self._archive.open(info) as f:  # reading to the end also checks the record's CRC
            got = f.readinto(memoryview(buf))
            if got != info.file_size or f.read(1):
                raise CheckpointError(f"{self._path}: record '{member}' is short; the file is truncated.")
        data = buf.view(dtype)
        if self._big_endian:
            data = data.astype(dtype.newbyteorder("="))
        storage = _Storage(data, bf16, data.size)
        self._storages[key] = storage
        return storage


def _state_dict(obj, path: Path) -> Dict[str, np.ndarray]:
    if isinstance(obj, dict):
        if obj and all(isinstance(v, np.ndarray) for v in obj.values()) and all(isinstance(k, str) for k in obj):
            return dict(obj)
        for key in _WRAPPER_KEYS:  # {"state_dict": {...}, "epoch": ...}
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, np.ndarray) for v in inner.values()):
                return dict(inner)
    raise CheckpointError(f"{path}: the pickle does not hold a state dict (a mapping of names to tensors). "
                          f"Fix: {_FIX}.")


def check_torch_checkpoint(path) -> None:
    """Check a `.pth` file as `load_torch_checkpoint` would, without reading its tensors: the archive, its pickle
    (allow-listed globals only, nothing called), every record's presence and size. Fast (the pickle is small), so a
    loader that reads the tensors later can refuse a broken file first."""
    _read(path, read_records=False)


def load_torch_checkpoint(path) -> Dict[str, np.ndarray]:
    """Read a zip-format `.pth` state dict into {name: numpy array}.

    Only tensors, storages and (ordered) dicts can be rebuilt; any other pickled global raises
    `UnsafeCheckpointError` before anything is called. bfloat16 tensors come back as float32 (exact).
    A dict nesting the state dict under "state_dict"/"model"/"module"/"model_state_dict" is unwrapped.
    """
    return _read(path, read_records=True)


def _read(path, read_records: bool) -> Dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint not found: {path}. Fix: check the path (or download the file).")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
        if not head:
            raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy. Fix: re-download "
                                  "it.") from e
        if head == LFS_POINTER:
            raise CheckpointError(f"{path} is a Git LFS pointer, not the weights: the repository was cloned without "
                                  "its large files. Fix: run `git lfs pull` in it, or download the file with "
                                  "`hf download`.") from e
        if head[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: this is a legacy (pre-zip) PyTorch file, which is not supported. Fix: re-save it with a "
                "current torch (`torch.save(torch.load(p), p2)`) or convert it to .safetensors.") from e
        raise CheckpointError(f"{path}: not a readable PyTorch zip archive ({e}); the file is truncated or "
                              "corrupt. Fix: re-download or re-save it.") from e
    with archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected one '<name>/data.pkl' record, found {len(pkls)}; this is not a "
                                  "torch.save archive. Fix: re-save it with torch.save.")
        prefix = pkls[0].split("/")[0]
        big_endian = False
        if f"{prefix}/byteorder" in archive.namelist():
            big_endian = archive.read(f"{prefix}/byteorder").strip() == b"big"
        try:
            with archive.open(pkls[0]) as f:
                obj = _RestrictedUnpickler(f, archive, prefix, path, big_endian, read_records).load()
        except CheckpointError as e:
            if str(path) in str(e):
                raise
            e.args = (f"{path}: {e}. Fix: re-download or re-save it.",)  # keeps its type (unsafe or corrupt)
            raise e from None
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError, ValueError, TypeError,
                AttributeError, IndexError, KeyError) as e:
            raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e}). "
                                  "Fix: re-download or re-save it.") from e
    return _state_dict(obj, path)
