"""--resume continues exactly where a run stopped: same final weights as an uninterrupted run."""

import json

import pytest
import torch

import vitkit.train.loop as train_module
from vitkit.checkpoint import restore_rng, rng_state
from vitkit.errors import VitkitError
from vitkit.pretrained import WEIGHTS_FILE
from vitkit.train import TrainConfig, read_metrics, train
from vitkit.train.distributed import resume_rng
from vitkit.weights import read_state_dict

from test_train import TINY_MODEL, make_shapes, tiny_config


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=24, val_per_class=6)


# Everything with randomness or state of its own: augmentation, mixup/cutmix (seeded per step),
# stochastic depth (the global RNG; depth 2, as the first block's drop rate is always 0), EMA,
# label smoothing, gradient clipping.
RECIPE = dict(model_overrides=dict(TINY_MODEL["model_overrides"], depth=2), epochs=3, batch_size=16, augment="trivialaugment", mixup=0.8, cutmix=1.0, drop_path=0.2, ema=0.9,
              clip_grad=1.0, random_erasing=0.25, checkpoint_every=2)


class Interrupt(BaseException):
    """Stands in for a crash: not an Exception, so nothing in the loop may swallow it."""


def interrupted(monkeypatch, at_step: int):
    """Make the run die when it is about to schedule optimiser step `at_step` (0-based)."""
    real = train_module.lr_at

    def lr_at(step, **kw):
        if step == at_step:
            raise Interrupt
        return real(step, **kw)

    monkeypatch.setattr(train_module, "lr_at", lr_at)


def weights(run, tag="last"):
    return read_state_dict(run / tag / WEIGHTS_FILE)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = train(tiny_config(shapes, out, **RECIPE))
    return out, summary


@pytest.mark.parametrize("at_step", [5, 8])  # mid-epoch (after the step-4 save), and at an epoch boundary
def test_resume_gives_the_uninterrupted_weights(shapes, tmp_path, monkeypatch, reference, at_step):
    ref_dir, ref_summary = reference
    assert ref_summary["steps"] == 12  # 72 images / 16 = 4 steps per epoch, 3 epochs
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupted(patch, at_step)
        with pytest.raises(Interrupt):
            train(tiny_config(shapes, out, **RECIPE))
    state = torch.load(out / "last" / "train_state.pt", weights_only=True)
    assert state["progress"]["step"] == (4 if at_step == 5 else 8)
    summary = train(TrainConfig(resume=str(out), progress=False))
    assert summary["steps"] == 12
    assert_same(weights(out), weights(ref_dir))
    assert_same(weights(out, "best"), weights(ref_dir, "best"))  # the EMA weights
    # The metrics read as one run: each step once, the same losses as the reference.
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    ref_steps = [r for r in read_metrics(ref_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in ref_steps], abs=1e-6)
    # ... and so do the epochs' training loss and accuracy, the interrupted epoch's included.
    epochs, ref_epochs = ([r for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "epoch"] for d in (out, ref_dir))
    for key in ("train_loss", "train_acc", "val_acc"):
        assert [r[key] for r in epochs] == pytest.approx([r[key] for r in ref_epochs], abs=1e-6), key
    # The summary's wall time counts the work before the interruption too.
    assert summary["wall_time_s"] > state["progress"]["wall_time"] > 0


def test_resume_refuses_another_model(shapes, tmp_path, reference):
    ref_dir, _ = reference
    with pytest.raises(VitkitError, match=r"trained with model='vit_cifar', not model='ViT-B/16'"):
        train(TrainConfig(resume=str(ref_dir), model="ViT-B/16", progress=False))


def test_resume_of_a_checkpoint_that_does_not_fit(shapes, tmp_path, reference):
    ref_dir, _ = reference
    import shutil

    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["model_overrides"]["embed_dim"] = 64  # as if the weights came from another model
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(VitkitError) as error:
        train(TrainConfig(resume=str(out), epochs=4, progress=False))
    message = str(error.value)
    assert str(out) in message and "'vit_cifar'" in message and "does not fit" in message


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(VitkitError, match="not a training run directory"):
        train(TrainConfig(resume=str(tmp_path), progress=False))


def test_out_refuses_to_overwrite_a_run(shapes, reference):
    ref_dir, _ = reference
    with pytest.raises(VitkitError, match="--resume"):
        train(tiny_config(shapes, ref_dir, epochs=1))
    with pytest.raises(VitkitError, match="holds a saved model; choose another directory"):  # not --resume RUN/best
        train(tiny_config(shapes, ref_dir / "best", epochs=1))


