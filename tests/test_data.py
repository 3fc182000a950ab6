"""Data pipeline: sources, tokenizers, shard format, TokenLoader, prepare_data. CPU, tiny, each test well under 2 s."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek.config import DataConfig
from nanoseek.data import (
    TokenLoader,
    describe_source,
    iter_documents,
    load_prepared,
    load_tokenizer,
    prepare_data,
    read_shard,
    token_windows,
    train_tokenizer,
    validation_batches,
)
from nanoseek.data.shards import HEADER_BYTES, MAGIC, read_tokens
from shard_helpers import next_windows, write_shards

UNICODE_TEXT = "naïve café — 日本語 🙂🚀 x² ∑\n\ttabs  and   spaces\r\nend"


@pytest.fixture(scope="module")
def pydocs_slice() -> list[str]:
    """A small, fixed slice of the default corpus (keeps BPE training in milliseconds)."""
    return list(itertools.islice(iter_documents("builtin:pydocs"), 12))


@pytest.fixture(scope="module")
def bpe(pydocs_slice):
    return train_tokenizer("bpe", pydocs_slice, vocab_size=300)


def write_stream(tmp_path: Path, lengths: list[int], vocab_size: int = 1000,
                 seed: int = 0) -> tuple[list[Path], list[np.ndarray]]:
    """One shard per length, filled with random ids; returns the paths and the reference arrays."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, vocab_size, size=n) for n in lengths]
    paths = []
    for i, array in enumerate(arrays):
        paths += write_shards([array], tmp_path, f"s{i}", shard_tokens=max(lengths), vocab_size=vocab_size)
    return paths, arrays


# ---- tokenizers -------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_unknown_character(tmp_path):
    tok = train_tokenizer("char", [UNICODE_TEXT, "abc"], vocab_size=0)
    assert tok.kind == "char" and tok.vocab_size == len(set(UNICODE_TEXT + "abc")) + 1
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT) and loaded.eos_id == tok.eos_id
    with pytest.raises(ValueError, match=r"'Z' is not in this char tokenizer.*tokenizer='byte'"):
        tok.encode("Zebra")


def test_byte_tokenizer_round_trip_and_transformers_export(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer("byte", [], vocab_size=0)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    ids = tok.encode(UNICODE_TEXT)
    assert ids == list(UNICODE_TEXT.encode("utf-8"))
    assert tok.decode(ids + [tok.eos_id] + ids) == UNICODE_TEXT + "<|endoftext|>" + UNICODE_TEXT
    tok.to_hf_files(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.encode(UNICODE_TEXT, add_special_tokens=False) == ids
    assert load_tokenizer(tmp_path).kind == "file"  # a bare tokenizer.json folder loads as a file tokenizer


def test_bpe_round_trip_save_load_and_transformers_parity(bpe, pydocs_slice, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    assert bpe.kind == "bpe" and bpe.vocab_size == 300 and bpe.eos_id == 0
    assert bpe.rust.token_to_id("<|pad|>") == 1
    samples = [UNICODE_TEXT, pydocs_slice[3][:2000], "unseenwordzzqx   def f(x): return x ** 2"]
    for text in samples:
        assert bpe.decode(bpe.encode(text)) == text
    # Text that merely contains the special token's spelling is text, not a document boundary.
    assert bpe.eos_id not in bpe.encode("a <|endoftext|> b")

    bpe.save(tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    assert loaded.kind == "bpe" and all(loaded.encode(t) == bpe.encode(t) for t in samples)

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "saved" / "tokenizer.json"))
    for text in samples:
        assert hf.encode(text, add_special_tokens=False) == bpe.encode(text)
        assert hf.decode(bpe.encode(text)) == text
    bpe.to_hf_files(tmp_path / "hf", model_max_length=128)
    hf_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert hf_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert auto.eos_token_id == 0 and auto.pad_token_id == 1
    assert auto.encode(samples[1], add_special_tokens=False) == bpe.encode(samples[1])

    # Any tokenizer.json path is a tokenizer kind of its own.
    from_file = train_tokenizer(str(tmp_path / "saved" / "tokenizer.json"), [], vocab_size=0)
    assert from_file.kind == "file" and from_file.encode(samples[1]) == bpe.encode(samples[1])


def test_bad_tokenizer_names_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist; use char, byte, bpe"):
        train_tokenizer("wordpiece", [], vocab_size=300)
    with pytest.raises(ValueError, match="no tokenizer in"):
        load_tokenizer(tmp_path)


# ---- sources ----------------------------------------------------------------------------------------


def test_builtin_corpora_yield_text():
    docs = list(iter_documents("builtin:pydocs"))
    assert len(docs) > 20 and all(isinstance(d, str) and d for d in docs)
    assert docs == list(iter_documents("builtin:pydocs"))  # deterministic order
    assert "pydocs" in describe_source("builtin:pydocs")
    stdlib = list(itertools.islice(iter_documents("builtin:stdlib"), 3))
    assert len(stdlib) == 3 and all(stdlib)
    with pytest.raises(ValueError, match="unknown builtin corpus"):
        iter_documents("builtin:wikipedia")


def make_text_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text")
    (root / "sub" / "b.md").write_text("# beta")
    records = [{"text": "gamma one"}, {"text": "gamma two", "id": 2}]
    (root / "c.jsonl").write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")  # blank line skipped
    (root / "ignored.csv").write_text("not,used")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["delta one", "delta two"], "n": [1, 2]}), root / "d.parquet")


