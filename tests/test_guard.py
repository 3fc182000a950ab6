"""The stability guard (nanoseek/train/guard.py) and what the trainer does with its verdicts.

Unit tests of `StabilityGuard.check` (non-finite values, spikes with warmup, escalation to rollback
and abort, fp16 overflow, state round trip), then tiny training runs: a skipped step is bit-exactly
the same as leaving its batch out, an LR spike is rolled back and the run recovers, exhausted
rollbacks abort with a finite checkpoint, and the guard's state survives save and resume.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig
from nanoseek.train.checkpoint import latest_checkpoint, read_checkpoint
from nanoseek.train.guard import StabilityGuard, StepStats
from nanoseek.train.optim import lr_factor
from nanoseek.train.trainer import Trainer
from tiny import write_corpus


# ---- StabilityGuard.check ---------------------------------------------------------------------------

LOSSES = [2.0, 2.1, 1.9, 2.05, 1.95, 2.0, 2.1, 1.9, 2.02, 1.98]  # a healthy, noisy plateau
NORMS = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.1, 0.9, 1.02, 0.98]


def make_guard(precision: str = "fp32", **overrides) -> StabilityGuard:
    return StabilityGuard(GuardConfig(**{"warmup": 5, "window": 20, **overrides}), precision)


def warmed(n: int = len(LOSSES), **overrides) -> StabilityGuard:
    """A guard that has accepted n healthy steps (0..n-1)."""
    guard = make_guard(**overrides)
    for step in range(n):
        assert guard.check(StepStats(step, LOSSES[step], NORMS[step])).ok
    return guard


def test_healthy_steps_are_ok_and_fill_the_window():
    guard = warmed()
    assert list(guard.stats["loss"].values) == LOSSES and list(guard.stats["grad_norm"].values) == NORMS
    assert (guard.n_skips, guard.n_rollbacks, guard.consecutive_spikes, guard.lr_scale) == (0, 0, 0, 1.0)


@pytest.mark.parametrize("loss, grad_norm, batch_ok, cause", [
    (math.nan, 1.0, True, "non-finite loss"),
    (math.inf, 1.0, True, "non-finite loss"),
    (2.0, math.nan, True, "non-finite gradient"),
    (2.0, math.inf, True, "non-finite gradient"),
    (2.0, 1.0, False, "bad batch"),
])
def test_nonfinite_values_and_bad_batches_are_skipped(loss, grad_norm, batch_ok, cause):
    guard = warmed()
    verdict = guard.check(StepStats(10, loss, grad_norm, batch_ok))
    assert (verdict.action, verdict.ok) == ("skip", False) and verdict.cause.startswith(cause)
    assert guard.n_skips == 1 and list(guard.recent_skips) == [10]
    assert list(guard.stats["loss"].values) == LOSSES  # nothing from a bad step enters the statistics


def test_fp16_gradient_overflow_is_the_scaler_working_not_a_fault():
    guard = make_guard("fp16")
    for step in range(5):  # overflows never count as skips, never escalate
        verdict = guard.check(StepStats(step, 2.0, math.inf))
        assert verdict.action == "overflow" and "GradScaler" in verdict.cause
    assert guard.n_skips == 0 and not guard.recent_skips and not guard.stats["grad_norm"].values
    assert guard.check(StepStats(5, math.nan, math.inf)).action == "skip"  # a NaN loss is a fault in any precision
    assert make_guard("bf16").check(StepStats(0, 2.0, math.inf)).action == "skip"
    assert make_guard("fp32").check(StepStats(0, 2.0, math.inf)).action == "skip"


def test_disabled_guard_accepts_everything():
    guard = make_guard(enabled=False)
    for step, (loss, norm, ok) in enumerate([(math.nan, 1.0, True), (2.0, math.inf, True), (2.0, 1.0, False)] * 3):
        assert guard.check(StepStats(step, loss, norm, ok)).ok
    assert guard.n_skips == 0 and not guard.recent_skips


def test_spike_detection_waits_for_warmup():
    guard = warmed(4)  # warmup=5: not armed yet, so even a huge loss passes (and enters the window)
    assert guard.check(StepStats(4, 50.0, 1.0)).ok and guard.stats["loss"].values[-1] == 50.0
    guard = warmed(5)
    verdict = guard.check(StepStats(5, 50.0, 1.0))
    assert verdict.action == "skip" and verdict.cause.startswith("loss spike") and verdict.value == 50.0


@pytest.mark.parametrize("loss, norm, action", [
    (2.2, 1.0, "ok"),  # 1.1x the mean but within 6 sigma: noise
    (2.6, 1.0, "skip"),  # a loss spike
    (2.0, 1.9, "ok"),  # grad norm far above a tight window, but under 2x the mean
    (2.0, 3.0, "skip"),  # a grad-norm spike
])
def test_spike_needs_both_sigma_and_ratio(loss, norm, action):
    verdict = warmed().check(StepStats(10, loss, norm))
    assert verdict.action == action
    if action == "skip":
        assert ("grad_norm spike" if norm > 2 else "loss spike") in verdict.cause


def test_std_floor_keeps_a_flat_window_from_flagging_noise():
    guard = make_guard()
    for step in range(10):
        assert guard.check(StepStats(step, 2.0, 1.0)).ok  # std 0: the floor is 2% of the mean
    assert guard.check(StepStats(10, 2.23, 1.0)).ok  # 5.75 floored sigmas, and above the 1.1x ratio: noise
    guard = make_guard()
    for step in range(10):
        guard.check(StepStats(step, 2.0, 1.0))
    assert guard.check(StepStats(10, 2.3, 1.0)).action == "skip"  # 7.5 floored sigmas


def test_spikes_are_kept_out_of_the_window():
    guard = warmed()
    assert guard.check(StepStats(10, 9.0, 1.0)).action == "skip" and guard.consecutive_spikes == 1
    assert list(guard.stats["loss"].values) == LOSSES
    assert guard.check(StepStats(11, 2.0, 1.0)).ok and guard.consecutive_spikes == 0
    assert list(guard.stats["loss"].values) == LOSSES + [2.0]


def test_two_spikes_in_a_row_roll_back():
    guard = warmed()
    assert guard.check(StepStats(10, 9.0, 1.0)).action == "skip"
    verdict = guard.check(StepStats(11, 9.5, 1.0))
    assert verdict.action == "rollback" and "stays high (2 spikes in a row)" in verdict.cause
    guard.rolled_back()
    assert (guard.n_rollbacks, guard.lr_scale, guard.consecutive_spikes) == (1, 0.5, 0) and not guard.recent_skips
    # Spikes that are not consecutive are only skips (2 < max_skips=3).
    guard = warmed()
    assert [guard.check(StepStats(s, v, 1.0)).action for s, v in [(10, 9.0), (11, 2.0), (12, 9.0)]] == ["skip", "ok", "skip"]


def test_max_skips_within_the_window_roll_back():
    guard = warmed(max_skips=3, window=10)
    assert guard.check(StepStats(20, math.nan, 1.0)).action == "skip"
    assert guard.check(StepStats(22, 2.0, math.inf)).action == "skip"
    verdict = guard.check(StepStats(24, 2.0, 1.0, batch_ok=False))
    assert verdict.action == "rollback" and verdict.cause.startswith("3 skips within 10 steps, last: bad batch")
    # The same three skips spread wider than the window stay skips.
    guard = warmed(max_skips=3, window=10)
    assert [guard.check(StepStats(step, math.nan, 1.0)).action for step in (20, 30, 40)] == ["skip"] * 3
    assert list(guard.recent_skips) == [40] and guard.n_skips == 3


def test_grad_norm_spikes_are_skipped_but_never_roll_back_and_a_new_level_is_absorbed():
    guard = warmed(max_skips=3)
    assert guard.check(StepStats(10, math.nan, 1.0)).action == "skip"  # one real fault in the window
    actions = [guard.check(StepStats(step, 2.0, 10.0)).action for step in range(11, 20)]  # the gradient's scale jumps 10x
    assert "rollback" not in actions and actions[0] == "skip"
    assert actions[-1] == "ok"  # the spikes joined the window: the new level is normal within a few steps
    assert list(guard.recent_skips) == [10]  # only the NaN counts towards max_skips
    assert guard.check(StepStats(20, math.nan, 1.0)).action == "skip"  # two faults in the window: still below three


@pytest.mark.parametrize("max_rollbacks", [0, 1, 2])
def test_rollbacks_are_capped_then_abort(max_rollbacks):
    guard = warmed(max_skips=2, max_rollbacks=max_rollbacks, rollback_lr_factor=0.5)
    step = 10
    for round_ in range(max_rollbacks + 1):
        assert guard.check(StepStats(step, math.nan, 1.0)).action == "skip"
        verdict = guard.check(StepStats(step + 1, math.nan, 1.0))
        step += 2
        if round_ < max_rollbacks:
            assert verdict.action == "rollback"
            guard.rolled_back()
    assert verdict.action == "abort" and f"rollbacks exhausted ({max_rollbacks}/{max_rollbacks})" in verdict.cause
    assert guard.n_rollbacks == max_rollbacks and guard.lr_scale == 0.5 ** max_rollbacks


def test_state_dict_round_trip():
    guard = warmed(max_skips=5, window=12)
    for step, (loss, norm) in enumerate([(math.nan, 1.0), (9.0, 1.0), (2.0, 1.0), (9.0, 1.0), (9.0, 1.0)], start=10):
        guard.check(StepStats(step, loss, norm))
    guard.rolled_back()
    guard.check(StepStats(15, 9.0, 1.0))  # a spike after the rollback: consecutive_spikes = 1
    state = guard.state_dict()
    assert state["n_skips"] == 5 and state["n_rollbacks"] == 1 and state["lr_scale"] == 0.5
    assert state["consecutive_spikes"] == 1 and state["recent_skips"] == [15] and len(state["loss"]) == 11
    assert json.loads(json.dumps(state)) == state  # plain data: it goes into a checkpoint

    restored = StabilityGuard(GuardConfig(warmup=5, window=12, max_skips=5))
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.state_dict() == state and restored.stats["loss"].values.maxlen == 12
    fresh = StabilityGuard(GuardConfig(warmup=5, window=12, max_skips=5))
    probe = [(16, 9.0, 1.0), (17, 2.0, 1.0), (18, math.nan, 1.0), (19, 2.0, 5.0), (20, 2.1, 1.1)]
    verdicts = [(guard.check(StepStats(*p)).action, restored.check(StepStats(*p)).action, fresh.check(StepStats(*p)).action) for p in probe]
    assert [v[0] for v in verdicts] == [v[1] for v in verdicts] == ["rollback", "ok", "skip", "skip", "ok"]
    assert [v[2] for v in verdicts] != [v[0] for v in verdicts]  # the state is what decides
    assert restored.state_dict() == guard.state_dict()



def test_attention_logit_growth_rolls_back_a_decade_down():
    """Wortsman et al.'s slow divergence: no NaN, no loss spike, only the max attention logit climbing."""
    guard = warmed(attn_logit_limit=50.0)
    logits = [1.5, 12.0, 30.0, 49.0]  # growing fast, but below the limit
    assert all(guard.check(StepStats(10 + i, 2.0, 1.0, attn_logit_max=v)).ok for i, v in enumerate(logits))
    assert guard.check(StepStats(14, 2.0, 1.0)).ok  # not sampled this step: nothing to judge
    verdict = guard.check(StepStats(15, 2.0, 1.0, attn_logit_max=68.0))
    assert verdict.action == "rollback" and "attention logits grew to 68 from 1.5 within 20 steps, past 50" in verdict.cause
    guard.rolled_back()
    assert guard.lr_scale == pytest.approx(0.1)  # plateau_lr_factor: such an LR is off by a decade
    assert not guard.recent_attn_logits  # the restored weights start a new record
    assert guard.check(StepStats(16, 2.0, 1.0, attn_logit_max=40.0)).ok


