"""Errors that the CLI turns into one clear line and a non-zero exit.

:func:`describe_expected` words the exceptions that bad input or a bad environment raise from
libraries (a read-only or full disk, a non-UTF-8 file, a corrupt Arrow or safetensors file, an
unreachable bucket, a hostile nesting depth, memory) as one line; anything else is a bug in
kdpipe, and the CLI shows its traceback.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import PurePath
from types import TracebackType

from cache_format.errors import CacheError


class KdpipeError(Exception):
    """A user-facing error: the message names the file, field or flag and says how to fix it."""


class ConfigError(KdpipeError):
    """A configuration value (YAML key or CLI flag) is invalid or inconsistent."""


class DatasetError(KdpipeError):
    """A dataset cannot be loaded or lacks a field the recipe needs."""


class ModelError(KdpipeError):
    """A teacher or student model cannot be loaded or does not fit the cache."""


class TrainingError(KdpipeError):
    """Training stopped (non-finite loss, nothing to resume, a checkpoint that cannot be written, ...)."""


# Packages whose exceptions mean "the remote storage said no" (or did not answer).
_REMOTE_PACKAGES = ("botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "fsspec", "aiohttp", "urllib3",
                    "requests", "huggingface_hub")


def _from_package(exc: BaseException, *packages: str) -> bool:
    """True when ``exc``'s class (or a base class) comes from one of ``packages`` (no import needed)."""
    return any(cls.__module__.split(".")[0].lstrip("_") in packages for cls in type(exc).__mro__)


def file_in_traceback(tb: TracebackType | None, suffix: str = "") -> str | None:
    """The file the innermost frame was working on (a ``Path``, an open text/binary file, or a path string
    ending in ``suffix``), for errors such as ``UnicodeDecodeError`` that do not carry a file name."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name = _file_name(value)
            if name is not None and name.endswith(suffix):
                return name
    return None


def _file_name(value: object) -> str | None:
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
        return str(value.name)  # type: ignore[attr-defined]
    if isinstance(value, str) and 0 < len(value) < 4096 and os.sep in value and os.path.isfile(value):
        return value
    return None


def _os_error(exc: OSError) -> str:
    """One line for an ``OSError``, by errno; names the file when the error carries it."""
    from pipeline.hf_io import first_line  # hf_io imports this module

    path = exc.filename if exc.filename is not None else "a file"
    code = exc.errno
    if code == errno.ENOSPC:
        return (f"disk full: no space left on the device while writing {path}; free space (or choose another "
                "--out) and rerun — a dump resumes where it stopped, train-student continues with --resume")
    if isinstance(exc.filename, str) and os.path.islink(exc.filename) and not os.path.exists(exc.filename):
        return f"{path} is a symbolic link to a missing target; remove the link or point it at an existing path"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or isinstance(exc, PermissionError):
        what = ("the file system is read-only" if code == errno.EROFS else "permission denied" if code is not None
                else first_line(exc))
        return f"cannot write or read {path}: {what}; choose a writable --out (or fix the permissions)"
    if code == errno.ENOTDIR:
        return f"{path}: a part of this path is a file, not a folder; if it is --out, give a folder path"
    if code == errno.ELOOP:
        return f"{path}: too many levels of symbolic links (a symlink loop); point the flag at the real path"
    if code == errno.ENOENT:
        return f"{path} does not exist; check the path"
    if isinstance(exc, ConnectionError | TimeoutError):
        return f"cannot reach the remote storage ({first_line(exc)}); check the URL, endpoint and network"
    if exc.filename is not None:
        return f"{exc.strerror or first_line(exc)}: {path}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def describe_expected(exc: BaseException) -> str | None:
    """One line for an exception that bad input or environment causes; None for anything else (a bug)."""
    from pipeline.hf_io import first_line  # hf_io imports this module

    if isinstance(exc, KdpipeError | CacheError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        where = file_in_traceback(exc.__traceback__) or "an input file"
        return (f"{where} is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset {exc.start}); "
                "convert it to UTF-8 (e.g. iconv -t UTF-8) and rerun")
    if isinstance(exc, RecursionError):
        return ("an input file is nested too deeply to read (a hostile or corrupt manifest, JSON or YAML file); "
                "check the files given to this command, or run `kdpipe cache verify` on a cache")
    if _from_package(exc, "pyarrow"):
        return (f"Arrow could not read the data ({type(exc).__name__}: {first_line(exc)}); if it comes from a "
                "cache, run `kdpipe cache verify` on it and re-copy or re-dump it")
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return (f"out of memory ({type(exc).__name__}: {first_line(exc)}); lower --batch-size, or run "
                "`kdpipe cache verify` if a cache may be corrupt")
    if _from_package(exc, "safetensors"):
        where = file_in_traceback(exc.__traceback__, ".safetensors") or "a .safetensors file"
        return f"{where} is corrupt or truncated ({first_line(exc)}); re-download or re-save that model"
    if _from_package(exc, *_REMOTE_PACKAGES):
        return (f"remote storage error ({type(exc).__name__}: {first_line(exc)}); check the URL, credentials "
                "(access denied?), endpoint and network")
    if isinstance(exc, OSError):
        return _os_error(exc)
    return None
