"""Putting a finished output under its final name without ever replacing what the run may not replace.

`os.replace` replaces whatever sits at the destination, so a file saved there by someone else while a run was
working would be lost. These use the system's no-replace and exchange renames (Linux `renameat2`, macOS
`renamex_np`), and where a system or file system lacks them, fallbacks that stay race-free: a hard link (fails when
the name is taken) for files, a `mkdir` claim for folders.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

_AT_FDCWD = -100  # <fcntl.h>: paths relative to the current folder
if sys.platform.startswith("linux"):
    _NOREPLACE, _EXCHANGE = 1, 2  # <linux/fs.h> RENAME_NOREPLACE, RENAME_EXCHANGE
elif sys.platform == "darwin":
    _NOREPLACE, _EXCHANGE = 4, 2  # <stdio.h> RENAME_EXCL, RENAME_SWAP
else:
    _NOREPLACE = _EXCHANGE = 0
# errors meaning "this system or file system has no such rename": use the fallback
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def _rename_function():
    """(function, takes folder fds) of the flagged rename this system offers, or (None, False)."""
    if not _NOREPLACE:
        return None, False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None, False
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return fn, True
    fn = getattr(libc, "renamex_np", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return fn, False
    return None, False


_RENAME, _AT = _rename_function()


def _flagged_rename(src, dst, flags: int) -> bool:
    """Rename with `flags`: True when done, False when unsupported here; OSError (e.g. FileExistsError) else."""
    if _RENAME is None:
        return False
    a, b = os.fsencode(src), os.fsencode(dst)
    ctypes.set_errno(0)
    result = _RENAME(_AT_FDCWD, a, _AT_FDCWD, b, flags) if _AT else _RENAME(a, b, flags)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), os.fsdecode(dst))


def rename_noreplace(src, dst) -> None:
    """Move the file or folder `src` to `dst`; FileExistsError, with nothing changed, when `dst` exists."""
    if _flagged_rename(src, dst, _NOREPLACE):
        return
    if os.name == "nt":  # Windows' rename never replaces an existing name
        os.rename(src, dst)
        return
    if os.path.isdir(src) and not os.path.islink(src):
        os.mkdir(dst)  # the claim: fails when the name is taken
        try:
            os.rename(src, dst)  # onto the empty folder just made; fails if anything was put into it since
        except OSError as e:
            with contextlib.suppress(OSError):
                os.rmdir(dst)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(errno.EEXIST, "taken while being claimed", os.fsdecode(dst)) from None
            raise
        return
    try:
        os.link(src, dst)  # fails when the name is taken
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system (FAT, some network shares): claim the name, then move
        os.close(os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.replace(src, dst)  # onto the empty file just claimed
        return
    os.unlink(src)


def exchange(a, b) -> bool:
    """Swap the files or folders `a` and `b` in one step (both names stay present throughout); False where the
    system or file system cannot."""
    return _flagged_rename(a, b, _EXCHANGE)


def free_path(path) -> Path:
    """The first of `path`, `stem-1.ext`, `stem-2.ext`, ... that does not exist."""
    path = Path(path)
    n = 1
    cand = path
    while cand.exists() or cand.is_symlink():
        cand = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return cand


def _claim(src: Path, dest: Path) -> bool:
    """Move `src` to `dest` unless the name is taken (False)."""
    try:
        rename_noreplace(src, dest)
        return True
    except FileExistsError:
        return False


def _to_free_name(src: Path, dest: Path) -> Path:
    """Move `src` to the first free name beside `dest` (`free_path`), claimed without replacing: another writer
    may race for it too."""
    while True:
        saved = free_path(dest)
        if _claim(src, saved):
            return saved


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


Replaceable = Callable[[Path, Path], bool]  # (path, the name whose suffix tells its format) -> may it be replaced


def publish(tmp, dest, replaceable: Optional[Replaceable] = None) -> Optional[Path]:
    """Move the finished file or folder `tmp` to `dest`; None when done. A missing `dest` is created by a rename
    that fails if the name was taken meanwhile; an existing one is replaced only if `replaceable` says so at the
    moment of the swap (`_swap`). Otherwise `tmp` goes to a free name beside `dest`, which is returned."""
    tmp, dest = Path(tmp), Path(dest)
    if not (dest.exists() or dest.is_symlink()) and _claim(tmp, dest):
        return None
    if replaceable is not None and _swap(tmp, dest, replaceable):
        return None
    return _to_free_name(tmp, dest)


def _swap(tmp: Path, dest: Path, replaceable: Replaceable) -> bool:
    """Replace `dest` by `tmp` if `replaceable(dest)`; False (nothing changed) when it is not.

    Where the system can exchange two names in one step, `dest` always holds the old or the new output: the two
    are swapped, and what came out of `dest` is checked again under the temporary name, where nothing else
    writes; if it may not be replaced after all (saved over in the instant between check and swap), it is
    swapped back. Elsewhere the old one is moved into a private folder, checked there, and `tmp` renamed in
    place without replacing."""
    if not replaceable(dest, dest):
        return False
    try:
        swapped = exchange(tmp, dest)
    except FileNotFoundError:  # removed meanwhile: nothing to replace
        return _claim(tmp, dest)
    if swapped:
        try:
            ok = replaceable(tmp, dest)
        except BaseException:
            exchange(tmp, dest)
            raise
        if not ok:
            exchange(tmp, dest)
            return False
        remove(tmp)
        return True
    aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent)) / dest.name
    try:
        os.rename(dest, aside)
    except FileNotFoundError:  # removed meanwhile: nothing to replace
        aside.parent.rmdir()
        return _claim(tmp, dest)
    if not replaceable(aside, dest):  # someone else's after all: back where it was (or beside, if taken again)
        if not _claim(aside, dest):
            _to_free_name(aside, dest)
        aside.parent.rmdir()
        return False
    try:
        return _claim(tmp, dest)  # False: the name was taken again meanwhile; the old output is dropped
    except BaseException:
        _claim(aside, dest)
        raise
    finally:
        shutil.rmtree(aside.parent, ignore_errors=True)
