"""Adaptive clipping (train/clipping.py) and plateau detection (train/plateau.py).

Both keep running statistics across steps, so each is checked against the pitfalls found in others' code:
ZClip's NaN gradient norm that poisons its EMA mean and variance for good, and MaxText's rolling window that
takes in a NaN loss and applies an early NaN during its warm-up. Every rule here must keep a NaN or Inf out of
its statistics, and a skipped step must leave them exactly as if its batch had never been drawn.
"""

import math
import statistics

import numpy as np
import pytest
from shard_helpers import write_shards

from nanoseek.config import GuardConfig
from nanoseek.train.clipping import AdaptiveClip, clip_norm
from nanoseek.train.guard import StabilityGuard, StepStats
from nanoseek.train.plateau import PlateauDetector, unigram_entropy

NORMS = [1.0, 1.2, 0.9, 1.1, 0.95, 1.05, 1.0, 0.98, 1.02, 1.1, 0.9, 1.0]


def warmed_clip(norms=NORMS, **kw) -> AdaptiveClip:
    clip = AdaptiveClip(**{"warmup": 5, **kw})
    for norm in norms:
        clip.commit(norm)
    return clip


def reference_stats(norms, warmup: int, alpha: float, z: float) -> tuple[float, float]:
    """The same statistics written out the slow, obvious way (float64 lists)."""
    mean = statistics.fmean(norms[:warmup])
    var = statistics.pvariance(norms[:warmup])
    for g in norms[warmup:]:
        std = math.sqrt(var)
        kept = mean + z * std if std > 0 and (g - mean) / std > z else g
        new_mean = alpha * mean + (1 - alpha) * kept
        var = alpha * var + alpha * (1 - alpha) * (kept - mean) ** 2
        mean = new_mean
    return mean, var


def test_adaptive_clip_matches_a_reference_and_clips_only_spikes():
    spiky = NORMS[:8] + [9.0] + NORMS[8:]
    clip = warmed_clip(spiky, z_threshold=2.5, alpha=0.9)
    mean, var = reference_stats(spiky, 5, 0.9, 2.5)
    assert clip.mean == pytest.approx(mean, rel=1e-12) and clip.var == pytest.approx(var, rel=1e-12)
    assert clip.n_clipped == 1  # the 9.0, and nothing else
    assert clip.limit(clip.mean) == math.inf  # an ordinary norm is left alone
    assert clip.limit(50.0) == pytest.approx(clip.mean + 2.5 * math.sqrt(clip.var))
    assert AdaptiveClip(warmup=5).limit(50.0) == math.inf  # nothing is clipped before the warm-up is over


def test_clip_norm_combines_the_fixed_and_the_adaptive_limit():
    clip = warmed_clip()
    assert clip_norm(1.0, None, 50.0) == 1.0 and clip_norm(0.0, None, 50.0) == math.inf
    adaptive = clip.limit(50.0)
    assert 1.0 < adaptive < 2.0
    assert clip_norm(0.0, clip, 50.0) == adaptive and clip_norm(1.0, clip, 50.0) == 1.0
    assert clip_norm(10.0, clip, 50.0) == adaptive


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("when", ["warm-up", "after warm-up"])
def test_a_nonfinite_norm_never_reaches_the_clip_statistics(bad, when):
    """ZClip's pitfall: its z-test is False for a NaN norm, so the NaN is averaged in for good."""
    norms = NORMS[:2] if when == "warm-up" else NORMS
    clip, twin = warmed_clip(norms), warmed_clip(norms)
    assert clip.limit(bad) == math.inf  # the guard skips such a step; the clipper only reads
    clip.commit(bad)
    assert clip.state_dict() == twin.state_dict()  # as if the step never happened
    for norm in NORMS:
        clip.commit(norm)
        twin.commit(norm)
    assert clip.state_dict() == twin.state_dict() and math.isfinite(clip.mean) and math.isfinite(clip.var)


def test_limit_never_changes_the_state_so_a_skip_is_a_left_out_batch():
    clip = warmed_clip()
    before = clip.state_dict()
    for norm in (0.5, 1.0, 30.0, math.nan):
        clip.limit(norm)
    assert clip.state_dict() == before


