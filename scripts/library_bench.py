"""A photo library through `mlx-vit classify`: peak memory against the number of inputs, and decoding threads.

    python scripts/library_bench.py memory --counts 1000,10000     # peak RSS of a whole run, per library size
    python scripts/library_bench.py workers --images 200 --workers 1,2,4 --rounds 3

`memory` classifies libraries of N copies of a repo photo (nested 100 to a folder) into a jsonl file with a tiny
seeded model, so that the run's bookkeeping, not the model, is what could grow. Peak is the child's own VmHWM
(not ru_maxrss, which Linux carries over from the parent across exec).

`workers` classifies N photo-sized JPEGs (the repo photos upscaled to 2048 px wide, decoded and resized per image)
with a seeded ViT-Ti/16 at 224 px, where decoding costs as much as the model, once per --workers value, the
values alternating round by round; it prints images/s of each (from the summary line) and the medians.
Needs the test extra (transformers, for the seeded checkpoints).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK = """
import atexit, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
atexit.register(lambda: sys.stderr.write(f"PEAK {peak():.1f}\\n"))
sys.argv = ["mlx-vit", *sys.argv[1:]]
runpy.run_module("mlx_vit", run_name="__main__")
"""
VIT_TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, image_size=224,
                patch_size=16, num_labels=1000)  # fmt: skip


def checkpoint(work: Path, name: str, **config) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import make_checkpoint

    folder = work / name
    if not folder.exists():
        make_checkpoint(folder, **config)
    return folder


def library(work: Path, count: int) -> Path:
    from PIL import Image

    folder = work / f"library-{count}"
    if not folder.exists():
        photo = ROOT / "tests" / "data" / "images" / "chelsea.png"
        small = work / "small.jpg"
        Image.open(photo).convert("RGB").resize((128, 85)).save(small, quality=85)
        for i in range(count):
            sub = folder / f"{i // 100:04d}"
            sub.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(small, sub / f"{i:06d}.jpg")
    return folder


def classify(*args: str) -> tuple[float, str]:
    """(peak MB, stderr) of one `mlx-vit ARGS` run in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return float(done.stderr.rsplit("PEAK ", 1)[1]), done.stderr


def memory(work: Path, counts: list[int]) -> None:
    model = checkpoint(work, "small")
    print("| images | peak RSS, MB | seconds | images/s |\n| --- | --- | --- | --- |")
    for count in counts:
        out = work / f"out-{count}.jsonl"
        out.unlink(missing_ok=True)
        peak, log = classify("classify", str(library(work, count)), "-m", str(model), "-o", str(out))
        seconds, rate = re.search(r"in ([\d.]+) s \(([\d.]+) images/s\)", log).groups()
        print(f"| {count:,} | {peak:.0f} | {seconds} | {rate} |", flush=True)


def photos(work: Path, count: int) -> Path:
    from PIL import Image

    folder = work / f"photos-{count}"
    if not folder.exists():
        folder.mkdir()
        sources = [p for p in sorted((ROOT / "tests" / "data" / "images").iterdir()) if p.suffix in (".png", ".jpg")]
        for i in range(count):
            image = Image.open(sources[i % len(sources)]).convert("RGB")
            image.resize((2048, 2048 * image.height // image.width)).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def workers(work: Path, count: int, values: list[int], rounds: int, batch_size: int) -> None:
    model, folder = checkpoint(work, "vit-tiny", **VIT_TINY), photos(work, count)
    rates: dict[int, list[float]] = {v: [] for v in values}
    for _ in range(rounds):
        for value in values:
            out = work / "workers.jsonl"
            out.unlink(missing_ok=True)
            _, log = classify("classify", str(folder), "-m", str(model), "-o", str(out), "--workers", str(value),
                              "--batch-size", str(batch_size))  # fmt: skip
            rates[value].append(float(re.search(r"\(([\d.]+) images/s\)", log).group(1)))
    print(f"{os.cpu_count()} cores; {count} JPEGs of 2048 px, ViT-Ti/16 at 224, batch {batch_size}")
    for value in values:
        print(f"--workers {value}: {statistics.median(rates[value]):.1f} images/s (runs: {rates[value]})")
    decode, infer = parts(model, folder, batch_size)
    print(
        f"alone, on this thread: decoding {decode:.1f} images/s, the model {infer:.1f} images/s; one after the "
        f"other that is {1 / (1 / decode + 1 / infer):.1f} images/s, overlapped at best {min(decode, infer):.1f}"
    )


def parts(model: Path, folder: Path, batch_size: int) -> tuple[float, float]:
    """(images/s decoding and preprocessing alone, images/s of the model alone), in this process."""
    import time

    import numpy as np

    import mlx_vit
    from mlx_vit.images import open_image
    from mlx_vit.preprocess import preprocess

    classifier = mlx_vit.load(str(model))
    files = sorted(folder.iterdir())
    start = time.perf_counter()
    pixels = np.stack([preprocess(open_image(f), classifier.preprocessing) for f in files])
    decode = len(files) / (time.perf_counter() - start)
    classifier.logits(pixels[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        classifier.logits(pixels[i : i + batch_size])
    return decode, len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "workers"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mlx-vit-library-bench"))
    parser.add_argument("--counts", default="1000,10000")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clean", action="store_true", help="remove --work first")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.what == "memory":
        memory(args.work, [int(c) for c in args.counts.split(",")])
    else:
        workers(args.work, args.images, [int(v) for v in args.workers.split(",")], args.rounds, args.batch_size)


if __name__ == "__main__":
    main()
