import base64
import io
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit import ViTConfig, create_model, save_pretrained
from vitkit.cli import main
from vitkit.explain import (attention_rollout, class_attention, collect_attention, embedding_filters,
                            mean_attention_distance, patch_grid, position_similarity, top_predictions)

from conftest import randomize

TINY = dict(embed_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=5)


def tiny(**kw):
    return create_model(ViTConfig(**{"img_size": 16, "patch_size": 4, **TINY, **kw})).eval()


# ---------------------------------------------------------------------------- rollout, by hand
def _two_layer_example():
    """Three tokens ([class], patch 1, patch 2), two layers, two heads. Head 0 of layer 1 sends the
    [class] token wholly to patch 1, of layer 2 wholly to patch 2; head 1 is the identity."""
    eye = np.eye(3)
    layer1 = np.array([[0, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    layer2 = np.array([[0, 0, 1], [0, 1, 0], [0, 0, 1]], dtype=float)
    return np.stack([np.stack([layer1, eye])[None], np.stack([layer2, eye])[None]])  # (L=2, B=1, h=2, 3, 3)


@pytest.mark.parametrize("fusion, expected", [
    # mean: fused rows [.5 .5 0] and [.5 0 .5]; with the residual [.75 .25 0] and [.75 0 .25];
    # product row 0 = .75 * [.75 .25 0] + .25 * [0 0 1] = [.5625 .1875 .25].
    ("mean", [0.1875, 0.25]),
    # max: rows [1 1 0] -> (+I)/2 [1 .5 0] -> /1.5 [2/3 1/3 0]; layer 2 [2/3 0 1/3];
    # product row 0 = 2/3 * [2/3 1/3 0] + 1/3 * [0 0 1] = [4/9 2/9 1/3].
    ("max", [2 / 9, 1 / 3]),
    # min: the [class] row fuses to zeros, so only the residual path is left: [1 0 0].
    ("min", [0.0, 0.0]),
])
def test_rollout_two_layers_equals_hand_computation(fusion, expected):
    out = attention_rollout(_two_layer_example(), num_prefix=1, fusion=fusion)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_rollout_single_head_hand_computation_and_discard():
    attn = _two_layer_example()[:, :, :1]  # head 0 only
    # [.5 .5 0] then [.5 0 .5]: row 0 = .5 * [.5 .5 0] + .5 * [0 0 1] = [.25 .25 .5]
    np.testing.assert_allclose(attention_rollout(attn, num_prefix=1)[0], [0.25, 0.5], atol=1e-6)
    # Discarding 2 of 3 weights per row changes nothing here: the zeros go first, the 1 stays.
    np.testing.assert_allclose(attention_rollout(attn, num_prefix=1, discard_ratio=0.67)[0], [0.25, 0.5], atol=1e-6)
    uniform = np.full((1, 1, 1, 3, 3), 1 / 3)
    np.testing.assert_allclose(attention_rollout(uniform, num_prefix=1)[0], [1 / 6, 1 / 6], atol=1e-6)
    # Discarding 1 of 3 on a uniform row drops exactly one tie (the first), not all three:
    # row 0 becomes [0 1/3 1/3] -> + I, halved [.5 1/6 1/6] -> renormalised [.6 .2 .2].
    np.testing.assert_allclose(attention_rollout(uniform, num_prefix=1, discard_ratio=0.34)[0], [0.2, 0.2], atol=1e-6)


def test_rollout_without_class_token_averages_patch_queries():
    # Two patch tokens, no prefix: rollout rows [.75 .25] and [0 1] average to [.375 .625].
    attn = np.array([[[[[0.5, 0.5], [0.0, 1.0]]]]])  # (1, 1, 1, 2, 2)
    np.testing.assert_allclose(attention_rollout(attn, num_prefix=0, class_token=False)[0], [0.375, 0.625])
    np.testing.assert_allclose(class_attention(attn, num_prefix=0, class_token=False)[0, 0, 0], [0.25, 0.75])


# ---------------------------------------------------------------------------- attention distance, by hand
def test_mean_attention_distance_hand_computation():
    # A 2x2 grid of 16 px patches behind one [class] token; three heads.
    T = 5
    uniform = np.zeros((T, T))
    uniform[:, 0] = 0.2  # weight on [class] is ignored and the patch weights renormalised
    uniform[:, 1:] = 0.2
    itself = np.eye(T)
    neighbour = np.zeros((T, T))
    neighbour[0, 0] = 1
    for q, k in ((1, 2), (2, 1), (3, 4), (4, 3)):  # each patch looks at its horizontal neighbour
        neighbour[q, k] = 1
    attn = np.stack([uniform, itself, neighbour])[None, None]  # (L=1, B=1, 3, T, T)
    distance = mean_attention_distance(attn, grid=(2, 2), patch_size=(16, 16))
    # uniform: every patch sees distances 0, 16, 16, 16*sqrt(2) equally
    np.testing.assert_allclose(distance[0], [(32 + 16 * math.sqrt(2)) / 4, 0.0, 16.0], rtol=1e-6)


def test_mean_attention_distance_non_square_patches():
    # A 1x2 grid of 8 (high) x 12 (wide) px patches: the two centres are 12 px apart.
    attn = np.array([[0.5, 0.5], [0.25, 0.75]])[None, None, None]
    np.testing.assert_allclose(mean_attention_distance(attn, grid=(1, 2), patch_size=(8, 12))[0, 0],
                               (0.5 * 12 + 0.25 * 12) / 2)


# ---------------------------------------------------------------------------- model-level numbers
def test_position_similarity_of_hand_set_embeddings():
    # Embedding = one-hot of the column: equal columns are identical (1), others orthogonal (0).
    model = tiny(img_size=(8, 12), reg_tokens=2)  # grid 2x3, three prefix tokens
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, :3] = 5.0  # prefix entries must not appear in the map
        for r in range(2):
            for c in range(3):
                model.pos_embed[0, 3 + r * 3 + c, c] = 1.0
    sim = position_similarity(model)
    assert sim.shape == (2, 3, 2, 3)
    cols = np.arange(3)
    expected = (cols[None, :, None, None] == cols[None, None, None, :]).astype(float)
    np.testing.assert_allclose(sim, np.broadcast_to(expected, sim.shape), atol=1e-6)


def test_embedding_filters_recover_a_two_dimensional_subspace():
    model = tiny()
    u, v = torch.zeros(3 * 4 * 4), torch.zeros(3 * 4 * 4)
    u[0], v[5] = 1.0, 1.0
    # Zero-mean, uncorrelated coefficients, so the principal axes are exactly u (spread 3) and v (1).
    coeff = torch.stack([3.0 * torch.tensor([1.0, -1.0]).repeat(16), torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(8)], 1)
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_((coeff[:, :1] * u + coeff[:, 1:] * v).reshape(32, 3, 4, 4))
    components, explained = embedding_filters(model, k=28)
    assert components.shape == (28, 3, 4, 4) and explained.shape == (28,)
    np.testing.assert_allclose(explained[:2].sum(), 1.0, atol=1e-5)
    assert explained[0] > explained[1]
    top = components[:2].reshape(2, -1)
    np.testing.assert_allclose(np.abs(top[0]), u.numpy(), atol=1e-3)  # the larger spread comes first
    np.testing.assert_allclose(np.abs(top[1]), v.numpy(), atol=1e-3)


def test_collect_attention_matches_the_models_own_forward():
    model = randomize(tiny(img_size=(12, 16), reg_tokens=1))
    x = torch.randn(2, 3, 12, 16)
    record = collect_attention(model, x)
    assert record.grid == (3, 4)
    assert record.attentions.shape == (2, 2, 4, 2 + 12, 2 + 12)
    np.testing.assert_allclose(record.attentions.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(record.logits, model(x).detach().numpy(), atol=1e-5)


def test_patch_grid_is_the_models_sequence_order():
    image = np.random.rand(8, 12, 3)
    patches = patch_grid(image, patch_size=(4, 4))
    assert patches.shape == (2, 3, 4, 4, 3)
    np.testing.assert_array_equal(patches[1, 2], image[4:8, 8:12])  # token 6 = row 1, column 2
    # The same order as PatchEmbed: patch 5's mean colour equals its conv output with a mean filter.
    embed = torch.nn.Conv2d(3, 1, 4, stride=4, bias=False)
    torch.nn.init.constant_(embed.weight, 1 / 48)
    tokens = embed(torch.from_numpy(image).permute(2, 0, 1)[None].float()).flatten(2)[0, 0]  # (6,)
    np.testing.assert_allclose(tokens.detach().numpy(), patches.reshape(6, -1).mean(-1), atol=1e-6)


def test_top_predictions_order_names_and_probabilities():
    top = top_predictions(np.log(np.array([[0.1, 0.6, 0.3]])), k=2, class_names=["a", "b", "c"])
    assert top.labels == [["b", "c"]]
    np.testing.assert_allclose(top.probabilities[0], [0.6, 0.3], rtol=1e-6)
    assert top_predictions(np.zeros((1, 3)), k=9).labels == [["0", "1", "2"]]


# ---------------------------------------------------------------------------- the command and its report
def _write_images(folder, sizes):
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _decode_report_images(report):
    sources = re.findall(r'<img src="([^"]+)"', report.read_text())
    decoded = []
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.verify()  # raises on a truncated or corrupt PNG
        decoded.append(image)
    return decoded


PER_IMAGE = ("patches", "sequence", "class_attention", "rollout", "predictions")


@pytest.mark.parametrize("kw", [
    dict(class_token=True, reg_tokens=2, img_size=(16, 24)),  # registers, non-square
    dict(class_token=False, global_pool="avg", img_size=(16, 16)),  # average pooling
    dict(class_token=True, global_pool="avg", img_size=(16, 16)),  # a [class] token the head does not read
], ids=["cls-registers-nonsquare", "avg-pool", "cls-avg-pool"])
def test_explain_command_writes_every_figure_and_a_self_contained_report(tmp_path, kw, capsys):
    model = randomize(tiny(**kw))
    model.class_names = ["ant", "bee", "cat", "dog", "eel"]
    save_pretrained(model, tmp_path / "model")
    images = _write_images(tmp_path / "images", [(20, 30), (40, 24)])
    out = tmp_path / "out"
    code = main(["explain", *images, "--model", str(tmp_path / "model"), "--out", str(out),
                 "--rollout-fusion", "max", "--top-k", "3"])
    assert code == 0, capsys.readouterr().err
    names = {p.name for p in out.glob("*.png")}
    expected = {"filters.png", "position_similarity.png", "attention_distance.png"}
    expected |= {f"{i:02d}-img{i - 1}-{kind}.png" for i in (1, 2) for kind in PER_IMAGE}
    assert names == expected
    decoded = _decode_report_images(out / "report.html")
    assert len(decoded) == len(expected)
    text = (out / "report.html").read_text()
    assert "<b>max</b>" in text
    assert len(re.findall(r"<tr><td>(ant|bee|cat|dog|eel)</td>", text)) == 2 * 3  # top-3 of two images
    if not kw["class_token"]:
        assert "no [class] token" in text
    if kw["class_token"] and kw.get("global_pool") == "avg":
        assert "does not read its [class] token" in text and "the [class] token's attention" not in text


def test_explain_names_the_architecture_of_a_timm_file(tmp_path, monkeypatch, capsys):
    # A timm state dict does not say its number of heads; --arch names the variant (--model is the weights).
    from safetensors.torch import save_file

    from vitkit import variants

    model = randomize(tiny(embed_dim=40, num_heads=5))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    images = _write_images(tmp_path / "images", [(16, 16)])
    command = ["explain", *images, "--model", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "o")]
    assert main(command) == 2
    assert "--arch" in capsys.readouterr().err
    monkeypatch.setitem(variants.EXTRA_MODELS, "explain-test-heads", ("ViT-Ti/16", model.config.to_dict()))
    assert main(command + ["--arch", "explain-test-heads"]) == 0
    assert (tmp_path / "o" / "01-img0-rollout.png").is_file()


def test_explain_with_a_variant_name_uses_random_weights(tmp_path, monkeypatch):
    images = _write_images(tmp_path / "images", [(16, 16)])
    # A tiny registered name keeps this fast; a variant name must go through create_model.
    from vitkit import variants

    monkeypatch.setitem(variants.EXTRA_MODELS, "explain-test-tiny", ("ViT-Ti/16", dict(
        img_size=32, depth=1, embed_dim=32, num_heads=2, mlp_dim=32, num_classes=3)))
    assert main(["explain", *images, "--model", "explain-test-tiny", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "01-img0-rollout.png").is_file()
    # No class names: labelled class_0 ... as `vitkit predict` labels them, not by bare indices.
    assert re.findall(r"<tr><td>([^<]+)</td>", (tmp_path / "o" / "report.html").read_text())[0].startswith("class_")


def test_explain_again_into_the_same_folder_keeps_only_its_figures(tmp_path, monkeypatch):
    # A second run on fewer images leaves no figures of the first run's extra images behind, and
    # never touches files of the user's own that explain did not write.
    from vitkit import variants

    monkeypatch.setitem(variants.EXTRA_MODELS, "explain-test-tiny", ("ViT-Ti/16", dict(
        img_size=32, depth=1, embed_dim=32, num_heads=2, mlp_dim=32, num_classes=3)))
    images = _write_images(tmp_path / "images", [(16, 16), (20, 20)])
    out = tmp_path / "o"
    assert main(["explain", *images, "--model", "explain-test-tiny", "--out", str(out)]) == 0
    (out / "mine.png").write_bytes(b"the user's")
    assert main(["explain", images[0], "--model", "explain-test-tiny", "--out", str(out)]) == 0
    assert not list(out.glob("02-*")) and (out / "01-img0-rollout.png").is_file()
    assert (out / "mine.png").read_bytes() == b"the user's"
    assert set((out / "explain-figures.txt").read_text().split()) == {p.name for p in out.glob("*.png")} - {"mine.png"}


@pytest.mark.parametrize("extra, message", [
    (["--discard-ratio", "1.5"], "--discard-ratio"),
    (["--top-k", "0"], "--top-k"),
    (["--device", "meta"], "--device"),  # torch accepts it; the figures cannot be drawn from it
])
def test_explain_bad_arguments_fail_in_one_line(tmp_path, capsys, extra, message):
    model = tiny()
    save_pretrained(model, tmp_path / "model")
    images = _write_images(tmp_path / "images", [(16, 16)])
    assert main(["explain", *images, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_explain_missing_image_names_the_file(tmp_path, capsys):
    save_pretrained(tiny(), tmp_path / "model")
    missing = tmp_path / "nope.jpg"
    assert main(["explain", str(missing), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # no model figures without a report


def test_explain_reports_a_broken_image_and_explains_the_rest(tmp_path, capsys):
    save_pretrained(tiny(), tmp_path / "model")
    images = _write_images(tmp_path / "images", [(16, 16)])
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "o"
    assert main(["explain", str(broken), *images, "--model", str(tmp_path / "model"), "--out", str(out)]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert (out / "01-img0-rollout.png").is_file() and "broken.png" in (out / "report.html").read_text()


# ---------------------------------------------------------------------------- the report in a real browser
def _chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (`make setup` installs it with apt-get)")
def test_report_renders_in_headless_chromium(tmp_path):
    model = randomize(tiny(img_size=(16, 16)))
    save_pretrained(model, tmp_path / "model")
    images = _write_images(tmp_path / "images", [(32, 32)])
    out = tmp_path / "out"
    assert main(["explain", *images, "--model", str(tmp_path / "model"), "--out", str(out)]) == 0
    report = (out / "report.html").resolve()
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--virtual-time-budget=10000", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded, f"the report's load check did not run: {dom.stderr[-500:]}"
    assert loaded.group(1) == loaded.group(2) == str(3 + len(PER_IMAGE))
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.reshape(-1, 3).std(axis=0).max() > 20  # text and figures, not one colour
    assert len(np.unique(pixels.reshape(-1, 3)[::97], axis=0)) > 50


def test_grid_panels_of_non_square_patches_keep_the_patch_shape():
    import numpy as np

    from vitkit.explain import figures

    # 16x8-pixel patches: a 3x10 grid on a 48x80 image; each cell must be drawn twice as tall as wide.
    rollout = figures.draw_rollout(np.zeros((48, 80, 3)), np.arange(30.0), grid=(3, 10), title="t")
    assert rollout.axes[1].get_aspect() == 2.0
    maps = np.random.default_rng(0).random((2, 3, 30))
    attention = figures.draw_class_attention(maps, grid=(3, 10), title="t", cell_aspect=2.0)
    assert attention.axes[0].get_aspect() == 2.0
    similarity = figures.draw_position_similarity(np.zeros((3, 10, 3, 10)), cell_aspect=2.0)
    assert similarity.axes[0].get_aspect() == 2.0
    # Each figure is sized as drawn (rows of cells twice as tall), not as if the cells were square.
    for figure, rows, cols in ((attention, 2 * 4 - 1, 3 * 11 - 1), (similarity, 3 * 4 - 1, 10 * 11 - 1)):
        width, height = figure.get_size_inches()
        assert (width - 1.6) / (height - 1.0) == pytest.approx(cols / (2.0 * rows))


def test_a_distilled_models_maps_average_the_class_and_dist_rows():
    import numpy as np

    from vitkit.explain import analysis

    rng = np.random.default_rng(0)
    attentions = rng.random((2, 1, 3, 6, 6))  # (L, B, heads, T, T): [class], [dist], 4 patches
    attentions /= attentions.sum(-1, keepdims=True)
    both = analysis.class_attention(attentions, num_prefix=2, dist_token=True)
    np.testing.assert_allclose(both, (attentions[..., 0, 2:] + attentions[..., 1, 2:]) / 2, rtol=1e-6)
    np.testing.assert_allclose(analysis.class_attention(attentions, num_prefix=2), attentions[..., 0, 2:], rtol=1e-6)
    matrix = analysis.rollout_matrix(attentions)
    np.testing.assert_allclose(analysis.attention_rollout(attentions, num_prefix=2, dist_token=True),
                               matrix[..., 0:2, 2:].mean(-2), rtol=1e-6)
