"""Weight files that are broken, foreign or hostile: a one-line CheckpointError naming the file,
never a traceback, and never a line of the file's code run."""

import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import vitkit
from vitkit import CheckpointError, ViTConfig
from vitkit.cli import main
from vitkit.weights import read_state_dict

from conftest import randomize

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=3)


def _weights(tmp_path, name="w.safetensors"):
    from safetensors.torch import save_file

    state = randomize(vitkit.create_model(TINY)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
    return tmp_path / name, state


class _Payload:
    """Unpickling this object would create the file `target`: the classic pickle exploit."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


class _ShellPayload(_Payload):
    """The same through os.system, which torch words differently ("unsupported GLOBAL posix.system")."""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [_Payload, _ShellPayload])
@pytest.mark.parametrize("how", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys, how, payload):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"patch_embed.proj.weight": torch.zeros(1), "x": payload(target)}
    if how == "torch_zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused.*could run code \(it asks for [\w.]+\)") as error:
        vitkit.load_pretrained(path, model=TINY)
    assert "weights_only" not in str(error.value)  # never torch's advice to load it unsafely
    assert not target.exists()
    assert main(["info", str(path), "--model", "vit_tiny_patch16_224"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not target.exists()


def test_truncated_safetensors_and_pth(tmp_path, capsys):
    path, state = _weights(tmp_path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(state, tmp_path / "full.pth")
    full = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(full[: len(full) // 2])
    for name in ("cut.safetensors", "cut.pth"):
        with pytest.raises(CheckpointError, match=name):
            vitkit.load_pretrained(tmp_path / name, model=TINY)
        assert main(["info", str(tmp_path / name), "--model", "vit_tiny_patch16_224"]) == 2
        err = capsys.readouterr().err
        assert name in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name, content", [
    ("empty.safetensors", b""), ("text.pth", b"hello, not weights\n"), ("random.bin", bytes(range(256)) * 4),
    ("random.npz", b"PK\x03\x04" + b"\x00" * 60), ("notes.txt", b"weights?"),
])
def test_files_that_are_not_checkpoints(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        vitkit.load_pretrained(tmp_path / name, model=TINY)


def test_non_tensor_entries_and_wrapped_state_dicts(tmp_path):
    _, state = _weights(tmp_path)
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pth")
    model = vitkit.load_pretrained(tmp_path / "wrapped.pth", model=TINY)  # the training-checkpoint wrapper
    x = torch.randn(1, 3, 32, 32)
    reference = vitkit.create_model(TINY).eval()
    reference.load_state_dict(state)
    torch.testing.assert_close(model(x), reference(x))
    torch.save({**state, "step": 3}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="not tensors.*step"):
        vitkit.load_pretrained(tmp_path / "mixed.pth", model=TINY)


def test_missing_keys_and_shapes_that_do_not_fit_the_named_model(tmp_path):
    from safetensors.torch import save_file

    _, state = _weights(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("blocks.1.norm2")},
              str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors.*blocks\.1\.norm2\.bias.*blocks\.1\.norm2\.weight"):
        vitkit.load_pretrained(tmp_path / "missing.safetensors", model=TINY)
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*embed_dim.*192"):
        vitkit.load_pretrained(tmp_path / "w.safetensors", model="vit_tiny_patch16_224")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", a=np.array([{"k": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled"):
        read_state_dict(tmp_path / "obj.npz")


@pytest.mark.parametrize("content", [b"hello, not weights\n", b"\x80\x04K\x01."], ids=["text", "a_pickle"])
def test_a_file_that_is_no_zip_is_not_a_npz_and_gets_no_advice_to_unpickle(tmp_path, capsys, content):
    from vitkit.cli import main

    (tmp_path / "w.npz").write_bytes(content)
    assert main(["info", str(tmp_path / "w.npz")]) == 2
    err = capsys.readouterr().err
    assert "w.npz: not a .npz archive" in err and "unsafely" not in err and "pickle.load" not in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".safetensors", ".pth", ".bin", ".npz"]),
       prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"]))
def test_fuzz_read_state_dict_gives_a_result_or_a_clean_error(tmp_path, data, suffix, prefix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(prefix + data)
    try:
        result = read_state_dict(path)
    except CheckpointError as error:
        assert str(path) in str(error)
    else:
        assert isinstance(result, dict) and all(isinstance(v, torch.Tensor) for v in result.values())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 0.99))
def test_fuzz_truncated_zip_checkpoints(tmp_path, cut):
    # A real checkpoint cut anywhere: the zip reader and the unpickler both see half a file.
    path = tmp_path / "w.pth"
    torch.save({"a": torch.arange(64.0), "b": torch.ones(3, 3)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="w.pth"):
        read_state_dict(path)


def test_every_loader_refuses_the_payload(tmp_path, capsys):
    """The same exploit through each way a file reaches vitkit: an HF directory's pytorch_model.bin,
    a run directory's training state (--resume), --init, predict and eval."""
    from test_train import make_shapes

    target = tmp_path / "pwned"
    evil = {"x": _Payload(target)}
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, '
                                        '"num_attention_heads": 4, "intermediate_size": 64, "image_size": 32, '
                                        '"patch_size": 8}')
    torch.save(evil, hf_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused"):
        vitkit.load_pretrained(hf_dir)

    data = make_shapes(tmp_path / "shapes", per_class=4, val_per_class=2)
    run = tmp_path / "run"
    common = ["--model", "vit_cifar", "--patch-size", "4", "--img-size", "16", "--epochs", "1", "--batch-size", "8",
              "--device", "cpu", "--no-progress", "--data", str(data)]
    assert main(["train", *common, "--out", str(run)]) == 0
    torch.save({"progress": evil}, run / "last" / "train_state.pt")
    capsys.readouterr()
    assert main(["train", *common, "--resume", str(run)]) == 2
    assert "train_state.pt: refused" in capsys.readouterr().err
    torch.save(evil, tmp_path / "evil.pth")
    image = next((data / "val").rglob("*.png"))
    for args in (["train", *common, "--init", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "run2")],
                 ["predict", str(tmp_path / "evil.pth"), "--model", "vit_tiny_patch16_224", str(image)],
                 ["eval", str(tmp_path / "evil.pth"), "--model", "vit_tiny_patch16_224", "--data", str(data)]):
        assert main(args) == 2
        assert "evil.pth: refused" in capsys.readouterr().err, args[0]
    assert not target.exists()


