"""A short convolution showcase until the full demo lands: one ResNet-50 layer (3x3, 64
channels, 56x56, batch 8) run by torch and by cnnops, same result, both timings.

    python -m cnnops.demo
"""
import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import cnnops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() and cnnops.has_cuda() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.batch, 64, 56, 56, device=args.device)
    conv = cnnops.nn.Conv2d(64, 64, 3, padding=1, device=args.device)
    reference = torch.nn.Conv2d(64, 64, 3, padding=1, device=args.device)
    reference.load_state_dict(conv.state_dict())  # same parameters, same state_dict keys

    with torch.no_grad():
        ours, theirs = conv(x), reference(x)
    flops = 2 * ours.numel() * 64 * 9
    print(f"cnnops {cnnops.__version__} on {args.device} ({torch.get_num_threads()} threads): "
          f"conv 3x3, 64 channels, {args.batch}x64x56x56")
    print(f"largest difference from torch.nn.Conv2d: {(ours - theirs).abs().max().item():.2e}")
    for name, module in (("torch ", reference), ("cnnops", conv)):
        timer = benchmark.Timer("with torch.no_grad(): m(x)", globals={"m": module, "x": x, "torch": torch},
                                num_threads=torch.get_num_threads())  # Timer's default is one thread
        t = timer.blocked_autorange(min_run_time=1.0).median
        print(f"{name}  {t * 1e3:7.2f} ms  {flops / t / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
