"""vitdemo's Gradio app: `python app.py`, or Hugging Face Spaces (which imports `demo`).

For now the app shows what the library holds; the classification, patch, attention and
training tabs arrive with the app issue. Host and port come from GRADIO_SERVER_NAME and
GRADIO_SERVER_PORT (default 127.0.0.1:7860).
"""

import gradio as gr

import vitdemo


def presets_table() -> list[list]:
    rows = []
    for name in vitdemo.list_presets():
        c = vitdemo.get_config(name)
        rows.append([name, f"{c.image_size[0]}x{c.image_size[1]}", c.patch_size, c.embed_dim, c.depth, c.num_heads, c.mlp_dim])
    return rows


with gr.Blocks(title="vitdemo: An Image is Worth 16x16 Words") as demo:
    gr.Markdown(
        "# vitdemo\n"
        "The Vision Transformer of Dosovitskiy et al. (2020): an image cut into 16x16 patches, "
        "each patch a word, read by a Transformer encoder.\n\n"
        "$z_0 = [x_{class}; x_p^1E; \\dots; x_p^NE] + E_{pos}$ (Eq. 1), "
        "$z'_l = MSA(LN(z_{l-1})) + z_{l-1}$ (Eq. 2), "
        "$z_l = MLP(LN(z'_l)) + z'_l$ (Eq. 3), $y = LN(z_L^0)$ (Eq. 4)."
    )
    gr.Dataframe(
        value=presets_table(),
        headers=["preset", "image", "patch", "width D", "layers", "heads", "MLP"],
        label="Presets (Table 1 of the paper, plus DeiT's Ti/S and a 32 px CIFAR model)",
        interactive=False,
    )

if __name__ == "__main__":
    demo.launch()
