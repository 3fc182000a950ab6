"""Hugging Face import: a transformers folder, imported, gives transformers' own logits; export -> import is exact.

The reference is transformers' LlamaForCausalLM / Qwen3ForCausalLM built from a config (no downloads), in fp32
with eager attention. Weights are re-drawn at unit scale and norm weights perturbed: at init_std 0.02
attention is nearly uniform and a RoPE layout error would hide (test_rope_layout_error_would_show checks
that it does not).
"""

from __future__ import annotations

import functools
import dataclasses
import json

import pytest
import torch

from hf_reference import gqa_config, max_logit_diff
from nanoseek import ModelConfig, Transformer
from nanoseek.interop import export_hf, import_hf, load_hf_tokenizer
from nanoseek.interop import importer

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

VOCAB = 320
TOL = 1e-5


@torch.no_grad()
def redraw(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Unit-scale weights (std 1/sqrt(fan_in)) and norm weights 1 +- 0.3; biases stay as they are."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            continue
        if param.ndim == 1:
            param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
        elif param.ndim >= 2:
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return model


def hf_folder(tmp_path, name: str = "hf", arch: str = "llama", shard: bool = False, **overrides):
    """A random tiny transformers model saved with save_pretrained; returns (model in eval mode, folder)."""
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5)
    base.update(overrides)
    if arch == "llama":
        config, cls = transformers.LlamaConfig(**base), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.Qwen3Config(**base), transformers.Qwen3ForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = redraw(cls(config).eval())
    folder = tmp_path / name
    model.save_pretrained(folder, **({"max_shard_size": "20KB"} if shard else {}))
    return model, folder


# ---- Llama-family folders against transformers ---------------------------------------------------------

LLAMA_CASES = {
    "gqa": {},
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-head-dim": dict(num_key_value_heads=1, head_dim=10),
    # SmolLM2-135M's shape family: 3 query heads share 1 KV head of 64 dims, tied, theta 1e5, eps 1e-5.
    "smollm2-shape": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                          intermediate_size=128, tie_word_embeddings=True, rope_theta=100000.0),
    "sharded": dict(shard=True),
    "zero-biases": dict(attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_logits_match_transformers(case, tmp_path):
    overrides = dict(LLAMA_CASES[case])
    hf, folder = hf_folder(tmp_path, shard=overrides.pop("shard", False), **overrides)
    if case == "sharded":
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    if case == "zero-biases":  # a zero bias is representable exactly; a non-zero one is refused (below)
        with torch.no_grad():
            for name, param in hf.named_parameters():
                if name.endswith(".bias"):
                    param.zero_()
        hf.save_pretrained(folder)
    model = import_hf(folder)
    cfg = model.config
    assert (cfg.attention, cfg.n_routed_experts, cfg.qk_norm) == ("gqa", 0, False)
    assert (cfg.n_kv_heads, cfg.head_dim) == (hf.config.num_key_value_heads, hf.config.head_dim)
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert (cfg.tie_embeddings and model.head.weight is model.embed.weight) or not cfg.tie_embeddings
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"] and cfg.norm_eps == 1e-5
    assert max_logit_diff(model, hf, seq_len=40) < TOL


ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                    "mscale": 0.9, "mscale_all_dim": 0.7, "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                              "attention_factor": 1.3},
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scaling_matches_transformers(case, tmp_path):
    scaling = {**ROPE_CASES[case], "rope_theta": 500.0}
    hf, folder = hf_folder(tmp_path, rope_parameters=scaling)
    model = import_hf(folder)
    assert model.config.rope_scaling == scaling["rope_type"]
    assert max_logit_diff(model, hf, seq_len=48) < TOL  # well past the original lengths of 16 / 32


def test_llama3_rope_scaling_is_refused(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500.0}
    _, folder = hf_folder(tmp_path, rope_parameters=scaling)
    with pytest.raises(ValueError, match="'llama3' is not supported") as err:
        import_hf(folder)
    assert "\n" not in str(err.value)


def test_qwen3_logits_match_transformers(tmp_path):
    hf, folder = hf_folder(tmp_path, arch="qwen3", head_dim=12, tie_word_embeddings=True)
    model = import_hf(folder)
    assert model.config.qk_norm and model.config.head_dim == 12
    assert max_logit_diff(model, hf, seq_len=40) < TOL


DEEPSEEK_FOLDERS = {
    "v3-moe-groups": ("DeepseekV3", dict(n_routed_experts=6, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                         q_lora_rank=8, norm_topk_prob=True)),
    "v3-yarn": ("DeepseekV3", dict(q_lora_rank=None, rope_parameters={
        "rope_type": "yarn", "rope_theta": 700.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 0.707, "mscale_all_dim": 0.707})),
    "v2-greedy-groups-ignored": ("DeepseekV2", dict(n_group=2, topk_group=1, topk_method="greedy", q_lora_rank=None)),
    "v2-group-limited": ("DeepseekV2", dict(n_routed_experts=6, n_group=2, topk_group=1, n_shared_experts=2,
                                            topk_method="group_limited_greedy", q_lora_rank=6)),
}


@pytest.mark.parametrize("case", list(DEEPSEEK_FOLDERS))
def test_deepseek_folders_match_transformers(case, tmp_path):
    """DeepSeek folders nanoseek did not write (transformers' own, random) import with transformers' logits."""
    arch, overrides = DEEPSEEK_FOLDERS[case]
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
                n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10, max_position_embeddings=64, rms_norm_eps=1e-6,
                n_group=1, topk_group=1)
    config = getattr(transformers, f"{arch}Config")(**{**base, **overrides})
    config._attn_implementation = "eager"
    if int(transformers.__version__.split(".")[0]) >= 5:
        config._experts_implementation = "eager"
    torch.manual_seed(0)
    hf = redraw(getattr(transformers, f"{arch}ForCausalLM")(config).eval())
    with torch.no_grad():
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a trained bias changes which experts are picked
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=torch.Generator().manual_seed(4)))
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    assert model.config.score_func == ("sigmoid" if arch == "DeepseekV3" else "softmax")
    assert max_logit_diff(model, hf, seq_len=48) < TOL