def test_logits_past_the_limit_without_fast_growth_are_left_alone():
    """A run drifting past the limit, a pretrained model that starts above it, and a healthy run whose logits
    grow fast early on (bench/RESULTS.md: the `small` preset at LR 3e-3)."""
    drifting = warmed(attn_logit_limit=50.0)  # window 20
    assert all(drifting.check(StepStats(step, 2.0, 1.0, attn_logit_max=40.0 + step / 10)).ok
               for step in range(10, 400, 5))  # 41 -> 80 over 390 steps: past 50 from step 100 on
    assert len(drifting.recent_attn_logits) == 4  # only the window's samples are kept
    pretrained = warmed(attn_logit_limit=50.0)
    assert pretrained.check(StepStats(10, 2.0, 1.0, attn_logit_max=80.0)).ok
    assert pretrained.check(StepStats(11, 2.0, 1.0, attn_logit_max=600.0)).ok  # 7.5x
    assert pretrained.check(StepStats(12, 2.0, 1.0, attn_logit_max=700.0)).action == "rollback"  # > 8 x 80
    healthy = warmed(attn_logit_limit=50.0, window=50)  # the default window, samples every 10 steps as there
    trace = [0.7, 2.6, 7.4, 19.7, 16.3, 27.2, 33.5, 43.1, 51.6, 68.3, 72.1, 76.8, 89.2, 91.9, 102.1, 107.1, 137.0]
    assert all(healthy.check(StepStats(10 * i, 2.0, 1.0, attn_logit_max=v)).ok for i, v in enumerate(trace))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_attention_logit_never_enters_the_record(bad):
    guard = warmed(attn_logit_limit=50.0)
    assert guard.check(StepStats(10, 2.0, 1.0, attn_logit_max=bad)).ok and not guard.recent_attn_logits
    assert guard.check(StepStats(11, 2.0, 1.0, attn_logit_max=3.0)).ok
    state = json.loads(json.dumps(guard.state_dict()))
    restored = make_guard(attn_logit_limit=50.0)
    restored.load_state_dict(state)
    assert list(restored.recent_attn_logits) == [(11, 3.0)]  # a resumed run keeps its record
    assert restored.check(StepStats(12, 2.0, 1.0, attn_logit_max=60.0)).action == "rollback"


