"""`mlx-vit tui`: a Textual app to browse, preview and classify images and camera frames.

app.py             the App: layout, keys, and what happens when a worker answers
backend.py         the one thread that does all MLX work (load, classify), returning plain values
widgets.py         folder browser, image preview, prediction bars, status line
webcam.py          webcam mode, a widget given the backend: starts and stops camera sessions, posts their frames
camera_session.py  one start of webcam mode: its frame source, its stop event and the loop that classifies frames
screens.py         modal screens: prompt, model picker, help
messages.py        what workers post back to the UI
"""
