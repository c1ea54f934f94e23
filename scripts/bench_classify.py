"""End to end: `mlx-vit classify` against transformers' image-classification pipeline, whole processes.

    python scripts/bench_classify.py                  # 32 photos, batch 8, a seeded random ViT-B/16, 5 rounds
    python scripts/bench_classify.py --batch-size 1 --rounds 3

Both sides start as fresh processes and do everything a user's run does: import, load the model (mlx-vit from
a folder written by `mlx-vit convert`, transformers from the Hugging Face folder it was converted from), decode
and preprocess the photos, classify, print top-5. The photos are tests/data/images repeated to --images files.
The model is a seeded random ViT-B/16 (google/vit-base-patch16-224's architecture and preprocessing; weights do
not change the speed), made once into --work. Needs the test extra (torch, transformers).

Runs alternate (mlx-vit, pipeline, mlx-vit, ...) after one warm-up each, so a machine whose speed drifts (a
shared one) slows both alike; the paired ratios mlx-vit / pipeline are the figures to quote, with the medians.
Each run's CPU time and peak memory come from the operating system (wait4). It also prints where mlx-vit's
time goes (its --debug timing lines) and how long `mlx-vit --help` takes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLX_VIT = [sys.executable, "-m", "mlx_vit"]
VIT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
                patch_size=16, num_labels=1000)  # fmt: skip


def prepare(work: Path, count: int) -> tuple[Path, Path, list[str]]:
    """(HF folder, mlx-vit folder, photo paths), made once into `work`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import PHOTOS, make_checkpoint

    hf, mlx = work / "vit-base-random", work / "vit-base-random-mlx"
    if not (hf / "config.json").is_file():
        make_checkpoint(hf, **VIT_BASE)
    if not (mlx / "config.json").is_file():
        subprocess.run([*MLX_VIT, "convert", str(hf), "-o", str(mlx), "--force"], check=True, capture_output=True)
    photos = work / f"photos-{count}"
    if not photos.is_dir():
        photos.mkdir()
        for i in range(count):
            source = PHOTOS[i % len(PHOTOS)]
            shutil.copy(source, photos / f"{i:03d}-{source.name}")
    return hf, mlx, sorted(str(p) for p in photos.iterdir())


def run_pipeline(folder: str, batch_size: int, photos: list[str]) -> None:
    """The transformers side, in this (fresh) process: print top-5 per photo as JSON."""
    from transformers import pipeline

    classifier = pipeline("image-classification", model=folder, device="cpu")
    results = classifier(photos, batch_size=batch_size, top_k=5)
    print(json.dumps([[p["label"] for p in r] for r in results]))


def timed(command: list[str]) -> dict:
    """Wall, CPU seconds and peak memory (MiB) of one run of `command`, and what it printed."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(command[:6])} ...")
    peak = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak": peak, "out": out}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mlx-vit-bench")
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)  # internal: run the transformers side
    parser.add_argument("photos", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline:
        run_pipeline(args.pipeline, args.batch_size, args.photos)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    hf, mlx, photos = prepare(args.work, args.images)
    ours = [*MLX_VIT, "classify", "-m", str(mlx), "--batch-size", str(args.batch_size), "--format", "json", *photos]
    theirs = [sys.executable, __file__, "--pipeline", str(hf), "--batch-size", str(args.batch_size), *photos]
    print(f"{len(photos)} photos, batch {args.batch_size}, {args.rounds} rounds after a warm-up each; {os.cpu_count()} "
          f"cores")  # fmt: skip
    timed(ours), timed(theirs)
    runs: dict[str, list[dict]] = {"mlx-vit": [], "pipeline": []}
    for _ in range(args.rounds):
        runs["mlx-vit"].append(timed(ours))
        runs["pipeline"].append(timed(theirs))
    for name, results in runs.items():
        walls, cpu, peak = ([r[key] for r in results] for key in ("wall", "cpu", "peak"))
        print(f"{name:9s} wall median {median(walls):6.2f} s (min {min(walls):.2f}, max {max(walls):.2f}); "
              f"CPU {median(cpu):6.2f} s; peak {median(peak):.0f} MiB")  # fmt: skip
    for figure in ("wall", "cpu"):
        ratios = [a[figure] / b[figure] for a, b in zip(runs["mlx-vit"], runs["pipeline"], strict=True)]
        spread = f"min {min(ratios):.3f}, max {max(ratios):.3f}"
        print(f"mlx-vit / pipeline {figure}: median {median(ratios):.3f} ({spread})")

    top1_ours = [r["predictions"][0]["label"] for r in json.loads(runs["mlx-vit"][-1]["out"])]
    top1_theirs = [labels[0] for labels in json.loads(runs["pipeline"][-1]["out"])]
    agree = sum(a == b for a, b in zip(top1_ours, top1_theirs, strict=True))
    print(f"top-1 labels agree on {agree} of {len(photos)} photos (the pipeline drops alpha channels; see docs/cli.md)")

    start = time.perf_counter()
    debug = subprocess.run([*MLX_VIT, "--debug", *ours[3:]], capture_output=True, text=True)
    print(f"where mlx-vit's time goes (one more run with --debug, {time.perf_counter() - start:.2f} s in all):")
    print("\n".join("  " + line for line in debug.stderr.splitlines() if line.startswith("mlx-vit:")))
    helps = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([*MLX_VIT, "--help"], capture_output=True, check=True)
        helps.append(time.perf_counter() - start)
    print(f"mlx-vit --help: median {median(helps):.3f} s of 5")


if __name__ == "__main__":
    main()