def test_file_directory_glob_jsonl_parquet_sources(tmp_path):
    make_text_tree(tmp_path)
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["alpha text"]
    assert list(iter_documents(str(tmp_path / "c.jsonl"))) == ["gamma one", "gamma two"]
    assert list(iter_documents(str(tmp_path / "d.parquet"))) == ["delta one", "delta two"]
    # Directory: recursive, sorted by relative path, only known suffixes.
    expected = ["alpha text", "gamma one", "gamma two", "delta one", "delta two", "# beta"]
    assert list(iter_documents(str(tmp_path))) == expected
    assert list(iter_documents(str(tmp_path / "**" / "*.md"))) == ["# beta"]
    assert list(iter_documents(str(tmp_path / "*.jsonl"))) == ["gamma one", "gamma two"]
    assert "2 files" not in describe_source(str(tmp_path)) and "4 files" in describe_source(str(tmp_path))


def test_record_field_errors_name_file_and_fix(tmp_path):
    make_text_tree(tmp_path)
    with pytest.raises(ValueError, match=r"c\.jsonl:1: record has no field 'body' \(it has: text\).*hf_text_field"):
        list(iter_documents(str(tmp_path / "c.jsonl"), text_field="body"))
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'body' \(columns: text, n\)"):
        list(iter_documents(str(tmp_path / "d.parquet"), text_field="body"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))
    with pytest.raises(ValueError, match=r"unsupported type '\.csv'"):
        iter_documents(str(tmp_path / "ignored.csv"))


def test_local_hf_dataset_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    rows = {"content": ["first row", "second row"], "id": [1, 2]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    assert list(iter_documents(f"hf:{tmp_path / 'saved'}", text_field="content")) == ["first row", "second row"]
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: content, id\)"):
        list(iter_documents(f"hf:{tmp_path / 'saved'}"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("uno", "dos")))
    assert list(iter_documents(f"hf:{tmp_path / 'files'}")) == ["uno", "dos"]  # load_dataset(path, streaming=True)
    with pytest.raises(ValueError, match="could not load Hugging Face dataset.*split 'validation'"):
        iter_documents(f"hf:{tmp_path / 'files'}", hf_split="validation")


def test_bad_path_empty_corpus_and_empty_dir_raise(tmp_path):
    with pytest.raises(ValueError, match=r"'/no/such/corpus\.txt' does not exist; pass builtin:pydocs"):
        iter_documents("/no/such/corpus.txt")
    with pytest.raises(ValueError, match=r"contains no \.txt/\.md/\.jsonl/\.parquet files"):
        iter_documents(str(tmp_path))
    with pytest.raises(ValueError, match="matches no"):
        iter_documents(str(tmp_path / "*.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        list(iter_documents(str(tmp_path / "empty.txt")))


# ---- shard format -----------------------------------------------------------------------------------


def test_shard_writer_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 500, size=n) for n in (7, 130, 1, 64, 40)]  # 242 tokens
    paths = write_shards(chunks, tmp_path, "train", shard_tokens=100, vocab_size=500)
    stream = np.concatenate(chunks)
    # 100 + 100 + a 42-token tail, which (under half a shard) joins the previous shard.
    assert [p.name for p in paths] == ["train_00000.bin", "train_00001.bin"]
    shards = [read_shard(p) for p in paths]
    assert [len(s) for s in shards] == [100, 142] and shards[0].dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate(shards), stream)
    for cap in (None, 30, 100, 150, 1000):  # read_tokens: joined in order, int64, stopping at the cap
        got = read_tokens(paths, cap)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, stream[:cap])
    big = write_shards([[0, 70_000, 5]], tmp_path, "wide", shard_tokens=10, vocab_size=70_001)
    assert read_shard(big[0]).dtype == np.uint32 and list(read_shard(big[0])) == [0, 70_000, 5]
    with pytest.raises(ValueError, match=r"token id 500 is outside \[0, 500\)"):
        write_shards([[1, 500]], tmp_path, "bad", shard_tokens=10, vocab_size=500)


