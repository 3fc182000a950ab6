"""Whatever model a user holds (a nanoseek run or checkpoint, a transformers folder, a GGUF file) with its tokenizer,
ready for `generate` / `eval`; and its chat template for `--chat`, rendered by transformers: the text holds special
tokens such as <|im_start|>, which only the model's own tokenizer.json (not nanoseek's `encode`) turns into ids."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.data import Tokenizer, load_tokenizer
from nanoseek.interop.importer import is_hf_folder
from nanoseek.interop.source import load_source_model
from nanoseek.model import Transformer
from nanoseek.train.loading import load_model, load_run_tokenizer, run_dir_of


@dataclass
class LoadedModel:
    model: Transformer  # in eval mode on the requested device
    tokenizer: Tokenizer
    tokenizer_dir: Path | None  # folder with tokenizer.json (and a chat template when the model has one)
    run_dir: Path | None  # the nanoseek run directory (its data/ is the default eval text), None otherwise
    label: str  # what was loaded, for the log line


def load_any_model(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = False,
                   which: str = "best") -> LoadedModel:
    """A run / checkpoint directory, a transformers folder or a GGUF file -> LoadedModel."""
    path = Path(path).expanduser()
    if path.is_dir() and not is_hf_folder(path):  # a nanoseek run or checkpoint
        model, _ = load_model(path, map_location=device, use_ema=use_ema, which=which)
        run_dir = run_dir_of(path)
        return LoadedModel(model, load_run_tokenizer(path), run_dir / "data" if run_dir else None, run_dir,
                           str(model.checkpoint_path))
    source = load_source_model(path, "--ckpt")  # a transformers folder or GGUF file, else the error saying so
    model = source.model.to(device).eval()
    model.uses_ema, model.checkpoint_path = False, path
    return LoadedModel(model, load_tokenizer(source.tokenizer_dir), source.tokenizer_dir, None,
                       f"{path} ({source.kind})")


def read_chat_template(folder: Path | None) -> str | None:
    """The chat template stored in `folder` (chat_template.jinja, else tokenizer_config.json's key), or None."""
    if folder is None:
        return None
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _tokenizer_config(folder).get("chat_template")
    return template if isinstance(template, str) else None


def chat_prompt(tokenizer_dir: Path | None, user_text: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """(token ids of one user turn in the model's chat template, ready for the assistant's reply; the ids that
    end a reply: the template tokenizer's end-of-turn token). ValueError when there is no template."""
    template = read_chat_template(tokenizer_dir)
    if template is None:
        raise ValueError(f"--chat: no chat template next to the tokenizer in {tokenizer_dir} (chat_template.jinja "
                         "or tokenizer_config.json); use an instruct model, or drop --chat")
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise ValueError("--chat renders the chat template with transformers: pip install 'nanoseek[hf]'") from None
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    fast.chat_template = template
    config = _tokenizer_config(tokenizer_dir)
    for key in ("eos_token", "bos_token"):
        if isinstance(config.get(key), str):
            setattr(fast, key, config[key])
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    text = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = fast(text, add_special_tokens=False)["input_ids"]  # [T]; special tokens in the text become their ids
    stops = [fast.eos_token_id] if fast.eos_token_id is not None else []
    return list(ids), stops


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}


def copy_chat_files(tokenizer_dir: Path, out: Path) -> None:
    """Copy the chat template (and the tokenizer config naming its special tokens) into `out`: a converted run's
    data/ gets them so that the converted model takes the same prompts as its original."""
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (tokenizer_dir / name).is_file():
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes((tokenizer_dir / name).read_bytes())
