import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit import ViTConfig, create_model
from vitkit.cli import main
from vitkit.distill import distillation_loss, load_teacher, student_logits

from conftest import randomize

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=4)


def test_soft_loss_is_eq2():
    cls, dist, teacher = torch.randn(3, 6, 5).unbind(0)
    y = torch.tensor([0, 4, 2, 1, 3, 3])
    tau, alpha = 2.0, 0.3
    p_t = F.softmax(teacher / tau, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(dist / tau, -1))).sum(-1).mean()
    expected = (1 - alpha) * F.cross_entropy(cls, y) + alpha * tau ** 2 * kl
    got = distillation_loss(cls, dist, teacher, y, kind="soft", tau=tau, alpha=alpha)
    torch.testing.assert_close(got, expected)
    # A distillation head that already agrees with the teacher leaves only the label term.
    same = distillation_loss(cls, teacher, teacher, y, kind="soft", tau=tau, alpha=alpha)
    torch.testing.assert_close(same, (1 - alpha) * F.cross_entropy(cls, y))


def test_hard_loss_is_eq3_and_teacher_gets_no_gradient():
    cls, dist, teacher = torch.randn(3, 6, 5).unbind(0)
    teacher.requires_grad_(True)
    dist.requires_grad_(True)
    y = torch.tensor([0, 4, 2, 1, 3, 3])
    got = distillation_loss(cls, dist, teacher, y, kind="hard")
    expected = 0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, teacher.argmax(-1))
    torch.testing.assert_close(got, expected)
    soft_targets = F.one_hot(y, 5).float()  # mixup-style targets go to base_loss unchanged
    torch.testing.assert_close(distillation_loss(cls, dist, teacher, soft_targets, kind="hard"), expected)
    distillation_loss(cls, dist, teacher, y, kind="soft").backward()
    assert teacher.grad is None and dist.grad is not None


def test_bad_arguments_are_refused():
    z = torch.randn(2, 3)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="kind"):
        distillation_loss(z, z, z, y, kind="medium")
    with pytest.raises(ValueError, match="tau"):
        distillation_loss(z, z, z, y, kind="soft", tau=0.0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(z, z, z, y, kind="soft", alpha=1.5)
    with pytest.raises(ValueError, match="same classes"):
        distillation_loss(z, z, torch.randn(2, 4), y, kind="hard")


def _quadrant_data(n=64, seed=0):
    """Images whose class is the brightest quadrant: learnable by a tiny ViT in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 3, 16, 16, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, :, r * 8:(r + 1) * 8, col * 8:(col + 1) * 8] += 1.0
    return x, y


class QuadrantTeacher(torch.nn.Module):
    """A perfect teacher for _quadrant_data: logits are the quadrants' mean brightness."""

    def forward(self, x):
        q = F.avg_pool2d(x.mean(1, keepdim=True), 8)  # (B, 1, 2, 2)
        return 4 * q.flatten(1)  # (B, 4): quadrant order = class order


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_student_with_distillation_token_learns_from_teacher(kind):
    x, y = _quadrant_data()
    teacher = QuadrantTeacher()
    student = create_model(ViTConfig(distill_token=True, **TINY)).train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        idx = torch.arange(step * 16, step * 16 + 16) % len(x)
        cls, dist = student_logits(student, x[idx])
        with torch.no_grad():
            t = teacher(x[idx])
        loss = distillation_loss(cls, dist, t, y[idx], kind=kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    student.eval()
    with torch.no_grad():
        cls, dist = student.forward_distilled(x)
        # DeiT at inference: the two heads' logits are averaged (Touvron et al., Sec. 4).
        torch.testing.assert_close(student(x), (cls + dist) / 2)
        agreement = (dist.argmax(-1) == teacher(x).argmax(-1)).float().mean().item()
    assert agreement > 0.6, agreement  # chance is 0.25


def test_distilled_deit_loads_from_timm_with_parity(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    name = "deit_tiny_distilled_patch16_224"
    ref = randomize(timm.create_model(name, img_size=32, depth=1, num_classes=5)).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "deit.safetensors")
    model = vitkit.load_pretrained(tmp_path / "deit.safetensors",
                                   model=vitkit.variants.resolve(name).replace(img_size=32, depth=1, num_classes=5))
    assert model.config.distill_token
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)
        ref.set_distilled_training(True)
        ref.train()  # timm returns both heads only in distilled training mode
        ref_cls, ref_dist = ref(x)
        cls, dist = model.forward_distilled(x)
    torch.testing.assert_close(cls, ref_cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dist, ref_dist, atol=1e-4, rtol=1e-4)


def test_deit_names():
    resolve = vitkit.variants.resolve
    assert resolve("deit_small_patch16_224") == resolve("ViT-S/16")
    assert resolve("deit_base_distilled_patch16_384") == resolve("ViT-B/16").replace(img_size=384, distill_token=True)
    assert resolve("deit_tiny_distilled_patch16_224").num_prefix_tokens == 2


def test_deit_weights_expect_imagenet_normalisation(tmp_path):
    # DeiT trained on ImageNet's mean and std, the paper's ViTs on 0.5: predict and eval must follow the name.
    timm = pytest.importorskip("timm")
    name = "deit_tiny_distilled_patch16_224"
    expected = timm.models.get_pretrained_cfg(name)
    assert vitkit.create_model(name).preprocessing.mean == pytest.approx(expected.mean)
    assert vitkit.create_model(name).preprocessing.std == pytest.approx(expected.std)
    timm_file = tmp_path / "deit.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vitkit.create_model(name).state_dict().items()}, timm_file)
    assert vitkit.load_pretrained(timm_file, model=name).preprocessing.std == pytest.approx(expected.std)
    assert vitkit.create_model("ViT-Ti/16").preprocessing.mean == (0.5, 0.5, 0.5)


def test_torchvision_teacher_is_frozen_and_loads_weights_safely(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    net = torchvision.models.resnet18(num_classes=4).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "r18.safetensors")
    teacher = load_teacher(f"torchvision:resnet18@{tmp_path / 'r18.safetensors'}", num_classes=4)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), net(x))
    with pytest.raises(vitkit.VitkitError, match="fc.weight"):
        load_teacher(f"torchvision:resnet18@{tmp_path / 'r18.safetensors'}", num_classes=10)
    with pytest.raises(vitkit.VitkitError, match="resnet18@FILE"):
        load_teacher("torchvision:resnet18", num_classes=4)
    # Not classifiers: RAFT takes no num_classes; FCN would download its backbone's weights.
    for name in ("resnet1800", "raft_small", "fcn_resnet50"):
        with pytest.raises(vitkit.VitkitError, match=f"torchvision:{name}: not a torchvision classification model"):
            load_teacher(f"torchvision:{name}@{tmp_path / 'r18.safetensors'}", num_classes=4)