def test_corrupt_shards_raise_with_path_and_fix(tmp_path):
    path = write_shards([np.arange(50)], tmp_path, "x", shard_tokens=100, vocab_size=100)[0]
    raw = path.read_bytes()

    path.write_bytes(b"NOTATOKN" + raw[8:])
    with pytest.raises(ValueError, match=r"x_00000\.bin: not a nanoseek token shard.*re-run `nanoseek prepare`"):
        read_shard(path)

    path.write_bytes(raw[:8] + (99).to_bytes(4, "little") + raw[12:])
    with pytest.raises(ValueError, match=r"shard format version 99.*re-run `nanoseek prepare`"):
        read_shard(path)

    path.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"truncated: the header says 50 tokens .* re-run `nanoseek prepare`"):
        read_shard(path)

    bad_ids = np.frombuffer(raw[HEADER_BYTES:], dtype=np.uint16).copy()
    bad_ids[17] = 4000
    path.write_bytes(raw[:HEADER_BYTES] + bad_ids.tobytes())
    with pytest.raises(ValueError, match=r"token id 4000 >= vocab_size 100.*re-run `nanoseek prepare`"):
        read_shard(path)
    path.write_bytes(raw)
    with pytest.raises(ValueError, match="token id 49 >= vocab_size 40"):
        read_shard(path, vocab_size=40)  # a model with a smaller vocabulary than the shard's tokenizer
    assert raw[:8] == MAGIC


# ---- TokenLoader ------------------------------------------------------------------------------------


def reference_windows(arrays: list[np.ndarray], seq_len: int, lookahead: int) -> list[np.ndarray]:
    """The obvious implementation: windows stepped by seq_len, never crossing a shard, shards in order."""
    window = seq_len + lookahead
    return [a[i:i + window] for a in arrays for i in range(0, len(a) - window + 1, seq_len)]


def test_loader_walks_shard_boundary_in_order(tmp_path):
    paths, arrays = write_stream(tmp_path, [53, 37])
    loader = TokenLoader(paths, batch_size=2, seq_len=8, lookahead=1, shuffle=False)
    expected = reference_windows(arrays, 8, 1)  # 6 windows in shard 0, 4 in shard 1
    assert loader.n_windows == len(expected) == 10 and loader.batches_per_epoch == 5
    got = []
    for _ in range(loader.batches_per_epoch):
        windows = next_windows(loader)
        x, targets = loader.next_batch()
        assert x.dtype == targets.dtype == torch.long and x.shape == targets.shape == (2, 8)
        got += [torch.cat([row_x, row_t[-1:]]).numpy() for row_x, row_t in zip(x, targets)]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert windows == [("s1_00000.bin", 16), ("s1_00000.bin", 24)]  # 24 + 9 <= 37: stays inside
    loader.next_batch()
    assert loader.epoch == 1 and loader.position == 2  # wrapped to the next epoch


def test_mtp_targets_line_up_with_raw_stream(tmp_path):
    paths, arrays = write_stream(tmp_path, [200, 120])
    seq_len, lookahead = 16, 4
    loader = TokenLoader(paths, batch_size=3, seq_len=seq_len, lookahead=lookahead, seed=3)
    raw = {p.name: a for p, a in zip(paths, arrays)}
    for _ in range(6):
        windows = next_windows(loader)
        x, targets = loader.next_batch()
        assert targets.shape == (3, seq_len + lookahead - 1)
        for row, (name, offset) in enumerate(windows):
            stream = raw[name]
            np.testing.assert_array_equal(x[row].numpy(), stream[offset:offset + seq_len])
            for k in range(lookahead):  # depth-k MTP target = token k+1 ahead of each input position
                np.testing.assert_array_equal(targets[row, k:k + seq_len].numpy(),
                                              stream[offset + k + 1:offset + k + 1 + seq_len])
        assert torch.equal(targets[:, :seq_len - 1], x[:, 1:])