def test_adaptive_clip_state_round_trip():
    clip = warmed_clip(NORMS + [7.0])
    restored = AdaptiveClip(warmup=5)
    restored.load_state_dict(clip.state_dict())
    for norm in (1.0, 8.0, 1.1):
        assert restored.limit(norm) == clip.limit(norm)
        restored.commit(norm)
        clip.commit(norm)
    assert restored.state_dict() == clip.state_dict()


@pytest.mark.parametrize("kw", [{"z_threshold": 0}, {"alpha": 1.0}, {"alpha": 0.0}, {"warmup": 0}])
def test_adaptive_clip_rejects_bad_settings(kw):
    with pytest.raises(ValueError, match="needs"):
        AdaptiveClip(**kw)


# ---- plateau detection -------------------------------------------------------------------------------

UNIGRAM = 5.0


def feed(detector: PlateauDetector, losses) -> list[str | None]:
    return [detector.observe(loss) for loss in losses]


def test_plateau_is_flagged_after_start_when_the_loss_stops_at_the_unigram_level():
    detector = PlateauDetector(UNIGRAM, start=30, margin=0.1, patience=20)
    flags = feed(detector, [6.2 - 0.04 * i for i in range(30)] + [5.02, 4.98] * 30)
    first = next(i for i, f in enumerate(flags) if f)
    assert first >= 30 and "unigram" in flags[first] and not detector.below_unigram


def test_a_slow_run_descending_through_the_unigram_level_is_not_a_plateau():
    detector = PlateauDetector(UNIGRAM, start=30, margin=0.1, patience=50)
    # 0.25 nats per 50 steps; LR 1e-3, the slowest LR of bench/stability_sweep.py, falls ~0.4 per 50 there
    assert not any(feed(detector, [6.5 - 0.005 * i for i in range(400)]))


def test_a_knocked_out_run_relearning_towards_the_unigram_level_is_a_plateau():
    """Measured at LR 1.0 (bench/instability_lab.py): the loss falls to ~5.4, is knocked up to ~5.7, then creeps
    back down towards the unigram entropy. It descends, but it makes no new low: that is the plateau."""
    detector = PlateauDetector(UNIGRAM + 0.3, start=40, margin=0.1, patience=30)
    losses = [6.2 - 0.03 * i for i in range(30)] + [5.6 + 0.01 * i for i in range(30)] + \
             [5.9 - 0.004 * i for i in range(100)]
    flags = feed(detector, losses)
    first = next(i for i, f in enumerate(flags) if f)
    assert 40 <= first < 80 and "lowest loss moved" in flags[first]


def test_a_loss_climbing_above_its_start_is_called_diverged_at_once():
    detector = PlateauDetector(UNIGRAM, start=100, margin=0.1, patience=50)
    flags = feed(detector, [6.2, 6.3, 7.9, 11.6, 9.0, 8.0])  # LR 1.0's first steps (bench/instability_lab.py)
    first = next(i for i, f in enumerate(flags) if f)
    assert first <= 4 and "diverged" in flags[first]
    assert not any(feed(PlateauDetector(UNIGRAM, start=100), [6.2, 6.5, 6.1, 6.6, 5.9] * 19))  # noise is not


def test_a_run_below_the_unigram_level_is_not_a_plateau_even_when_flat():
    detector = PlateauDetector(UNIGRAM, start=10, margin=0.1, patience=20)
    assert not any(feed(detector, [4.5, 4.52, 4.48] * 60)) and detector.below_unigram


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_loss_never_enters_the_plateau_window(bad):
    """MaxText's pitfall: a NaN appended to the rolling window makes every later decision NaN-driven."""
    detector, twin = (PlateauDetector(UNIGRAM, start=5, patience=10) for _ in range(2))
    feed(detector, [6.0, 5.8, bad, 5.6, bad])
    feed(twin, [6.0, 5.8, 5.6])
    assert detector.state_dict() == twin.state_dict() and math.isfinite(detector.ema) and math.isfinite(detector.best)


