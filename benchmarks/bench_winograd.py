"""Winograd F(4x4, 3x3) against the direct path and torch (oneDNN) on the CPU: the 3x3 stride-1
ResNet layers of benchmarks/bench_conv.py (batch 8, float32), forward and forward+backward, with
cnnops.backends.cpu.allow_winograd on and off, timed in alternating turns (common.compare_times).

    python3 -m benchmarks.bench_winograd [--threads 2] [--min-run-time 2] [--layout both]

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--layout", choices=["nchw", "nhwc", "both"], default="nchw")
    parser.add_argument("--shapes", default=None, help="comma-separated channel counts to run")
    parser.add_argument("--force", action="store_true", help="Winograd on every shape, past the size rules")
    args = parser.parse_args()
    if args.force:
        _C._set_cpu_winograd_min_tiles(0)
    torch.set_num_threads(args.threads)
    layouts = {"nchw": [False], "nhwc": [True], "both": [False, True]}[args.layout]
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
