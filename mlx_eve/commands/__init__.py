"""The command-line tools, one module each: its ``build_parser`` and its ``main``.

``main`` parses the arguments first and only then imports the library it runs (and with it mlx-lm,
transformers, Gradio or FastAPI), so that ``--help`` and a mistyped option answer at once. Each command also
runs as ``python -m mlx_eve.<command>`` (the three-line ``mlx_eve/<command>.py``) and as the ``mlx_eve.<command>``
script.
"""

COMMANDS = ["generate", "convert", "lora", "fuse", "app", "server", "caption", "evaluate"]