def test_under_muon_attention_logit_growth_lowers_only_the_muon_groups_lr():
    """Muon updates the attention matrices; embeddings, head and norms train with AdamW at an LR that is fine."""
    guard = warmed(attn_logit_limit=50.0, plateau_margin=0.0)
    guard.attention_groups = ("muon",)
    guard.check(StepStats(10, 2.0, 1.0, attn_logit_max=1.0))
    assert guard.check(StepStats(15, 2.0, 1.0, attn_logit_max=90.0)).action == "rollback"
    guard.rolled_back()
    assert guard.lr_scale == 1.0 and guard.group_lr_scale == {"muon": pytest.approx(0.1)}
    assert guard.lr_note == "lr x1, muon lr x0.1"
    verdicts = [guard.check(StepStats(20 + i, math.nan, 1.0)).action for i in range(3)]
    assert verdicts == ["skip", "skip", "rollback"]
    guard.rolled_back()  # any other fault still lowers every group
    assert guard.lr_scale == 0.5 and guard.lr_note == "lr x0.5, muon lr x0.1"
    state = json.loads(json.dumps(guard.state_dict()))
    restored = make_guard(attn_logit_limit=50.0, plateau_margin=0.0)
    restored.load_state_dict(state)
    assert restored.group_lr_scale == guard.group_lr_scale and restored.state_dict() == guard.state_dict()


