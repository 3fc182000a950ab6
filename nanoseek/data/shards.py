"""Token shards: the on-disk format, `prepare_data` (corpus -> tokenizer -> shards) and `TokenLoader` (batches).

Shard file = a 32-byte little-endian header, then the raw token ids:
  magic b"NSEEKTOK" | format version u32 | bytes per token u32 (2: uint16, 4: uint32) | token count u64 | vocab size u64
uint16 whenever the vocabulary fits (<= 65535 ids), halving disk and page-cache use. Documents are separated by
the tokenizer's end-of-text id. A prepared directory holds train_*.bin, val_*.bin, the tokenizer files and
meta.json, written last, so a folder whose preparation crashed is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from nanoseek.config import DataConfig
from nanoseek.data.corpus import PREPARED_FORMAT, PREPARED_META, describe_source, is_prepared_dir, iter_documents
from nanoseek.data.tokenizer import META_FILE, TOKENIZER_FILE, Tokenizer, load_tokenizer, train_tokenizer
from nanoseek.rundir import replacing

MAGIC = b"NSEEKTOK"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per token, token count, vocab size
HEADER_BYTES = _HEADER.size  # 32: keeps the payload aligned for uint16 and uint32 memory maps
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_FIX = "re-run `nanoseek prepare` to rebuild the shards"

# Train/val split (see `_split_threshold`): documents are cut into line-aligned pieces of at most this many
# characters, so even a single-file corpus (one long document) splits, and each piece is placed by its hash.
SPLIT_PIECE_CHARS = 1 << 12
_HASH_BUCKETS = 1 << 16
# Each split must hold this many sequences of seq_len tokens, plus room for multi-token-prediction look-ahead.
MIN_SPLIT_SEQUENCES = 4
MAX_LOOKAHEAD = 8
_ENCODE_BATCH = 256  # documents per encode_batch call: enough to keep the Rust BPE threads busy


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535 leaves no id above 65534), else uint32."""
    return _DTYPES[2] if vocab_size <= 65535 else _DTYPES[4]


# ---- writing --------------------------------------------------------------------------------------


class ShardWriter:
    """Streams tokens into `{prefix}_00000.bin`, `{prefix}_00001.bin`, ... of `shard_tokens` tokens each.

    Memory use is one shard buffer, whatever the corpus size. A short tail (under half a shard) is appended
    to the previous shard instead of becoming a tiny shard of its own that could not hold a training window.
    """

    def __init__(self, out_dir: str | Path, prefix: str, shard_tokens: int, vocab_size: int):
        if shard_tokens <= 0 or vocab_size <= 0:
            raise ValueError(f"shard_tokens={shard_tokens}, vocab_size={vocab_size}: both must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_tokens, self.vocab_size = prefix, shard_tokens, vocab_size
        self.dtype = token_dtype(vocab_size)
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)
        self.filled = 0
        self.paths: list[Path] = []
        self.total_tokens = 0

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
        if self.filled:
            if self.paths and self.filled < self.shard_tokens // 2:
                _append_tokens(self.paths[-1], self.buffer[:self.filled])
            else:
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


def _append_tokens(path: Path, tokens: np.ndarray) -> None:
    with path.open("r+b") as f:
        magic, version, itemsize, count, vocab_size = _HEADER.unpack(f.read(HEADER_BYTES))
        f.seek(0, os.SEEK_END)
        f.write(tokens.tobytes())
        f.seek(0)
        f.write(_HEADER.pack(magic, version, itemsize, count + tokens.size, vocab_size))


def write_shards(token_chunks: Iterable[np.ndarray | list[int]], out_dir: str | Path, prefix: str,
                 shard_tokens: int, vocab_size: int) -> list[Path]:
    """Stream `token_chunks` (each a 1-D array of ids, e.g. one document + eos) into shard files; return them."""
    writer = ShardWriter(out_dir, prefix, shard_tokens, vocab_size)
    for chunk in token_chunks:
        writer.write(chunk)
    return writer.close()


# ---- reading --------------------------------------------------------------------------------------


