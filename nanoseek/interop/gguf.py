"""Read a GGUF file (llama.cpp's format, how many people keep their small models) as a nanoseek model.

transformers dequantises the GGUF's tensors (Q4_0/Q4_1/Q8_0/K-quants/F16/...) into an ordinary
`LlamaForCausalLM` (or Qwen3, ...) in float32, undoing llama.cpp's query/key row permutation; from there the
weights take the same road as a transformers folder (`importer.import_hf`).
The tokenizer inside the GGUF is written once, as tokenizer.json plus its chat template, into a cache folder
(`$NANOSEEK_CACHE`, default ~/.cache/nanoseek/gguf/<name>-<key>/) so that data preparation, `--chat` and a
converted run can all read it as a file. Needs the `gguf` extra: `pip install 'nanoseek[gguf]'`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch


GGUF_MAGIC = b"GGUF"
EXTRA_HINT = "pip install 'nanoseek[gguf]'"


def is_gguf_file(path: str | Path) -> bool:
    """True for a file that starts with the GGUF magic (whatever its suffix)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def _require_gguf_support():
    try:
        import gguf  # noqa: F401  transformers' loader reads the file with it
        import transformers
    except ImportError as err:
        raise ValueError(f"reading a .gguf file needs the gguf extra ({err.name} is missing): {EXTRA_HINT}") from None
    return transformers


def _check(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not is_gguf_file(path):
        raise ValueError(f"{str(path)!r} is not a GGUF file (no GGUF header); pass a .gguf model file")
    return path


def load_gguf_hf(path: str | Path) -> torch.nn.Module:
    """The GGUF dequantised into a transformers model (float32, CPU, eval mode)."""
    path = _check(path)
    transformers = _require_gguf_support()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise ValueError(f"{path}: transformers could not read this GGUF ({str(err).splitlines()[0]}); "
                         "its architecture or quantisation may be unsupported") from None
    return model.eval()


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(transformers config dict, dequantised float32 tensors by transformers' names) of a GGUF file; the
    importer maps them as it maps a transformers folder."""
    hf_model = load_gguf_hf(path)
    hf = hf_model.config.to_dict()
    hf.pop("quantization_config", None)  # the weights are plain floats from here on
    return hf, {name: tensor.detach() for name, tensor in hf_model.state_dict().items()}


def _cache_root() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek") / "gguf"


def gguf_tokenizer_dir(path: str | Path) -> Path:
    """A folder holding the GGUF's tokenizer (tokenizer.json, tokenizer_config.json, its chat template),
    written on first use; keyed by the file's absolute path, size and modification time."""
    path = _check(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = _cache_root() / f"{path.stem}-{key}"
    if (folder / "tokenizer.json").is_file():
        return folder
    transformers = _require_gguf_support()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    partial = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(str(partial))
    if not (partial / "tokenizer.json").is_file():
        raise ValueError(f"{path}: its tokenizer has no fast (tokenizer.json) form; nanoseek needs one")
    if folder.exists():  # a concurrent writer got there first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.replace(folder)
    return folder


__all__ = ["is_gguf_file", "gguf_tokenizer_dir", "load_gguf_hf", "read_gguf"]
