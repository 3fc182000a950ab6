"""One writer per directory, and outputs that are replaced whole or not at all.

`hold` takes an `fcntl.flock` on DIRECTORY/.nanoseek.lock until the command ends; a second writer is refused in one
line naming the holder's PID. The kernel drops the lock however its process exits (kill -9, a crash), so a stale
lock never blocks anyone; the file stays behind on purpose (deleting it races with a process that just opened it).

`replacing` writes a folder that is replaced whole (prepared data, an export) into a sibling staging folder and
swaps it in only once that succeeded; a crash between the two renames leaves the old one intact as `.NAME.old-PID`."""

import contextlib
import glob
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".nanoseek.lock"

try:  # POSIX; on Windows runs are not locked (msvcrt locks are per byte range and not inherited alike)
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None


class _Lock:
    def __init__(self, directory: Path, fd: int, created: bool):
        self.directory, self.fd, self.created, self.count = directory, fd, created, 1


_held: dict[str, _Lock] = {}  # realpath of the locked directory -> its lock (re-entrant within a process)


def _holder(lock_path: Path) -> str:
    try:
        pid, *what = lock_path.read_text().split()
    except (OSError, ValueError):  # unreadable, or empty
        return "another process"
    return f"pid {pid} ({' '.join(what)})"


def check_folder_path(path: Path) -> None:
    """ValueError (one line) if `path` or a folder above it is an existing file, so it cannot be a folder."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "" if part == path else f" ({part} is a file)"
                raise ValueError(f"--out {path}: not a directory{where}; choose another --out")
            return


def hold(directory: str | Path, command: str) -> None:
    """Lock `directory` (created if missing) until `command_scope` ends or the process exits; another process's
    hold is refused with a ValueError naming its PID."""
    directory = Path(directory).expanduser()
    check_folder_path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(directory)
    if key in _held:
        _held[key].count += 1
        return
    lock_path = directory / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"{directory} is in use by {_holder(lock_path)}: one process writes a run directory "
                             "at a time; wait for it to finish (or stop it), or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} nanoseek {command} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _held[key] = _Lock(directory, fd, created)


def is_new(directory: str | Path) -> bool:
    """True if `directory` does not exist or holds nothing but its lock file (nothing to lose in it)."""
    directory = Path(directory).expanduser()
    return not directory.exists() or (directory.is_dir() and all(p.name == LOCK_FILE for p in directory.iterdir()))


def release(directory: str | Path) -> None:
    """Drop one hold on `directory`; the last one unlocks it, and removes the directory if this process
    created it and nothing but the lock file was written there (a command that failed validation)."""
    key = os.path.realpath(Path(directory).expanduser())
    lock = _held.get(key)
    if lock is None:
        return
    lock.count -= 1
    if lock.count:
        return
    del _held[key]
    if lock.created and lock.directory.is_dir() and [p.name for p in lock.directory.iterdir()] == [LOCK_FILE]:
        (lock.directory / LOCK_FILE).unlink(missing_ok=True)  # still ours: nobody else can have locked it
        with contextlib.suppress(OSError):
            lock.directory.rmdir()
    os.close(lock.fd)  # closing the last descriptor releases the flock


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """Locks taken inside are released when the command returns or fails (for `nanoseek.cli.main`)."""
    try:
        yield
    finally:
        for lock in list(_held.values()):
            lock.count = 1
            release(lock.directory)


def unique_run_dir(root: str | Path, prefix: str) -> Path:
    """A path ROOT/PREFIX-YYYYmmdd-HHMMSS-XXXXXX that does not exist yet: the random suffix keeps two runs
    started in the same second (on one node or many) apart; `hold` then creates and locks it."""
    while True:
        path = Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        if not path.exists():
            return path


def _foreign(directory: Path, owned: set[str], writes: set[str], what: str) -> list[Path]:
    """Entries of `directory` the command did not write (the lock file is always its own). A folder among
    them, or a file named in `writes`, is refused: the command would replace it."""
    if not directory.is_dir():
        return []
    foreign = sorted(p for p in directory.iterdir() if p.name != LOCK_FILE and p.name not in owned)
    clash = [p.name for p in foreign if p.is_dir() or p.name in writes]
    if clash:
        shown = ", ".join(clash[:3]) + (f" and {len(clash) - 3} more" if len(clash) > 3 else "")
        raise ValueError(f"{directory} holds {shown}, which it did not write and would replace; nothing was "
                         f"changed: choose a new or empty folder for the {what}, or move those away")
    return foreign


@contextlib.contextmanager
def replacing(target: str | Path, owned: set[str], writes: set[str], what: str) -> Iterator[Path]:
    """Yield a fresh staging folder next to `target`; once the body succeeded, it becomes `target`.

    owned: the names in an existing `target` that an earlier run of the command wrote (replaced). Any other file
    is the user's, carried into the new folder as a hard link (a crash at any point leaves it where it was);
    refused, before anything changes, if it is a folder or named like a file the command writes."""
    target = Path(target).expanduser()
    check_folder_path(target)
    _foreign(target, owned, writes, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    staging = target.parent / f".{target.name}.new-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        staging.mkdir()
    except OSError as err:  # name the folder the user asked for, not the staging one
        raise OSError(err.errno, err.strerror, str(target)) from None
    try:
        yield staging
        # Again: the user may have added files meanwhile.
        for path in _foreign(target, owned, {p.name for p in staging.iterdir()}, what):
            os.link(path, staging / path.name)
        if (target / LOCK_FILE).is_file():  # the lock (the same inode) travels with the folder it locks
            with contextlib.suppress(OSError):
                os.link(target / LOCK_FILE, staging / LOCK_FILE)
        swap_in(staging, target, target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def _recover(target: Path) -> None:
    """Tidy what a process killed mid-replacement left next to `target` (names carry its PID; a live PID's
    are left alone): a staging folder is removed; an old folder moved aside is renamed back if the swap
    never completed (no `target`), else removed."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*-*"):
        kind, pid, *_ = path.name[len(target.name) + 2:].split("-")  # new|old, the PID, a random suffix
        if kind not in ("new", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not target.exists():
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def swap_in(new: Path, target: Path, aside: Path) -> None:
    """Rename `new` to `target` durably. An existing `target` is moved to `aside` first (and back, should the second
    rename fail), then deleted: between the two renames `target` is briefly absent, never half there."""
    if target.exists():
        os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        if aside.exists():
            os.replace(aside, target)
        raise
    fsync_path(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data to disk (directories: so a rename inside survives power loss)."""
    if path.is_dir() and os.name == "nt":  # Windows cannot open a directory for fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
