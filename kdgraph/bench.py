"""Benchmarks that print ratios (not tests): ``python -m kdgraph.bench [--reps N] [--batch B] [--device D]``.

taps: an eager forward of the teacher WRN-28-4 against the same forward tapped at its three pre-ReLU stage
ends (``block2.0.relu1:pre``, ``block3.0.relu1:pre``, ``relu:pre``), interleaved, median of the per-pair
ratios. Target: <= 1.05.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .graph import tap
from .models import build_model

PRE_RELU = ["block2.0.relu1:pre", "block3.0.relu1:pre", "relu:pre"]


def _time(fn, x, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.no_grad()
def tap_overhead(reps: int = 15, batch: int = 128, device: str = "cpu", train: bool = False) -> dict:
    dev = torch.device(device)
    model = build_model("wrn-28-4", num_classes=100).to(dev).train(train)
    tapped = tap(model, PRE_RELU).train(train)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    for _ in range(2):  # warm-up
        model(x), tapped(x)
    eager, taps, ratios = [], [], []
    for i in range(reps):
        first, second = (model, tapped) if i % 2 == 0 else (tapped, model)  # alternate the order
        a, b = _time(first, x, dev), _time(second, x, dev)
        e, t = (a, b) if first is model else (b, a)
        eager.append(e)
        taps.append(t)
        ratios.append(t / e)
    return {"bench": "taps", "model": "wrn-28-4", "taps": PRE_RELU, "batch": batch, "device": str(dev),
            "mode": "train" if train else "eval", "reps": reps, "eager_ms": 1e3 * statistics.median(eager),
            "tapped_ms": 1e3 * statistics.median(taps), "ratio": statistics.median(ratios),
            "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    r = tap_overhead(args.reps, args.batch, args.device)
    print(f"{'benchmark':<40} {'eager ms':>10} {'tapped ms':>10} {'ratio':>7}")
    print(f"{'WRN-28-4, 3 pre-ReLU taps, batch ' + str(r['batch']) + ', ' + r['device']:<40} "
          f"{r['eager_ms']:>10.1f} {r['tapped_ms']:>10.1f} {r['ratio']:>7.3f}  (target <= 1.05)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()


def cli(args) -> int:
    """``kdgraph bench``: the tap-overhead figure (more figures are being added)."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    r = tap_overhead(args.reps, args.batch, device)
    print(f"WRN-28-4, 3 pre-ReLU taps, batch {r['batch']}, {r['device']}: eager {r['eager_ms']:.1f} ms, "
          f"tapped {r['tapped_ms']:.1f} ms, ratio {r['ratio']:.3f} (target <= 1.05)")
    with open(args.out, "w") as f:
        json.dump(r, f, indent=2)
    return 0
