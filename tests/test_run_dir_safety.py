"""Nothing lost, nothing half-done: every writing command refuses an unusable --out in one line and changes
nothing; a full disk is one line and leaves what was saved intact; replacing prepared data or an export is
write-new-then-swap; a run directory has one writer at a time."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nanoseek.cli import main
from nanoseek.errors import describe
from nanoseek.rundir import LOCK_FILE, hold, release, replacing, unique_run_dir
from nanoseek.train.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from nanoseek.train.metrics import WANDB_ID_FILE
from nanoseek.train.resume import refuse_foreign_files
from safety_helpers import FLAGS, assert_one_line_failure, fingerprint, popen_cli, run_cli

@pytest.fixture(scope="module")
def runs(safety_runs) -> dict[str, Path]:
    return safety_runs


def command(name: str, runs: dict[str, Path], corpus: Path, out: Path) -> list[str]:
    """Each writing subcommand, aimed at `out`."""
    return {
        "train": ["train", "--data", str(corpus), "--out", str(out), "--max-steps", "1", *FLAGS],
        "prepare": ["prepare", "--data", str(corpus), "--data.tokenizer", "char", "--data.seq-len", "16", "--out", str(out)],
        "convert": ["convert", "--from", str(runs["gqa"]), "--out", str(out), "--to", "mla", "--data", str(corpus),
                    "--seq-len", "16", "--calib-tokens", "64", "--eval-tokens", "64"],
        "heal": ["heal", "--ckpt", str(runs["conv"]), "--out", str(out), "--steps", "1", "--device", "cpu",
                 "--no-progress"],
        "npt": ["npt", "--base", str(runs["gqa"]), "--out", str(out), "--max-steps", "1", "--data", str(corpus),
                "--seq-len", "16", "--device", "cpu", "--no-progress"],
        "export": ["export", str(runs["mla"]), "--out", str(out)],
    }[name]


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder nobody may write into: chmod for a normal user; root ignores modes, so a read-only tmpfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


COMMANDS = ["train", "prepare", "convert", "heal", "npt", "export"]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("kind", ["is-a-file", "under-a-file", "read-only"])
def test_an_unusable_out_is_one_line_and_changes_nothing(name, kind, runs, corpus, tmp_path, capsys, request):
    existing = tmp_path / "notes.txt"
    existing.write_text("my own notes\n")
    out = {"is-a-file": existing, "under-a-file": existing / "run"}.get(kind)
    if kind == "read-only":
        out = request.getfixturevalue("read_only_dir") / "run"
    before, runs_before = fingerprint(tmp_path), fingerprint(runs["mla"].parent)
    capsys.readouterr()
    code = main(command(name, runs, corpus, out))
    line = assert_one_line_failure(code, capsys.readouterr().err)
    assert str(out) in line
    assert fingerprint(tmp_path) == before and fingerprint(runs["mla"].parent) == runs_before


def test_os_errors_read_as_what_to_do():
    cases = {errno.ENOSPC: "no space left", errno.EACCES: "permission denied", errno.ENOTDIR: "not a directory",
             errno.EEXIST: "already exists", errno.EROFS: "read-only"}
    for code, words in cases.items():
        line = describe(OSError(code, os.strerror(code), "/some/path"))
        assert line.startswith("/some/path: ") and words in line, line
    assert describe(KeyError("step")) is None  # not an expected failure: a bug, shown with its traceback


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import nanoseek.cli as cli

    def broken(args):
        raise KeyError("step")

    monkeypatch.setitem(cli.COMMANDS, "prepare", (cli.Prepare, broken))
    assert main(["prepare", "--out", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "this is a bug in nanoseek" in err


# ---- prepared data and exports: write-new-then-swap --------------------------------------------------


def test_a_failed_prepare_keeps_the_earlier_data(corpus, tmp_path):  # through the real CLI, as a user runs it
    """The issue's repro: a typo in --data used to delete meta.json and the shards before failing."""
    out = tmp_path / "prep1"
    assert main(["prepare", "--data", str(corpus), "--data.tokenizer", "char", "--data.seq-len", "16", "--out", str(out)]) == 0
    (out / "my-notes.txt").write_text("kept\n")
    before = fingerprint(tmp_path)
    done = run_cli("prepare", "--data", str(tmp_path / "corpsu.txt"), "--data.tokenizer", "char", "--out", out, cwd=tmp_path)
    assert_one_line_failure(done.returncode, done.stderr, "corpsu.txt")
    assert fingerprint(tmp_path) == before
    # A good re-preparation replaces the data, keeps the user's file, and leaves no staging folder behind.
    assert main(["prepare", "--data", str(corpus), "--data.tokenizer", "byte", "--data.seq-len", "16", "--out", str(out)]) == 0
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["kind"] == "byte"
    assert (out / "my-notes.txt").read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep1"]