def test_apply_lr_factor_scales_the_named_groups():
    from nanoseek.train.optim import apply_lr_factor
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    opt = torch.optim.SGD([dict(params=[params[0]], name="muon", base_lr=0.02, lr=0.02),
                           dict(params=[params[1]], name="decay", base_lr=1e-3, lr=1e-3)])
    apply_lr_factor(opt, 0.5, {"muon": 0.1})
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.001), pytest.approx(5e-4)]
    apply_lr_factor(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.01), pytest.approx(5e-4)]

def test_attention_logit_rule_off_with_a_zero_limit_or_a_disabled_guard():
    for guard in (warmed(attn_logit_limit=0.0), warmed(enabled=False)):
        assert guard.check(StepStats(10, 2.0, 1.0, attn_logit_max=1.0)).ok
        assert guard.check(StepStats(11, 2.0, 1.0, attn_logit_max=1e6)).ok


# ---- tiny runs --------------------------------------------------------------------------------------


def tiny_config(corpus: Path, max_steps: int, inject=(), train: dict | None = None,
                guard: dict | None = None) -> RunConfig:
    """MLA + MoE (1 dense layer, 4 routed experts, 1 shared) + one MTP module, char tokens, batches of 4x16."""
    model = ModelConfig.from_preset("tiny", dim=32, n_heads=2, n_layers=2, kv_lora_rank=16, qk_nope_head_dim=8,
                                    qk_rope_head_dim=8, v_head_dim=8, inter_dim=64, moe_inter_dim=16,
                                    n_routed_experts=4, n_dense_layers=1, n_shared_experts=1, mtp_depth=1,
                                    max_seq_len=32)
    train = {"batch_size": 4, "warmup_steps": 2, "eval_batches": 4, "tensorboard": False,
             "eval_every": 10**6, "save_every": 10**6, **(train or {})}
    return RunConfig(model=model, data=DataConfig(source=str(corpus), tokenizer="char", seq_len=16),
                     train=TrainConfig(max_steps=max_steps, **train),
                     guard=GuardConfig(inject=tuple(inject), **(guard or {})), device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def model_and_optimizer_state(trainer: Trainer) -> dict:
    """Weights, buffers (the MoE balance bias), optimizer moments and settings, GradScaler, opt_step. The
    groups' "lr" is left out: each step sets it afresh from the schedule (a function of opt_step)."""
    optimizer = trainer.optimizer.state_dict()
    return {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": {"state": {k: {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in slots.items()}
                                    for k, slots in optimizer["state"].items()},
                          "param_groups": [{k: v for k, v in group.items() if k != "lr"}
                                           for group in optimizer["param_groups"]]},
            "scaler": trainer.scaler.state_dict(), "opt_step": trainer.opt_step}


