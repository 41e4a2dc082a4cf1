"""Who may write where: one run per output folder, and nothing deleted or overwritten that is not ours.

- `FolderLock(folder)`: an exclusive lock, held for a whole run, on a folder it writes (a converter's output
  and work folder; a training run's release and checkpoint folders). A second run on the same folder
  stops at once with an error naming the folder and the pid of the run that holds it. The lock is the
  file `FOLDER.lock` beside the folder, held with `flock` (the kernel releases it when its process dies,
  however it dies) and holding the owner's pid: a lock file left by a dead process is taken over.
- `MARKER` (`.slimp-output.json`): written into every folder this project publishes (a dataset, a
  release). `--overwrite` only ever removes a folder that holds it.
- `check_apart`: an output that equals, holds or lies inside an input (a dataset, a CSV, an image folder,
  a checkpoint) is refused, so no run writes into, or deletes, its own inputs.
- `disk_error`: a full disk, a read-only or forbidden output as one line naming the path.
- `file_sha256`: the content hash of a file (checkpoint manifests, the converter's input fingerprints).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, read in 1 MiB blocks (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

LOCK_SUFFIX = ".lock"
MARKER = ".slimp-output.json"
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}


class OutputError(RuntimeError):
    """An output this run may not write: in use by another run, holding its inputs, or not ours to replace."""


class FolderInUse(OutputError):
    """Another live run holds the folder's lock."""


def _owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class FolderLock:
    """An exclusive lock on `folder` (which need not exist yet), as a context manager.

    Raises `FolderInUse` naming the folder and the holder's pid when another run holds it: a process that
    holds the `flock`, or a live process of this machine named in the lock file (a lock written without
    `flock`). A lock file whose process is gone is stale and taken over."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder"):
        self.folder = Path(folder).resolve()
        self.path = self.folder.with_name(self.folder.name + LOCK_SUFFIX)
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _in_use(self, owner: dict) -> FolderInUse:
        holder = f"pid {owner.get('pid', '?')}" + (f" on {owner['host']}" if owner.get("host") else "")
        return FolderInUse(f"{self.what} {self.folder} is in use by another run ({holder}: {owner.get('command', '?')}); "
                           f"wait for it to end or choose another folder (if no such run exists, delete {self.path})")

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # retried only when a releasing holder removed the file between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(fd)
                os.close(fd)
                raise self._in_use(owner) from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            owner = _owner(fd)
            pid = owner.get("pid")
            if isinstance(pid, int) and owner.get("host") == socket.gethostname() and _alive(pid):
                os.close(fd)
                raise self._in_use(owner)
            if pid is not None:
                logger.warning("%s: taking over a stale lock of pid %s, which is no longer running", self.folder, pid)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self._fd = fd
            return
        raise FolderInUse(f"{self.what} {self.folder}: could not take its lock {self.path} (it keeps changing)")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)  # removed while still locked, so a waiting run sees a fresh file
        os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def locked(folders: dict[str, str | os.PathLike | None], enabled: bool = True) -> Iterator[None]:
    """Holds a `FolderLock` on each folder of `{what: folder}` (None skipped; the same folder once) for the
    block. `enabled=False` (the other processes of a multi-process run) takes none."""
    with contextlib.ExitStack() as stack:
        if enabled:
            seen = set()
            for what, folder in folders.items():
                if folder is not None and Path(folder).resolve() not in seen:
                    seen.add(Path(folder).resolve())
                    stack.enter_context(FolderLock(folder, what))
        yield


# ----- whose folder is it -----
def write_marker(folder: str | os.PathLike, kind: str) -> None:
    """Marks `folder` as written by this project (`kind`: "dataset" or "release")."""
    (Path(folder) / MARKER).write_text(json.dumps({"written_by": "slimp", "kind": kind}) + "\n")


def marker_kind(folder: str | os.PathLike) -> str | None:
    """The kind of SLIMP output `folder` is (its marker), or None when this project did not write it."""
    try:
        return json.loads((Path(folder) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def is_empty(folder: str | os.PathLike) -> bool:
    """True when `folder` does not exist or is an empty directory."""
    path = Path(folder)
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def check_replaceable(folder: str | os.PathLike, kind: str, option: str) -> None:
    """Raises unless `folder` may be replaced as a whole: it is absent, empty, or a SLIMP `kind` (its marker)."""
    path = Path(folder)
    if is_empty(path) or (path.is_dir() and marker_kind(path) == kind):
        return
    what = "a file" if not path.is_dir() else f"a folder without the {MARKER} marker of a SLIMP {kind}"
    raise OutputError(f"{option} {path} is {what}: it was not written by this project (or by a version before the "
                      "marker), so it is never deleted or replaced, even with --overwrite; choose a new folder, or "
                      "remove it yourself")


def check_writable_release(folder: str | os.PathLike, option: str, ours: tuple[str, ...]) -> None:
    """A release folder is written into, file by file: refuse one that holds files of the names a release
    writes (`ours`) but no SLIMP marker, so a user's own README.md or config.json is never overwritten."""
    path = Path(folder)
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder")
    if marker_kind(path) is not None:
        return
    clash = sorted(p.name for p in path.iterdir() if p.name in ours)
    if clash:
        raise OutputError(f"{option} {path} holds {', '.join(clash)} but no {MARKER}: this project did not write them "
                          "(or a version before the marker did), so they are never overwritten; choose a new or empty "
                          "folder, or remove them yourself")


def relation(a: str | os.PathLike, b: str | os.PathLike) -> str | None:
    """How path `a` lies to path `b`: "is", "is inside", "holds", or None."""
    a, b = Path(a).resolve(), Path(b).resolve()
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "is inside"
    if b.is_relative_to(a):
        return "holds"
    return None


def check_apart(output: str | os.PathLike, option: str, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Raises `OutputError` when `output` is, holds or lies inside one of `inputs` ({description: path})."""
    for description, path in inputs.items():
        if path is None or not str(path):
            continue
        how = relation(output, path)
        if how:
            raise OutputError(f"{option} {output} {how} {description} {path}: an output never shares a folder with "
                              "an input (it would overwrite or delete it, or publish it); choose a separate folder")


def disk_error(error: BaseException) -> str | None:
    """One line for an OSError of a full disk, a read-only or forbidden path (None for any other error)."""
    if not isinstance(error, OSError) or error.errno not in DISK_ERRORS:
        return None
    where = error.filename or "a file"
    hint = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "use a folder this user may write"
    return f"{where}: {DISK_ERRORS[error.errno]}; {hint} and run the same command again (finished work is kept)"


__all__ = ["file_sha256", "OutputError", "FolderInUse", "FolderLock", "locked", "MARKER", "write_marker", "marker_kind", "is_empty",
           "check_replaceable", "check_writable_release", "relation", "check_apart", "disk_error"]
