"""What OpenBLAS's generic fallback costs, and what mlx-vit's choice of kernels gets back (Linux x86, OpenBLAS).

    python scripts/blas_fallback.py --rounds 3

Times a ViT-B/16 forward pass (random weights, batch 1 and 8, median of 7 after a warm-up) and a 1024x1024
float32 matmul in fresh processes, three ways, alternating round by round:
- default: whatever this machine's OpenBLAS picks (on a CPU it knows, the right kernels);
- fallback: OPENBLAS_CORETYPE=Prescott set by the user, which mlx-vit leaves alone: what a CPU the build does
  not know gets;
- fixed: OpenBLAS made to fall back to Prescott by itself (loaded under the variable, which is then taken away
  before mlx_vit looks), so mlx-vit chooses the kernels again.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import ctypes, json, os, sys, time
if {fixed}:
    ctypes.CDLL({path!r}, mode=ctypes.RTLD_GLOBAL)
    del os.environ["OPENBLAS_CORETYPE"]
import mlx_vit
import mlx.core as mx
from mlx_vit.blas import blas_info
from mlx_vit.config import ViTConfig
from mlx_vit.model import ViT

def median(fn, runs=7):
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]

a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
out = {{"core": blas_info().core, "gflops": 2 * 1024**3 / median(lambda: mx.eval(a @ b), 20) / 1e9}}
model = ViT(ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      image_size=224, patch_size=16, num_labels=1000))
mx.eval(model.parameters())
for batch in (1, 8):
    x = mx.random.normal((batch, 224, 224, 3))
    out[f"ms/image b{{batch}}"] = 1000 * median(lambda: mx.eval(model(x))) / batch
print(json.dumps(out))
"""


def run(way: str, path: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if way != "default":
        env["OPENBLAS_CORETYPE"] = "Prescott"
    code = CHILD.format(fixed=way == "fixed", path=path)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = ctypes.util.find_library("openblas")
    if path is None:
        raise SystemExit("no system OpenBLAS")
    results: dict[str, list[dict]] = {"default": [], "fallback": [], "fixed": []}
    for _ in range(args.rounds):
        for way in results:
            results[way].append(run(way, path))
    print("| run | core | GFLOP/s | ms/image, batch 1 | ms/image, batch 8 |\n| --- | --- | --- | --- | --- |")
    for way, runs in results.items():
        cells = [statistics.median(r[key] for r in runs) for key in ("gflops", "ms/image b1", "ms/image b8")]
        print(f"| {way} | {runs[0]['core']} | {cells[0]:.0f} | {cells[1]:.0f} | {cells[2]:.0f} |")


if __name__ == "__main__":
    main()
