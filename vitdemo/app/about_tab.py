"""The About tab: the paper's model in four equations, and the picked model's card."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .common import LATEX


ABOUT = r"""
## The Vision Transformer

*An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale*, Dosovitskiy et al., 2020
([arXiv:2010.11929](https://arxiv.org/abs/2010.11929)).

A ViT cuts an $H \times W$ image into $N = HW/P^2$ patches of $P \times P$ pixels, flattens each one and
projects it linearly to width $D$ (the patch embedding $E$). A learned class token goes in front, a
learned position embedding is added, and a plain Transformer encoder of $L$ layers reads the sequence:

$$z_0 = [x_\text{class};\, x_p^1 E;\, x_p^2 E;\, \dots;\, x_p^N E] + E_{pos} \qquad (1)$$

with $E \in \mathbb{R}^{(P^2 C) \times D}$ and $E_{pos} \in \mathbb{R}^{(N+1) \times D}$ ($C$ colour channels), then for
each layer $\ell = 1 \dots L$:

$$z'_\ell = \mathrm{MSA}(\mathrm{LN}(z_{\ell-1})) + z_{\ell-1} \qquad (2)$$

$$z_\ell = \mathrm{MLP}(\mathrm{LN}(z'_\ell)) + z'_\ell \qquad (3)$$

$$y = \mathrm{LN}(z_L^0) \qquad (4)$$

The classifier is one linear layer on $y$, the class token's final state. Nothing in the model
knows that images are two-dimensional except the patch cutting: the position embeddings learn the
2-D layout (see the Position embeddings tab), and some attention heads look across the whole image
already in the first layers (see the Attention tab). With little data a ViT lacks the inductive biases of a CNN; with a
lot of data (or pre-trained weights and fine-tuning) it matches or beats them.

**Links:** [the paper (arXiv:2010.11929)](https://arxiv.org/abs/2010.11929) ·
[Google's code](https://github.com/google-research/vision_transformer) ·
attention rollout: [Abnar and Zuidema, 2020 (arXiv:2005.00928)](https://arxiv.org/abs/2005.00928)
"""


def create_ui() -> dict[str, Any]:
    gr.Markdown(ABOUT, latex_delimiters=LATEX)
    return {"card": gr.Markdown(latex_delimiters=[])}