def test_rank_striding_is_disjoint_and_covers_single_rank_batch(tmp_path):
    paths, _ = write_stream(tmp_path, [300, 170])
    single = TokenLoader(paths, batch_size=4, seq_len=10, lookahead=2, seed=7)
    ranks = [TokenLoader(paths, batch_size=2, seq_len=10, lookahead=2, rank=r, world_size=2, seed=7) for r in (0, 1)]
    for _ in range(single.batches_per_epoch + 3):  # into the second (reshuffled) epoch
        x, targets = single.next_batch()
        windows = [next_windows(loader) for loader in ranks]
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), targets)
        assert not set(windows[0]) & set(windows[1])
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_state_dict_resume_and_skip_are_exact(tmp_path):
    paths, _ = write_stream(tmp_path, [90, 75, 60])
    make = lambda: TokenLoader(paths, batch_size=3, seq_len=8, lookahead=2, seed=11)  # noqa: E731
    straight = make()
    for _ in range(7):
        straight.next_batch()
    state = json.loads(json.dumps(straight.state_dict()))  # plain JSON survives a checkpoint
    expected = [straight.next_batch() for _ in range(12)]  # crosses two epoch boundaries (9 batches per epoch)
    assert straight.epoch >= 2

    resumed = make()
    resumed.load_state_dict(state)
    for x, targets in expected:
        rx, rt = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(rt, targets)

    skipped = make()
    skipped.skip(7)
    assert skipped.state_dict() == state
    with pytest.raises(ValueError, match="seed=11 but this loader has 12"):
        TokenLoader(paths, batch_size=3, seq_len=8, lookahead=2, seed=12).load_state_dict(state)


def test_epochs_reshuffle_deterministically_and_eval_starts_at_beginning(tmp_path):
    paths, arrays = write_stream(tmp_path, [100, 100])
    loader = TokenLoader(paths, batch_size=2, seq_len=9, lookahead=1, seed=5)
    epoch0 = [loader.next_batch()[0] for _ in range(loader.batches_per_epoch)]
    epoch1 = [loader.next_batch()[0] for _ in range(loader.batches_per_epoch)]
    assert loader.epoch == 1
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    as_rows = lambda batches: sorted(tuple(row.tolist()) for b in batches for row in b)  # noqa: E731
    assert as_rows(epoch0) == as_rows(epoch1)  # same windows, new order

    shards = [read_shard(path) for path in paths]
    eval_a, eval_b = list(token_windows(shards, 9, 2, max_batches=3)), list(token_windows(shards, 9, 2, max_batches=3))
    assert len(eval_a) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(eval_a, eval_b))
    np.testing.assert_array_equal(eval_a[0][0][0].numpy(), arrays[0][:9])  # natural order from the start


def test_validation_batches_are_the_unshuffled_loaders_batches_on_every_rank(tmp_path):
    paths, _ = write_stream(tmp_path, [90, 75, 60])
    for world in (1, 2):
        for rank in range(world):
            loader = TokenLoader(paths, batch_size=3, seq_len=8, lookahead=2, rank=rank, world_size=world,
                                 shuffle=False)
            got = validation_batches(paths, 3, 8, lookahead=2, rank=rank, world_size=world, max_batches=100)
            assert len(got) == loader.batches_per_epoch  # only full global batches
            for x, targets in got:
                rx, rt = loader.next_batch()
                assert torch.equal(x, rx) and torch.equal(targets, rt)
    assert len(validation_batches(paths, 3, 8, lookahead=2, max_batches=2)) == 2


def test_token_windows_score_every_token_once_with_a_tail(tmp_path):
    ids = np.arange(23)
    batches = list(token_windows([ids], seq_len=5, batch_size=3, tail=True))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 5), (1, 5), (1, 2)]  # 4 full windows, then 23 - 20 = 3
    targets = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(targets, torch.arange(1, 23))
    for x, y in batches:
        assert torch.equal(y, x + 1)


