"""Print the largest logit difference between vitdemo and each peer, on the same random weights.

    python benchmarks/parity.py

The peers are built locally with random weights (nothing is downloaded); the tests in
tests/test_parity.py assert the same comparisons stay within 1e-4.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import timm  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402

from test_parity import hf_model, images, load_converted, randomise, to_hub_names  # noqa: E402


def diff(ours, peer_fn, x):
    with torch.no_grad():
        return (ours(x) - peer_fn(x)).abs().max().item()


def main() -> None:
    x = images()
    rows = []
    for name, preset in (("vit_base_patch16_224", "vit_b_16"), ("vit_small_patch16_224", "vit_s_16")):
        peer = randomise(timm.create_model(name, pretrained=False))
        rows.append((f"timm {name}", diff(load_converted(peer.state_dict(), "timm", preset), peer, x)))
    peer = randomise(torchvision.models.vit_b_16(weights=None))
    rows.append(("torchvision vit_b_16", diff(load_converted(peer.state_dict(), "torchvision", "vit_b_16"), peer, x)))
    peer = hf_model()
    for names, state in (("5.x names", peer.state_dict()), ("hub-file names", to_hub_names(peer.state_dict()))):
        ours = load_converted(state, "hf", "vit_b_16")
        rows.append((f"transformers {transformers.__version__} ({names})",
                     diff(ours, lambda t: peer(pixel_values=t).logits, x)))
    print("max |logit difference|, ViT on 2 random images, perturbed random weights:")
    for name, value in rows:
        print(f"  {name:<45} {value:.1e}")


if __name__ == "__main__":
    main()
