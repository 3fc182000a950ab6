"""`prepare_data`: corpus -> tokenizer -> a prepared directory of train_*.bin and val_*.bin (shards.py's format),
the tokenizer files and meta.json; `load_prepared` opens it."""

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nanoseek.config import DataConfig
from nanoseek.data.corpus import PREPARED_FORMAT, PREPARED_META, describe_source, is_prepared_dir, iter_documents
from nanoseek.data.shards import FORMAT_VERSION, REBUILD, ShardWriter, file_sha256, read_shard_header, token_dtype
from nanoseek.data.tokenizer import META_FILE, TOKENIZER_FILE, Tokenizer, load_tokenizer, train_tokenizer
from nanoseek.rundir import replacing

# The train/val split. A split unit is a piece of a document (<= SPLIT_PIECE_CHARS, cut after a newline when
# there is one), so even a one-document corpus splits; it is placed by the top 16 bits of its blake2b hash.
# Pass 1 adds each piece's length to its bucket; val is every piece whose bucket is <= the first bucket at which
# the running total reaches val_fraction of the characters. So: deterministic, independent of document order,
# identical pieces (duplicated licence headers) always on the same side, val never empty and within one piece
# of val_fraction even for a corpus of a few documents, and only a 65536-entry histogram kept in memory.
SPLIT_PIECE_CHARS = 1 << 12
_HASH_BUCKETS = 1 << 16
# Each split must hold this many sequences of seq_len tokens, plus room for multi-token-prediction look-ahead.
MIN_SPLIT_SEQUENCES = 4
MAX_LOOKAHEAD = 8
_ENCODE_BATCH = 256  # runs per encode_batch call: enough to keep the Rust BPE threads busy
_SPLITS = ("train", "val")


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
        for entry in self.meta["train"]["shards"] + self.meta["val"]["shards"]:
            path = self.out_dir / entry["file"]
            if file_sha256(path) != entry["sha256"]:
                raise ValueError(f"{path}: contents do not match the sha256 in meta.json (corrupt or "
                                 f"modified); {REBUILD}")


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
        raise ValueError(f"{meta_path} is not valid JSON; {REBUILD}") from None
    if meta.get("format") != PREPARED_FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
                         f"this nanoseek reads {PREPARED_FORMAT!r} version {FORMAT_VERSION}; {REBUILD}")
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise ValueError(f"{directory}: tokenizer has {tokenizer.vocab_size} ids but meta.json says "
                         f"{meta['vocab_size']}; {REBUILD}")
    for entry in meta["train"]["shards"] + meta["val"]["shards"]:
        path = directory / entry["file"]
        if (count := read_shard_header(path)[1]) != entry["tokens"]:
            raise ValueError(f"{path}: holds {count} tokens but meta.json lists {entry['tokens']}; {REBUILD}")
    train, val = ([directory / entry["file"] for entry in meta[split]["shards"]] for split in _SPLITS)
    return PreparedData(directory, tokenizer, meta["vocab_size"], train, val, meta)


def prepare_data(cfg: DataConfig, out_dir: str | Path, progress: bool = True) -> PreparedData:
    """Corpus -> tokenizer -> train/val shards + meta.json in `out_dir` (`cfg.source` itself if it is prepared),
    via a staging folder swapped in only once complete (rundir.replacing): a failed preparation (a typo in --data,
    a full disk) leaves an earlier one in `out_dir`, and a user's own files there, untouched."""
    source_dir = Path(cfg.source).expanduser()
    if source_dir.is_dir() and is_prepared_dir(source_dir):
        return load_prepared(source_dir)  # `nanoseek train --data PREPARED_DIR`: use it as it is
    min_shard = 2 * (cfg.seq_len + MAX_LOOKAHEAD)
    if cfg.shard_tokens < min_shard:
        raise ValueError(f"data.shard_tokens={cfg.shard_tokens}: must be >= {min_shard} (two sequences of "
                         f"seq_len={cfg.seq_len} plus look-ahead) so every shard holds a training window")
    out_dir = Path(out_dir).expanduser()
    writes = {PREPARED_META, META_FILE, TOKENIZER_FILE}
    earlier: set[str] = set()  # the files an earlier preparation in `out_dir` wrote: this one replaces them
    if is_prepared_dir(out_dir):
        meta = json.loads((out_dir / PREPARED_META).read_text())
        earlier = writes | {Path(e["file"]).name for split in _SPLITS for e in meta.get(split, {}).get("shards", [])}
    with replacing(out_dir, earlier, writes, "data written by `nanoseek prepare`") as staging:
        _prepare_into(cfg, staging, progress)
    return load_prepared(out_dir)