@pytest.mark.parametrize("change, message", [
    (dict(batch_size="many"), r"batch_size must be int \| None \(got 'many'\)"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
    (dict(lr=-1.0), "--lr must be positive"),
    (dict(compile="yes"), "compile must be bool"),
    (dict(colour="blue"), r"unknown training config keys \['colour'\]"),
])
def test_resume_validates_the_saved_config(shapes, tmp_path, reference, change, message):
    ref_dir, _ = reference
    import shutil

    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(change)
    (out / "config.json").write_text(json.dumps(config))
    before = weights(out)
    with pytest.raises(VitkitError, match=message) as error:
        train(TrainConfig(resume=str(out), epochs=4, progress=False))
    assert str(out / "config.json") in str(error.value)
    assert_same(weights(out), before)  # nothing written over the checkpoint


def test_resume_before_the_first_checkpoint_starts_over(shapes, tmp_path, monkeypatch, reference):
    # Killed before anything was saved: --resume must still work (from step 0), not point at a missing checkpoint.
    ref_dir, _ = reference
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupted(patch, 1)  # before the step-2 checkpoint
        with pytest.raises(Interrupt):
            train(tiny_config(shapes, out, **RECIPE))
    assert (out / "config.json").is_file() and not (out / "last").exists()
    summary = train(TrainConfig(resume=str(out), progress=False))
    assert summary["steps"] == 12
    assert_same(weights(out), weights(ref_dir))
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == list(range(1, 13))


def test_a_run_that_fails_to_start_leaves_its_directory_free(shapes, tmp_path, capsys):
    from vitkit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(out), "--no-progress"]) == 2
    assert "missing" in capsys.readouterr().err
    assert not out.exists()  # not even an empty directory
    assert train(tiny_config(shapes, out, epochs=1))["steps"] > 0


def test_a_checkpoint_without_per_rank_streams_still_resumes_every_rank():
    # Checkpoints older than per-rank streams hold rank 0's state only: rank 0 continues it, the
    # other ranks get streams of their own (repeatable) rather than a copy of rank 0's.
    cpu = torch.device("cpu")

    def draws_after_resume(state, rank, step=4):
        resume_rng(state, seed=0, rank=rank, step=step, device=cpu)
        return torch.rand(8)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        old = {"rng": rng_state(cpu), "progress": {}}
        expected = torch.rand(8)
        assert torch.equal(draws_after_resume(old, 0), expected)
        rank1 = draws_after_resume(old, 1)
        assert not torch.equal(rank1, expected)
        assert torch.equal(draws_after_resume(old, 1), rank1)
        assert not torch.equal(draws_after_resume(old, 2), rank1)
        assert not torch.equal(draws_after_resume(old, 1, step=8), rank1)


def test_rng_states_of_mae_checkpoints_from_before_the_shared_format_still_restore():
    # MAE pre-training once saved {"cpu": ..., "cuda": None}; train saves {"torch": ...}.
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        saved = rng_state(cpu)
        expected = torch.rand(8)
        for state in (saved, {"cpu": saved["torch"], "cuda": None}):
            torch.manual_seed(99)
            restore_rng(state, cpu)
            assert torch.equal(torch.rand(8), expected)


@pytest.mark.parametrize("changes, message", [
    (dict(epochs=0), "--epochs must be at least 1"),
    (dict(epochs=2), "--epochs 2: the run in .* has already trained 3 epochs"),
    (dict(checkpoint_every=-1), "--checkpoint-every must be at least 1"),
    (dict(workers=-1), "--workers must be 0 or more"),
    (dict(out="elsewhere"), "--out elsewhere: a resumed run continues in its own directory"),
])
def test_changes_on_resume_are_checked_before_they_are_saved(reference, changes, message):
    ref_dir, _ = reference
    before = (ref_dir / "config.json").read_text()
    with pytest.raises(VitkitError, match=message):
        train(TrainConfig(resume=str(ref_dir), progress=False, **changes))
    assert (ref_dir / "config.json").read_text() == before


def test_empty_paths_seeds_and_a_lone_best_checkpoint_are_guarded(shapes, tmp_path, reference):
    for field in ("resume", "init", "distill_from"):
        with pytest.raises(VitkitError, match="an empty path"):
            train(tiny_config(shapes, tmp_path / "r", **{field: ""}))
    with pytest.raises(VitkitError, match="--out '': an empty path"):
        train(tiny_config(shapes, ""))
    for seed in (-1, 2 ** 70):
        with pytest.raises(VitkitError, match=r"--seed must lie in \[0, 2\^63\)"):
            train(tiny_config(shapes, tmp_path / "r", seed=seed))
    import shutil

    ref_dir, _ = reference
    shutil.copytree(ref_dir / "best", tmp_path / "kept" / "best")  # a checkpoint the user put there
    with pytest.raises(VitkitError, match="already holds a training run"):
        train(tiny_config(shapes, tmp_path / "kept", epochs=1))


def test_init_with_a_model_of_another_architecture_is_refused(shapes, tmp_path, reference):
    ref_dir, _ = reference
    with pytest.raises(VitkitError, match="--model ViT-B/16: --init .* holds another architecture"):
        train(TrainConfig(data=str(shapes), init=str(ref_dir), model="ViT-B/16", out=str(tmp_path / "r"),
                          epochs=1, batch_size=16, progress=False))


def test_runs_saved_by_earlier_versions_with_model_null_still_resume(reference, tmp_path):
    import shutil

    ref_dir, _ = reference
    out = tmp_path / "old"
    shutil.copytree(ref_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(model=None)  # a recipe without a model of its own (finetune, deit)
    (out / "config.json").write_text(json.dumps(config))
    summary = train(TrainConfig(resume=str(out), epochs=4, progress=False))
    assert summary["epochs"] == 4
