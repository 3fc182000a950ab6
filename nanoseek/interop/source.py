"""A model to start from (`convert`, `heal`, `npt`, and `generate` / `eval` on a model that is not a run), with the
tokenizer its data must use: a nanoseek run or checkpoint directory (tokenizer from its data/), a transformers folder
(detected by its config.json; its tokenizer.json) or a GGUF file (detected by its header; a cache folder)."""

from dataclasses import dataclass
from pathlib import Path

from nanoseek.config import RunConfig
from nanoseek.interop.gguf import gguf_tokenizer_dir, is_gguf_file
from nanoseek.interop.importer import import_hf, is_hf_folder, load_hf_tokenizer
from nanoseek.model import Transformer
from nanoseek.train.loading import load_model, load_run_tokenizer, run_dir_of


@dataclass
class SourceModel:
    model: Transformer  # fp32, on CPU, in eval mode
    kind: str  # "nanoseek" | "hf" | "gguf"
    tokenizer: str  # what DataConfig.tokenizer takes: a tokenizer.json path, "byte", or "char"
    tokenizer_dir: Path  # the folder with tokenizer.json (and a chat template, if any)
    prepared_data: Path | None = None  # a char-tokenizer run's own prepared data (its table covers only that text)
    preset: str = "tiny-gqa"  # only supplies defaults when a run config is read back; every field is stored


def load_source_model(path: str | Path, flag: str) -> SourceModel:
    """Load the model at `path`; `flag` (e.g. "--from") names the option in errors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{flag} {str(path)!r} does not exist; pass a nanoseek run/checkpoint directory, a "
                         "transformers folder (with config.json) or a .gguf file")
    if path.is_file():
        if not is_gguf_file(path):
            raise ValueError(f"{flag} {str(path)!r} is a file but not a GGUF model; pass a .gguf file, a "
                             "transformers folder or a nanoseek run directory")
        folder = gguf_tokenizer_dir(path)
        return SourceModel(import_hf(path), "gguf", str(folder / "tokenizer.json"), folder)
    if is_hf_folder(path):
        if load_hf_tokenizer(path) is None:
            raise ValueError(f"{flag} {str(path)!r} has no tokenizer.json; save the model's fast tokenizer there "
                             "(tokenizer.save_pretrained(folder)) so text is tokenised as the model expects")
        return SourceModel(import_hf(path), "hf", str(path / "tokenizer.json"), path)
    model, _ = load_model(path)
    run_dir = run_dir_of(path)
    if run_dir is None:
        raise ValueError(f"{flag} {str(path)!r}: no run directory (with data/ and config.toml) at or above it, so "
                         "its tokenizer is unknown; pass the run directory")
    kind = load_run_tokenizer(run_dir).kind
    try:
        preset = RunConfig.load_toml(run_dir / "config.toml").preset
    except ValueError:
        preset = "tiny-gqa"
    data = run_dir / "data"
    tokenizer = kind if kind in ("byte", "char") else str(data / "tokenizer.json")
    return SourceModel(model.eval(), "nanoseek", tokenizer, data, prepared_data=data if kind == "char" else None,
                       preset=preset)