def test_legacy_config_keys(tmp_path):
    """A transformers 4.x config.json (top-level rope_theta + rope_scaling, no rope_parameters) reads the same."""
    hf, folder = hf_folder(tmp_path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 700.0,
                                                      "original_max_position_embeddings": 16})
    config = json.loads((folder / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    (folder / "config.json").write_text(json.dumps(config))
    model = import_hf(folder)
    assert (model.config.rope_theta, model.config.rope_scaling) == (700.0, "yarn")
    assert max_logit_diff(model, hf, seq_len=48) < TOL


def test_rope_layout_error_would_show(tmp_path, monkeypatch):
    """Negative control: importing without the rotate-half -> interleaved row permutation must not match."""
    hf, folder = hf_folder(tmp_path)
    monkeypatch.setitem(importer.ROTATE_HALF_TRANSFORMS, "gqa", {})
    assert max_logit_diff(import_hf(folder), hf, seq_len=40) > 1e-2


def test_dtype(tmp_path):
    hf, folder = hf_folder(tmp_path)
    model = import_hf(folder, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.layers[0].attn.wv.weight, hf.model.layers[0].self_attn.v_proj.weight.bfloat16())


# ---- our own exports back --------------------------------------------------------------------------------


def mla(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=2, max_seq_len=32, attention="mla", kv_lora_rank=16,
                qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10, inter_dim=40, n_routed_experts=4,
                n_activated_experts=2, n_shared_experts=1, moe_inter_dim=12, n_dense_layers=1, mtp_depth=1)
    base.update(overrides)
    return ModelConfig(**base)


gqa = functools.partial(gqa_config, vocab_size=VOCAB)


ROUND_TRIP = {
    "llama-tied": gqa(tie_embeddings=True, rope_theta=321.0, norm_eps=1e-5),
    "qwen3": gqa(qk_norm=True, n_kv_heads=1, head_dim=10),
    "v3-moe-qlora-mtp": mla(q_lora_rank=8, route_scale=2.5),
    "v3-groups-noshared": mla(n_routed_experts=6, n_expert_groups=2, n_limited_groups=1, n_shared_experts=0),
    "v3-dense-tied": mla(n_routed_experts=0, tie_embeddings=True, mtp_depth=0),
    "v2-softmax": mla(score_func="softmax", n_shared_experts=2, n_dense_layers=0),
    "gqa-yarn": gqa(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=8, mscale=0.8, mscale_all_dim=1.0),
    "mla-yarn": mla(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=8, mscale=0.707,
                    mscale_all_dim=0.707),
    "mla-linear": mla(rope_scaling="linear", rope_factor=2.0),
}
# Settings an export does not carry: training-only, or (GQA yarn) folded into one attention factor.
NOT_EXPORTED = {"mtp_depth", "mtp_kind", "mtp_weight", "balance_rate", "aux_loss_coef", "router_z_loss_coef",
                "dropout", "qk_clip_threshold", "logit_z_loss_coef", "router_fp32", "swiglu_clamp", "mscale",
                "mscale_all_dim"}


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_export_import_round_trip(case, tmp_path):
    cfg = ROUND_TRIP[case]
    torch.manual_seed(0)
    model = redraw(Transformer(cfg).eval())
    for _, moe in model.moe_layers():
        if cfg.score_func == "sigmoid":  # a trained correction bias must come back
            moe.gate.balance_bias.copy_(0.1 * torch.randn(moe.gate.balance_bias.shape))
    back = import_hf(export_hf(model, tmp_path / "hf", max_shard_bytes=40_000))
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    theirs = back.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    differs = {k for k, v in cfg.to_dict().items() if back.config.to_dict()[k] != v}
    assert differs <= NOT_EXPORTED, differs
    idx = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(idx).logits - back(idx).logits).abs().max().item()
    # Bit-identical, except where yarn's mscale is recovered from the exported attention factor (same
    # function, other rounding).
    assert diff <= (TOL if "yarn" in case else 0.0)


def test_deepseek_rotate_half_folder(tmp_path):
    """A DeepseekV3 folder with rope_interleave=false (rotate-half rope rows) imports into the same model."""
    from nanoseek.interop import interleaved_to_halves

    cfg = mla(n_routed_experts=0, mtp_depth=0, q_lora_rank=8)
    model = redraw(Transformer(cfg).eval())
    out = export_hf(model, tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    dn, dr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    for i in range(cfg.n_layers):
        q = tensors[f"model.layers.{i}.self_attn.q_b_proj.weight"].view(cfg.n_heads, dn + dr, -1)
        q[:, dn:] = interleaved_to_halves(q[:, dn:].reshape(-1, q.shape[-1]), dr).view(cfg.n_heads, dr, -1)
        kv = tensors[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"]
        kv[cfg.kv_lora_rank:] = interleaved_to_halves(kv[cfg.kv_lora_rank:].clone(), dr)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(out, rope_interleave=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    assert max_logit_diff(model, hf.eval(), seq_len=32) < TOL  # transformers reads the edited folder as the original
    back = import_hf(out)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_bf16_export_round_trip(tmp_path):
    model = redraw(Transformer(mla()).eval())
    back = import_hf(export_hf(model, tmp_path / "hf", dtype="bf16"), dtype=torch.bfloat16)
    for name, tensor in back.state_dict().items():
        expected = model.state_dict()[name]
        if name.endswith("balance_bias"):  # kept float32 on both sides
            assert tensor.dtype == torch.float32 and torch.equal(tensor, expected)
        else:
            assert torch.equal(tensor, expected.bfloat16()), name


def test_import_in_bf16_keeps_a_trained_balance_bias_exact(tmp_path):
    """Routing compares biased scores, so the bias must not pass through bf16 on its way to float32."""
    model = redraw(Transformer(mla()).eval())
    for _, moe in model.moe_layers():
        moe.gate.balance_bias.copy_(0.1 * torch.randn(moe.gate.balance_bias.shape))  # not bf16-representable
    back = import_hf(export_hf(model, tmp_path / "hf"), dtype="bf16")
    ours = dict(model.moe_layers())  # the MTP modules' MoE layers are not exported
    imported = dict(back.moe_layers())
    assert imported and imported.keys() <= ours.keys()
    for name, moe in imported.items():
        assert moe.gate.balance_bias.dtype == torch.float32
        assert torch.equal(moe.gate.balance_bias, ours[name].gate.balance_bias), name


# ---- tokenizer and the CLI --------------------------------------------------------------------------------


def tiny_bpe_file(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 10, trainer)
    tok.save(str(path))
    return tok


def test_tokenizer_is_carried_through_import_and_export(tmp_path):
    from nanoseek.cli import main
    from nanoseek.data.tokenizer import HFTokenizer

    hf, folder = hf_folder(tmp_path)
    assert load_hf_tokenizer(folder) is None
    rust = tiny_bpe_file(folder / "tokenizer.json")
    tok = load_hf_tokenizer(folder)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == rust.token_to_id("<|endoftext|>")
    text = "the cat sat on a log, héllo"
    assert tok.encode(text) == rust.encode(text).ids and tok.decode(tok.encode(text)) == text

    out = tmp_path / "again"
    assert main(["export", str(folder), "--out", str(out)]) == 0  # re-export of a transformers folder
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto(text)["input_ids"] == tok.encode(text)
    assert auto.eos_token == "<|endoftext|>"
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    idx = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (again(input_ids=idx).logits - hf(input_ids=idx).logits).abs().max().item() < TOL


def test_cli_exports_a_run_dir(tmp_path):
    from nanoseek.cli import main
    from nanoseek.config import DataConfig, RunConfig
    from nanoseek.data.tokenizer import ByteTokenizer
    from nanoseek.train.checkpoint import save_checkpoint

    cfg = gqa(vocab_size=260, tie_embeddings=True)
    model = redraw(Transformer(cfg))
    run_dir = tmp_path / "run"
    run = RunConfig(model=cfg, data=DataConfig(seq_len=16, tokenizer="byte"), preset="tiny-gqa", out=str(run_dir))
    step_dir = save_checkpoint(run_dir, 5, model.state_dict(), {"step": 5}, run.to_dict())
    run.save_toml(run_dir / "config.toml")
    ByteTokenizer().save(run_dir / "data")
    for source in (run_dir, step_dir):
        out = tmp_path / f"out-{source.name}"
        assert main(["export", str(source), "--out", str(out), "--dtype", "bf16"]) == 0
        back = import_hf(out)
        for name, tensor in model.state_dict().items():
            assert torch.equal(back.state_dict()[name], tensor.bfloat16().float()), name
        auto = transformers.AutoTokenizer.from_pretrained(out)
        assert auto("héllo")["input_ids"] == ByteTokenizer().encode("héllo")


def test_cli_error_is_one_line(tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoseek: error:") and "\n" not in err


# ---- refusals ---------------------------------------------------------------------------------------------


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder, drop=(), add=None):
    tensors = load_file(str(folder / "model.safetensors"))
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


ERRORS = {
    "missing-folder": (lambda f: f.parent / "nowhere", "does not exist"),
    "missing-config": (lambda f: (f / "config.json").unlink() or f, "has no config.json"),
    "unsupported-type": (lambda f: _edit_config(f, model_type="gpt2") or f, "model_type='gpt2' is not supported"),
    "missing-weights-file": (lambda f: (f / "model.safetensors").unlink() or f, "neither model.safetensors"),
    "missing-weight": (lambda f: _edit_weights(f, drop=["model.layers.1.mlp.up_proj.weight"]) or f,
                       "weight model.layers.1.mlp.up_proj.weight .* is missing"),
    "mismatched-weight": (lambda f: _edit_config(f, intermediate_size=50) or f,
                          r"weight model.layers.0.mlp.gate_proj.weight has shape \(48, 32\) but"),
    "unknown-weight": (lambda f: _edit_weights(f, add={"model.layers.0.self_attn.sinks": torch.zeros(4)}) or f,
                       "weight model.layers.0.self_attn.sinks .* no nanoseek counterpart"),
    "nonzero-bias": (lambda f: _edit_weights(f, add={"model.layers.0.self_attn.q_proj.bias": torch.ones(32)}) or f,
                     "q_proj.bias .* non-zero bias"),
    "activation": (lambda f: _edit_config(f, hidden_act="gelu") or f, "hidden_act='gelu'"),
    "sliding-window": (lambda f: _edit_config(f, use_sliding_window=True) or f, "sliding-window"),
    "nanoseek-checkpoint": (lambda f: (f / "COMPLETE").touch() or f, "nanoseek.load_checkpoint"),
    "bad-config-value": (lambda f: _edit_config(f, head_dim=7) or f, "head_dim=7"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line(case, tmp_path):
    _, folder = hf_folder(tmp_path)
    breaks, message = ERRORS[case]
    with pytest.raises(ValueError, match=message) as err:
        import_hf(breaks(folder))
    assert "\n" not in str(err.value)


def test_mtp_layers_of_deepseek_folders_are_skipped(tmp_path):
    model = redraw(Transformer(mla(mtp_depth=0)).eval())
    out = export_hf(model, tmp_path / "hf")
    extra = {"model.layers.3.enorm.weight": torch.ones(32), "model.layers.3.eh_proj.weight": torch.zeros(32, 64)}
    _edit_weights(out, add=extra)
    _edit_config(out, num_nextn_predict_layers=1)
    with pytest.warns(UserWarning, match="multi-token"):
        back = import_hf(out)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_config_from_dict_needs_sizes():
    with pytest.raises(ValueError, match="has no 'hidden_size'"):
        importer.model_config_from_hf({"model_type": "llama", "vocab_size": 10, "num_attention_heads": 2})
    cfg = importer.model_config_from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 16,
                                         "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2})
    assert dataclasses.astuple(cfg)[:4] == (10, 16, 1, 2) and cfg.head_dim == 8 and cfg.max_seq_len == 2048
