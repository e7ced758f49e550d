"""Faults: SIGKILL at any moment, a full disk, a diverging loss, fp16 overflow, running out of memory."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vitkit
import vitkit.checkpoint as checkpoint_module
import vitkit.train.loop as train_module
from vitkit.checkpoint import CheckpointSaveError, recover, save_checkpoint
from vitkit.cli import main
from vitkit.errors import VitkitError
from vitkit.pretrained import WEIGHTS_FILE
from vitkit.train import TrainConfig, TrainingDiverged, read_metrics, train
from vitkit.weights import read_state_dict

from test_train import make_shapes, tiny_config


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=24, val_per_class=6)


def _cli_args(data: Path, out: Path) -> list[str]:
    return ["train", "--model", "vit_cifar", "--patch-size", "4", "--img-size", "16", "--data", str(data),
            "--out", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "3e-3", "--drop-path", "0.1",
            "--mixup", "0.8", "--checkpoint-every", "1", "--no-progress"]


def _spawn(args: list[str]) -> subprocess.Popen:
    # vit_cifar's full width is too slow here: shrink it through the one override the CLI lacks.
    code = ("import sys, torch; torch.set_num_threads(1); import vitkit.train.run_dir as t; "
            "from vitkit.cli import main; "
            "orig = t.resolve_config\n"
            "def small(c):\n"
            "    c.model_overrides = c.model_overrides or dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64)\n"
            "    return orig(c)\n"
            "t.resolve_config = small\n"
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for r in read_metrics(path) if r.get("kind") == "step")


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(shapes, tmp_path):
    """Kill the trainer (SIGKILL: no cleanup runs) three times, once while a checkpoint is being
    written, resuming after each; the final weights equal an uninterrupted run's."""
    ref = tmp_path / "ref"
    done = _spawn(_cli_args(shapes, ref))
    assert done.wait(timeout=300) == 0, done.stderr.read().decode()
    total = _steps_logged(ref)
    assert total == 27  # 72 images / 8 = 9 steps per epoch

    out = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    args = _cli_args(shapes, out)
    for target in sorted(rng.sample(range(2, total - 2), 2)) + ["during-write"]:
        process = _spawn(args)
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline:
            if target == "during-write":
                # A save is underway while its .tmp directory exists: kill inside that window.
                if (out / ".last.tmp").exists():
                    break
                time.sleep(0.0005)
            elif _steps_logged(out) >= target:
                break
            else:
                time.sleep(0.01)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
        args = ["train", "--resume", str(out), "--no-progress"]
    assert kills == 3
    final = _spawn(args)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()
    a = read_state_dict(out / "last" / WEIGHTS_FILE)
    b = read_state_dict(ref / "last" / WEIGHTS_FILE)
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == list(range(1, total + 1))
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*.old"))


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    model = vitkit.create_model("vit_cifar", embed_dim=32, depth=1, num_heads=2, mlp_dim=64)
    save_checkpoint(tmp_path, tag="last", model=model, train_state={"progress": {"step": 1}})
    torch.nn.init.constant_(model.head.bias, 0.5)
    save_checkpoint(tmp_path, tag="last", model=model, train_state={"progress": {"step": 2}})
    # Replay the newer save's first rename only: last -> .last.old, the complete .last.tmp waiting.
    save = checkpoint_module.save_pretrained
    os.rename(tmp_path / "last", tmp_path / ".last.old")
    save(model, tmp_path / ".last.tmp")
    (tmp_path / ".last.tmp" / "train_state.pt").write_bytes((tmp_path / ".last.old" / "train_state.pt").read_bytes())
    recover(tmp_path)
    assert (tmp_path / "last" / WEIGHTS_FILE).exists() and not (tmp_path / ".last.old").exists()
    assert torch.all(vitkit.load_pretrained(tmp_path / "last").head.bias == 0.5)


