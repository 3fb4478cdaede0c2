"""Error of the Winograd path and of the direct path against a float64 reference, on the 3x3
stride-1 layers of benchmarks/bench_conv.py (batch 8, float32, N(0, 1) input, weights scaled by
1/sqrt(fan_in) as a trained layer's are). Forward output, grad_input (the stride-1 input
gradient is a forward convolution, so it runs Winograd too) and grad_weight (its own transforms).

    python3 -m benchmarks.winograd_error [--batch 8]

max abs: max |got - ref|; max rel: max |got - ref| / max |ref|. The "winograd" rows force the path
on every shape (at batch 8 the size rules take all four; 256 and 512 channels stream U), F(4x4, 3x3);
"winograd F(2x2)" the forward and grad input with F(2x2, 3x3) (the size rules' choice for small maps at
small batches; grad weight has F(4x4) only).
"""
import argparse

import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional as CF
from cnnops import _C

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def errors(got, ref):
    d = (got.double() - ref).abs().max().item()
    return d, d / ref.abs().max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    _C._set_cpu_winograd_min_tiles(0)  # every 3x3 stride-1 layer, whatever its size
    print("| layer | output | path | max abs | max rel |")
    print("| --- | --- | --- | --- | --- |")
    for c, hw in SHAPES:
        x = torch.randn(args.batch, c, hw, hw, generator=gen)
        w = torch.randn(c, c, 3, 3, generator=gen) * (9 * c) ** -0.5
        go = torch.randn(args.batch, c, hw, hw, generator=gen)
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
        ref = F.conv2d(xd, wd, None, padding=1)
        ref_dx, ref_dw = torch.autograd.grad(ref, (xd, wd), go.double())
        for path, allowed, tile in (("direct", False, 0), ("winograd", True, 4), ("winograd F(2x2)", True, 2)):
            _C._set_cpu_winograd_tile(tile)
            with cnnops.backends.cpu.flags(allow_winograd=allowed):
                xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
                y = CF.conv2d(xf, wf, None, padding=1)
                dx, dw = torch.autograd.grad(y, (xf, wf), go)
            outputs = [("forward", y.detach(), ref.detach()), ("grad_input", dx, ref_dx), ("grad_weight", dw, ref_dw)]
            for name, got, r in outputs[:2] if tile == 2 else outputs:
                a, rel = errors(got, r)
                print(f"| {c}ch {hw}x{hw} | {name} | {path} | {a:.2e} | {rel:.2e} |", flush=True)


if __name__ == "__main__":
    main()
