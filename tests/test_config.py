"""Configuration: validation messages name the field, derivations are recorded, presets build,
TOML round-trips."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from nanoseek import PRESETS, DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig, Transformer
from nanoseek.config import to_toml, tomllib

GQA = dict(attention="gqa")


@pytest.mark.parametrize("kwargs,field", [
    # sizes
    (dict(vocab_size=0), "vocab_size"),
    (dict(dim=-8), "dim"),
    (dict(n_layers=0), "n_layers"),
    (dict(n_heads=0), "n_heads"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(inter_dim=0), "inter_dim"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(n_layers=True), "n_layers"),  # a bool is not a size
    # choices
    (dict(attention="mha"), "attention"),
    (dict(score_func="relu"), "score_func"),
    (dict(mtp_kind="heads"), "mtp_kind"),
    (dict(rope_scaling="ntk"), "rope_scaling"),
    # GQA
    (dict(GQA, n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(GQA, n_heads=4, n_kv_heads=0), "n_kv_heads"),
    (dict(GQA, dim=130, n_heads=4), "dim"),
    (dict(GQA, head_dim=15), "head_dim"),
    (dict(GQA, kv_head_ratio=1.5), "kv_head_ratio"),
    (dict(GQA, kv_head_ratio=0.0), "kv_head_ratio"),
    # MLA
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(v_head_dim=0), "v_head_dim"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(n_kv_heads=2), "n_kv_heads"),
    (dict(kv_head_ratio=0.5), "kv_head_ratio"),
    (dict(head_dim=64), "head_dim"),
    (dict(embd_scale=1.5), "embd_scale"),
    (dict(qk_norm=True), "qk_norm"),
    # MoE
    (dict(n_routed_experts=8, n_activated_experts=9), "n_activated_experts"),
    (dict(n_activated_experts=0), "n_activated_experts"),
    (dict(moe_inter_dim=0), "moe_inter_dim"),
    (dict(n_routed_experts=8, n_expert_groups=3), "n_expert_groups"),
    (dict(n_routed_experts=8, n_expert_groups=8), "n_expert_groups"),  # one expert per group
    (dict(n_routed_experts=8, n_expert_groups=2, n_limited_groups=3), "n_limited_groups"),
    (dict(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=3), "n_limited_groups"),
    (dict(n_routed_experts=-1), "n_routed_experts"),
    (dict(balance_rate=-0.1), "balance_rate"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    # layers, MTP, positions, the rest
    (dict(n_layers=4, n_dense_layers=5), "n_dense_layers"),
    (dict(mtp_depth=-1), "mtp_depth"),
    (dict(mtp_weight=-0.3), "mtp_weight"),
    (dict(rope_scaling="yarn", rope_factor=0.5), "rope_factor"),
    (dict(dropout=1.0), "dropout"),
    (dict(qk_clip_threshold=-5.0), "qk_clip_threshold"),
    (dict(swiglu_clamp=-1.0), "swiglu_clamp"),
])
def test_invalid_model_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        ModelConfig(**kwargs)
    message = str(err.value)
    assert message.startswith(f"{field}="), message  # "field=value: fix"
    assert len(message) > len(field) + 10  # and says what to do


def test_valid_edge_cases_construct():
    ModelConfig(n_routed_experts=0, n_activated_experts=0, moe_inter_dim=0)  # dense: MoE fields unused
    ModelConfig(mtp_depth=0, n_dense_layers=4, n_layers=4)
    ModelConfig(qk_nope_head_dim=0)  # rope-only MLA keys
    ModelConfig(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=2)
    ModelConfig(**GQA, n_heads=4, n_kv_heads=1)  # MQA


@pytest.mark.parametrize("n_heads,ratio,n_kv", [(12, 0.25, 3), (9, 0.5, 3), (8, 0.5, 4), (6, 0.1, 1), (7, 0.5, 1)])
def test_kv_head_ratio_derivation(n_heads, ratio, n_kv):
    cfg = ModelConfig(**GQA, dim=n_heads * 16, n_heads=n_heads, kv_head_ratio=ratio)
    assert cfg.n_kv_heads == n_kv
    assert n_heads % cfg.n_kv_heads == 0
    assert cfg.kv_head_ratio is None  # applied once
    assert "n_kv_heads" in cfg.derived and f"-> {n_kv}" in cfg.derived["n_kv_heads"]
    # re-running validation (as dataclasses.replace does) does not derive again
    again = dataclasses.replace(cfg, vocab_size=512)
    assert again.n_kv_heads == n_kv


@pytest.mark.parametrize("dim,n_heads,scale,head_dim,widened", [
    (128, 4, 1.5, None, 192),
    (128, 4, 1.12, None, 136),   # 143 -> multiple of 8 (head_dim stays even): 136, head_dim 34
    (768, 12, 1.12, None, 840),  # seed 004's numbers: a multiple of 12 alone would give head_dim 71
    (128, 6, 1.12, 32, 138),     # explicit head_dim: a multiple of n_heads is enough
])
def test_embd_scale_widens_dim(dim, n_heads, scale, head_dim, widened):
    cfg = ModelConfig(**GQA, dim=dim, n_heads=n_heads, embd_scale=scale, head_dim=head_dim)
    assert cfg.dim == widened
    assert cfg.dim % n_heads == 0 and cfg.head_dim % 2 == 0
    assert cfg.head_dim == (head_dim or widened // n_heads)
    assert cfg.embd_scale == 1.0 and cfg.derived["dim"].endswith(f"-> {widened}")
    assert dataclasses.replace(cfg, vocab_size=512).dim == widened  # not widened twice
    Transformer(dataclasses.replace(cfg, n_layers=1, vocab_size=32, mtp_depth=0, n_routed_experts=0))


def test_from_preset_overrides_and_unknown_name():
    cfg = ModelConfig.from_preset("tiny", n_layers=2, mtp_depth=0)
    assert cfg.n_layers == 2 and cfg.mtp_depth == 0 and cfg.dim == PRESETS["tiny"].dim
    assert PRESETS["tiny"].n_layers == 4  # the table is not modified
    with pytest.raises(ValueError, match="preset='nope'"):
        ModelConfig.from_preset("nope")
    with pytest.raises(ValueError, match="n_activated_experts"):
        ModelConfig.from_preset("tiny", n_activated_experts=99)


# ---- presets -------------------------------------------------------------------------------------


def expected_params(cfg: ModelConfig, active: bool) -> int:
    """Parameter count from the config alone (the paper's formulas, not the module tree)."""
    d, heads = cfg.dim, cfg.n_heads
    if cfg.attention == "mla":
        q = (d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
             if cfg.q_lora_rank else d * heads * cfg.qk_head_dim)
        attn = (q + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
                + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) + heads * cfg.v_head_dim * d)
    else:
        attn = (2 * d * heads * cfg.head_dim + 2 * d * cfg.n_kv_heads * cfg.head_dim
                + (2 * cfg.head_dim if cfg.qk_norm else 0))
    routed = cfg.n_activated_experts if active else cfg.n_routed_experts
    moe = cfg.n_routed_experts * d + routed * 3 * d * cfg.moe_inter_dim + 3 * d * cfg.n_shared_experts * cfg.moe_inter_dim

    def block(i: int) -> int:
        return 2 * d + attn + (moe if cfg.is_moe_layer(i) else 3 * d * cfg.inter_dim)

    total = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d + sum(block(i) for i in range(cfg.n_layers))
    if cfg.mtp_kind == "modules":
        total += cfg.mtp_depth * (block(cfg.n_layers - 1) + 3 * d + 2 * d * d)
    return total


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_counts(name):
    cfg = ModelConfig.from_preset(name)
    assert cfg == dataclasses.replace(PRESETS[name], derived={})
    tiny = name.startswith("tiny")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == expected_params(cfg, active=False)
    assert model.num_params(active=True) == expected_params(cfg, active=True)
    assert model.num_params(active=True) <= model.num_params()
    if cfg.uses_moe:
        assert model.num_params(active=True) < model.num_params()
    if tiny:  # CPU-test sized: really builds and runs
        model = Transformer(cfg)
        assert model.num_params() < 3_000_000
        out = model(torch.randint(0, cfg.vocab_size, (1, 8)))
        assert out.logits.shape == (1, 8, cfg.vocab_size)