def tensors(state, prefix: str = ""):
    """(name, tensor) for every tensor in a nested dict/list."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from tensors(value, f"{prefix}.{key}")
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            yield from tensors(value, f"{prefix}[{index}]")


def differences(a, b, where: str = "") -> list[str]:
    """Where two nested states differ; tensors compared with torch.equal (bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b or (a != a and b != b) else [where]


def assert_finite(state) -> None:
    bad = [name for name, t in tensors(state) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    assert not bad, f"NaN/Inf in {bad[:5]}"


def watch_steps(trainer: Trainer) -> None:
    """After every step: no NaN/Inf in weights or optimizer state, and a step the guard did not accept
    left them bit-for-bit as they were."""
    original = trainer.train_step

    def train_step():
        before = model_and_optimizer_state(trainer)
        verdict, values, batches = original()
        after = model_and_optimizer_state(trainer)
        assert_finite(after)
        if not verdict.ok:
            changed = differences(before, after)
            assert not changed, f"step {trainer.step - 1} ({verdict.cause}) changed {changed[:5]}"
        return verdict, values, batches

    trainer.train_step = train_step


@dataclass
class Run:
    run_dir: Path
    trainer: Trainer
    result: object

    def records(self, kind: str) -> list[dict]:
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("kind") == kind]

    def steps(self) -> dict[int, dict]:
        return {r["step"]: r for r in self.records("train")}


def run_training(cfg: RunConfig, run_dir: Path, resume: bool = False, patch=None, watch: bool = True) -> Run:
    trainer = Trainer(cfg, run_dir, resume=resume, show_progress=False)
    if watch:
        watch_steps(trainer)
    if patch is not None:
        patch(trainer)
    return Run(run_dir, trainer, trainer.train())


# ---- a skipped step is bit-exactly a left-out batch ---------------------------------------------------

SKIP_AT, SKIP_STEPS = 4, 10
COMPARED = ("opt_step", "loss", "ce", "mtp_1", "aux", "z", "grad_norm", "lr", "logit_max")


def leave_out_batches(at: int):
    """The reference for a skip: a clean run whose loader hands out the batch(es) of data step `at`, which
    are dropped unread (no forward, backward, optimizer, GradScaler or MoE-bias update), and whose step
    counter then moves on. The LR schedule follows opt_step in both runs, so this is what a skip
    promises: nothing changes but the data position."""
    def patch(trainer: Trainer) -> None:
        original = trainer.train_step

        def train_step():
            if trainer.step == at:
                for _ in range(trainer.cfg.train.grad_accum):
                    trainer.train_loader.next_batch()
                trainer.step += 1
            return original()
        trainer.train_step = train_step
    return patch


def per_step_values(run: Run) -> dict[int, dict]:
    return {step: {k: r.get(k) for k in COMPARED} for step, r in run.steps().items() if r["action"] == "ok"}


@pytest.fixture(scope="module")
def skip_runs(corpus, tmp_path_factory):
    cache: dict = {}

    def get(kind: str, grad_accum: int) -> tuple[Run, Run, Run]:
        if (kind, grad_accum) not in cache:
            train = {"grad_accum": grad_accum}
            make = lambda inject=(): tiny_config(corpus, SKIP_STEPS, inject, train=train)  # noqa: E731
            cache[kind, grad_accum] = (
                run_training(make([f"{kind}@{SKIP_AT}"]), tmp_path_factory.mktemp("skip")),
                run_training(make(), tmp_path_factory.mktemp("left-out"), patch=leave_out_batches(SKIP_AT)),
                run_training(make(), tmp_path_factory.mktemp("clean")),
            )
        return cache[kind, grad_accum]
    return get


@pytest.mark.parametrize("kind, grad_accum", [("nan-loss", 1), ("nan-grad", 1), ("bad-batch", 1),
                                              ("nan-loss", 2), ("bad-batch", 2)])
def test_skip_equals_leaving_the_batch_out(skip_runs, kind, grad_accum):
    skipped, left_out, clean = skip_runs(kind, grad_accum)
    assert skipped.result.n_skips == 1 and [(e["step"], e["action"]) for e in skipped.records("event")] == \
        [(SKIP_AT, "skip")]
    assert skipped.result.opt_step == left_out.result.opt_step == SKIP_STEPS - 1
    assert sorted(per_step_values(skipped)) == [s for s in range(SKIP_STEPS) if s != SKIP_AT]
    assert per_step_values(skipped) == per_step_values(left_out)  # every opt step's losses, bit for bit
    diff = differences(model_and_optimizer_state(skipped.trainer), model_and_optimizer_state(left_out.trainer))
    assert not diff, diff[:5]
    assert skipped.trainer.train_loader.state_dict() == left_out.trainer.train_loader.state_dict()

    # Negative control: training on that batch (a clean run) ends elsewhere, so the comparison has teeth.
    assert differences(model_and_optimizer_state(skipped.trainer), model_and_optimizer_state(clean.trainer))
    assert per_step_values(skipped)[SKIP_AT + 1] != per_step_values(clean)[SKIP_AT + 1]


# ---- an LR spike is rolled back, and the run recovers -------------------------------------------------

SPIKE_AT, SPIKE_STEPS = 79, 120  # the spiked update lands in the snapshot taken at step 80


@pytest.fixture(scope="module")
def spike_runs(corpus, tmp_path_factory) -> dict[str, Run]:
    # LR 1e-2: at 3e-3 a one-step LR x100 barely hurts this tiny model (an unguarded run ends no worse than
    # a clean one), so there would be nothing to recover from. The rollback halves the LR for the rest of
    # the run, and this tiny model is still LR-hungry, so the cost of recovery grows with the steps left
    # after the spike (measured on this setup, final val loss vs clean: spike at 79 of 120: +2.2%; at 59 of
    # 120: +4.5%; at 30 of 120: +6.6%; at 59 of 160: +13%; unguarded: +70..100% in all of them).
    train = {"lr": 1e-2, "warmup_steps": 5, "eval_batches": 8}
    guard = {"snapshot_every": 5}
    spike = [f"lr-spike:100@{SPIKE_AT}"]
    return {
        "clean": run_training(tiny_config(corpus, SPIKE_STEPS, train=train, guard=guard),
                              tmp_path_factory.mktemp("clean"), watch=False),
        "guarded": run_training(tiny_config(corpus, SPIKE_STEPS, spike, train=train, guard=guard),
                                tmp_path_factory.mktemp("guarded")),
        "unguarded": run_training(tiny_config(corpus, SPIKE_STEPS, spike, train=train, guard={"enabled": False}),
                                  tmp_path_factory.mktemp("unguarded"), watch=False),
    }


def test_lr_spike_is_caught_within_two_steps_and_rolled_back(spike_runs):
    run, clean = spike_runs["guarded"], spike_runs["clean"]
    assert run.result.status == "finished" and run.result.n_rollbacks == 1
    events = run.records("event")
    assert events and events[0]["step"] <= SPIKE_AT + 2 and "spike" in events[0]["cause"], events
    rollback = [e for e in events if e["action"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] <= SPIKE_AT + 2
    # The snapshot it restores is from before the spiked update (snapshot k = the state after k updates),
    # not the newer one that already holds it.
    assert rollback[0]["restored_step"] <= SPIKE_AT and rollback[0]["lr_scale"] == 0.5

    steps, clean_steps = run.steps(), clean.steps()
    assert steps[SPIKE_AT]["lr"] == pytest.approx(100 * clean_steps[SPIKE_AT]["lr"])  # the fault fired
    # After the rollback every update runs at half the clean run's LR for the same opt step.
    clean_lr = {r["opt_step"]: r["lr"] for r in clean_steps.values()}
    after = [r for s, r in steps.items() if s > rollback[0]["step"]]
    assert len(after) == SPIKE_STEPS - 1 - rollback[0]["step"] and all(r["action"] == "ok" for r in after)
    assert all(r["lr"] == pytest.approx(0.5 * clean_lr[r["opt_step"]]) for r in after)
    assert run.trainer.guard.lr_scale == 0.5
    assert sorted(steps) == list(range(SPIKE_STEPS))  # the data moved on: no batch was replayed


def test_run_recovers_from_an_lr_spike(spike_runs):
    def final(run: Run) -> tuple[float, float]:
        ce = [r["ce"] for r in run.records("train") if r["action"] == "ok"][-8:]
        return run.result.val_loss, sum(ce) / len(ce)

    assert [spike_runs[name].result.status for name in ("clean", "guarded", "unguarded")] == ["finished"] * 3
    clean, guarded, unguarded = (final(spike_runs[name]) for name in ("clean", "guarded", "unguarded"))
    assert guarded[0] < 1.05 * clean[0] and guarded[1] < 1.05 * clean[1], (guarded, clean)
    # Negative control: the same spike without the guard leaves the run far behind.
    assert unguarded[0] > 1.2 * clean[0] and unguarded[1] > 1.2 * clean[1], (unguarded, clean)


# ---- rollbacks exhausted: abort with a finite checkpoint ----------------------------------------------



def test_attention_logit_growth_in_a_real_run_is_rolled_back(corpus, tmp_path):
    """No fault injected: at LR 0.1 this tiny model's max attention logit goes 0 -> 20 -> 97 -> 233 within
    15 steps (nothing is non-finite, the loss does not spike). The guard reads it from the trainer's sampled
    statistics and rolls back a decade down, after which the logits stay under the limit."""
    train, guard = {"lr": 0.1}, {"stats_every": 5, "snapshot_every": 5}
    off = run_training(tiny_config(corpus, 30, train=train, guard={**guard, "attn_logit_limit": 0.0}),
                       tmp_path / "off", watch=False)
    sampled = [max(v for k, v in r.items() if k.startswith("attn_logit_max/")) for r in off.records("train")
               if any(k.startswith("attn_logit_max/") for k in r)]
    assert max(sampled) > 100 and off.result.n_rollbacks == 0
    run = run_training(tiny_config(corpus, 30, train=train, guard=guard), tmp_path / "on")
    rollbacks = [e for e in run.records("event") if e["action"] == "rollback"]
    assert len(rollbacks) == 1 and "attention logits grew" in rollbacks[0]["cause"], rollbacks
    assert rollbacks[0]["lr_scale"] == pytest.approx(0.1) and run.result.status == "finished"


def test_muon_attention_logit_growth_in_a_real_run_lowers_the_muon_lr_only(corpus, tmp_path):
    """Muon at LR 2.0 (100x its default) blows the attention logits up within 5 steps; the AdamW part at 1e-2
    is healthy. The rollback lowers the Muon group's LR a decade and leaves the AdamW groups' alone."""
    train = {"optimizer": "muon", "muon_lr": 2.0, "lr": 1e-2}
    run = run_training(tiny_config(corpus, 30, train=train, guard={"stats_every": 5, "snapshot_every": 5}),
                       tmp_path / "muon")
    rollbacks = [e for e in run.records("event") if e["action"] == "rollback"]
    assert rollbacks and "attention logits grew" in rollbacks[0]["cause"] and "muon lr x0.1" in rollbacks[0]["detail"]
    lrs = {g["name"]: g["lr"] / g["base_lr"] for g in run.trainer.optimizer.param_groups}
    assert lrs["muon"] == pytest.approx(lrs["decay"] * run.trainer.guard.group_lr_scale["muon"])
    assert run.trainer.guard.lr_scale == 1.0 and lrs["decay"] == lrs["no_decay"]

@pytest.mark.parametrize("max_rollbacks", [0, 1])
def test_exhausted_rollbacks_abort_with_a_finite_checkpoint(corpus, tmp_path, max_rollbacks):
    faults = [f"nan-loss@{step}" for step in range(3, 3 + 3 * (max_rollbacks + 1))]
    cfg = tiny_config(corpus, 20, faults, guard={"max_skips": 3, "max_rollbacks": max_rollbacks})
    run = run_training(cfg, tmp_path / "run")
    assert run.result.status == "aborted" and run.result.exit_code != 0
    expected = (["skip", "skip", "rollback"] * max_rollbacks) + ["skip", "skip", "abort"]
    events = run.records("event")
    assert [e["action"] for e in events] == expected
    assert [e["step"] for e in events] == list(range(3, 3 + len(expected)))
    assert "rollbacks exhausted" in events[-1]["cause"]
    assert run.result.step == 3 + len(expected) < 20  # it stopped there
    summary = run.records("summary")
    assert summary and summary[-1]["status"] == "aborted"

    path = latest_checkpoint(run.run_dir)
    assert path is not None
    ckpt = read_checkpoint(path)
    assert ckpt.step == run.result.step
    assert_finite(ckpt.model_state)
    assert_finite(ckpt.trainer_state["optimizer"])
    # It holds the last verified-good snapshot, not whatever the weights were at the fault.
    assert not differences(ckpt.model_state, run.trainer.rollback.good["model"])
    model, _ = nanoseek.load_checkpoint(run.run_dir)
    assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long)).logits).all()


