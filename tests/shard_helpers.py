"""Test-only helpers around the data layer: write shards from token lists, and name the windows a loader reads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nanoseek.data import ShardWriter, TokenLoader


def write_shards(token_chunks: Iterable[np.ndarray | list[int]], out_dir: str | Path, prefix: str,
                 shard_tokens: int, vocab_size: int) -> list[Path]:
    """Stream `token_chunks` (each a 1-D array of ids) into shard files; return them."""
    writer = ShardWriter(out_dir, prefix, shard_tokens, vocab_size)
    for chunk in token_chunks:
        writer.write(chunk)
    return writer.close()


def next_windows(loader: TokenLoader) -> list[tuple[str, int]]:
    """(shard file name, token offset) of each row `loader.next_batch()` is about to read."""
    epoch, position = loader.epoch, loader.position
    if position + loader.global_batch > loader.n_windows:
        epoch, position = epoch + 1, 0
    start = position + loader.rank * loader.batch_size
    located = (loader._locate(epoch, start + row, loader.shuffle) for row in range(loader.batch_size))
    return [(loader.shards[shard].name, offset) for shard, offset in located]