def test_disk_full_keeps_the_previous_checkpoint(shapes, tmp_path, monkeypatch):
    real = checkpoint_module.save_pretrained
    calls = {"n": 0}

    def flaky(model, directory):
        calls["n"] += 1
        if calls["n"] == 3:  # the third save (step 3's) finds the disk full halfway
            real(model, directory)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, directory)

    monkeypatch.setattr(checkpoint_module, "save_pretrained", flaky)
    out = tmp_path / "run"
    with pytest.raises(CheckpointSaveError, match="the disk is full; the previous checkpoint .* is kept"):
        train(tiny_config(shapes, out, batch_size=8, checkpoint_every=1))
    state = torch.load(out / "last" / "train_state.pt", weights_only=True)
    assert state["progress"]["step"] == 2 and not (out / ".last.tmp").exists()
    monkeypatch.setattr(checkpoint_module, "save_pretrained", real)
    assert train(TrainConfig(resume=str(out), epochs=1, progress=False))["steps"] == 9


def assert_same_weights(run_a, run_b):
    a, b = read_state_dict(run_a / "last" / WEIGHTS_FILE), read_state_dict(run_b / "last" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _poison_loss(monkeypatch, at_call: int, value: float):
    real = train_module.compute_loss
    calls = {"n": 0}

    def compute_loss(*args, **kwargs):
        loss, logits = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * value if calls["n"] >= at_call else loss), logits

    monkeypatch.setattr(train_module, "compute_loss", compute_loss)


