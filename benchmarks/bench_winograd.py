"""Winograd against the direct path and torch (oneDNN) on the CPU: the 3x3 stride-1 ResNet layers of
benchmarks/bench_conv.py (batch 8, float32), forward and forward+backward, with
cnnops.backends.cpu.allow_winograd on and off, timed in alternating turns (common.compare_times).
--small-tiles: instead, layers of small maps at batch 1 to 4, where F(4x4, 3x3) has fewer than 32
tiles, each with the direct path, F(4x4), F(2x2) and the size rules' choice.

    python3 -m benchmarks.bench_winograd [--threads 2] [--min-run-time 2] [--layout both] [--small-tiles]

Prints a table; ratios are torch time / cnnops time (above 1: cnnops faster).
"""
import argparse

import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from benchmarks import common
from cnnops import _C

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (channels, H = W), 3x3, padding 1
# (channels, H = W, batch): VGG's and ResNet's last stages and AlexNet's 13x13 layers at small batches
SMALL_TILE_SHAPES = [(512, 7, 1), (512, 7, 2), (512, 7, 4), (256, 7, 2), (384, 13, 1), (256, 14, 1), (128, 14, 1)]
# The forward's paths, by the test hooks (tiles >= 0: Winograd on every geometry of that many tiles).
PATHS = {"direct": (1 << 40, 0), "F(4x4)": (0, 4), "F(2x2)": (0, 2), "default": (-1, 0)}


def with_winograd(fn, allowed):
    def run():
        cnnops.backends.cpu.allow_winograd = allowed
        return fn()

    return run


def runners(conv, x, w, grad_out):
    def forward():
        with torch.no_grad():
            return conv(x, w, None, padding=1)

    def forward_backward():
        y = conv(x, w, None, padding=1)
        return torch.autograd.grad(y, (x, w), grad_out)

    return forward, forward_backward


def on_path(fn, path):
    min_tiles, tile = PATHS[path]

    def run():
        _C._set_cpu_winograd_min_tiles(min_tiles)
        _C._set_cpu_winograd_tile(tile)
        return fn()

    return run


def default_path(x, w):
    """Which path the size rules give the forward of x and w."""
    _C._set_cpu_winograd_min_tiles(-1)
    _C._set_cpu_winograd_tile(0)
    calls, small = _C._cpu_winograd_calls(), _C._cpu_winograd_small_tile_calls()
    with torch.no_grad():
        CF.conv2d(x, w, None, padding=1)
    if _C._cpu_winograd_small_tile_calls() > small:
        return "F(2x2)"
    return "F(4x4)" if _C._cpu_winograd_calls() > calls else "direct"


def small_tile_table(args, layouts):
    paths = list(PATHS)
    print("| layer | batch | layout | pass | torch ms | " + " | ".join(f"{p} ms" for p in paths) +
          " | default path | torch/default |")
    print("|" + " --- |" * (7 + len(paths)))
    gen = torch.Generator().manual_seed(0)
    for c, hw, batch in SMALL_TILE_SHAPES:
        for channels_last in layouts:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.randn(batch, c, hw, hw, generator=gen).contiguous(memory_format=fmt).requires_grad_()
            w = (torch.randn(c, c, 3, 3, generator=gen) * (9 * c) ** -0.5).contiguous(memory_format=fmt)
            w.requires_grad_()
            grad_out = torch.randn(x.shape, generator=gen).contiguous(memory_format=fmt)
            chosen = default_path(x, w)
            fwd_t, fb_t = runners(F.conv2d, x, w, grad_out)
            fwd_c, fb_c = runners(CF.conv2d, x, w, grad_out)
            for mode, ft, fc in (("fwd", fwd_t, fwd_c), ("fwd+bwd", fb_t, fb_c)):
                fns = [ft] + [on_path(fc, p) for p in paths]
                for fn in fns:
                    fn()
                times = common.compare_times(fns, args.min_run_time, rounds=3)
                _C._set_cpu_winograd_min_tiles(-1)
                _C._set_cpu_winograd_tile(0)
                print(f"| {c}ch {hw}x{hw} | {batch} | {'NHWC' if channels_last else 'NCHW'} | {mode} | "
                      + " | ".join(f"{t * 1e3:.2f}" for t in times)
                      + f" | {chosen} | {times[0] / times[-1]:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--layout", choices=["nchw", "nhwc", "both"], default="nchw")
    parser.add_argument("--shapes", default=None, help="comma-separated channel counts to run")
    parser.add_argument("--force", action="store_true", help="Winograd on every shape, past the size rules")
    parser.add_argument("--small-tiles", action="store_true", help="the small-map table (see above)")
    args = parser.parse_args()
    if args.force:
        _C._set_cpu_winograd_min_tiles(0)
    torch.set_num_threads(args.threads)
    layouts = {"nchw": [False], "nhwc": [True], "both": [False, True]}[args.layout]
    if args.small_tiles:
        print(f"threads {args.threads}, isa {common.cnnops_cpu_isa()}")
        return small_tile_table(args, layouts)
    shapes = [s for s in SHAPES if args.shapes is None or str(s[0]) in args.shapes.split(",")]
    print(f"threads {args.threads}, batch {args.batch}, isa {common.cnnops_cpu_isa()}")
    header = ("| layer | layout | pass | torch ms | cnnops direct ms | cnnops winograd ms | torch/direct "
              "| torch/winograd |")
    print(header)
    print("|" + " --- |" * 8)
    gen = torch.Generator().manual_seed(0)
    for c, hw in shapes:
        for channels_last in layouts:
            x = torch.randn(args.batch, c, hw, hw, generator=gen)
            w = torch.randn(c, c, 3, 3, generator=gen) * (9 * c) ** -0.5
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
                w = w.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            w.requires_grad_()
            grad_out = torch.randn(x.shape, generator=gen).contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format)

            fwd_t, fb_t = runners(F.conv2d, x, w, grad_out)
            fwd_c, fb_c = runners(CF.conv2d, x, w, grad_out)
            for mode, ft, fc in (("fwd", fwd_t, fwd_c), ("fwd+bwd", fb_t, fb_c)):
                fns = [ft, with_winograd(fc, False), with_winograd(fc, True)]
                for fn in fns:
                    fn()
                t_torch, t_direct, t_wino = common.compare_times(fns, args.min_run_time, rounds=3)
                cnnops.backends.cpu.allow_winograd = True
                print(f"| {c}ch {hw}x{hw} | {'NHWC' if channels_last else 'NCHW'} | {mode} | {t_torch * 1e3:.2f} "
                      f"| {t_direct * 1e3:.2f} | {t_wino * 1e3:.2f} | {t_torch / t_direct:.2f} "
                      f"| {t_torch / t_wino:.2f} |", flush=True)


if __name__ == "__main__":
    main()