def read_shard_header(path: str | Path) -> tuple[np.dtype, int, int]:
    """(dtype, token count, vocab size) of a shard; ValueError naming the file for any mismatch or truncation."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"shard {str(path)!r} does not exist; {_FIX}")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a nanoseek token shard (bad magic {raw[:len(MAGIC)]!r}, "
                         f"expected {MAGIC!r}); {_FIX}")
    _, version, itemsize, count, vocab_size = _HEADER.unpack(raw)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: shard format version {version}, this nanoseek reads version "
                         f"{FORMAT_VERSION}; {_FIX}")
    if itemsize not in _DTYPES:
        raise ValueError(f"{path}: unknown token width {itemsize} bytes (expected 2 or 4); {_FIX}")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        state = "truncated" if size < expected else "has trailing bytes"
        raise ValueError(f"{path}: {state}: the header says {count} tokens ({expected} bytes) but the file has "
                         f"{size} bytes; {_FIX}")
    if count == 0:
        raise ValueError(f"{path}: holds no tokens; {_FIX}")
    return _DTYPES[itemsize], count, vocab_size


def read_shard(path: str | Path, vocab_size: int | None = None) -> np.memmap:
    """Memory-map a shard's tokens, shape [count], after checking header, size and that every id is in range.

    The id range is checked against the header's vocab size and, if given, `vocab_size` (the model's).
    """
    dtype, count, header_vocab = read_shard_header(path)
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
    limit = header_vocab if vocab_size is None else min(header_vocab, vocab_size)
    top = int(tokens.max())  # one sequential read: cheap next to a training run, and catches a wrong tokenizer
    if top >= limit:
        raise ValueError(f"{path}: token id {top} >= vocab_size {limit}; the shard was made with another "
                         f"tokenizer or is corrupt, {_FIX} with the tokenizer this model uses")
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


# ---- prepared directories -------------------------------------------------------------------------


@dataclass
class PreparedData:
    """A prepared directory: tokenizer, shard lists and the meta.json describing them."""

    out_dir: Path
    tokenizer: Tokenizer
    vocab_size: int
    train_shards: list[Path]
    val_shards: list[Path]
    meta: dict

    def verify(self) -> None:
        """Check every shard's sha256 against meta.json (reads all data; catches flipped bytes the header can't)."""
        for split in ("train", "val"):
            for entry in self.meta[split]["shards"]:
                path = self.out_dir / entry["file"]
                if file_sha256(path) != entry["sha256"]:
                    raise ValueError(f"{path}: contents do not match the sha256 in meta.json (corrupt or "
                                     f"modified); {_FIX}")


def load_prepared(directory: str | Path) -> PreparedData:
    """Open a directory written by `prepare_data`, checking that its files exist and match meta.json."""
    directory = Path(directory).expanduser()
    meta_path = directory / PREPARED_META
    if not meta_path.is_file():
        raise ValueError(f"{directory} has no {PREPARED_META}; it is not prepared data, run `nanoseek prepare` "
                         "with --out pointing there first")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        raise ValueError(f"{meta_path} is not valid JSON; {_FIX}") from None
    if meta.get("format") != PREPARED_FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
                         f"this nanoseek reads {PREPARED_FORMAT!r} version {FORMAT_VERSION}; {_FIX}")
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise ValueError(f"{directory}: tokenizer has {tokenizer.vocab_size} ids but meta.json says "
                         f"{meta['vocab_size']}; {_FIX}")
    shards = {}
    for split in ("train", "val"):
        shards[split] = []
        for entry in meta[split]["shards"]:
            path = directory / entry["file"]
            _, count, _ = read_shard_header(path)
            if count != entry["tokens"]:
                raise ValueError(f"{path}: holds {count} tokens but meta.json lists {entry['tokens']}; {_FIX}")
            shards[split].append(path)
    return PreparedData(directory, tokenizer, meta["vocab_size"], shards["train"], shards["val"], meta)


def prepare_data(cfg: DataConfig, out_dir: str | Path, progress: bool = True) -> PreparedData:
    """Prepare into a staging folder next to `out_dir` and swap it in only once complete (rundir.replacing):
    a failed preparation (a typo in --data, a full disk) leaves an earlier one in `out_dir` untouched."""
    source_dir = Path(cfg.source).expanduser()
    if source_dir.is_dir() and is_prepared_dir(source_dir):
        return load_prepared(source_dir)  # `nanoseek train --data PREPARED_DIR`: use it as it is
    with replacing(out_dir, _prepared_files(Path(out_dir).expanduser()), {PREPARED_META, META_FILE, TOKENIZER_FILE},
                   "data written by `nanoseek prepare`") as staging:
        _prepare_into(cfg, staging, progress)
    return load_prepared(out_dir)


def _prepared_files(out_dir: Path) -> set[str]:
    """The files an earlier preparation in `out_dir` wrote (replaced by a new one); none if it is not one."""
    if not is_prepared_dir(out_dir):
        return set()
    meta = json.loads((out_dir / PREPARED_META).read_text())
    shards = {Path(entry["file"]).name for split in ("train", "val") for entry in meta.get(split, {}).get("shards", [])}
    return {PREPARED_META, META_FILE, TOKENIZER_FILE} | shards


def _prepare_into(cfg: DataConfig, out_dir: str | Path, progress: bool = True) -> PreparedData:
    """Corpus -> tokenizer -> train/val shards + meta.json in `out_dir`; reuse `cfg.source` if it is prepared.

    Two streaming passes over the source: the first measures the split and trains the tokenizer, the second
    encodes. The tokenizer learns from the whole corpus (train and val): a char vocabulary must cover val or
    val could not be encoded, BPE merge counts from a few % more text barely move val loss, and one shared pass
    keeps a streamed Hugging Face dataset to two reads. The same source and config give byte-identical
    shards, tokenizer and `content_hash`.
    """
    source_dir = Path(cfg.source).expanduser()
    if source_dir.is_dir() and is_prepared_dir(source_dir):
        return load_prepared(source_dir)  # `nanoseek train --data PREPARED_DIR`: use it as it is
    min_shard = 2 * (cfg.seq_len + MAX_LOOKAHEAD)
    if cfg.shard_tokens < min_shard:
        raise ValueError(f"data.shard_tokens={cfg.shard_tokens}: must be >= {min_shard} (two sequences of "
                         f"seq_len={cfg.seq_len} plus look-ahead) so every shard holds a training window")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)

    def documents() -> Iterator[str]:
        return iter_documents(cfg.source, text_field=cfg.hf_text_field, hf_split=cfg.hf_split)

    # Pass 1: hash every piece into the histogram while the tokenizer trains on the same stream.
    histogram = np.zeros(_HASH_BUCKETS, dtype=np.int64)
    pieces = _scan_pieces(tqdm(documents(), desc="prepare 1/2 scan", unit="doc", disable=not progress), histogram)
    tokenizer = train_tokenizer(cfg.tokenizer, pieces, cfg.vocab_size)
    for _ in pieces:  # byte/file tokenizers and the BPE character cap leave the scan unfinished
        pass
    val_bucket_max = _split_threshold(histogram, cfg.val_fraction, cfg.source)
    tokenizer.save(out_dir)

    # Pass 2: encode each run of same-split pieces, end it with eos, stream it into that split's shards.
    writers = {split: ShardWriter(out_dir, split, cfg.shard_tokens, tokenizer.vocab_size) for split in ("train", "val")}
    runs = {"train": 0, "val": 0}
    encoded = _encode_runs(tqdm(documents(), desc="prepare 2/2 encode", unit="doc", disable=not progress),
                           tokenizer, val_bucket_max)
    for split, tokens in encoded:
        writers[split].write(tokens)
        runs[split] += 1
    min_tokens = MIN_SPLIT_SEQUENCES * cfg.seq_len + MAX_LOOKAHEAD
    for split, writer in writers.items():
        if writer.total_tokens < min_tokens:
            raise ValueError(f"{cfg.source}: the {split} split has {writer.total_tokens} tokens, fewer than "
                             f"{min_tokens} ({MIN_SPLIT_SEQUENCES} sequences of seq_len={cfg.seq_len}); use a larger "
                             f"corpus, raise data.val_fraction (now {cfg.val_fraction}) or lower data.seq_len")
    paths = {split: writer.close() for split, writer in writers.items()}

    meta = _build_meta(cfg, out_dir, tokenizer, paths, runs, val_bucket_max)
    tmp = out_dir / (PREPARED_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out_dir / PREPARED_META)  # atomic: meta.json exists only once everything else does
    return PreparedData(out_dir, tokenizer, tokenizer.vocab_size, paths["train"], paths["val"], meta)


def _build_meta(cfg: DataConfig, out_dir: Path, tokenizer: Tokenizer, paths: dict[str, list[Path]],
                runs: dict[str, int], val_bucket_max: int) -> dict:
    splits = {}
    for split, shard_paths in paths.items():
        entries = [{"file": p.name, "tokens": read_shard_header(p)[1], "sha256": file_sha256(p)} for p in shard_paths]
        splits[split] = {"tokens": sum(e["tokens"] for e in entries), "documents": runs[split], "shards": entries}
    tokenizer_files = {name: _canonical_json_sha256(out_dir / name)
                       for name in (META_FILE, TOKENIZER_FILE) if (out_dir / name).is_file()}
    content = {"tokenizer": tokenizer_files,
               "shards": {split: [e["sha256"] for e in splits[split]["shards"]] for split in splits}}
    return {
        "format": PREPARED_FORMAT,
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "source_description": describe_source(cfg.source),
        "text_field": cfg.hf_text_field,
        "hf_split": cfg.hf_split,
        "tokenizer": {"kind": tokenizer.kind, "requested": cfg.tokenizer, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "files": sorted(tokenizer_files)},
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "seq_len": cfg.seq_len,
        "split": {"method": "blake2b-64 of line-aligned text pieces; val = hash bucket <= val_bucket_max",
                  "val_fraction": cfg.val_fraction, "piece_chars": SPLIT_PIECE_CHARS,
                  "hash_buckets": _HASH_BUCKETS, "val_bucket_max": val_bucket_max},
        "train": splits["train"],
        "val": splits["val"],
        "content_hash": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(),
    }


def _canonical_json_sha256(path: Path) -> str:
    # Hash the parsed JSON, not the bytes: the same tokenizer must hash the same whatever the writer's spacing.
    value = json.loads(path.read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ---- the train/val split --------------------------------------------------------------------------
#
# A split unit is a piece of a document (<= SPLIT_PIECE_CHARS, cut after a newline when there is one), placed
# by the top 16 bits of its blake2b hash. Pass 1 adds each piece's length to its bucket; the validation set is
# then every piece whose bucket is <= the first bucket at which the running total reaches val_fraction of the
# characters. So: deterministic, independent of document order, identical pieces (duplicated licence headers)
# always land on the same side, val is never empty and is within one piece of val_fraction even for a corpus
# of a few documents, and nothing but a 65536-entry histogram is kept in memory.


def _pieces(text: str) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        end = min(start + SPLIT_PIECE_CHARS, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline > start:
                end = newline + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _bucket(piece: str) -> int:
    digest = hashlib.blake2b(piece.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - 16)


def _scan_pieces(documents: Iterable[str], histogram: np.ndarray) -> Iterator[str]:
    for text in documents:
        for piece in _pieces(text):
            histogram[_bucket(piece)] += len(piece)
            yield piece


def _split_threshold(histogram: np.ndarray, val_fraction: float, source: str) -> int:
    cumulative = np.cumsum(histogram)
    total = int(cumulative[-1])
    bucket = int(np.searchsorted(cumulative, val_fraction * total, side="left"))
    if cumulative[bucket] >= total:  # val would swallow everything: give the last non-empty bucket to train
        filled = np.flatnonzero(histogram)
        if len(filled) < 2:
            raise ValueError(f"{source}: too little text to split into train and val ({total} characters); "
                             "use a larger corpus")
        bucket = int(filled[-2])
    return bucket


def _encode_runs(documents: Iterable[str], tokenizer: Tokenizer,
                 val_bucket_max: int) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (split, ids + [eos]) per run of consecutive same-split pieces; a fully-train document is one run."""
    batch: list[tuple[str, str]] = []

    def flush() -> Iterator[tuple[str, np.ndarray]]:
        encoded = tokenizer.encode_batch([text for _, text in batch])
        for (split, _), ids in zip(batch, encoded):
            tokens = np.empty(len(ids) + 1, dtype=np.int64)
            tokens[:-1] = ids
            tokens[-1] = tokenizer.eos_id
            yield split, tokens
        batch.clear()

    for text in documents:
        for is_val, group in itertools.groupby(_pieces(text), key=lambda p: _bucket(p) <= val_bucket_max):
            batch.append(("val" if is_val else "train", "".join(group)))
        if len(batch) >= _ENCODE_BATCH:
            yield from flush()
    yield from flush()


