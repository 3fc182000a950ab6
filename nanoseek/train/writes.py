"""torch.save that fails as the OSError the disk reported.

torch's zip writer turns a failed write (a full disk, a quota, an I/O error) into a RuntimeError that says
only "unexpected pos N vs M"; the user should read "no space left on the device" with the path instead
(nanoseek/errors.py maps the OSError to that one line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class _RecordingWriter:
    """A raw file for torch.save that keeps the OSError of a failed write: torch's zip writer reports a full
    disk only as "unexpected pos N vs M"."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:  # a raw write may take only part of the buffer
                view = view[self.file.write(view):]
        except OSError as err:
            self.error = err
            raise
        return len(data)

    def flush(self) -> None:
        self.file.flush()


def torch_save(value: Any, path: Path) -> None:
    """torch.save(value, path); a write the OS refused (a full disk, say) raises that OSError, naming `path`."""
    with open(path, "wb", buffering=0) as file:
        writer = _RecordingWriter(file)
        try:
            torch.save(value, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            err = writer.error
            raise OSError(err.errno, err.strerror, str(path)) from None