def test_vitkit_teacher(tmp_path):
    randomize(create_model(ViTConfig(**TINY))).save_pretrained(tmp_path / "t")
    teacher = load_teacher(tmp_path / "t", num_classes=4)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with pytest.raises(vitkit.VitkitError, match="4 classes"):
        load_teacher(tmp_path / "t", num_classes=10)


def test_convert_to_timm_loads_in_timms_distilled_deit(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    name = "deit_tiny_distilled_patch16_224"
    model = randomize(vitkit.create_model(name, img_size=32, depth=1, num_classes=5)).eval()
    vitkit.save_pretrained(model, tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "deit.safetensors"), "--to", "timm"]) == 0
    ref = timm.create_model(name, img_size=32, depth=1, num_classes=5).eval()
    ref.load_state_dict(load_file(tmp_path / "deit.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), atol=1e-4, rtol=1e-4)


def test_a_teacher_normalised_otherwise_sees_its_own_normalisation(tmp_path):
    from vitkit.config import Preprocessing

    imagenet = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop=16, resize=16)
    student = Preprocessing(crop=16, resize=16)  # the paper's 0.5 / 0.5
    model = randomize(create_model(ViTConfig(**TINY))).eval()
    model.preprocessing = imagenet
    model.save_pretrained(tmp_path / "t")
    pixels = torch.rand(2, 3, 16, 16)

    def normalised(p):
        return (pixels - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)

    teacher = load_teacher(tmp_path / "t", num_classes=4, input_preprocessing=student)
    with torch.no_grad():
        torch.testing.assert_close(teacher(normalised(student)), model(normalised(imagenet)), atol=1e-5, rtol=1e-5)
    assert teacher.class_names == model.class_names
    same = load_teacher(tmp_path / "t", num_classes=4, input_preprocessing=imagenet)
    assert isinstance(same, vitkit.VisionTransformer)  # nothing to convert: the model itself


def test_distillation_flags_that_cannot_work_are_named(tmp_path):
    from vitkit.train import TrainConfig, resolve_config
    from vitkit.train.setup import build_model

    create_model(ViTConfig(**TINY, class_token=False, global_pool="avg")).save_pretrained(tmp_path / "avg")
    config = TrainConfig(init=str(tmp_path / "avg"), distill_from=str(tmp_path / "teacher"), drop_path=0.0)
    with pytest.raises(vitkit.VitkitError, match=r"^--init .*avg with --distill-from: a distillation token"):
        build_model(config, num_classes=4)
    for tau in (float("nan"), float("inf"), 0.0):
        with pytest.raises(vitkit.VitkitError, match="--distill-tau must be a finite number above 0"):
            resolve_config(TrainConfig(distill_from="teacher", distill_tau=tau))