def test_an_early_nan_is_skipped_by_the_guard_even_during_warm_up():
    """MaxText's other pitfall: its check is bypassed during warm-up, so an early NaN is applied."""
    guard = StabilityGuard(GuardConfig(warmup=20, window=50, max_skips=10))
    guard.watch_plateau(UNIGRAM, start=0)
    assert guard.check(StepStats(0, 6.0, 1.0, ce=6.0)).ok
    for loss, norm in ((math.nan, 1.0), (6.0, math.nan), (math.inf, math.inf)):
        assert guard.check(StepStats(1, loss, norm, ce=loss)).action == "skip"
    assert list(guard.stats["loss"].values) == [6.0] and guard.plateau.state_dict()["ema"] == 6.0
    assert guard.plateau.applied == 1


def test_guard_rolls_back_on_a_plateau_and_keeps_its_state():
    guard = StabilityGuard(GuardConfig(warmup=5, window=20, plateau_patience=10, max_rollbacks=1))
    guard.watch_plateau(UNIGRAM, start=15)
    assert all(guard.check(StepStats(step, 5.0, 1.0)).ok for step in range(40))  # no CE given: no check
    verdicts = [guard.check(StepStats(step, 5.0, 1.0, ce=5.0 + 0.01 * (step % 2))) for step in range(40, 80)]
    rollback = next(i for i, v in enumerate(verdicts) if not v.ok)
    assert rollback + 1 >= 15 and verdicts[rollback].action == "rollback" and "plateau" in verdicts[rollback].cause
    assert not guard.worth_keeping
    state = guard.state_dict()
    restored = StabilityGuard(GuardConfig(warmup=5, window=20, plateau_patience=10, max_rollbacks=1))
    restored.watch_plateau(UNIGRAM, start=15)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    guard.rolled_back()
    assert guard.plateau.ema is None and guard.lr_scale == pytest.approx(0.1)  # a decade down
    after = [guard.check(StepStats(100 + s, 5.0, 1.0, ce=5.0)) for s in range(12)]
    assert after[-1].action == "abort"  # still stuck after the one allowed rollback: the run says so



def test_a_loss_without_a_unigram_level_is_watched_for_divergence_only():
    """Distillation's KL: flat for ever is not a plateau, but climbing 0.5 nats above its start is a divergence."""
    guard = StabilityGuard(GuardConfig(warmup=5, window=20, plateau_patience=10))
    guard.watch_plateau(None, start=0)
    assert all(guard.check(StepStats(step, 1.6, 1.0, ce=1.6)).ok for step in range(60)) and guard.worth_keeping
    # A creep of 0.03 nats a step: never a spike, but the loss EMA ends far above where the run began.
    verdicts = [guard.check(StepStats(60 + s, 1.6 + 0.03 * s, 1.0, ce=1.6 + 0.03 * s)) for s in range(40)]
    first = next(v for v in verdicts if not v.ok)
    assert first.action == "rollback" and "diverged" in first.cause

def test_plateau_detection_off_with_a_zero_margin_or_a_disabled_guard():
    for cfg in (GuardConfig(plateau_margin=0.0), GuardConfig(enabled=False)):
        guard = StabilityGuard(cfg)
        guard.watch_plateau(UNIGRAM, start=0)
        assert guard.plateau is None and guard.worth_keeping


def test_unigram_entropy_of_shards(tmp_path):
    tokens = np.array([0, 0, 1, 2] * 50, dtype=np.int64)
    paths = write_shards([tokens], tmp_path, "train", shard_tokens=1 << 10, vocab_size=8)
    p = np.array([0.5, 0.25, 0.25])
    assert unigram_entropy(paths, 8) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert unigram_entropy(paths, 8, max_tokens=2) == 0.0  # only the first two tokens (both 0) are read


# ---- in training: a skip leaves the clipper and the plateau window exactly as a left-out batch would ---------

SKIP_AT, STEPS = 5, 12


def active_clipper(trainer) -> None:
    """ZClip (zclip=0.5 in the config) with a 2-step warm-up, so it clips within these few steps."""
    assert trainer.clipper.z_threshold == 0.5
    trainer.clipper.warmup = 2


