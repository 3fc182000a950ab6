"""Where text comes from: one string `source` names a corpus, and `iter_documents` streams its documents one at
a time (never a whole corpus in memory), in an order fixed by the source alone.

  builtin:pydocs     CPython's language reference (`pydoc_data.topics`), shipped with every Python: the default.
  builtin:stdlib     the standard library's own `.py` files (a larger corpus, still no download).
  PATH | DIR | GLOB  a .txt/.md file (one document), .jsonl (one JSON object per line) or .parquet file; every
                     such file under DIR, recursively; or the files a pattern such as `data/**/*.jsonl` matches.
  hf:NAME[:CONFIG]   a Hugging Face dataset, streamed; hf:PATH, a folder of data files or of `save_to_disk`."""

import glob
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from nanoseek.errors import first_line

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")

# A prepared directory (shards.py writes it) is recognised by this file and marker, so that a user who
# passes one where text is expected is told what it is instead of "no text files found".
PREPARED_META = "meta.json"
PREPARED_FORMAT = "nanoseek-tokens"

_STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Directory names under the stdlib that are not "the standard library": third-party installs and the
# regression-test suites (huge, repetitive, and full of deliberately broken code).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

_FIX_SOURCE = ("pass builtin:pydocs, builtin:stdlib, a .txt/.md/.jsonl/.parquet file, a directory of them, "
               "a glob pattern, or hf:NAME")


def is_prepared_dir(path: str | Path) -> bool:
    try:
        return json.loads((Path(path) / PREPARED_META).read_text()).get("format") == PREPARED_FORMAT
    except (OSError, ValueError, AttributeError):  # no meta.json, not JSON, or not a JSON object
        return False


def iter_documents(source: str, *, text_field: str = "text", hf_split: str = "train") -> Iterator[str]:
    """The non-empty documents of `source`, in a deterministic order. The source is checked now (a bad path raises
    here, not at the first `next`), its text read lazily; a source with no text raises ValueError once exhausted."""
    checked = _checked(source)
    if checked == "builtin:pydocs":
        documents = iter(_pydocs())
    elif checked == "builtin:stdlib":
        documents = _stdlib_documents()
    elif checked.startswith("hf:"):
        documents = _hf_documents(checked, text_field, hf_split)
    elif is_prepared_dir(Path(checked).expanduser()):
        raise ValueError(f"data source {source!r} is a prepared token directory, not text; pass it to "
                         f"`nanoseek train --data {source}` (or prepare_data) which reuses it as-is")
    else:
        documents = _file_documents(_resolve_files(checked), text_field)
    return _non_empty(documents, source)


def describe_source(source: str) -> str:
    """A one-line human description of `source`, without reading its documents (no network either)."""
    source = _checked(source)
    if source == "builtin:pydocs":
        return f"builtin:pydocs (CPython {sys.version.split()[0]} language reference, {len(_pydocs())} topics)"
    if source == "builtin:stdlib":
        return f"builtin:stdlib (Python {sys.version.split()[0]} standard library sources in {_STDLIB})"
    if source.startswith("hf:"):
        name, config = _parse_hf(source)
        if Path(name).is_dir():
            return f"local Hugging Face dataset folder {name}"
        return f"Hugging Face dataset {name}" + (f" (config {config})" if config else "") + " (streamed)"
    path = Path(source).expanduser()
    if is_prepared_dir(path):
        return f"prepared token shards in {path}"
    files = _resolve_files(source)
    total = sum(f.stat().st_size for f in files)
    if len(files) == 1 and path.is_file():
        return f"file {path} ({_human_bytes(total)})"
    kind = "directory" if path.is_dir() else "glob"
    return f"{kind} {source} ({len(files)} file{'s' * (len(files) != 1)}, {_human_bytes(total)})"


