"""A small CNN teacher for distilling into a plain ViT, and its file.

Touvron et al. 2021 (DeiT, section 5.2) find that a convnet teacher lifts a ViT student more than
a transformer teacher, through the inductive bias the convnet's labels carry; Beyer et al. 2022
find the teacher must label the same augmented view the student sees. The student keeps the
paper's architecture (no distillation token): the teacher's hard label on each augmented image is
a second target for its class token (`Recipe.distillation`, vitdemo.engine).

The network is a ResNet-9-like stack (the kind Page's fast CIFAR-10 runs made known: a 3x3
convolution stem, three stages that double the width and halve the resolution, a residual pair
of convolutions after the first and the last, a max pool and one linear layer), trained by
`vitdemo.engine.train_teacher`. Its file is a safetensors file with the class names, the
preprocessing and the split it was trained on, so that a student can check it never saw the
student's held-out images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .checkpoint import CheckpointError, atomic_write

TEACHER_FORMAT = "vitdemo-cnn-teacher"
TEACHER_NAME = "teacher.safetensors"


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 convolution, (2x2 max pool), batch norm, GELU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.BatchNorm2d(c_out), nn.GELU())


class Residual(nn.Module):
    """x + f(x): two convolutions at the stage's width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(width, width), conv_bn(width, width))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvTeacher(nn.Module):
    """The teacher: stem at `width`, stages at 2x, 4x and 8x `width`, each halving the resolution."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.num_classes, self.width = num_classes, width
        w = (width, 2 * width, 4 * width, 8 * width)
        self.features = nn.Sequential(
            conv_bn(3, w[0]),
            conv_bn(w[0], w[1], pool=True), Residual(w[1]),
            conv_bn(w[1], w[2], pool=True),
            conv_bn(w[2], w[3], pool=True), Residual(w[3]),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(w[3], num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # The logits scaled down, as Page's network does: its max-pooled features are large.
        return self.head(self.features(x)) * 0.125


def save_teacher(path: str | Path, model: ConvTeacher, **metadata: Any) -> Path:
    """Write the teacher and its metadata (class names, preprocessing, split, accuracy) atomically."""
    header = {"format": TEACHER_FORMAT, "num_classes": model.num_classes, "width": model.width, **metadata}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"vitdemo": json.dumps(header)}))


def load_teacher(path: str | Path) -> tuple[ConvTeacher, dict[str, Any]]:
    """The teacher in `path` (a file, or a folder holding teacher.safetensors), in eval mode, and
    its metadata. Raises CheckpointError, in words, for anything else."""
    path = Path(path)
    if path.is_dir():
        path = path / TEACHER_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("vitdemo", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path.name} is not a readable teacher file: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != TEACHER_FORMAT:
        raise CheckpointError(f"{path.name} is not a CNN teacher saved by `vitdemo teacher`")
    model = ConvTeacher(meta["num_classes"], meta["width"])
    model.load_state_dict(tensors)
    return model.eval(), meta