def test_public_presets_exist():
    assert {"tiny", "tiny-dense", "tiny-gqa"} <= set(PRESETS)
    assert PRESETS["tiny"].uses_moe and PRESETS["tiny"].attention == "mla"
    assert not PRESETS["tiny-dense"].uses_moe
    assert PRESETS["tiny-gqa"].attention == "gqa"


# ---- TOML ----------------------------------------------------------------------------------------


def custom_run_config() -> RunConfig:
    model = ModelConfig.from_preset("tiny-gqa", n_layers=3, rope_scaling="yarn", rope_factor=2.5,
                                    dropout=0.1, tie_embeddings=True, init_std=0.0123456789)
    return RunConfig(
        model=model,
        data=DataConfig(source='dir with "quotes" \\ and spaces', tokenizer="byte", seq_len=64),
        train=TrainConfig(max_steps=7, lr=1.5e-4, optimizer="muon", schedule="wsd", precision="bf16",
                          compile=True, grad_clip=0.0),
        guard=GuardConfig(inject=("nan-loss@12", "inf-act:layers.1.ffn@5"), spike_sigma=4.5),
        preset="tiny-gqa", out="runs/x", seed=7, device="cpu",
    )


def test_run_config_toml_round_trip(tmp_path):
    original = custom_run_config()
    path = tmp_path / "config.toml"
    original.save_toml(path)
    loaded = RunConfig.load_toml(path)
    assert loaded == original
    assert loaded.guard.inject == ("nan-loss@12", "inf-act:layers.1.ffn@5")
    assert loaded.model.init_std == 0.0123456789 and loaded.train.lr == 1.5e-4  # floats exact
    loaded.save_toml(tmp_path / "again.toml")
    assert (tmp_path / "again.toml").read_text() == path.read_text()
    default = RunConfig()
    default.save_toml(tmp_path / "default.toml")
    assert RunConfig.load_toml(tmp_path / "default.toml") == default


