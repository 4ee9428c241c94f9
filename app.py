"""vitdemo's Gradio app: `python app.py`, or Hugging Face Spaces (which imports `demo`).

The app itself is the package `vitdemo/app/` (one module per tab). Host and port come from GRADIO_SERVER_NAME and
GRADIO_SERVER_PORT (default 127.0.0.1:7860).
"""

from vitdemo.app import build_demo, launch_options

demo = build_demo()

if __name__ == "__main__":
    demo.launch(**launch_options())
