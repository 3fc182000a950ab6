"""torch.save that fails as the OSError the disk reported.

torch's zip writer turns a failed write (a full disk, a quota, an I/O error) into a RuntimeError saying only
"unexpected pos N vs M"; the OSError, with the path, is what nanoseek/errors.py turns into one clear line."""

from pathlib import Path
from typing import Any

import torch


class _RecordingWriter:
    """A raw file for torch.save that keeps the OSError of a failed write."""

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
    with open(path, "wb", buffering=0) as file:
        writer = _RecordingWriter(file)
        try:
            torch.save(value, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise OSError(writer.error.errno, writer.error.strerror, str(path)) from None