@pytest.mark.parametrize("kind", ["nan-loss", "nan-grad"])
def test_a_skipped_step_leaves_clipper_and_plateau_state_as_a_left_out_batch(kind, tmp_path):
    from test_guard import (differences, leave_out_batches, model_and_optimizer_state, run_training,
                            tiny_config, write_corpus)

    corpus = write_corpus(tmp_path / "corpus.txt")
    make = lambda inject=(): tiny_config(corpus, STEPS, inject, train={"zclip": 0.5})  # noqa: E731

    def both(patch):
        return lambda trainer: (active_clipper(trainer), patch(trainer) if patch else None)

    skipped = run_training(make([f"{kind}@{SKIP_AT}"]), tmp_path / "skip", patch=both(None))
    left_out = run_training(make(), tmp_path / "left-out", patch=both(leave_out_batches(SKIP_AT)))
    clean = run_training(make(), tmp_path / "clean", patch=both(None))
    assert skipped.result.n_skips == 1
    a, b = skipped.trainer, left_out.trainer
    assert a.clipper.n_clipped > 0  # the clipper did clip: the comparison has teeth
    assert a.clipper.state_dict() == b.clipper.state_dict() and math.isfinite(a.clipper.mean)
    assert a.guard.plateau.state_dict() == b.guard.plateau.state_dict() and math.isfinite(a.guard.plateau.ema)
    diff = differences(model_and_optimizer_state(a), model_and_optimizer_state(b))
    assert not diff, diff[:5]
    assert a.clipper.state_dict() != clean.trainer.clipper.state_dict()  # training on that batch moves it


def test_with_adaptive_clipping_a_grad_norm_outlier_is_clipped_not_skipped():
    guard = StabilityGuard(GuardConfig(warmup=5, window=20))
    for step, norm in enumerate(NORMS):
        assert guard.check(StepStats(step, 2.0, norm)).ok
    assert guard.check(StepStats(12, 2.0, 50.0)).action == "skip"  # the guard alone skips it
    guard.grad_spikes_clipped = True
    assert guard.check(StepStats(13, 2.0, 80.0)).ok  # with ZClip on, the step goes ahead (and is clipped)
    assert guard.check(StepStats(14, 2.0, math.nan)).action == "skip"  # a non-finite norm is skipped all the same
    assert guard.check(StepStats(15, 9.0, 1.0)).action == "skip"  # and so is a loss spike


def test_fp16_run_survives_a_skip_and_a_rollback(tmp_path):
    """Found by the instability lab (fp16 at LR 1.0): after a step the guard dropped, the GradScaler still held
    that step's unscale_ record and the next step raised. The scaler must come out of a skip at its old scale."""
    from test_guard import run_training, tiny_config, write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_config(corpus, 8, ["nan-loss@2", "nan-loss@5", "nan-loss@6", "nan-loss@7"],
                      train={"precision": "fp16"}, guard={"max_skips": 3})
    run = run_training(cfg, tmp_path / "run")
    actions = [(e["step"], e["action"]) for e in run.records("event")]
    assert actions == [(2, "skip"), (5, "skip"), (6, "rollback"), (7, "skip")]
    assert run.result.status == "finished" and run.trainer.scaler.get_scale() == 2.0 ** 16  # never lowered


# ---- the clipper and the plateau detector across rollbacks and checkpoints ----------------------------------


def test_a_rollback_restores_the_clipper_of_the_snapshot_it_returns_to(tmp_path):
    """The clip threshold after a rollback is the one the restored weights trained under."""
    from test_guard import run_training, tiny_config, write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_config(corpus, 10, ["nan-loss@5", "nan-loss@6", "nan-loss@7"], train={"zclip": 0.5},
                      # no plateau detection: it keeps the first snapshot until the loss is below the unigram level
                      guard={"max_skips": 3, "snapshot_every": 2, "plateau_margin": 0.0})
    after_step, restored = {}, {}

    def watch(trainer) -> None:
        active_clipper(trainer)
        step, roll_back = trainer.train_step, trainer.rollback.roll_back

        def train_step():
            verdict, values, batches = step()
            if verdict.ok:
                after_step[trainer.step] = trainer.clipper.state_dict()
            return verdict, values, batches

        def rollback(progress):
            restored.update(before=trainer.clipper.state_dict(), to_step=roll_back(progress),
                            after=trainer.clipper.state_dict())
            return restored["to_step"]
        trainer.train_step, trainer.rollback.roll_back = train_step, rollback

    run = run_training(cfg, tmp_path / "run", patch=watch)
    assert run.result.n_rollbacks == 1 and restored["to_step"] == 2
    assert restored["before"]["seen"] == 5 and restored["after"] == after_step[2]  # seen 2: past the warm-up
    assert restored["after"]["mean"] > 0 and restored["after"] != restored["before"]