def test_loader_rejects_short_shard_and_oversized_batch(tmp_path):
    paths, _ = write_stream(tmp_path, [100, 6])
    with pytest.raises(ValueError, match=r"s1_00000\.bin: 6 tokens, shorter than one window of seq_len\+lookahead=9"):
        TokenLoader(paths, batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match=r"one batch needs batch_size\*world_size=64"):
        TokenLoader(paths[:1], batch_size=32, seq_len=8, world_size=2)
    with pytest.raises(ValueError, match=r"token id \d+ >= vocab_size 10"):
        TokenLoader(paths[:1], batch_size=1, seq_len=8, vocab_size=10).next_batch()


# ---- prepare_data -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, pydocs_slice) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(pydocs_slice))  # one long document: the split must still work
    return path


def test_prepare_data_is_deterministic_and_reusable(small_corpus, tmp_path):
    cfg = DataConfig(source=str(small_corpus), tokenizer="bpe", vocab_size=300, seq_len=32, shard_tokens=4096)
    first = prepare_data(cfg, tmp_path / "a", progress=False)
    second = prepare_data(cfg, tmp_path / "b", progress=False)
    (tmp_path / "a" / "train_00099.bin").write_bytes(b"")  # not listed in meta.json: left alone
    again = prepare_data(cfg, tmp_path / "a", progress=False)  # re-preparing in place
    assert (tmp_path / "a" / "train_00099.bin").exists()
    assert first.meta["content_hash"] == second.meta["content_hash"] == again.meta["content_hash"]
    assert first.meta == again.meta

    meta = first.meta
    assert len(first.train_shards) > 1 and first.val_shards  # several shards exercise the writer
    assert meta["vocab_size"] == first.vocab_size == 300 and meta["tokenizer"]["kind"] == "bpe"
    total = meta["train"]["tokens"] + meta["val"]["tokens"]
    assert 0.03 < meta["val"]["tokens"] / total < 0.15  # close to val_fraction=0.05, by character mass
    assert sum(len(read_shard(p)) for p in first.train_shards) == meta["train"]["tokens"]

    # Every character lands in exactly one split (they interleave by piece, so compare sizes).
    decoded = "".join(first.tokenizer.decode(np.concatenate([read_shard(p) for p in shards]))
                      for shards in (first.train_shards, first.val_shards))
    assert len(decoded.replace("<|endoftext|>", "")) == len(small_corpus.read_text())

    reused = prepare_data(DataConfig(source=str(tmp_path / "a")), tmp_path / "ignored", progress=False)
    assert reused.meta == meta and reused.train_shards == first.train_shards
    assert not (tmp_path / "ignored").exists()
    assert "prepared token shards" in describe_source(str(tmp_path / "a"))
    with pytest.raises(ValueError, match="is a prepared token directory, not text"):
        iter_documents(str(tmp_path / "a"))
    loader = TokenLoader(reused.train_shards, batch_size=2, seq_len=32, lookahead=2, vocab_size=reused.vocab_size)
    x, targets = loader.next_batch()
    assert x.shape == (2, 32) and targets.shape == (2, 33) and int(x.max()) < 300


def test_prepared_dir_detects_corruption(small_corpus, tmp_path):
    cfg = DataConfig(source=str(small_corpus), tokenizer="byte", seq_len=32, shard_tokens=1 << 16)
    prepared = prepare_data(cfg, tmp_path, progress=False)
    prepared.verify()
    shard = prepared.train_shards[0]
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES + 5] ^= 1  # a flipped bit in a token: header and range checks cannot see it
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train_00000\.bin: contents do not match the sha256 in meta\.json"):
        prepared.verify()
    shard.write_bytes(bytes(raw[:-4]))
    with pytest.raises(ValueError, match="truncated"):
        load_prepared(tmp_path)


def test_prepare_data_too_small_corpus_fails_clearly(tmp_path):
    (tmp_path / "tiny.txt").write_text("a short line\n" * 20)
    cfg = DataConfig(source=str(tmp_path / "tiny.txt"), tokenizer="char", seq_len=64, shard_tokens=1024)
    with pytest.raises(ValueError, match=r"too little text to split|split has \d+ tokens, fewer than"):
        prepare_data(cfg, tmp_path / "out", progress=False)
    # 400 short documents: val gets about 5% of 40k characters, too few for 4 sequences of 1024.
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i}: " + "words " * 15}) + "\n"
                                                 for i in range(400)))
    cfg = DataConfig(source=str(tmp_path / "docs.jsonl"), tokenizer="char", seq_len=1024, shard_tokens=8192)
    with pytest.raises(ValueError, match=r"the val split has \d+ tokens, fewer than 4104.*lower data\.seq_len"):
        prepare_data(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()