# ---- guard state across checkpoints ----------------------------------------------------------------


def test_guard_state_survives_save_and_resume(corpus, tmp_path):
    # A constant LR: the schedule depends on max_steps, and the straight run must match the resumed one.
    make = lambda steps: tiny_config(corpus, steps, ["nan-loss@3"], train={"schedule": "constant"},  # noqa: E731
                                     guard={"warmup": 2})
    first = run_training(make(6), tmp_path / "resumed")
    at_save = first.trainer.guard.state_dict()
    assert at_save["n_skips"] == 1 and at_save["recent_skips"] == [3] and len(at_save["loss"]) == 5
    assert read_checkpoint(latest_checkpoint(first.run_dir)).trainer_state["guard"] == at_save

    resumed = Trainer(make(10), tmp_path / "resumed", resume=True, show_progress=False)
    assert resumed.guard.state_dict() == at_save and resumed.step == 6
    watch_steps(resumed)
    resumed.train()
    straight = run_training(make(10), tmp_path / "straight")
    # The resumed guard goes on exactly as if the run had never stopped.
    assert resumed.guard.state_dict() == straight.trainer.guard.state_dict()
    assert not differences(model_and_optimizer_state(resumed), model_and_optimizer_state(straight.trainer))


def test_lr_scale_survives_rollback_and_resume(corpus, tmp_path):
    faults = ["nan-loss@3", "nan-loss@4", "nan-loss@5"]
    make = lambda steps: tiny_config(corpus, steps, faults, guard={"max_skips": 3})  # noqa: E731
    first = run_training(make(8), tmp_path / "run")
    assert [e["action"] for e in first.records("event")] == ["skip", "skip", "rollback"]
    assert first.trainer.guard.lr_scale == 0.5 and first.trainer.guard.n_rollbacks == 1

    resumed = run_training(make(12), tmp_path / "run", resume=True)
    assert resumed.trainer.guard.lr_scale == 0.5 and resumed.trainer.guard.n_rollbacks == 1
    cfg = resumed.trainer.cfg.train
    base_lr = resumed.trainer.optimizer.param_groups[0]["base_lr"]
    after = [r for r in resumed.records("train") if r["step"] >= 8]
    assert [r["step"] for r in after] == [8, 9, 10, 11]
    assert all(r["lr"] == pytest.approx(0.5 * base_lr * lr_factor(r["opt_step"] - 1, cfg)) for r in after)


