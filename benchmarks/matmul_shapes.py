"""fp32 matmul rate at the shapes a GRPO step of each speed.py workload multiplies.

    python benchmarks/matmul_shapes.py

The FLOP-bound limit in SPEED.md divides a step's FLOPs by the rate of large square products.
The step's own products are smaller: in decoding, one token for each of the 64 rows through
every projection (64 x width by width x out); in the training forwards, every real token at
once. This prints the rate of each, as a markdown table, so that the limit the step can reach
on this machine (its FLOPs at these rates) can be read beside the square-product one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from speed import WORKLOADS, Settings, machine


def rate(rows: int, k: int, n: int, seconds: float = 0.3) -> float:
    """GFLOP/s of F.linear on (rows, k) by an (n, k) weight: the median over ``seconds``."""
    x, w = torch.randn(rows, k), torch.randn(n, k)
    for _ in range(3):
        F.linear(x, w)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        F.linear(x, w)
        times.append(time.perf_counter() - t)
    return 2 * rows * k * n / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--training-rows", type=int, default=1700, help="real tokens per forward")
    args = parser.parse_args()
    s = Settings()
    decode_rows = s.prompts * s.G
    print(f"- machine: {machine()}\n- command: `python benchmarks/matmul_shapes.py`\n")
    print(
        "| workload | product (out x in) | decode: 64 rows GFLOP/s | training: "
        f"{args.training_rows} rows GFLOP/s |"
    )
    print("|---|---|---:|---:|")
    for name in ("tiny", "small"):
        w = WORKLOADS[name]
        for k, n in ((w.width, w.width), (w.width, w.mlp), (w.mlp, w.width)):
            print(
                f"| {name} | {n} x {k} | {rate(decode_rows, k, n):.0f} | "
                f"{rate(args.training_rows, k, n):.0f} |"
            )


if __name__ == "__main__":
    main()
