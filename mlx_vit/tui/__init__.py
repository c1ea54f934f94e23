"""`mlx-vit tui`: a Textual app to browse, preview and classify images and camera frames.

app.py       the App: layout, keys, and what happens when a worker answers
backend.py   the one thread that does all MLX work (load, classify), returning plain values
widgets.py   folder browser, image preview, prediction bars, status line
screens.py   modal screens: prompt, model picker, help
messages.py  what workers post back to the UI
"""
