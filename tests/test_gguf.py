"""GGUF files and transformers folders wherever a model is accepted (import_hf, convert --from, generate /
eval --ckpt), and --chat; against transformers' own model and tokenizer."""

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

sys.path.insert(0, str(Path(__file__).parent))
from gguf_tiny import CHAT_TEMPLATE, tiny_llama, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(random transformers Llama, its GGUF file, the same model as a transformers folder with the GGUF's
    tokenizer and chat template)."""
    folder = tmp_path_factory.mktemp("gguf")
    model = tiny_llama()
    path = write_gguf(model, folder / "tiny.gguf")
    hf_dir = folder / "hf"
    model.save_pretrained(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="tiny.gguf")
    tok.save_pretrained(hf_dir)
    return model, path, hf_dir


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))


def test_gguf_imports_with_the_logits_of_the_model_written(tiny):
    from nanoseek.interop import import_hf

    model, path, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        loaded = import_hf(path)  # the .gguf file where a transformers folder would go
        assert loaded.config.attention == "gqa" and loaded.config.n_kv_heads == 2
        assert (loaded(ids).logits - reference).abs().max() < 1e-4


def test_source_model_reads_the_gguf_tokenizer_and_chat_template(tiny):
    from nanoseek.data import load_tokenizer
    from nanoseek.interop.any_model import chat_prompt, read_chat_template
    from nanoseek.interop.source import load_source_model

    model, path, _ = tiny
    source = load_source_model(path, "--from")
    assert source.kind == "gguf" and Path(source.tokenizer).is_file()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "hello, help all"
    assert load_tokenizer(source.tokenizer_dir).encode(text) == reference(text, add_special_tokens=False)["input_ids"]
    assert read_chat_template(source.tokenizer_dir) == CHAT_TEMPLATE
    ids, stops = chat_prompt(source.tokenizer_dir, "hi")
    messages = [{"role": "user", "content": "hi"}]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == reference(expected, add_special_tokens=False)["input_ids"]
    assert reference.convert_tokens_to_ids("<|im_start|>") in ids and stops == [reference.eos_token_id]


def test_missing_gguf_package_is_a_one_line_error_naming_the_extra(tiny, monkeypatch):
    from nanoseek.interop.source import load_source_model

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails as if it were not installed
    with pytest.raises(ValueError, match=r"nanoseek\[gguf\]") as err:
        load_source_model(tiny[1], "--from")
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_gguf_is_refused_by_name(tmp_path):
    from nanoseek.interop.source import load_source_model

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a GGUF model"):
        load_source_model(bad, "--from")


def test_generate_and_eval_take_a_gguf_or_a_transformers_folder(tiny, tmp_path, capsys):
    from nanoseek.cli import main

    _, path, hf_dir = tiny
    outputs = []
    for ckpt in (path, hf_dir):
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", "hello", "--temperature", "0",
                     "--max-new-tokens", "8", "--device", "cpu", "--no-stream"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("hello")
    text = tmp_path / "text.txt"
    text.write_text("hello all, help the hall\n" * 40)
    losses = []
    for ckpt in (path, hf_dir):
        assert main(["eval", "--ckpt", str(ckpt), "--data", str(text), "--seq-len", "32", "--device", "cpu",
                     "--json"]) == 0
        losses.append(capsys.readouterr().out)
    assert losses[0].split('"loss"')[1] == losses[1].split('"loss"')[1]


def test_generate_chat_uses_the_template_and_eval_needs_data(tiny, capsys):
    from nanoseek.cli import main
    from nanoseek.interop.any_model import chat_prompt
    from nanoseek.interop.source import load_source_model

    model, path, _ = tiny
    assert main(["generate", "--ckpt", str(path), "--prompt", "hi", "--chat", "--temperature", "0",
                 "--max-new-tokens", "6", "--device", "cpu", "--no-stream"]) == 0
    printed = capsys.readouterr().out
    source = load_source_model(path, "--from")
    ids, stops = chat_prompt(source.tokenizer_dir, "hi")
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.no_grad():  # transformers' own greedy decoding is the reference
        new = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
    if any(t in stops for t in new):
        new = new[:min(new.index(t) for t in stops if t in new)]
    assert printed == "hi\n" + tok.decode(new) + "\n"
    assert main(["eval", "--ckpt", str(path), "--device", "cpu"]) != 0
    assert "pass --data" in capsys.readouterr().err


def test_convert_from_gguf_keeps_the_chat_template(tiny, tmp_path):
    from nanoseek.cli import main
    from nanoseek.interop.any_model import read_chat_template

    _, path, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text("hello all, help the hall. " * 200)
    out = tmp_path / "converted"
    assert main(["convert", "--from", str(path), "--out", str(out), "--to", "mla", "--data", str(text),
                 "--seq-len", "32", "--calib-tokens", "256", "--eval-tokens", "128"]) == 0
    assert read_chat_template(out / "data") == CHAT_TEMPLATE
    assert main(["generate", "--ckpt", str(out), "--prompt", "hi", "--chat", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
