"""The token shard file: a 32-byte little-endian header, then the raw token ids.

  magic b"NSEEKTOK" | format version u32 | bytes per token u32 (2: uint16, 4: uint32) | token count u64 | vocab size u64

Ids are uint16 whenever the vocabulary fits, halving disk and page-cache use; documents are separated by the
tokenizer's end-of-text id."""

import hashlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

MAGIC = b"NSEEKTOK"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per token, token count, vocab size
HEADER_BYTES = _HEADER.size  # 32: keeps the payload aligned for uint16 and uint32 memory maps
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
REBUILD = "re-run `nanoseek prepare` to rebuild the data"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535 leaves no id above 65534), else uint32."""
    return _DTYPES[2] if vocab_size <= 65535 else _DTYPES[4]


class ShardWriter:
    """Streams tokens into `{prefix}_00000.bin`, `{prefix}_00001.bin`, ... of `shard_tokens` tokens each.

    Memory use is one shard buffer, whatever the corpus size. A short tail (under half a shard) is appended
    to the previous shard instead of becoming a tiny shard of its own that could not hold a training window."""

    def __init__(self, out_dir: str | Path, prefix: str, shard_tokens: int, vocab_size: int):
        if shard_tokens <= 0 or vocab_size <= 0:
            raise ValueError(f"shard_tokens={shard_tokens}, vocab_size={vocab_size}: both must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_tokens, self.vocab_size = prefix, shard_tokens, vocab_size
        self.dtype = token_dtype(vocab_size)
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)
        self.paths: list[Path] = []
        self.filled = self.total_tokens = 0

    def write(self, tokens: np.ndarray | list[int]) -> None:
        """Append token ids (any integer array-like, shape [n])."""
        ids = np.asarray(tokens)
        if ids.size == 0:
            return
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is outside [0, {self.vocab_size}); "
                             "the tokenizer and vocab_size passed to the shard writer disagree")
        self.total_tokens += ids.size
        while ids.size:
            take = min(ids.size, self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + take] = ids[:take]
            self.filled += take
            ids = ids[take:]
            if self.filled == self.shard_tokens:
                self._flush()

    def close(self) -> list[Path]:
        """Write what is buffered and return every shard path, in order."""
        if self.filled and self.paths and self.filled < self.shard_tokens // 2:
            with self.paths[-1].open("r+b") as f:  # append to the last shard, then update its header's count
                magic, version, itemsize, count, vocab_size = _HEADER.unpack(f.read(HEADER_BYTES))
                f.seek(0, os.SEEK_END)
                f.write(self.buffer[:self.filled].tobytes())
                f.seek(0)
                f.write(_HEADER.pack(magic, version, itemsize, count + self.filled, vocab_size))
        elif self.filled:
            self._flush()
        self.filled = 0
        return list(self.paths)

    def _flush(self) -> None:
        path = self.out_dir / f"{self.prefix}_{len(self.paths):05d}.bin"
        with path.open("wb") as f:
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self.filled, self.vocab_size))
            f.write(self.buffer[:self.filled].tobytes())
        self.paths.append(path)
        self.filled = 0


def read_shard_header(path: str | Path) -> tuple[np.dtype, int, int]:
    """(dtype, token count, vocab size) of a shard; ValueError naming the file for any mismatch or truncation."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"shard {str(path)!r} does not exist; {REBUILD}")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a nanoseek token shard (bad magic {raw[:len(MAGIC)]!r}, "
                         f"expected {MAGIC!r}); {REBUILD}")
    _, version, itemsize, count, vocab_size = _HEADER.unpack(raw)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: shard format version {version}, this nanoseek reads version "
                         f"{FORMAT_VERSION}; {REBUILD}")
    if itemsize not in _DTYPES:
        raise ValueError(f"{path}: unknown token width {itemsize} bytes (expected 2 or 4); {REBUILD}")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        state = "truncated" if size < expected else "has trailing bytes"
        raise ValueError(f"{path}: {state}: the header says {count} tokens ({expected} bytes) but the file has "
                         f"{size} bytes; {REBUILD}")
    if count == 0:
        raise ValueError(f"{path}: holds no tokens; {REBUILD}")
    return _DTYPES[itemsize], count, vocab_size


def read_shard(path: str | Path, vocab_size: int | None = None) -> np.memmap:
    """Memory-map a shard's tokens, shape [count], after checking its header, its size and that every id is below
    the header's vocab size and, if given, `vocab_size` (the model's)."""
    dtype, count, header_vocab = read_shard_header(path)
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
    limit = header_vocab if vocab_size is None else min(header_vocab, vocab_size)
    top = int(tokens.max())  # one sequential read: cheap next to a training run, and catches a wrong tokenizer
    if top >= limit:
        raise ValueError(f"{path}: token id {top} >= vocab_size {limit}; the shard was made with another "
                         f"tokenizer or is corrupt, {REBUILD} with the tokenizer this model uses")
    return tokens


def read_tokens(shards: Iterable[str | Path], max_tokens: int | None = None) -> np.ndarray:
    """The shards' tokens joined in order as int64 [N], stopping once `max_tokens` are read (None: all)."""
    parts, total = [], 0
    for path in shards:
        parts.append(np.asarray(read_shard(path)[:None if max_tokens is None else max_tokens - total]))
        total += len(parts[-1])
        if max_tokens is not None and total >= max_tokens:
            break
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
