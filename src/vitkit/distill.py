"""DeiT: training a ViT through attention from a teacher (Touvron et al., 2021, "Training
data-efficient image transformers & distillation through attention").

The student carries a second prefix token, the distillation token (`ViTConfig(distill_token=True)`),
whose output goes to its own head (`head_dist`). In training, the class head learns from the labels
and the distillation head from the teacher (`distillation_loss`, the paper's Eq. 2 and 3); at
inference the two heads' softmax inputs are averaged (`VisionTransformer.forward`, Sec. 4).

The teacher is any model vitkit can load, or a torchvision CNN with a weights file
(`torchvision:regnet_y_16gf@FILE`; the paper's best teachers are RegNets). It sees the student's
batch: a vitkit teacher saved with another normalisation gets the batch re-normalised to its own
mean and std; a torchvision teacher's file does not say its normalisation, so it must expect the
student's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Preprocessing
from .errors import VitkitError
from .variants import register_model

KINDS = ("soft", "hard")


def load_teacher(source: str | Path, *, num_classes: int, device: str | torch.device = "cpu",
                 model: str | None = None, input_preprocessing: Preprocessing | None = None) -> nn.Module:
    """A frozen teacher in eval mode on `device`, mapping images (B, 3, H, W) to logits (B, num_classes).

    source: `torchvision:NAME@FILE` (a torchvision classification model, e.g.
        `torchvision:resnet18@teacher.safetensors`, its weights a state-dict file read without
        running code), or anything `vitkit.load_pretrained` reads (a vitkit directory, a run, ...).
    model: the variant name, for weight files that cannot say the whole architecture.
    input_preprocessing: how the batches the teacher will see are normalised (the student's); a
        teacher whose own `preprocessing` has another mean or std is wrapped to convert them.
    Raises VitkitError if the teacher cannot be built or predicts another number of classes.
    """
    text = str(source)
    if text.startswith("torchvision:"):
        name, _, weights = text.removeprefix("torchvision:").partition("@")
        teacher = _torchvision_teacher(name, num_classes=num_classes, weights=weights or None)
    else:
        from .pretrained import load_pretrained

        teacher = load_pretrained(source, model=model)
        if teacher.config.num_classes != num_classes:
            raise VitkitError(f"{text}: the teacher predicts {teacher.config.num_classes} classes, "
                              f"the student {num_classes}")
        own = getattr(teacher, "preprocessing", None)
        if input_preprocessing is not None and own is not None and (own.mean, own.std) != (
                input_preprocessing.mean, input_preprocessing.std):
            teacher = _Renormalised(teacher, given=input_preprocessing, expected=own)
    teacher.to(device).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


class _Renormalised(nn.Module):
    """A teacher fed batches normalised for another model: x * std_s + mean_s recovers the pixels
    in [0, 1], which then get the teacher's own mean and std, in one multiply-add."""

    def __init__(self, teacher: nn.Module, *, given: Preprocessing, expected: Preprocessing) -> None:
        super().__init__()
        self.teacher = teacher
        self.class_names = getattr(teacher, "class_names", None)
        given_mean, given_std = torch.tensor(given.mean), torch.tensor(given.std)
        mean, std = torch.tensor(expected.mean), torch.tensor(expected.std)
        self.register_buffer("scale", (given_std / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((given_mean - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) normalised for the student
        return self.teacher(x * self.scale.to(x.dtype) + self.shift.to(x.dtype))


def check_teacher_classes(teacher: nn.Module, class_names: list[str], *, source: str) -> None:
    """Refuse a teacher whose logits name the student's classes in another order; warn when its
    class names are other words altogether (they may be ids for the same classes)."""
    theirs = getattr(teacher, "class_names", None)
    if not theirs or list(theirs) == list(class_names):
        return
    if sorted(theirs) == sorted(class_names):
        raise VitkitError(f"{source}: the teacher's classes come in another order ({', '.join(theirs[:5])}, ...) "
                          f"than the data's ({', '.join(class_names[:5])}, ...); its logits would teach the wrong labels")
    import warnings

    warnings.warn(f"{source}: the teacher was trained on other class names ({', '.join(theirs[:5])}, ...) than the "
                  f"data's ({', '.join(class_names[:5])}, ...); logit i is taken to mean the data's class i",
                  stacklevel=2)


def add_distillation_token(model: nn.Module) -> nn.Module:
    """`model` (a VisionTransformer with a [class] token) with DeiT's distillation token added, for
    distilling into a pre-trained model. The token, its position embedding and its head start as
    copies of the [class] token's, so both heads begin from what the model already knows."""
    from .model import VisionTransformer

    config = model.config
    if config.distill_token:
        return model
    if not config.class_token:
        raise VitkitError("a distillation token sits beside the [class] token; this model has none "
                          "(average pooling), so it cannot be distilled DeiT's way")
    student = VisionTransformer(config.replace(distill_token=True)).to(model.pos_embed.device)
    state = dict(model.state_dict())
    state["dist_token"] = state["cls_token"].clone()
    if config.prefix_pos_embed:
        pos = state["pos_embed"]  # (1, [class] + registers + patches, D): the new token goes second
        state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
    if student.head_dist is not None:
        state["head_dist.weight"] = state["head.weight"].clone()
        state["head_dist.bias"] = state["head.bias"].clone()
    student.load_state_dict(state)
    student.class_names, student.preprocessing = model.class_names, model.preprocessing
    student.grad_checkpointing = model.grad_checkpointing
    student.train(model.training)
    return student


def _torchvision_teacher(name: str, *, num_classes: int, weights: str | Path | None) -> nn.Module:
    import torchvision

    from .pretrained import load_state
    from .weights import read_state_dict

    if weights is None:
        raise VitkitError(f"torchvision:{name}: a teacher needs trained weights; name its state-dict file "
                          f"as torchvision:{name}@FILE")
    # Classification models only: the others take no num_classes, or (segmentation, detection)
    # download ImageNet weights for their backbone even with weights=None.
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise VitkitError(f"torchvision:{name}: not a torchvision classification model (e.g. resnet50, regnet_y_16gf)")
    teacher = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    state = read_state_dict(weights)
    load_state(teacher, state, source=str(weights))
    return teacher


def distillation_loss(cls_logits: Tensor, dist_logits: Tensor | None, teacher_logits: Tensor, targets: Tensor, *,
                      kind: str, tau: float = 3.0, alpha: float = 0.5,
                      base_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Tensor:
    """The DeiT objective: (1 - alpha) * base_loss(class head, labels) + alpha * a teacher term.

    kind "soft" (Eq. 2): the teacher term is tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)),
        averaged over the batch; tau^2 keeps its gradients on the scale of the label term (Hinton et al.).
    kind "hard" (Eq. 3): the teacher term is the cross-entropy with the teacher's argmax; alpha = 0.5
        gives the paper's 1/2 + 1/2.
    cls_logits, dist_logits, teacher_logits: (B, K). dist_logits are the distillation head's; None
        (a student without the token) distils through the class head, the "usual distillation".
    targets: (B,) class indices, or (B, K) probabilities (mixup / label smoothing), for base_loss.
    """
    if kind not in KINDS:
        raise ValueError(f"distillation kind must be one of {KINDS}, got {kind!r}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    student = cls_logits if dist_logits is None else dist_logits
    if teacher_logits.shape != student.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student.shape)} differ: do teacher and student predict the same classes?")
    teacher_logits = teacher_logits.detach()
    base = base_loss(cls_logits, targets)
    if kind == "soft":
        # DeiT's code divides the summed KL by B * K; per-sample (batchmean) is Eq. 2's expectation.
        teacher_term = F.kl_div(F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                                reduction="batchmean", log_target=True) * (tau * tau)
    else:
        teacher_term = F.cross_entropy(student, teacher_logits.argmax(dim=-1))
    return (1.0 - alpha) * base + alpha * teacher_term


def student_logits(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """The (class head, distillation head) logits of a student; (logits, None) without the token."""
    if getattr(model, "head_dist", None) is not None:
        return model.forward_distilled(images)
    return model(images), None


# ---------------------------------------------------------------------------- DeiT's named models
# The architectures are the paper's ViT-Ti/S/B (DeiT Table 1); DeiT's checkpoints expect ImageNet's
# mean and std, which a model's `preprocessing` (not its config) carries.
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
for _size, _base in (("tiny", "ViT-Ti/16"), ("small", "ViT-S/16"), ("base", "ViT-B/16")):
    register_model(f"deit_{_size}_patch16_224", _base, preprocessing=_IMAGENET)
    register_model(f"deit_{_size}_distilled_patch16_224", _base, preprocessing=_IMAGENET, distill_token=True)
register_model("deit_base_patch16_384", "ViT-B/16", preprocessing=_IMAGENET, img_size=384)
register_model("deit_base_distilled_patch16_384", "ViT-B/16", preprocessing=_IMAGENET, img_size=384, distill_token=True)
