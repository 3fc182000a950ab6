"""Data pipeline: text sources (corpus.py) -> tokenizers (tokenizer.py) -> token shards and batches (shards.py)."""

from nanoseek.data.corpus import describe_source, is_prepared_dir, iter_documents
from nanoseek.data.shards import (
    PreparedData,
    ShardWriter,
    TokenLoader,
    count_windows,
    load_prepared,
    prepare_data,
    read_shard,
    read_shard_header,
    write_shards,
)
from nanoseek.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "ByteTokenizer", "CharTokenizer", "HFTokenizer", "PreparedData", "ShardWriter", "TokenLoader", "Tokenizer",
    "count_windows", "describe_source", "is_prepared_dir", "iter_documents", "load_prepared", "load_tokenizer",
    "prepare_data", "read_shard", "read_shard_header", "train_tokenizer", "write_shards",
]