def test_saved_files_follow_the_umask(tmp_path):
    # Written through a private temporary file, a checkpoint must still get the mode any other file would.
    import os

    old = os.umask(0o022)
    try:
        vitkit.save_pretrained(vitkit.create_model(TINY), tmp_path / "run")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644


def test_a_damaged_pickle_is_unreadable_not_unsafe(tmp_path):
    # torch prefixes every weights_only failure alike; only a refused global is a safety refusal.
    import zipfile

    torch.save({"patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "w.pth")
    with zipfile.ZipFile(tmp_path / "w.pth") as src, zipfile.ZipFile(tmp_path / "bad.pth", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, b"\x80\x02garbage" if item.filename.endswith("data.pkl") else data)
    with pytest.raises(CheckpointError) as error:
        vitkit.load_pretrained(tmp_path / "bad.pth", model=TINY)
    assert "not a readable PyTorch checkpoint" in str(error.value) and "refused" not in str(error.value)


def test_a_newer_pickle_protocol_is_named_without_torchs_advice_to_drop_weights_only(tmp_path, capsys):
    torch.save(randomize(vitkit.create_model(TINY)).state_dict(), tmp_path / "p4.pth", pickle_protocol=4)
    assert main(["info", str(tmp_path / "p4.pth"), "--model", "ViT-Ti/16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pickle protocol 4 or above" in err
    assert "weights_only" not in err and "False" not in err


def test_weights_of_impossible_shapes_are_one_line_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    from vitkit.convert.jax_npz import write_npz

    write_npz(randomize(vitkit.create_model(TINY)), path=tmp_path / "good.npz")
    arrays = dict(np.load(tmp_path / "good.npz"))
    for key, bad in (("head/kernel", np.zeros(32, np.float32)), ("cls", np.zeros((1, 1, 7), np.float32))):
        np.savez(tmp_path / "bad.npz", **{**arrays, key: bad})
        assert main(["info", str(tmp_path / "bad.npz")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "bad.npz" in err
    state = {k: v.contiguous() for k, v in randomize(vitkit.create_model(TINY)).state_dict().items()}
    save_file({**state, "pos_embed": torch.zeros(17)}, str(tmp_path / "bad.safetensors"))
    assert main(["info", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.safetensors" in err


def test_a_bad_stem_in_a_saved_config_is_one_line(tmp_path, capsys):
    import json

    vitkit.create_model("vit_cifar_conv", embed_dim=32, num_heads=2, mlp_dim=32, depth=1).save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["model"]["hybrid_stem"]["bogus"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    assert main(["info", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bogus" in err and str(tmp_path / "m") in err


def test_a_model_name_that_contradicts_the_file_is_refused(tmp_path, capsys):
    from vitkit.convert.jax_npz import write_npz

    model = randomize(vitkit.create_model(TINY))
    model.save_pretrained(tmp_path / "m")
    write_npz(model, path=tmp_path / "m.npz")
    for source in (tmp_path / "m", tmp_path / "m.npz"):
        assert main(["info", str(source), "--model", "ViT-H/14"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--model ViT-H/14" in err and "embed_dim=32 (not 1280)" in err and "\n" not in err


def test_garbage_is_not_blamed_on_the_pickle_protocol(tmp_path):
    # Bytes that are no pickle at all stop the unpickler at an "unsupported operand" too; advice to
    # re-save a newer protocol would send the user after the wrong cause.
    from vitkit.weights import load_torch_file

    (tmp_path / "train_state.pt").write_bytes(b"garbage, not a checkpoint\n" * 4)
    with pytest.raises(CheckpointError, match="not a readable") as error:
        load_torch_file(tmp_path / "train_state.pt")
    assert "protocol" not in str(error.value)