def test_replacing_refuses_to_overwrite_a_users_file_and_rolls_back_on_error(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("mine")
    with pytest.raises(ValueError, match="config.json"):
        with replacing(target, set(), {"config.json"}, "an export"):
            raise AssertionError("must refuse before the body runs")
    with pytest.raises(RuntimeError):
        with replacing(target, {"config.json"}, {"config.json"}, "an export") as staging:
            (staging / "config.json").write_text("new")
            raise RuntimeError("the export failed half-way")
    assert (target / "config.json").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_what_a_killed_replacement_left_is_recovered(tmp_path):
    """kill -9 between the two renames: the old folder waits under .NAME.old-PID; the next replacement puts
    it back (the swap never happened), and a dead process's staging folder is removed."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    target = tmp_path / "prep"
    (tmp_path / f".prep.old-{dead.pid}-abcdef").mkdir()
    (tmp_path / f".prep.old-{dead.pid}-abcdef" / "meta.json").write_text("old")
    (tmp_path / f".prep.new-{dead.pid}-123456").mkdir()
    (tmp_path / f".prep.new-{os.getpid()}-654321").mkdir()  # a live process's: left alone
    with pytest.raises(RuntimeError):
        with replacing(target, {"meta.json"}, {"meta.json"}, "data"):
            raise RuntimeError("stop before the swap")
    assert (target / "meta.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".prep.new-{os.getpid()}-654321", "prep"]


def test_train_never_deletes_a_users_files_in_out(corpus, tmp_path, capsys):
    """The issue's repro: `train --out DIR` where DIR/data/meta.json is the user's own file deleted it."""
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "data" / "meta.json").write_text('{"my": "metadata"}')
    before = fingerprint(tmp_path)
    code = main(["train", "--data", str(corpus), "--out", str(out), "--max-steps", "1", *FLAGS])
    assert_one_line_failure(code, capsys.readouterr().err, "meta.json")
    assert fingerprint(tmp_path) == before


# ---- a full disk ------------------------------------------------------------------------------------


def test_a_full_disk_at_a_later_checkpoint_is_one_line_and_keeps_the_earlier(corpus, tmp_path, monkeypatch, capsys):
    """A patched safetensors write failing as a full disk does (works without root)."""
    import nanoseek.train.checkpoint as checkpoint
    from safetensors import SafetensorError

    calls = {"n": 0}
    real = checkpoint.save_file

    def full_on_second_checkpoint(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # one weights file per checkpoint (no EMA): steps 3 and 6 are written, 9 is not
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_on_second_checkpoint)
    run = tmp_path / "run"
    code = main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "9", *FLAGS])
    assert_one_line_failure(code, capsys.readouterr().err, "no space left")
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003", "step-00000006"]
    read_checkpoint(latest_checkpoint(run))  # verified: sizes and sha256 match
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import torch

    import nanoseek.train.checkpoint as checkpoint

    state = {"w": torch.zeros(1000)}
    checkpoint.save_checkpoint(tmp_path, 1, state, {}, {})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))  # 100 bytes left
    with pytest.raises(OSError) as err:
        checkpoint.save_checkpoint(tmp_path, 2, state, {}, {})
    assert err.value.errno == errno.ENOSPC and "100 bytes free, the latest checkpoint took" in describe(err.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A real 4 MB file system (tmpfs: needs root); skipped where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as file:
        try:
            while True:
                file.write(b"\0" * 4096)
                file.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_a_real_full_disk_at_the_first_and_a_later_checkpoint(corpus, tiny_disk, monkeypatch, capsys):
    import nanoseek.train.trainer as trainer_module

    real = trainer_module.save_checkpoint
    for fill_before in (1, 2):  # the disk fills up before the first, then before the second checkpoint
        saves = {"n": 0}

        def filling(*args, **kwargs):
            saves["n"] += 1
            if saves["n"] == fill_before:
                fill(tiny_disk)
            return real(*args, **kwargs)

        monkeypatch.setattr(trainer_module, "save_checkpoint", filling)
        run = tiny_disk / f"run{fill_before}"
        code = main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "6", *FLAGS])
        assert_one_line_failure(code, capsys.readouterr().err, "no space left")
        kept = list_checkpoints(run)
        assert [p.name for p in kept] == (["step-00000003"] if fill_before == 2 else [])
        for path in kept:
            read_checkpoint(path)
        (tiny_disk / "filler").unlink()


def test_a_real_full_disk_during_prepare_keeps_the_earlier_data(corpus, tiny_disk, tmp_path, capsys):
    out = tiny_disk / "prep"
    assert main(["prepare", "--data", str(corpus), "--data.tokenizer", "char", "--data.seq-len", "16", "--out", str(out)]) == 0
    before = fingerprint(tiny_disk)
    big = tmp_path / "big.txt"
    big.write_text("\n".join(f"line {i} of a corpus larger than the disk" for i in range(100_000)))
    capsys.readouterr()
    code = main(["prepare", "--data", str(big), "--data.tokenizer", "char", "--data.seq-len", "16", "--out", str(out)])
    assert_one_line_failure(code, capsys.readouterr().err, "no space left")
    assert fingerprint(tiny_disk) == before


# ---- one writer per run directory ---------------------------------------------------------------------


def test_the_lock_is_reentrant_released_and_never_stale(tmp_path):
    run = tmp_path / "run"
    hold(run, "train")
    hold(run, "train")  # the same process again (a command calling another): fine
    release(run)
    assert (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    release(run)
    assert not run.exists()  # created by the lock and never written: removed again
    # A holder killed with SIGKILL leaves its lock file, not its lock: the kernel drops flocks of dead processes.
    holder = subprocess.Popen(["python3", "-c", f"from nanoseek.rundir import hold; hold({str(run)!r}, 'x'); "
                               "import time; print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=f"pid {holder.pid}"):
        hold(run, "train")
    holder.kill()
    holder.wait()
    hold(run, "train")
    release(run)
    names = {unique_run_dir(tmp_path, "tiny") for _ in range(50)}
    assert len(names) == 50


def test_two_writers_on_one_run_directory(corpus, tmp_path, capsys):
    """Two `train --out same`: exactly one trains; the other (and a --resume) is refused naming the holder,
    and the first run is not damaged (it is then stopped with SIGTERM and checked)."""
    first = popen_cli("train", "--data", corpus, "--out", "run", "--max-steps", "2000", *FLAGS, cwd=tmp_path)
    lock = tmp_path / "run" / LOCK_FILE
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().startswith(f"{first.pid} ")):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.1)
    for args in (["--data", str(corpus), "--max-steps", "5", *FLAGS], ["--resume", "--max-steps", "5"]):
        code = main(["train", "--out", str(tmp_path / "run"), *args])  # this test's process: another writer
        assert_one_line_failure(code, capsys.readouterr().err, f"pid {first.pid}", "in use")
    assert first.poll() is None  # still training, undisturbed
    while not list_checkpoints(tmp_path / "run"):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    last = read_checkpoint(latest_checkpoint(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(last.step))  # one writer's records, each step once


def test_an_out_holding_only_run_files_is_accepted_and_any_other_file_refused(tmp_path):
    """Every file a run writes (wandb's run id included, so a wandb run can start over) is a run's; anything else
    is someone's, and nothing is written next to it."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.toml", "metrics.jsonl", WANDB_ID_FILE, "samples.txt", ".data.tmp-1"):
        (run / name).write_text("x")
    refuse_foreign_files(run)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not a nanoseek run \(notes.txt\).*choose a new or empty --out"):
        refuse_foreign_files(run)
