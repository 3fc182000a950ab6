"""One error path for every command: an expected failure (a ValueError carrying its fix, an OS refusal, a corrupt
file, running out of memory) is one line on stderr and exit 2; anything else is a bug: a traceback and a request
to report it."""

import contextlib
import errno
import os
import pickle
import sys
import traceback
import zipfile

EXIT_FAILURE = 2  # an expected failure (bad input, the OS refused); 1 is left to bugs, 3 to an aborted run

_OS_FIXES = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere (--out); files already "
                  "saved, earlier checkpoints included, are intact",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere (--out)",
    errno.EACCES: "permission denied; choose a path you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted; choose a path you can write to (or fix its permissions)",
    errno.EROFS: "the file system is read-only; choose a writable path",
    errno.ENOTDIR: "a part of this path is a file, not a directory; choose another path",
    errno.EISDIR: "is a directory where a file was expected; pass the file",
    errno.EEXIST: "already exists; choose a new path or remove it",
    errno.ENOENT: "no such file or directory; check the path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.EIO: "an input/output error on the device; check the disk",
}


def describe(err: BaseException) -> str | None:
    """The one line for an expected failure, or None if `err` looks like a bug."""
    if isinstance(err, OSError):
        where = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
        fix = _OS_FIXES.get(err.errno, err.strerror or os.strerror(err.errno or 0) or type(err).__name__)
        if err.errno in _OS_FIXES and err.strerror and err.strerror != os.strerror(err.errno):
            fix = f"{fix} ({err.strerror})"  # a detail the raiser added (how much space a checkpoint needs)
        return f"{where}: {fix}" if where else f"{err.strerror or err}: {fix}"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return ("out of memory; lower --train.batch-size (raise --train.grad-accum to keep the batch), use a smaller "
                "model, or --train.activation-checkpointing")
    if isinstance(err, (pickle.UnpicklingError, zipfile.BadZipFile, EOFError)):
        return f"a file is truncated or corrupt ({type(err).__name__}: {first_line(err)}); recreate it"
    if type(err).__name__ == "SafetensorError":
        return f"a .safetensors file is unreadable or corrupt ({first_line(err)}); recreate it"
    if isinstance(err, ValueError):
        return str(err).replace("\n", " ")
    return None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def report(err: BaseException, prog: str = "nanoseek") -> int:
    """Print `err` the way a user should see it; returns the exit code."""
    line = describe(err)
    if line is not None:
        print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_FAILURE
    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    print(f"{prog}: internal error: this is a bug in nanoseek, not in your input; please report it to the "
          "nanoseek issue tracker with the command and the traceback above", file=sys.stderr)
    return 1


def validation_errors_raised():
    """Within: a config's `__post_init__` ValueError while tyro builds it comes out as a one-line ValueError,
    not tyro's multi-line box; usage errors (an unknown flag, a wrong type) keep tyro's message. Uses tyro
    1.0's parse-error hook; a no-op on a tyro without it."""
    try:
        from tyro._errors import InstantiationFailure, on_parse_error
    except ImportError:  # pragma: no cover - an older tyro
        return contextlib.nullcontext()

    def hook(event) -> None:
        if isinstance(event, InstantiationFailure):
            raise ValueError(str(event.message).replace("\n", " "))

    return on_parse_error(hook)