def _checked(source: str) -> str:
    """`source`, refused if its name alone is wrong; a folder written by `save_to_disk` becomes hf:FOLDER."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"data source {source!r} is empty; {_FIX_SOURCE}")
    if source.startswith("builtin:") and source not in ("builtin:pydocs", "builtin:stdlib"):
        raise ValueError(f"data source {source!r}: unknown builtin corpus; use builtin:pydocs or builtin:stdlib")
    path = Path(source).expanduser()
    return f"hf:{path}" if _is_saved_hf_dataset(path) else source


def _non_empty(documents: Iterator[str], source: str) -> Iterator[str]:
    empty = True
    for text in filter(None, documents):
        empty = False
        yield text
    if empty:
        raise ValueError(f"data source {source!r} holds no text (every document is empty); "
                         "point it at files or a dataset with text in them")


def _resolve_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        where = f"glob {source!r} matches"
        fix = "check the pattern (use ** with a quoted pattern to search subdirectories)"
    elif path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise ValueError(f"data file {str(path)!r} has unsupported type {path.suffix or '(none)'!r}; "
                             f"use one of {', '.join(SUFFIXES)}")
        return [path]
    elif path.is_dir():
        # Sorted by path relative to the directory, so the order is the same on every machine.
        found = sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix())
        where, fix = f"directory {str(path)!r} contains", "add some or point the source at the right directory"
    else:
        raise ValueError(f"data source {source!r} does not exist; {_FIX_SOURCE}")
    files = [p for p in found if p.is_file() and p.suffix.lower() in SUFFIXES]
    if not files:
        raise ValueError(f"{where} no {'/'.join(SUFFIXES)} files; {fix}")
    return files


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _pydocs() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise ValueError("builtin:pydocs needs the `pydoc_data` module, which this Python build lacks; "
                         "use builtin:stdlib or a text file") from None
    return [topics[key] for key in sorted(topics)]  # dict order is a detail of the generated file; sort it


def _stdlib_documents() -> Iterator[str]:
    for directory, subdirs, files in os.walk(_STDLIB):
        # Pruning and sorting in place steers os.walk: skipped trees are never entered, order is fixed.
        subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                yield (Path(directory) / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # a few stdlib files are unreadable or not UTF-8 on some installs; they are not needed


def _file_documents(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            # errors="replace": one stray byte in a large scraped corpus should not stop preparation.
            yield path.read_text(encoding="utf-8", errors="replace")
        elif suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield from _parquet_documents(path, text_field)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}); each line of a .jsonl file "
                                 "must be one JSON object") from None
            yield _text_of(record, text_field, f"{path}:{line_no}")


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow; pip install 'nanoseek[hf]'") from None
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)}); "
                         "set the text field (data.hf_text_field) to the column holding the text")
    # Row-group batches keep memory bounded for files larger than RAM.
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield text or ""


def _text_of(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: record has no field {text_field!r} (it has: {keys}); "
                         "set the text field (data.hf_text_field) to the one holding the text")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not text; "
                         "choose a field that holds strings")
    return text or ""


def _parse_hf(source: str) -> tuple[str, str | None]:
    rest = source[len("hf:"):]
    if not rest:
        raise ValueError(f"data source {source!r} names no dataset; use hf:NAME, hf:NAME:CONFIG or hf:/local/folder")
    if Path(rest).expanduser().exists():  # a local folder may contain ':' in its path; take it whole
        return str(Path(rest).expanduser()), None
    name, _, config = rest.partition(":")
    return name, config or None


def _is_saved_hf_dataset(path: Path) -> bool:
    """A folder written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk (dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _hf_documents(source: str, text_field: str, hf_split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data source {source!r} needs the `datasets` library; pip install 'nanoseek[hf]'") from None
    name, config = _parse_hf(source)
    path = Path(name)
    if _is_saved_hf_dataset(path):
        # save_to_disk folders are memory-mapped Arrow: already larger-than-memory friendly.
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if hf_split not in dataset:
                raise ValueError(f"{path}: no split {hf_split!r} (splits: {', '.join(dataset)}); "
                                 "set data.hf_split to one of them")
            dataset = dataset[hf_split]
    else:
        try:
            dataset = datasets.load_dataset(name, config, split=hf_split, streaming=True)
        except Exception as err:  # the library raises many types (hub, network, builder); name them all once
            reason = first_line(err) or type(err).__name__
            what = f"{name!r}" + (f" config {config!r}" if config else "") + f" split {hf_split!r}"
            raise ValueError(f"could not load Hugging Face dataset {what}: {type(err).__name__}: {reason}; check "
                             "the name/config/split, or save it locally and pass hf:/path/to/folder") from err
    columns = getattr(dataset, "column_names", None)  # None for a stream whose features are unknown
    if columns is not None and text_field not in columns:
        raise ValueError(f"{source}: no column {text_field!r} (columns: {', '.join(columns)}); "
                         "set data.hf_text_field to the column holding the text")
    return (_text_of(row, text_field, f"{source} row {index}") for index, row in enumerate(dataset))