def test_snapshots_are_promoted_only_while_the_weights_are_worth_keeping():
    import torch

    from nanoseek.train.rollback import RollbackKeeper

    model = torch.nn.Linear(2, 2)
    keeper = RollbackKeeper(GuardConfig(snapshot_every=1), model,
                            torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False),
                            None, AdaptiveClip())
    keeper.after_good_step(0, 0)
    for step in (1, 2, 3):  # a loss on the plateau: the snapshot of step 0 stays the rollback target
        keeper.after_good_step(step, step, worth_keeping=False)
        assert keeper.good["step"] == 0 and keeper.pending["step"] == step
    keeper.after_good_step(4, 4, worth_keeping=True)  # below the unigram level: the pending one is promoted
    assert keeper.good["step"] == 3 and keeper.pending["step"] == 4


def _as_before_adaptive_clipping(trainer) -> None:
    """Checkpoints as written before adaptive clipping and plateau detection: neither their settings nor state."""
    state_of, config_of = trainer.trainer_state, trainer.cfg.to_dict

    def trainer_state() -> dict:
        state = {k: v for k, v in state_of().items() if k != "clipper"}
        return {**state, "guard": {k: v for k, v in state["guard"].items() if k != "plateau"}}

    def to_dict() -> dict:
        cfg = config_of()
        cfg["train"].pop("zclip")
        for key in ("plateau_margin", "plateau_patience", "plateau_lr_factor"):
            cfg["guard"].pop(key)
        return cfg
    trainer.trainer_state, trainer.cfg.to_dict = trainer_state, to_dict


def test_a_checkpoint_from_before_adaptive_clipping_resumes(tmp_path):
    from test_guard import run_training, tiny_config, write_corpus

    from nanoseek.train.checkpoint import latest_checkpoint, read_checkpoint
    from nanoseek.train.resume import saved_config

    corpus = write_corpus(tmp_path / "corpus.txt")
    run_training(tiny_config(corpus, 6), tmp_path / "run", patch=_as_before_adaptive_clipping)
    old = read_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert "clipper" not in old.trainer_state and "plateau" not in old.trainer_state["guard"]
    assert "zclip" not in old.config["train"] and "plateau_margin" not in old.config["guard"]
    cfg = saved_config(tmp_path / "run")  # what `--resume` continues with: the checkpoint's own config
    cfg.train.max_steps = 10
    resumed = run_training(cfg, tmp_path / "run", resume=True)
    assert resumed.result.status == "finished" and resumed.result.step == 10 and resumed.result.n_skips == 0
    # Both start afresh at the resume, with the defaults: 4 applied steps seen since.
    assert resumed.trainer.clipper.seen == 4 and resumed.trainer.guard.plateau.applied == 4


def test_clipper_and_plateau_state_resume_exactly(tmp_path):
    from test_guard import differences, model_and_optimizer_state, run_training, tiny_config, write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    # A constant LR: the schedule depends on max_steps, and the straight run must match the resumed one.
    make = lambda steps: tiny_config(corpus, steps, train={"schedule": "constant", "zclip": 0.5})  # noqa: E731
    first = run_training(make(6), tmp_path / "resumed", patch=active_clipper)
    at_save = first.trainer.clipper.state_dict(), first.trainer.guard.plateau.state_dict()
    assert at_save[0]["seen"] == 6 and at_save[1]["applied"] == 6
    resumed = run_training(make(10), tmp_path / "resumed", resume=True, patch=active_clipper)
    straight = run_training(make(10), tmp_path / "straight", patch=active_clipper)
    a, b = resumed.trainer, straight.trainer
    assert a.clipper.n_clipped > 0 and a.clipper.state_dict() == b.clipper.state_dict()
    assert a.guard.plateau.state_dict() == b.guard.plateau.state_dict()
    assert not differences(model_and_optimizer_state(a), model_and_optimizer_state(b))
