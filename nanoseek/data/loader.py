"""Batches of token windows from shards: `TokenLoader` for training (shuffled epochs, exact cursor, rank
striding), `token_windows` / `validation_batches` for evaluation (natural order, the same every time).

A window is seq_len + lookahead tokens inside one shard, starting at a multiple of seq_len, so every token is a
next-token target once. A batch is x [B, T] and targets [B, T + lookahead - 1], both int64: targets[:, k:k+T]
are the (k+1)-ahead targets (k = 0: next token; k > 0: multi-token prediction)."""

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.shards import read_shard, read_shard_header

Batch = tuple[torch.Tensor, torch.Tensor]


def count_windows(shards: Iterable[str | Path], seq_len: int, lookahead: int = 1) -> int:
    """How many TokenLoader windows the shards hold (headers only), e.g. to size an eval batch to a small val set."""
    lengths = (read_shard_header(path)[1] for path in shards)
    return sum((n - lookahead) // seq_len for n in lengths if n >= seq_len + lookahead)


class TokenLoader:
    """Training batches from memory-mapped shards. An epoch orders all windows: shard order, then window order within a
    shard; `shuffle` permutes both with a generator keyed on (seed, epoch), so the order depends on those alone and
    costs memory in proportion to one shard's windows. Global batch g is windows [g*B*W, (g+1)*B*W) of that order
    (W = world_size), rank r taking the r-th block of B: ranks are disjoint and together equal one rank with batch size
    B*W. Windows that cannot fill a last global batch are left out (a different few each shuffled epoch). The cursor
    (epoch, position) is the same on every rank, so any rank's `state_dict` resumes all of them."""

    def __init__(self, shards: list[Path], batch_size: int, seq_len: int, lookahead: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0, vocab_size: int | None = None, shuffle: bool = True):
        for name, value, least in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("lookahead", lookahead, 1),
                                   ("world_size", world_size, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r}: must be an integer >= {least}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
        if not shards:
            raise ValueError("no shards given; prepare data first (`nanoseek prepare`) and pass its shard lists")
        self.shards = [Path(p) for p in shards]
        self.batch_size, self.seq_len, self.lookahead, self.vocab_size = batch_size, seq_len, lookahead, vocab_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.window = seq_len + lookahead
        lengths = [read_shard_header(path)[1] for path in self.shards]
        for path, n in zip(self.shards, lengths):
            if n < self.window:
                raise ValueError(f"{path}: {n} tokens, shorter than one window of seq_len+lookahead={self.window}; "
                                 "lower seq_len or re-run `nanoseek prepare` with a larger data.shard_tokens")
        self.windows_per_shard = np.array([(n - lookahead) // seq_len for n in lengths], dtype=np.int64)
        self.n_windows = int(self.windows_per_shard.sum())
        self.global_batch = batch_size * world_size
        if self.n_windows < self.global_batch:
            raise ValueError(f"the shards hold {self.n_windows} windows of {self.window} tokens but one batch "
                             f"needs batch_size*world_size={self.global_batch}; lower the batch size or seq_len, "
                             "or use more data")
        self.epoch = 0
        self.position = 0  # windows of this epoch consumed by all ranks together
        self._tokens: dict[int, np.memmap] = {}
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    @property
    def batches_per_epoch(self) -> int:
        return self.n_windows // self.global_batch

    def next_batch(self) -> Batch:
        start = self._advance() + self.rank * self.batch_size
        rows = []
        for index in range(start, start + self.batch_size):
            shard, offset = self._locate(self.epoch, index, self.shuffle)
            if shard not in self._tokens:  # validated on first use: the id range check reads the whole shard once
                self._tokens[shard] = read_shard(self.shards[shard], self.vocab_size)
            rows.append(self._tokens[shard][offset:offset + self.window])
        return _as_batch(rows, self.lookahead)

    def skip(self, n_batches: int) -> None:
        """Move the cursor `n_batches` global batches forward without reading (to step over a bad data window)."""
        for _ in range(n_batches):
            self._advance()

    def state_dict(self) -> dict:
        """The exact cursor as plain ints (JSON-able), plus what it is only valid for."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "n_windows": self.n_windows, "seq_len": self.seq_len, "lookahead": self.lookahead}

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor; batch_size and world_size may differ (the cursor counts windows, not batches)."""
        for key in ("seed", "shuffle", "n_windows", "seq_len", "lookahead"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"data loader state has {key}={state.get(key)!r} but this loader has "
                                 f"{getattr(self, key)!r}; resume with the same data and settings")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n_windows:
            raise ValueError(f"data loader state epoch={epoch}, position={position} is out of range; "
                             "the checkpoint's data state is corrupt")
        self.epoch, self.position = epoch, position

    def _advance(self) -> int:
        """Take the next global batch, starting a new epoch when this one cannot fill it; its first window."""
        if self.position + self.global_batch > self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        self.position += self.global_batch
        return self.position - self.global_batch

    def _locate(self, epoch: int, index: int, shuffled: bool) -> tuple[int, int]:
        """Window `index` of `epoch`'s order -> (shard number, token offset in that shard)."""
        key = epoch if shuffled else -1  # -1: the natural order
        if self._layout is None or self._layout[0] != key:  # the shard order and each shard's first window index
            n = len(self.shards)
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(n) if shuffled else np.arange(n)
            self._layout = (key, order, np.concatenate([[0], np.cumsum(self.windows_per_shard[order])[:-1]]))
        _, order, starts = self._layout
        slot = int(np.searchsorted(starts, index, side="right")) - 1
        shard, local = int(order[slot]), index - int(starts[slot])
        if shuffled:
            if (epoch, shard) not in self._permutations:  # the shard's window order in this epoch
                if len(self._permutations) >= 4:  # a batch touches at most a few shards; keep memory to a few
                    self._permutations.clear()
                rng = np.random.default_rng([self.seed, epoch, 1, shard])
                self._permutations[epoch, shard] = rng.permutation(int(self.windows_per_shard[shard]))
            local = int(self._permutations[epoch, shard][local])
        return shard, local * self.seq_len


def token_windows(arrays: Iterable[np.ndarray], seq_len: int, batch_size: int, lookahead: int = 1, rank: int = 0,
                  world_size: int = 1, max_batches: int | None = None, drop_last: bool = False,
                  tail: bool = False) -> Iterator[Batch]:
    """Evaluation batches of the windows of each array (a shard's tokens, or ids held in memory), in order.

    Consecutive windows form global batches of batch_size * world_size; rank r takes the r-th block of
    batch_size. A last global batch short of windows is used only without `drop_last` in one process (every
    rank must run the same batches). With `tail`, each array's last, shorter window (if it holds a target)
    comes in a batch of its own after the rest. Arrays are read lazily, only as far as `max_batches` needs."""
    window, per_step, tails = seq_len + lookahead, batch_size * world_size, []

    def windows() -> Iterator[np.ndarray]:
        for tokens in arrays:
            n_full = max((len(tokens) - lookahead) // seq_len, 0)
            for start in range(0, n_full * seq_len, seq_len):
                yield tokens[start:start + window]
            if tail and len(tokens) - n_full * seq_len > lookahead:
                tails.append(tokens[n_full * seq_len:])

    rows, produced = windows(), 0
    while max_batches is None or produced < max_batches:
        group = list(itertools.islice(rows, per_step))
        if not group or ((drop_last or world_size > 1) and len(group) < per_step):
            break
        yield _as_batch(group[rank * batch_size:(rank + 1) * batch_size], lookahead)
        produced += 1
    for rest in tails:
        yield _as_batch([rest], lookahead)


def validation_batches(shards: list[Path], batch_size: int, seq_len: int, lookahead: int = 1, rank: int = 0,
                       world_size: int = 1, vocab_size: int | None = None,
                       max_batches: int | None = None) -> list[Batch]:
    """The first `max_batches` batches of a validation split (the same at every evaluation of a run); smaller
    than batch_size when the split holds fewer windows than one global batch, so every rank gets one."""
    batch_size = max(min(batch_size, count_windows(shards, seq_len, lookahead) // world_size), 1)
    arrays = (read_shard(path, vocab_size) for path in shards)
    return list(token_windows(arrays, seq_len, batch_size, lookahead, rank, world_size, max_batches, drop_last=True))


def _as_batch(rows: list[np.ndarray], lookahead: int) -> Batch:
    """Windows [b, T + lookahead] -> (x [b, T], targets [b, T + lookahead - 1])."""
    batch = np.stack(rows).astype(np.int64)
    x = torch.from_numpy(np.ascontiguousarray(batch[:, :batch.shape[1] - lookahead]))
    return x, torch.from_numpy(np.ascontiguousarray(batch[:, 1:]))
