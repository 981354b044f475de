"""Writing files and folders so that nothing half-written ever looks finished, and no planted link is followed.

- ``create_exclusive``: open a new file for writing that did not exist before (never through a symlink).
- ``FolderLock``: one writer per output folder, by exclusive creation of a lock file.
- ``atomic_folder`` / ``atomic_file``: build a folder (file) under a temporary sibling name and rename it into
  place when complete; ``check_target`` refuses what ``atomic_folder`` would, before any slow work.
- ``write_error``: an ``OSError`` while writing (disk full, read-only, no permission) as one clear line;
  ``atomic_output``: ``atomic_folder`` with its write errors so reported, for every command that writes a folder.

The standard library has the pieces (``os.open`` flags, ``os.replace``) but no such helpers; ``tempfile`` names
are random and live elsewhere, while these sit beside their target so the final rename never crosses filesystems.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from azgpt.errors import AzGPTError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, where symlinks need privileges anyway
_EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0)
FILE_MODE = 0o666  # before the umask, as open() does: every file of one output gets the same mode


def create_exclusive(path: Path, replace_leftover: bool = False) -> BinaryIO:
    """A new file at ``path`` open for binary writing; fails if anything, a symlink included, is already there.

    ``replace_leftover`` first unlinks whatever sits at ``path`` (a leftover of a killed run, or a planted link:
    unlinking a link never touches its target); only safe while the caller holds the folder's lock.
    """
    if replace_leftover:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    try:
        fd = os.open(path, _EXCLUSIVE, FILE_MODE)
    except FileExistsError:
        raise AzGPTError(f"{path} appeared while azgpt was about to create it (another process, or a planted "
                         f"link): refusing to write through it; check who else writes into {path.parent}") from None
    return os.fdopen(fd, "wb")


def write_text_exclusive(path: Path, text: str, replace_leftover: bool = False) -> None:
    """``create_exclusive`` + write ``text`` as UTF-8 + fsync."""
    with create_exclusive(path, replace_leftover) as handle:
        handle.write(text.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class FolderLock:
    """Exclusive right to write into ``folder`` for the duration of a ``with`` block.

    The lock is a file created with ``O_CREAT | O_EXCL`` holding ``host pid``; a second writer fails at once
    with a message naming the holder. A lock left by a dead process on this host is taken over.
    """

    def __init__(self, folder: Path, what: str = "azgpt", name: str = ".azgpt.lock") -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self._held = False

    def __enter__(self) -> FolderLock:
        for _ in range(2):
            try:
                with create_exclusive(self.path) as handle:
                    handle.write(f"{socket.gethostname()} {os.getpid()}\n".encode())
                self._held = True
                return self
            except AzGPTError:
                if not self._take_over_stale():
                    raise AzGPTError(f"another {self.what} is writing into {self.folder} (lock file {self.path}: "
                                     f"{self._holder() or 'unknown holder'}): wait for it to finish, or delete the "
                                     f"lock file if no such process runs") from None
        raise AzGPTError(f"could not lock {self.folder}: {self.path} keeps reappearing")

    def _holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""

    def _take_over_stale(self) -> bool:
        if self.path.is_symlink():
            self.path.unlink()  # never ours: a planted link
            return True
        host, _, pid = self._holder().partition(" ")
        if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            self.path.unlink(missing_ok=True)
            return True
        return False

    def __exit__(self, *exc_info: object) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


@contextmanager
def atomic_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends without error it becomes ``target``.

    On error, Ctrl-C or SIGTERM ``target`` is untouched and the temporary folder is removed (only a kill -9 leaves
    a hidden ``.NAME.partial-HOST-PID`` folder, which the next run here sweeps once that process is gone). An
    existing ``target`` must be empty unless ``overwrite``; then when the new folder holds a file of every name in
    the old one, the old folder is swapped out as a whole (between the two renames ``target`` is briefly absent,
    never half-written); else the new files are renamed in one by one and the old folder's other files are kept.
    The current folder (``--out .``) is never swapped out, which would leave the shell in a deleted folder: the
    temporary folder is built inside it and its files are renamed in.
    """
    target = _named(Path(target))
    check_target(target, overwrite)
    in_place = target.is_dir() and _is_current_folder(target)
    home = target if in_place else target.parent
    home.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(home, target.name)
    tag = f"{socket.gethostname()}-{os.getpid()}"
    temporary = home / f".{target.name}.partial-{tag}"
    _remove(temporary)
    temporary.mkdir()
    try:
        with _sigterm_as_exit():
            yield temporary
            fsync_folder(temporary)
            if in_place:
                _move_files(temporary, target)
            elif not target.exists():
                os.replace(temporary, target)
            elif {p.name for p in target.iterdir()} <= {p.name for p in temporary.iterdir()}:
                old = target.with_name(f".{target.name}.old-{tag}")
                _remove(old)
                os.replace(target, old)
                os.replace(temporary, target)
                _remove(old)
            else:
                _move_files(temporary, target)
            fsync_folder(target.parent)
    finally:
        _remove(temporary)