def _prepare_into(cfg: DataConfig, out_dir: Path, progress: bool) -> None:
    """Two streaming passes over the source: the first measures the split and trains the tokenizer, the second
    encodes. The tokenizer learns from train and val alike: a char vocabulary must cover val to encode it, BPE
    merges from a few % more text barely move val loss, and one shared pass keeps a streamed dataset to two
    reads. The same source and config give byte-identical shards, tokenizer and `content_hash`."""

    def documents(desc: str) -> Iterable[str]:
        texts = iter_documents(cfg.source, text_field=cfg.hf_text_field, hf_split=cfg.hf_split)
        return tqdm(texts, desc=desc, unit="doc", disable=not progress)

    histogram = np.zeros(_HASH_BUCKETS, dtype=np.int64)
    pieces = _scan_pieces(documents("prepare 1/2 scan"), histogram)
    tokenizer = train_tokenizer(cfg.tokenizer, pieces, cfg.vocab_size)
    for _ in pieces:  # byte/file tokenizers and the BPE character cap leave the scan unfinished
        pass
    val_bucket_max = _split_threshold(histogram, cfg.val_fraction, cfg.source)
    tokenizer.save(out_dir)

    writers = {split: ShardWriter(out_dir, split, cfg.shard_tokens, tokenizer.vocab_size) for split in _SPLITS}
    runs = dict.fromkeys(_SPLITS, 0)
    for split, tokens in _encode_runs(documents("prepare 2/2 encode"), tokenizer, val_bucket_max):
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
    (out_dir / PREPARED_META).write_text(json.dumps(meta, indent=1) + "\n")


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
    return {"format": PREPARED_FORMAT, "format_version": FORMAT_VERSION, "source": cfg.source,
            "source_description": describe_source(cfg.source), "text_field": cfg.hf_text_field,
            "hf_split": cfg.hf_split,
            "tokenizer": {"kind": tokenizer.kind, "requested": cfg.tokenizer, "vocab_size": tokenizer.vocab_size,
                          "eos_id": tokenizer.eos_id, "files": sorted(tokenizer_files)},
            "vocab_size": tokenizer.vocab_size, "dtype": token_dtype(tokenizer.vocab_size).name, "seq_len": cfg.seq_len,
            "split": {"method": "blake2b-64 of line-aligned text pieces; val = hash bucket <= val_bucket_max",
                      "val_fraction": cfg.val_fraction, "piece_chars": SPLIT_PIECE_CHARS,
                      "hash_buckets": _HASH_BUCKETS, "val_bucket_max": val_bucket_max},
            "train": splits["train"], "val": splits["val"],
            "content_hash": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()}


def _canonical_json_sha256(path: Path) -> str:
    # Hash the parsed JSON, not the bytes: the same tokenizer must hash the same whatever the writer's spacing.
    value = json.loads(path.read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _pieces(text: str) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        end = start + SPLIT_PIECE_CHARS
        newline = text.rfind("\n", start, end)
        if end < len(text) and newline > start:
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

    def runs() -> Iterator[tuple[str, str]]:
        for text in documents:
            for is_val, group in itertools.groupby(_pieces(text), key=lambda p: _bucket(p) <= val_bucket_max):
                yield "val" if is_val else "train", "".join(group)

    pending = runs()
    while batch := list(itertools.islice(pending, _ENCODE_BATCH)):
        for (split, _), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
            yield split, np.array([*ids, tokenizer.eos_id], dtype=np.int64)
