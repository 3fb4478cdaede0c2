"""Depthwise convolution on the CPU: torch vs cnnops in one run, torch.set_num_threads(2).

MobileNetV3 / EfficientNet / ConvNeXt depthwise layers at batch 8, NCHW and channels_last, forward and
forward + backward (grad input, weight and bias). Prints torch time / cnnops time per row
(above 1: cnnops faster) and the median.

    python3 -m benchmarks.bench_depthwise [--quick] [--rows fwd|all]
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import cnnops
import cnnops.functional

# (channels, size, kernel, stride): the depthwise layers of MobileNetV3 and EfficientNet-B0
SHAPES = [
    (16, 112, 3, 2),
    (32, 112, 3, 1),
    (72, 56, 3, 1),
    (144, 56, 3, 2),
    (96, 14, 5, 1),
    (240, 14, 5, 1),
    (576, 7, 5, 1),
    (240, 28, 5, 2),
    (672, 14, 5, 2),
    # ConvNeXt-T's 7x7 depthwise layers
    (96, 56, 7, 1),
    (192, 28, 7, 1),
    (384, 14, 7, 1),
    (768, 7, 7, 1),
]


def run(fn, min_run_time):
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"cnnops isa: {torch.ops.cnnops.cpu_gemm_isa()}, threads {args.threads}, batch {args.batch}")
    print(f"{'layer':28} {'layout':14} {'pass':8} {'torch ms':>9} {'cnnops ms':>9} {'ratio':>6}")
    ratios = {"fwd": [], "fwd+bwd": []}
    for (c, size, k, s) in SHAPES:
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(args.batch, c, size, size).contiguous(memory_format=layout)
            w = torch.randn(c, 1, k, k)
            b = torch.randn(c)
            p = k // 2
            fns = {"torch": lambda x, w, b, s=s, p=p, c=c: F.conv2d(x, w, b, s, p, 1, c),
                   "cnnops": lambda x, w, b, s=s, p=p, c=c: cnnops.functional.conv2d(x, w, b, s, p, 1, c)}
            for mode in ("fwd", "fwd+bwd"):
                times = {}
                for name, f in fns.items():
                    if mode == "fwd":
                        def fn(f=f, x=x, w=w, b=b):
                            with torch.no_grad():
                                f(x, w, b)
                    else:
                        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
                        go = torch.randn_like(f(x, w, b)).contiguous(memory_format=layout)

                        def fn(f=f, xg=xg, wg=wg, bg=bg, go=go):
                            torch.autograd.grad(f(xg, wg, bg), (xg, wg, bg), go)
                    times[name] = run(fn, args.min_run_time)
                ratio = times["torch"] / times["cnnops"]
                ratios[mode].append(ratio)
                name = f"{c}ch {size}x{size} {k}x{k} s{s}"
                lay = "channels_last" if layout == torch.channels_last else "NCHW"
                t_torch, t_cnnops = times['torch'] * 1e3, times['cnnops'] * 1e3
                print(f"{name:28} {lay:14} {mode:8} {t_torch:9.3f} {t_cnnops:9.3f} {ratio:6.2f}", flush=True)
    for mode, r in ratios.items():
        print(f"{mode}: median ratio {statistics.median(r):.2f}, min {min(r):.2f}")


if __name__ == "__main__":
    main()