def test_toml_round_trips_non_finite_floats():
    values = {"up": math.inf, "down": -math.inf, "table": {"down": -math.inf}}
    assert tomllib.loads(to_toml(values)) == values
    assert math.isnan(tomllib.loads(to_toml({"x": math.nan}))["x"])


def test_round_trip_of_a_derived_config(tmp_path):
    model = ModelConfig(**GQA, dim=128, n_heads=8, kv_head_ratio=0.25, embd_scale=1.25)
    run = RunConfig(model=model, preset="tiny-gqa")
    run.save_toml(tmp_path / "c.toml")
    loaded = RunConfig.load_toml(tmp_path / "c.toml")
    assert loaded.model.to_dict() == model.to_dict()  # the derived sizes are saved, not re-derived
    assert (loaded.model.dim, loaded.model.n_kv_heads) == (160, 2)


@pytest.mark.parametrize("text,name", [
    ("bogus = 1\n", "bogus"),
    ("[model]\nn_layerz = 2\n", "n_layerz"),
    ("[train]\nlearning_rate = 0.1\n", "learning_rate"),
    ("[data]\nsorce = 'x'\n", "sorce"),
    ("[guard]\nspike = 3\n", "spike"),
])
def test_toml_unknown_fields_raise(tmp_path, text, name):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=name):
        RunConfig.load_toml(path)


def test_toml_bad_files_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        RunConfig.load_toml(tmp_path / "missing.toml")
    (tmp_path / "broken.toml").write_text("[model\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        RunConfig.load_toml(tmp_path / "broken.toml")
    (tmp_path / "invalid.toml").write_text("[model]\nn_heads = 0\n")
    with pytest.raises(ValueError, match="n_heads"):
        RunConfig.load_toml(tmp_path / "invalid.toml")


# ---- the other sections --------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs,field", [
    (TrainConfig, dict(lr=0.0), "lr"),
    (TrainConfig, dict(batch_size=0), "batch_size"),
    (TrainConfig, dict(grad_accum=0), "grad_accum"),
    (TrainConfig, dict(max_steps=-1), "max_steps"),
    (TrainConfig, dict(optimizer="sgd"), "optimizer"),
    (TrainConfig, dict(schedule="step"), "schedule"),
    (TrainConfig, dict(precision="fp8"), "precision"),
    (TrainConfig, dict(keep_last=0), "keep_last"),
    (TrainConfig, dict(beta2=1.0), "beta2"),
    (TrainConfig, dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (TrainConfig, dict(ema_decay=1.0), "ema_decay"),
    (TrainConfig, dict(decay_fraction=0.0), "decay_fraction"),
    (TrainConfig, dict(weight_decay=-0.1), "weight_decay"),
    (TrainConfig, dict(grad_clip=-1.0), "grad_clip"),
    (DataConfig, dict(seq_len=0), "seq_len"),
    (DataConfig, dict(val_fraction=0.6), "val_fraction"),
    (DataConfig, dict(val_fraction=0.0), "val_fraction"),
    (DataConfig, dict(tokenizer="bpe", vocab_size=100), "vocab_size"),
    (GuardConfig, dict(window=0), "window"),
    (GuardConfig, dict(spike_sigma=0.0), "spike_sigma"),
    (GuardConfig, dict(rollback_lr_factor=2.0), "rollback_lr_factor"),
    (GuardConfig, dict(max_rollbacks=-1), "max_rollbacks"),
    (RunConfig, dict(device="tpu"), "device"),
    (RunConfig, dict(data=DataConfig(seq_len=512)), "data.seq_len"),  # tiny's max_seq_len is 256
])
def test_invalid_section_values_raise(cls, kwargs, field):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    assert str(err.value).startswith(f"{field}="), str(err.value)
