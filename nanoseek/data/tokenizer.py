"""Tokenizers behind one interface: char, byte, byte-level BPE (trained with `tokenizers`), or a tokenizer.json.

`encode` treats its input as plain text: a literal "<|endoftext|>" in a document is encoded as characters, never
as `eos_id`, so a corpus that mentions the token cannot fake document boundaries; only `prepare_data` inserts
`eos_id`, between documents."""

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, processors, trainers

from nanoseek.data.shards import REBUILD

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
META_FILE = "tokenizer_meta.json"
TOKENIZER_FILE = "tokenizer.json"
_META_FORMAT = "nanoseek-tokenizer"
# End-of-text spellings of common tokenizer.json files, tried in order for the `file` kind.
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
# BPE merge statistics settle long before this; capping the training text bounds time and memory on a
# corpus far larger than RAM (the `tokenizers` trainer keeps a count per distinct word).
BPE_TRAIN_MAX_CHARS = 1 << 28
_REPLACEMENT = "\ufffd"  # what decode prints for an id no table entry has (a padded model vocab can sample one)


class Tokenizer:
    """The interface every tokenizer kind implements."""

    kind: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts; kinds backed by Rust override this to encode them in parallel."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": _META_FORMAT, "kind": self.kind, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "eos_token": EOS_TOKEN, **self._meta_extra()}
        (directory / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def to_hf_files(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json + tokenizer_config.json so transformers' AutoTokenizer loads `directory`."""
        raise ValueError(f"a {self.kind!r} tokenizer cannot be exported for transformers; "
                         "prepare the data with tokenizer='bpe' or 'byte' to export")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def _meta_extra(self) -> dict:
        return {}


class CharTokenizer(Tokenizer):
    """One id per character seen in the corpus (sorted), then end-of-text as the last id."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise ValueError("a char tokenizer needs at least one character; the corpus is empty")
        self.char_to_id = {ch: i for i, ch in enumerate(self.chars)}
        self.eos_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        try:
            return [self.char_to_id[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in this char tokenizer's vocabulary "
                             f"({len(self.chars)} characters seen in its training corpus); use tokenizer='byte' "
                             "or 'bpe' for open-ended text") from None

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] if 0 <= i < n else EOS_TOKEN if i == n else _REPLACEMENT for i in map(int, ids))

    def _meta_extra(self) -> dict:
        return {"chars": "".join(self.chars)}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255 are the byte values, 256 is end-of-text."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def decode(self, ids: Iterable[int]) -> str:
        parts: list[str] = []  # a character spans several bytes: decode each run of byte ids as a whole
        for is_byte, run in itertools.groupby(map(int, ids), key=lambda i: 0 <= i < 256):
            if is_byte:
                parts.append(bytes(run).decode("utf-8", errors="replace"))
            else:
                parts += [EOS_TOKEN if i == self.eos_id else _REPLACEMENT for i in run]
        return "".join(parts)

    def to_hf_files(self, directory: str | Path, model_max_length: int | None = None) -> None:
        # A byte vocabulary is a BPE model with no merges over byte-level BPE's alphabet, each character mapped
        # to its byte value so that ids stay ours: printable bytes stand for themselves, the rest are shifted
        # above U+0100 in byte order (every byte a visible, non-space character).
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
        shifted = [b for b in range(256) if b not in printable]
        vocab = {**{chr(b): b for b in printable}, **{chr(256 + offset): b for offset, b in enumerate(shifted)}}
        rust = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
        rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        rust.decoder = decoders.ByteLevel()
        rust.add_special_tokens([EOS_TOKEN])
        _write_hf_files(Path(directory), rust, EOS_TOKEN, EOS_TOKEN, model_max_length)


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer: the byte-level BPE we train (`bpe`) or any tokenizer.json (`file`)."""

    def __init__(self, rust_tokenizer, kind: str, source: str = ""):
        self.rust = rust_tokenizer
        # Plain-text semantics (module docstring); not serialized, so a saved tokenizer.json behaves as usual.
        self.rust.encode_special_tokens = True
        self.kind = kind
        self.vocab_size = rust_tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token = next((t for t in _EOS_CANDIDATES if rust_tokenizer.token_to_id(t) is not None), None)
        if self.eos_token is None:
            raise ValueError(f"tokenizer {source or kind!r} has no end-of-text token (looked for "
                             f"{', '.join(_EOS_CANDIDATES)}); add one as a special token")
        self.eos_id = rust_tokenizer.token_to_id(self.eos_token)
        self.pad_token = PAD_TOKEN if rust_tokenizer.token_to_id(PAD_TOKEN) is not None else self.eos_token

    def encode(self, text: str) -> list[int]:
        return self.rust.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.rust.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.rust.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        super().save(directory)
        self.rust.save(str(Path(directory) / TOKENIZER_FILE))

    def to_hf_files(self, directory: str | Path, model_max_length: int | None = None) -> None:
        _write_hf_files(Path(directory), self.rust, self.eos_token, self.pad_token, model_max_length)


def _write_hf_files(directory: Path, rust, eos_token: str, pad_token: str, model_max_length: int | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rust.save(str(directory / TOKENIZER_FILE))
    # tokenizer_config.json by hand: transformers 5.x's save_pretrained names the class "TokenizersBackend", which 4.x
    # cannot load; "PreTrainedTokenizerFast" loads in both.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos_token, "eos_token": eos_token,
              "pad_token": pad_token, "unk_token": None, "clean_up_tokenization_spaces": False}
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def _train_bpe(documents: Iterable[str], vocab_size: int) -> HFTokenizer:
    specials = [EOS_TOKEN, PAD_TOKEN]  # ids 0 and 1, in this order
    if vocab_size < 256 + len(specials) + 1:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs >= 259 (256 bytes + 2 specials + 1 merge)")
    rust = RustTokenizer(models.BPE())  # byte-level: every string is representable, no unknown token needed
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rust.train_from_iterator(_take_chars(documents, BPE_TRAIN_MAX_CHARS), trainer)
    return HFTokenizer(rust, "bpe")


def _take_chars(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for text in documents:
        if seen >= max_chars:
            return
        seen += len(text)
        yield text


def train_tokenizer(kind_or_path: str, documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Build a tokenizer: "char" and "bpe" learn from `documents`, "byte" and a tokenizer.json path ignore them.
    `vocab_size` applies to "bpe" only (a small corpus may yield fewer tokens; read `.vocab_size`)."""
    if kind_or_path == "char":
        return CharTokenizer(itertools.chain.from_iterable(documents))
    if kind_or_path == "byte":
        return ByteTokenizer()
    if kind_or_path == "bpe":
        return _train_bpe(documents, vocab_size)
    return _load_tokenizer_json(Path(kind_or_path).expanduser(), kind="file")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load what `Tokenizer.save` wrote (or a folder / file holding just a tokenizer.json)."""
    path = Path(directory).expanduser()
    meta_path = path / META_FILE
    if path.is_file() or (not meta_path.is_file() and (path / TOKENIZER_FILE).is_file()):
        return _load_tokenizer_json(path, kind="file")
    if not meta_path.is_file():
        raise ValueError(f"no tokenizer in {str(path)!r} (neither {META_FILE} nor {TOKENIZER_FILE}); {REBUILD}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
        raise ValueError(f"{meta_path} is not valid JSON; {REBUILD}") from None
    kind = meta.get("kind")
    if meta.get("format") != _META_FORMAT or kind not in ("char", "byte", "bpe", "file"):
        raise ValueError(f"{meta_path} is not a nanoseek tokenizer description (kind={kind!r}); {REBUILD}")
    if kind == "char":
        tokenizer: Tokenizer = CharTokenizer(meta["chars"])
    elif kind == "byte":
        tokenizer = ByteTokenizer()
    else:
        tokenizer = _load_tokenizer_json(path / TOKENIZER_FILE, kind=kind)
    if tokenizer.vocab_size != meta.get("vocab_size"):
        raise ValueError(f"{meta_path} says vocab_size={meta.get('vocab_size')} but the tokenizer has "
                         f"{tokenizer.vocab_size}; the files are mismatched, {REBUILD}")
    return tokenizer


def _load_tokenizer_json(path: Path, kind: str) -> HFTokenizer:
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"tokenizer {str(path)!r} does not exist; use char, byte, bpe or a path to a tokenizer.json")
    try:
        rust = RustTokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        raise ValueError(f"{path} is not a valid tokenizer.json ({err}); point to a file saved by "
                         "`tokenizers` or transformers") from None
    return HFTokenizer(rust, kind, source=str(path))