def test_rollback_right_after_resume_restores_the_checkpoint(corpus, tmp_path):
    # A resumed run has no in-memory snapshot until its first snapshot step (every 20 here); a rollback
    # before then must still have the resumed (checkpointed) state to go back to.
    first = run_training(tiny_config(corpus, 8), tmp_path / "run")
    saved = read_checkpoint(latest_checkpoint(first.run_dir))
    restored = {}

    def capture_rollback(trainer: Trainer) -> None:
        original = trainer.rollback.roll_back

        def rollback(progress):
            to_step = original(progress)
            restored.update(model_and_optimizer_state(trainer), step=to_step)
            return to_step
        trainer.rollback.roll_back = rollback

    faults = ["nan-loss@9", "nan-loss@10", "nan-loss@11"]
    cfg = tiny_config(corpus, 14, faults, guard={"max_skips": 3})
    resumed = run_training(cfg, tmp_path / "run", resume=True, patch=capture_rollback)
    assert resumed.result.status == "finished" and resumed.result.n_rollbacks == 1
    rollback = [e for e in resumed.records("event") if e["action"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 11 and rollback[0]["restored_step"] == 8
    assert restored["step"] == 8 and restored["opt_step"] == saved.trainer_state["opt_step"]
    assert not differences(restored["model"], saved.model_state)
    assert not differences(restored["optimizer"]["state"], saved.trainer_state["optimizer"]["state"])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_rollback_can_skip_extra_batches(corpus, tmp_path, grad_accum):
    faults = ["nan-loss@3", "nan-loss@4", "nan-loss@5"]
    cfg = tiny_config(corpus, 10, faults, train={"grad_accum": grad_accum},
                      guard={"max_skips": 3, "rollback_skip_batches": 2})
    run = run_training(cfg, tmp_path / "run")
    assert run.result.status == "finished" and run.result.step == 10
    events = run.records("event")
    assert [(e["step"], e["action"]) for e in events] == [(3, "skip"), (4, "skip"), (5, "rollback")]
    assert sorted(run.steps()) == [0, 1, 2, 3, 4, 5, 8, 9]  # the data of steps 6 and 7 was stepped over
    # Every step's data was consumed or stepped over, no more: the cursor is where 10 steps put it.
    assert run.trainer.train_loader.state_dict()["position"] == 10 * grad_accum * cfg.train.batch_size
