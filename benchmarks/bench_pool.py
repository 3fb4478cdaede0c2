"""Pooling benchmark: cnnops.functional pools against torch.nn.functional, timed in the same run
on the same tensors (same dtype and memory layout).

    python -m benchmarks.bench_pool [--device cpu|cuda] [--dtype float32 ...] [--quick]
                                    [--out benchmarks/results] [--filter SUBSTRING]

The suite, at ResNet's first-stage size N=32, C=64, 56x56, NCHW and channels_last: the stem max
pool 3x3 stride 2 padding 1, max pool 2x2 stride 2, average pool 2x2 stride 2, global average
pool (adaptive, output 1) and adaptive max pool to 7x7; each forward (under torch.no_grad) and
forward+backward (forward, then torch.autograd.grad for the input).

GB/s counts the bytes that must move: forward reads the input and writes the output;
forward+backward also reads grad_output and writes grad_input, and for the max pools writes the
int64 indices in the forward and reads them back in the backward. The machine's copy bandwidth
(bytes read plus written by a large tensor copy) is quoted beside it: the physical limit of these
memory-bound ops. Results: <out>/pool_<device>.json and .md.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional

from . import common

# Relative error allowed (max |cnnops - torch| / max |torch|, per tensor) before a row is flagged.
# Max pools must agree exactly (values and, through the gradient, argmax positions).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass
class Case:
    name: str
    op: str  # a torch.nn.functional / cnnops.functional name
    kwargs: dict
    n: int = 32
    c: int = 64
    hw: int = 56
    channels_last: bool = False

    @property
    def is_max(self):
        return "max" in self.op

    def shape(self):
        return f"{self.n}x{self.c}x{self.hw}x{self.hw}"


def suite():
    cases = [
        Case("stem max 3x3 s2 p1", "max_pool2d", dict(kernel_size=3, stride=2, padding=1)),
        Case("max 2x2 s2", "max_pool2d", dict(kernel_size=2, stride=2)),
        Case("avg 2x2 s2", "avg_pool2d", dict(kernel_size=2, stride=2)),
        Case("global avg", "adaptive_avg_pool2d", dict(output_size=1)),
        Case("adaptive max 7", "adaptive_max_pool2d", dict(output_size=7)),
    ]
    return [dataclasses.replace(c, channels_last=cl) for cl in (False, True) for c in cases]


def make_input(case, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((case.n, case.c, case.hw, case.hw), generator=gen).to(device=device, dtype=dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


def runners(pool, case, x, grad_out):
    """(forward, forward+backward) callables of one implementation."""

    def forward():
        with torch.no_grad():
            return pool(x, **case.kwargs)

    def forward_backward():
        y = pool(x, **case.kwargs)
        return y.detach(), torch.autograd.grad(y, x, grad_out)[0]

    return forward, forward_backward


def max_rel_error(got, ref):
    """max over tensors of max |got - ref| / max |ref| (inf on a shape mismatch)."""
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    err = 0.0
    for g, r in zip(got, ref, strict=True):
        if g.shape != r.shape:
            return math.inf
        d = (g.double() - r.double()).abs().max().item() if g.numel() else 0.0
        err = max(err, d / max(r.double().abs().max().item() if r.numel() else 0.0, 1e-30))
    return err


def bytes_moved(case, x, y, mode):
    """Bytes that must move (see the module docstring)."""
    elem = x.element_size()
    fwd = (x.numel() + y.numel()) * elem
    if mode == "fwd":
        return fwd
    indices = 2 * y.numel() * 8 if case.is_max else 0
    return fwd + (y.numel() + x.numel()) * elem + indices


def run_case(case, dtype, device, min_run_time, copy_gbps):
    x = make_input(case, dtype, device)
    pool_t = getattr(F, case.op)
    pool_c = getattr(cnnops.functional, case.op)
    with torch.no_grad():
        y = pool_t(x, **case.kwargs)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    if case.channels_last:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    fwd_t, fb_t = runners(pool_t, case, x, grad_out)
    fwd_c, fb_c = runners(pool_c, case, x, grad_out)
    rows = []
    for mode, fn_t, fn_c in (("fwd", fwd_t, fwd_c), ("fwd+bwd", fb_t, fb_c)):
        nbytes = bytes_moved(case, x, y, mode)
        row = dict(case=case.name, shape=case.shape(), layout="channels_last" if case.channels_last else "contiguous",
                   dtype=str(dtype).replace("torch.", ""), mode=mode, mbytes=nbytes / 1e6,
                   torch_s=None, cnnops_s=None, torch_gbps=None, cnnops_gbps=None, copy_gbps=copy_gbps,
                   ratio=None, max_rel_diff=None, check="-", error=None)
        try:
            got, ref = fn_c(), fn_t()
            err = max_rel_error(got, ref)
            tol = 0.0 if case.is_max and mode == "fwd" else TOLERANCE[dtype]
            # outputs keep the input's memory format (torch's grad_input may be an expanded view)
            out = got[0] if isinstance(got, tuple) else got
            layout = torch.channels_last if case.channels_last else torch.contiguous_format
            fmt_ok = out.is_contiguous(memory_format=layout)
            row.update(max_rel_diff=err, check="ok" if err <= tol and fmt_ok else "MISMATCH")
            t_torch, t_cnnops = common.compare_times([fn_t, fn_c], min_run_time)
            row.update(torch_s=t_torch, cnnops_s=t_cnnops, torch_gbps=common.gbps(nbytes, t_torch),
                       cnnops_gbps=common.gbps(nbytes, t_cnnops), ratio=t_torch / t_cnnops)
        except Exception as exc:  # keep going: one failing case must not hide the others
            row.update(check="ERROR", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        rows.append(row)
    return rows


COLUMNS = common.memory_bound_columns(
    layout=lambda r: "NHWC" if r["layout"] == "channels_last" else "NCHW",
    extra=[("max rel diff", lambda r: common.fmt_num(r["max_rel_diff"], ".2g"))],
)


def summary_lines(rows):
    lines = []
    for (dtype, mode), med in sorted(common.median_ratios(rows, ("dtype", "mode")).items()):
        lines.append(f"median torch/cnnops {dtype} {mode}: {med:.2f}x")
    for (dtype, layout), med in sorted(common.median_ratios(rows, ("dtype", "layout")).items()):
        lines.append(f"median torch/cnnops {dtype} {layout}: {med:.2f}x")
    for (dtype,), med in sorted(common.median_ratios(rows, ("dtype",)).items()):
        lines.append(f"median torch/cnnops {dtype}, whole suite: {med:.2f}x")
    lines.append(common.correctness_line(rows))
    return lines


def main(argv=None):
    parser = common.make_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    device, min_run_time, dtypes = common.resolve_run(parser, args)
    cases = common.select(parser, args, suite())

    env = common.environment(device)
    env["min_run_time"] = min_run_time
    copy_gbps = common.copy_bandwidth(device, min_run_time=max(min_run_time, 0.2))
    env["copy_gbps"] = copy_gbps
    header = ["# cnnops pooling vs torch", ""]
    header += [f"- {line}" for line in common.environment_lines(env)[:-1]]
    header += [f"- Copy bandwidth (bytes read + written by a 256 MiB tensor copy): {copy_gbps:.3g} GB/s, "
               "the limit for these memory-bound ops.",
               "- Median time of torch.utils.benchmark blocked_autorange, torch and cnnops alternating "
               f"in 2 turns, min_run_time {min_run_time} s in all. torch/cnnops > 1: cnnops faster.",
               "- GB/s: bytes that must move / time. fwd: input + output; fwd+bwd adds grad_output + "
               "grad_input, and 2x the int64 indices for max pools. fwd runs under no_grad.",
               "- cnnops runs the user-facing cnnops.functional API; max rel diff: against torch in the "
               "same dtype (max pools must match exactly).", ""]
    common.run_suite("pool", "pool_" + common.device_slug(device), args.out, header, COLUMNS, summary_lines,
                     lambda case, dtype: run_case(case, dtype, device, min_run_time, copy_gbps),
                     cases, dtypes, device, env)


if __name__ == "__main__":
    main()
