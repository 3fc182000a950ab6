"""Read a GGUF file (llama.cpp's format) through transformers, which dequantises it into an ordinary float32 model
(undoing llama.cpp's query/key row permutation); from there it is imported as a transformers folder is. Its
tokenizer is written once into a cache folder ($NANOSEEK_CACHE, default ~/.cache/nanoseek/gguf/<name>-<key>/) so
that data preparation, `--chat` and a converted run read it as a file. Needs `pip install 'nanoseek[gguf]'`."""

import hashlib
import importlib
import os
import shutil
from pathlib import Path

import torch


def is_gguf_file(path: str | Path) -> bool:
    """True for a file that starts with the GGUF magic (whatever its suffix)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _require_gguf_support():
    try:
        importlib.import_module("gguf")  # transformers' loader reads the file with it
        import transformers
    except ImportError as err:
        raise ValueError(f"reading a .gguf file needs the gguf extra ({err.name} is missing): "
                         "pip install 'nanoseek[gguf]'") from None
    return transformers


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(transformers config dict, dequantised float32 tensors by transformers' names) of a GGUF file."""
    path = Path(path)
    transformers = _require_gguf_support()
    try:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                     dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise ValueError(f"{path}: transformers could not read this GGUF ({str(err).splitlines()[0]}); "
                         "its architecture or quantisation may be unsupported") from None
    hf = hf_model.config.to_dict()
    hf.pop("quantization_config", None)  # the weights are plain floats from here on
    return hf, {name: tensor.detach() for name, tensor in hf_model.state_dict().items()}


def gguf_tokenizer_dir(path: str | Path) -> Path:
    """A folder holding the GGUF's tokenizer (tokenizer.json, tokenizer_config.json, its chat template),
    written on first use; keyed by the file's absolute path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache/nanoseek") / "gguf" / f"{path.stem}-{key}"
    if (folder / "tokenizer.json").is_file():
        return folder
    tokenizer = _require_gguf_support().AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    partial = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(str(partial))
    if not (partial / "tokenizer.json").is_file():
        raise ValueError(f"{path}: its tokenizer has no fast (tokenizer.json) form; nanoseek needs one")
    if folder.exists():  # a concurrent writer got there first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.replace(folder)
    return folder