def check_target(target: Path, overwrite: bool = False, option: str = "") -> None:
    """Refuse a ``target`` folder that is a file, or that holds files while not ``overwrite``; ``option`` (such
    as ``--out``) is named in the message."""
    named = f"{option} {target}" if option else str(target)
    if target.exists() and not target.is_dir():
        raise AzGPTError(f"{named} is a file: give a folder to write into")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise AzGPTError(f"{named} is not empty: choose a new folder or pass --overwrite")


@contextmanager
def atomic_output(target: Path, option: str, overwrite: bool = False) -> Iterator[Path]:
    """``atomic_folder(target, overwrite)``, with a full disk, a read-only filesystem or a denied permission met
    while writing it raised as ``write_error``'s one line naming ``option`` (``--out``, ``the model folder``)."""
    try:
        with atomic_folder(target, overwrite=overwrite) as folder:
            yield folder
    except OSError as exc:
        error = write_error(exc, target, option)
        if error is None:
            raise
        raise error from None


def _named(path: Path) -> Path:
    """``path`` with a last component to name siblings after (``.``, ``..`` and ``/`` have none)."""
    return Path(os.path.abspath(path)) if path.name in ("", ".", "..") else path


def _is_current_folder(path: Path) -> bool:
    try:
        return path.samefile(Path.cwd())
    except OSError:
        return False


def _move_files(source: Path, target: Path) -> None:
    """Rename every entry of ``source`` into ``target``, replacing entries of the same name."""
    for path in sorted(source.iterdir()):
        if (target / path.name).is_dir():
            _remove(target / path.name)
        os.replace(path, target / path.name)


def _sweep_leftovers(folder: Path, name: str) -> None:
    """Remove the temporary folders of earlier writes of ``name`` whose process on this host is gone."""
    host = socket.gethostname()
    for kind in ("partial", "old"):
        for path in folder.glob(f".{name}.{kind}-{host}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                _remove(path)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` (the shell's code for it) so that ``finally`` blocks
    clean up; Python's default would end the process at once. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; it becomes ``target`` (replacing it) only on success."""
    target = Path(target)
    temporary = target.with_name(f".{target.name}.partial-{socket.gethostname()}-{os.getpid()}")
    _remove(temporary)
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        fsync_folder(target.parent)
    finally:
        _remove(temporary)


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree at ``path`` if there is one (a link is removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "it is on a read-only filesystem", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.EFBIG: "the file grew too large for the filesystem"}


# numpy's ``tofile`` (which the gguf writer uses) reports a short write this way, with no errno: the disk filled up.
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def write_error(exc: OSError, where: Path | str, option: str, remedy: str = "") -> AzGPTError | None:
    """A clear ``AzGPTError`` for an OSError met while writing into ``where``, or None for other errors."""
    if exc.errno is None and _SHORT_WRITE.match(str(exc)):
        exc = OSError(errno.ENOSPC, str(exc))
    reason = WRITE_ERRNOS.get(exc.errno)
    if reason is None:
        return None
    remedy = remedy or ("free some space or choose another folder" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                        else "choose a folder you can write to")
    named = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(where) else ""
    return AzGPTError(f"cannot write {option} {where}: {reason}{named}; {remedy}; nothing was left half-written")
