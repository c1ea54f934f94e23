"""`mlx-vit tui PHOTO -m MODEL` in a real terminal (tmux, 120x40): the screen shows transformers' top label,
`q` quits with exit status 0."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from checkpoints import IMAGES, hf_pipeline

from mlx_vit.convert import convert

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt install tmux)")


def tmux(socket: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", socket, *args], check=True, capture_output=True, text=True).stdout


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return result


def test_tui_in_tmux(vit_folder, tmp_path):
    photo = IMAGES / "chelsea.png"
    top = hf_pipeline(vit_folder)(str(photo), top_k=1)[0]
    model = convert(str(vit_folder), tmp_path / "vit-mlx")
    exit_file = tmp_path / "exit-status"
    env = {"HF_HUB_OFFLINE": "1", "MLX_VIT_CACHE": str(tmp_path / "cache")}
    command = " ".join(
        [
            "env",
            *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
            shlex.quote(sys.executable),
            "-m",
            "mlx_vit",
            "tui",
            shlex.quote(str(photo)),
            "-m",
            shlex.quote(str(model)),
            f"; echo $? > {shlex.quote(str(exit_file))}; sleep 60",  # keep the pane to read after exit
        ]
    )
    socket = f"mlx-vit-test-{os.getpid()}"  # a private tmux server: nothing of the user's is touched
    tmux(socket, "new-session", "-d", "-s", "tui", "-x", "120", "-y", "40", "-c", str(tmp_path), command)

    def screen_with(text: str) -> str | None:
        screen = tmux(socket, "capture-pane", "-p", "-t", "tui")
        return screen if text in screen else None

    try:
        screen = wait_for(lambda: screen_with(f"1. {top['label']}"), "the top label on screen")
        # transformers' score as the bar's percentage (within the 1e-4 parity tolerance)
        assert any(f"{100 * (top['score'] + d):.1f}%" in screen for d in (-1e-4, 0, 1e-4))
        assert "float32 · not quantized · cpu" in screen or "float32 · not quantized · gpu" in screen
        assert "3/8 chelsea.png" in screen
        assert len(screen.splitlines()) == 40 and max(len(line) for line in screen.splitlines()) <= 120
        tmux(socket, "send-keys", "-t", "tui", "q")
        status = wait_for(lambda: exit_file.is_file() and exit_file.read_text().strip(), "the app to exit", 20)
        assert status == "0", tmux(socket, "capture-pane", "-p", "-t", "tui")
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