# ---- batches --------------------------------------------------------------------------------------


def count_windows(shards: Iterable[str | Path], seq_len: int, lookahead: int = 1) -> int:
    """How many TokenLoader windows the shards hold (headers only), e.g. to size an eval batch to a small val set."""
    lengths = (read_shard_header(path)[1] for path in shards)
    return sum((n - lookahead) // seq_len for n in lengths if n >= seq_len + lookahead)


class TokenLoader:
    """Batches of token windows from memory-mapped shards, with multi-token targets and rank striding.

    A window is seq_len + lookahead consecutive tokens inside one shard, starting at a multiple of seq_len, so
    every token is a next-token target once per epoch and no window reads past its shard's end. An epoch is
    an order over all windows: shard order, then window order within a shard; with `shuffle` both are
    permuted by a generator keyed on (seed, epoch), so an epoch's order depends only on those, costs memory
    proportional to one shard's window count, and differs between epochs. Without `shuffle` the order is
    the shards' natural order. Batches take consecutive windows of that order: global batch g is windows
    [g*B*W, (g+1)*B*W) (W = world_size) and rank r takes the r-th block of B, so ranks are disjoint and
    together equal a single-rank loader with batch size B*W. An epoch's last windows that do not fill a
    global batch are left out (with `shuffle`, a different few each epoch). The cursor (epoch, position) is the same on
    every rank, so any rank's `state_dict` resumes all of them.
    """

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
        self.batch_size, self.seq_len, self.lookahead = batch_size, seq_len, lookahead
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.vocab_size = vocab_size
        self.window = seq_len + lookahead
        lengths = [read_shard_header(path)[1] for path in self.shards]
        for path, n in zip(self.shards, lengths):
            if n < self.window:
                raise ValueError(f"{path}: {n} tokens, shorter than one window of seq_len+lookahead={self.window}; "
                                 "lower seq_len or re-run `nanoseek prepare` with a larger data.shard_tokens")
        self.shard_lengths = lengths
        self.windows_per_shard = np.array([(n - lookahead) // seq_len for n in lengths], dtype=np.int64)
        self.n_windows = int(self.windows_per_shard.sum())
        self.global_batch = batch_size * world_size
        if self.n_windows < self.global_batch:
            raise ValueError(f"the shards hold {self.n_windows} windows of {self.window} tokens but one batch "
                             f"needs batch_size*world_size={self.global_batch}; lower the batch size or seq_len, "
                             "or use more data")
        self.epoch = 0
        self.position = 0  # windows of this epoch consumed by all ranks together
        self.last_windows: list[tuple[str, int]] = []  # (shard file, token offset) of each row of the last batch
        self._tokens: dict[int, np.memmap] = {}
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    @property
    def batches_per_epoch(self) -> int:
        return self.n_windows // self.global_batch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: x LongTensor [B, T], targets LongTensor [B, T + lookahead - 1].

        targets[:, j] is the token j+1 positions after x's first: targets[:, :T] are next-token targets and
        targets[:, k:k+T] the (k+1)-ahead targets of multi-token prediction.
        """
        if self.position + self.global_batch > self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.batch_size
        self.position += self.global_batch
        return self._read(self.epoch, start, shuffled=self.shuffle)

    def skip(self, n_batches: int) -> None:
        """Move the cursor `n_batches` global batches forward without reading (to step over a bad data window)."""
        for _ in range(n_batches):
            if self.position + self.global_batch > self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
            self.position += self.global_batch

    def iter_eval(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from the start in natural (unshuffled) order, up to `max_batches`; the cursor is untouched.

        Every call yields the same batches, so validation losses are comparable across a run.
        """
        n = self.batches_per_epoch if max_batches is None else min(max_batches, self.batches_per_epoch)
        for index in range(n):
            yield self._read(0, index * self.global_batch + self.rank * self.batch_size, shuffled=False)

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

    # ---- internals ----

    def _read(self, epoch: int, start: int, shuffled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((self.batch_size, self.window), dtype=np.int64)
        self.last_windows = []
        for row in range(self.batch_size):
            shard, offset = self._locate(epoch, start + row, shuffled)
            rows[row] = self._shard_tokens(shard)[offset:offset + self.window]
            self.last_windows.append((self.shards[shard].name, offset))
        x = torch.from_numpy(np.ascontiguousarray(rows[:, :self.seq_len]))
        targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        return x, targets

    def _locate(self, epoch: int, index: int, shuffled: bool) -> tuple[int, int]:
        """Window `index` of `epoch`'s order -> (shard number, token offset in that shard)."""
        order, starts = self._epoch_layout(epoch if shuffled else -1)
        slot = int(np.searchsorted(starts, index, side="right")) - 1
        shard = int(order[slot])
        local = index - int(starts[slot])
        if shuffled:
            local = int(self._window_permutation(epoch, shard)[local])
        return shard, local * self.seq_len

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard order of `epoch` (-1: natural) and the first window index of each shard in that order."""
        if self._layout is None or self._layout[0] != epoch:
            order = np.arange(len(self.shards))
            if epoch >= 0:
                order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.shards))
            counts = self.windows_per_shard[order]
            self._layout = (epoch, order, np.concatenate([[0], np.cumsum(counts)[:-1]]))
        return self._layout[1], self._layout[2]

    def _window_permutation(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._permutations:
            if len(self._permutations) >= 4:  # a batch touches at most a few shards; keep memory to a few
                self._permutations.clear()
            rng = np.random.default_rng([self.seed, epoch, 1, shard])
            self._permutations[key] = rng.permutation(int(self.windows_per_shard[shard]))
        return self._permutations[key]

    def _shard_tokens(self, shard: int) -> np.memmap:
        if shard not in self._tokens:  # validated on first use: the id range check reads the whole shard once
            self._tokens[shard] = read_shard(self.shards[shard], self.vocab_size)
        return self._tokens[shard]