def test_nan_loss_stops_with_the_step_and_remedies(shapes, tmp_path, monkeypatch, capsys):
    _poison_loss(monkeypatch, at_call=4, value=float("nan"))
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as error:
        train(tiny_config(shapes, out, batch_size=8, checkpoint_every=1))
    message = str(error.value)
    assert "loss became nan at step 4" in message and "lower --lr" in message and "--clip-grad" not in message  # the recipe already clips
    assert str(out / "last") in message and "\n" not in message
    # The last good checkpoint (step 3) is kept and resumable.
    assert torch.load(out / "last" / "train_state.pt", weights_only=True)["progress"]["step"] == 3
    # Through the CLI: one line, exit 2.
    monkeypatch.undo()
    _poison_loss(monkeypatch, at_call=4, value=float("nan"))
    out2 = tmp_path / "cli"
    code = main(["train", "--model", "vit_cifar", "--patch-size", "4", "--img-size", "16", "--data", str(shapes),
                 "--out", str(out2), "--epochs", "1", "--batch-size", "8", "--no-progress", "--precision", "fp16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "loss became nan at step 4" in err[-1] and "--precision bf16 instead of fp16" in err[-1]


@pytest.mark.parametrize("changes, steps_per_epoch", [({}, 4), ({"grad_accum": 4, "batch_size": 8, "checkpoint_every": 2}, 3),
                                                      ({"precision": "fp16"}, 4)],
                         ids=["plain", "grad-accum-checkpoints", "fp16"])
def test_numbers_read_back_every_few_steps_are_the_same(shapes, tmp_path, monkeypatch, changes, steps_per_epoch):
    # On a GPU the loop reads the loss and accuracy back every 16 steps, not each step; here every
    # 3. 72 images: 4 steps of 16 an epoch, or with grad-accum 4 nine micro-batches of 8 in groups
    # of 4, 4 and 1. Windows close by the count, at a checkpoint and at the epoch's end.
    every_step = tmp_path / "every"
    train(tiny_config(shapes, every_step, **{"batch_size": 16, "epochs": 2, **changes}))
    monkeypatch.setattr(train_module, "_read_back_every", lambda device: 3)
    batched = tmp_path / "batched"
    train(tiny_config(shapes, batched, **{"batch_size": 16, "epochs": 2, **changes}))

    def numbers(run):
        return [{k: v for k, v in r.items() if k not in ("img_s", "elapsed_s")} for r in read_metrics(run / "metrics.jsonl")]

    assert numbers(batched) == numbers(every_step)
    assert len([r for r in numbers(batched) if r["kind"] == "step"]) == 2 * steps_per_epoch
    assert_same_weights(batched, every_step)


def test_a_diverged_run_is_stopped_before_saving_when_numbers_are_read_every_few_steps(shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "_read_back_every", lambda device: 3)
    _poison_loss(monkeypatch, at_call=2, value=float("inf"))
    diverged = tmp_path / "diverged"
    with pytest.raises(TrainingDiverged, match="loss became inf at step 2 .*no checkpoint had been written yet") as error:
        train(tiny_config(shapes, diverged, batch_size=16, epochs=2))
    assert error.value.step == 1
    assert not (diverged / "last").exists()  # found at the read-back after step 3, before any saving
    assert read_metrics(diverged / "metrics.jsonl")[-1] == {"kind": "event", "step": 1, "event": "diverged"}


@pytest.mark.parametrize("read_back_every", [1, 3])
def test_fp16_counts_and_shows_skipped_steps(shapes, tmp_path, monkeypatch, read_back_every):
    # 1e34 x the scaler's 65536 overflows float32 in the backward pass: the scaler must skip
    # those steps and lower its scale, not stop the run or apply infinite gradients. Counted
    # whether the loop reads its numbers back each step (CPU) or every few (GPU).
    monkeypatch.setattr(train_module, "_read_back_every", lambda device: read_back_every)
    real = train_module.compute_loss
    calls = {"n": 0}

    def compute_loss(*args, **kwargs):
        loss, logits = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * 1e34 if calls["n"] <= 2 else loss), logits

    monkeypatch.setattr(train_module, "compute_loss", compute_loss)
    out = tmp_path / "run"
    summary = train(tiny_config(shapes, out, batch_size=8, epochs=1, precision="fp16"))
    assert summary["skipped_steps"] == 2 and summary["precision"] == "fp16"
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["skipped_steps"] for r in steps[:3]] == [1, 2, 2]
    model = vitkit.load_pretrained(out / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_out_of_memory_suggests_remedies(shapes, tmp_path, monkeypatch):
    def compute_loss(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "compute_loss", compute_loss)
    with pytest.raises(VitkitError) as error:
        train(tiny_config(shapes, tmp_path / "run", batch_size=8))
    message = str(error.value)
    assert "out of GPU memory" in message and "--batch-size" in message
    assert "--grad-accum" in message and "--grad-checkpointing" in message and "\n" not in message


@pytest.mark.parametrize("with_state", [False, True])  # safetensors fails first, or torch.save
def test_a_real_failed_write_keeps_the_previous_checkpoint(tmp_path, with_state):
    # A file-size limit makes the writers fail as a full disk does: safetensors raises SafetensorError,
    # torch.save RuntimeError, not OSError. Either way: one CheckpointSaveError, the old checkpoint whole.
    import resource
    import signal

    from vitkit.checkpoint import save_checkpoint

    model = vitkit.create_model("vit_cifar", num_classes=3)
    state = {"progress": {"step": 1}, "big": torch.zeros(8_000_000)} if with_state else None
    save_checkpoint(tmp_path, tag="last", model=model, train_state=state)
    before = (tmp_path / "last" / WEIGHTS_FILE).read_bytes()
    limit = (tmp_path / "last" / WEIGHTS_FILE).stat().st_size + (1000 if with_state else -1000)
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        with pytest.raises(CheckpointSaveError, match="previous checkpoint .* is kept"):
            save_checkpoint(tmp_path, tag="last", model=model, train_state=state)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert (tmp_path / "last" / WEIGHTS_FILE).read_bytes() == before
    assert not (tmp_path / ".last.tmp").exists()


def test_a_full_disk_under_the_metrics_log_names_the_file(tmp_path):
    import errno

    from vitkit.train.run_dir import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", keep_until_step=None, enabled=True)

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    log.handle = Full()
    with pytest.raises(VitkitError, match=r"metrics.jsonl: cannot be written \(the disk is full\)"):
        log.write({"kind": "step"})
