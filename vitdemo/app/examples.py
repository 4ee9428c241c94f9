"""Example images, chosen for the model picked (`examples_for`): images it can know.

- CIFAR-10 models: two images per class from the shipped model's held-out split (never trained
  on), in `assets/cifar10/` with `examples.json` saying how they were picked
  (`scripts/pick_examples.py`); the only CIFAR-10 images in the repository.
- ImageNet models: the photos that the gradio package itself ships.
- Models trained on the built-in shapes: new shapes drawn as their training images are (another seed).
- Any other model: pictures drawn here, one of them a 16-bit PNG.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gradio.media
import numpy as np
from PIL import Image, ImageDraw

from ..data import CIFAR10_CLASSES, SHAPES, synthetic_shapes

ASSETS = Path(__file__).resolve().parent / "assets"
SHAPE_SEED = 2020  # not the Train tab's seed (0): shapes the runs have never seen


@dataclass(frozen=True)
class ExampleSet:
    """The examples shown for a model: a title saying what they are, and (file, caption) pairs."""

    title: str
    items: tuple[tuple[Path, str], ...]


def cifar_examples() -> ExampleSet:
    """The 20 held-out CIFAR-10 images, with their classes as captions."""
    manifest = json.loads((ASSETS / "cifar10" / "examples.json").read_text())
    items = tuple((ASSETS / "cifar10" / file, f"{name} (held out)")
                  for name, entry in manifest["classes"].items() for file in entry["files"])
    return ExampleSet("CIFAR-10 images the shipped model never trained on, two per class (its held-out split; "
                      "32x32, shown enlarged)", items)


def shape_examples(folder: Path, num_classes: int) -> ExampleSet:
    """Two new shapes per class, drawn as the Train tab's built-in data are (32x32)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = synthetic_shapes(num_classes=num_classes, per_class=2, image_size=32, seed=SHAPE_SEED)
    items = []
    for i, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
        path = folder / f"{SHAPES[label]}-{i}.png"
        if not path.is_file():
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        items.append((path, SHAPES[label]))
    return ExampleSet("New shapes, drawn like the built-in training images (32x32, shown enlarged)", tuple(items))


def examples_for(class_names: list[str], folder: Path) -> ExampleSet:
    """The examples a model with these classes can know (`folder`: where drawn ones are written)."""
    names = list(class_names)
    if names == list(CIFAR10_CLASSES):
        return cifar_examples()
    if len(names) == 1000:
        return ExampleSet("Photos (shipped with gradio)", tuple((p, p.stem) for p in photos()))
    if names == list(SHAPES[: len(names)]):
        return shape_examples(folder / f"shapes-{len(names)}", len(names))
    return ExampleSet("Drawn pictures", tuple((p, p.stem) for p in draw_examples(folder / "drawn")))


def _sky(size: int, top: tuple, bottom: tuple) -> Image.Image:
    t = np.linspace(0, 1, size)[:, None, None]
    rows = (1 - t) * np.array(top) + t * np.array(bottom)
    return Image.fromarray(np.repeat(rows, size, axis=1).astype(np.uint8))


def draw_examples(folder: Path, size: int = 128) -> list[Path]:
    """Write a few simple drawn pictures (and one 16-bit grayscale PNG) to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    s = size / 128
    pictures: dict[str, Image.Image] = {}

    img = _sky(size, (70, 130, 220), (170, 205, 245))
    d = ImageDraw.Draw(img)
    d.polygon([(60 * s, 60 * s), (78 * s, 60 * s), (58 * s, 18 * s), (48 * s, 18 * s)], fill=(200, 200, 210))
    d.polygon([(60 * s, 68 * s), (78 * s, 68 * s), (58 * s, 110 * s), (48 * s, 110 * s)], fill=(185, 185, 198))
    d.ellipse([16 * s, 57 * s, 112 * s, 71 * s], fill=(238, 238, 242))
    d.polygon([(18 * s, 64 * s), (32 * s, 64 * s), (22 * s, 42 * s), (14 * s, 42 * s)], fill=(210, 60, 60))
    pictures["airplane"] = img

    img = _sky(size, (150, 190, 230), (200, 220, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 76 * s, size, size], fill=(25, 70, 130))
    d.polygon([(14 * s, 70 * s), (114 * s, 70 * s), (100 * s, 90 * s), (26 * s, 90 * s)], fill=(120, 40, 35))
    d.rectangle([40 * s, 54 * s, 86 * s, 70 * s], fill=(240, 240, 240))
    d.rectangle([72 * s, 40 * s, 80 * s, 54 * s], fill=(30, 30, 30))
    pictures["ship"] = img

    img = _sky(size, (180, 200, 225), (120, 120, 120))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 88 * s, size, size], fill=(70, 70, 75))
    d.rounded_rectangle([12 * s, 58 * s, 116 * s, 90 * s], radius=int(8 * s), fill=(200, 30, 40))
    d.polygon([(34 * s, 58 * s), (46 * s, 40 * s), (84 * s, 40 * s), (98 * s, 58 * s)], fill=(190, 25, 35))
    d.polygon([(40 * s, 57 * s), (49 * s, 44 * s), (64 * s, 44 * s), (64 * s, 57 * s)], fill=(170, 210, 235))
    d.polygon([(68 * s, 57 * s), (68 * s, 44 * s), (82 * s, 44 * s), (92 * s, 57 * s)], fill=(170, 210, 235))
    for cx in (36, 94):
        d.ellipse([(cx - 12) * s, 78 * s, (cx + 12) * s, 102 * s], fill=(20, 20, 20))
        d.ellipse([(cx - 5) * s, 85 * s, (cx + 5) * s, 95 * s], fill=(150, 150, 150))
    pictures["car"] = img

    img = _sky(size, (40, 30, 60), (90, 60, 40))
    ImageDraw.Draw(img).ellipse([30 * s, 26 * s, 98 * s, 94 * s], fill=(235, 220, 120))
    pictures["circle"] = img

    folder_files = []
    for name, picture in pictures.items():
        path = folder / f"{name}.png"
        picture.save(path)
        folder_files.append(path)
    # A 16-bit grayscale PNG (mode I;16): converted by scaling, not clipped to white.
    yy, xx = np.mgrid[0:size, 0:size]
    square = (abs(xx - size / 2) < size / 4) & (abs(yy - size / 2) < size / 4)
    a = (yy * 20000 // size + square * 40000).astype(np.uint16)
    path = folder / "square-16bit.png"
    Image.fromarray(a).save(path)
    folder_files.append(path)
    return folder_files



PHOTOS = ("cheetah1.jpg", "lion.jpg", "bus.png", "tower.jpg")  # photos the gradio package ships


def photos() -> list[Path]:
    """Real photos for the examples, from the gradio package itself (nothing is downloaded);
    those missing from this gradio version are left out."""
    found = []
    for name in PHOTOS:
        try:
            path = Path(gradio.media.get_image(name))
        except (FileNotFoundError, ValueError):
            continue
        if path.is_file():
            found.append(path)
    return found
