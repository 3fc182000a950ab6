"""Data pipeline: text sources (corpus.py) -> tokenizers (tokenizer.py) -> prepared directories (prepare.py) of
token shards (shards.py, the file format) -> batches (loader.py)."""

from nanoseek.data.corpus import describe_source, is_prepared_dir, iter_documents
from nanoseek.data.loader import TokenLoader, count_windows, token_windows, validation_batches
from nanoseek.data.prepare import PreparedData, load_prepared, prepare_data
from nanoseek.data.shards import ShardWriter, read_shard, read_shard_header, read_tokens
from nanoseek.data.tokenizer import (ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer,
                                     train_tokenizer)

__all__ = ["ByteTokenizer", "CharTokenizer", "HFTokenizer", "PreparedData", "ShardWriter", "TokenLoader", "Tokenizer",
           "count_windows", "describe_source", "is_prepared_dir", "iter_documents", "load_prepared", "load_tokenizer",
           "prepare_data", "read_shard", "read_shard_header", "read_tokens", "token_windows", "train_tokenizer",
           "validation_batches"]
