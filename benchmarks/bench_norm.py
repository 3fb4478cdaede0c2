"""Normalization benchmark: cnnops.functional batch/instance/group/layer norm against
torch.nn.functional, timed in the same run on the same tensors (same dtype and memory layout).

    python -m benchmarks.bench_norm [--device cpu|cuda] [--dtype float32 ...] [--quick]
                                    [--out benchmarks/results] [--filter SUBSTRING]

The suite (issue 4): at N=32, C=64, 56x56, NCHW and channels_last, batch norm (training, with
running statistics), instance norm, group norm (32 groups, affine) and layer norm (NCHW: over
(C, H, W) with elementwise affine; channels_last: ConvNeXt-style, over C of an (N, H, W, C)
tensor), plus layer norm over the rows of a (4096, 1024) matrix; each forward (under no_grad)
and forward+backward (torch.autograd.grad for input, weight and bias).

GB/s counts the bytes that must move: forward reads x and writes y (2 tensors); forward+backward
adds reading dy and x and writing dx (5 tensors in all). Parameters and statistics are small and
not counted. The machine's copy bandwidth (dst.copy_(src), read + write) is the physical limit
to compare with. Results: <out>/norm_<device>.json and .md.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional

from . import common

# max |cnnops - torch| / max |torch| per tensor before a row is flagged (both round to the same
# dtype; gradients sum up to 1e5 values).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclasses.dataclass
class Case:
    name: str
    layout: str  # "NCHW", "NHWC" (channels_last) or "rows"
    shape: tuple

    def numel(self):
        return math.prod(self.shape)


N, C, HW = 32, 64, 56


def suite():
    cases = []
    for name in ("batch norm", "instance norm", "group norm 32", "layer norm"):
        for layout in ("NCHW", "NHWC"):
            shape = (N, HW, HW, C) if (name == "layer norm" and layout == "NHWC") else (N, C, HW, HW)
            cases.append(Case(name, layout, shape))
    cases.append(Case("layer norm 4096x1024", "rows", (4096, 1024)))
    return cases


def make_inputs(case, dtype, device):
    """x (leaf), parameters (leaves), the call for a given functional module, and grad_output."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    x = randn(*case.shape)
    if case.layout == "NHWC" and case.name != "layer norm":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = randn(*case.shape)
    if case.layout == "NHWC" and case.name != "layer norm":
        dy = dy.contiguous(memory_format=torch.channels_last)
    if case.name.startswith("layer norm"):
        ns = tuple(case.shape[1:]) if case.layout == "NCHW" else (case.shape[-1],)
        params = [randn(*ns), randn(*ns)]
    elif case.name == "instance norm":
        params = []  # nn.InstanceNorm2d's default: affine=False, no running statistics
    else:
        params = [randn(C), randn(C)]
    return x, params, dy


def call(mod, case, x, params, state):
    if case.name == "batch norm":
        return mod.batch_norm(x, state["rm"], state["rv"], params[0], params[1], training=True)
    if case.name == "instance norm":
        return mod.instance_norm(x)
    if case.name == "group norm 32":
        return mod.group_norm(x, 32, params[0], params[1])
    ns = tuple(case.shape[1:]) if case.layout == "NCHW" else (case.shape[-1],)
    return mod.layer_norm(x, ns, params[0], params[1])


def runners(mod, case, x, params, dy, device):
    state = dict(rm=torch.zeros(C, device=device, dtype=x.dtype), rv=torch.ones(C, device=device, dtype=x.dtype))
    leaves = [x] + params

    def forward():
        with torch.no_grad():
            return call(mod, case, x, params, state)

    def forward_backward():
        y = call(mod, case, x, params, state)
        return (y.detach(),) + torch.autograd.grad(y, leaves, dy)

    return forward, forward_backward


def max_rel_error(got, ref):
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    err = 0.0
    for g, r in zip(got, ref, strict=True):
        if g.shape != r.shape:
            return math.inf
        d = (g.double() - r.double()).abs().max().item() if g.numel() else 0.0
        err = max(err, d / max(r.double().abs().max().item() if r.numel() else 0.0, 1e-30))
    return err


def run_case(case, dtype, device, min_run_time, copy_gbps):
    x, params, dy = make_inputs(case, dtype, device)
    x.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)
    fwd_t, fb_t = runners(F, case, x, params, dy, device)
    fwd_c, fb_c = runners(cnnops.functional, case, x, params, dy, device)
    elem = x.element_size() * case.numel()
    rows = []
    for mode, fn_t, fn_c, tensors in (("fwd", fwd_t, fwd_c, 2), ("fwd+bwd", fb_t, fb_c, 5)):
        row = dict(case=case.name, layout=case.layout, shape="x".join(map(str, case.shape)),
                   dtype=str(dtype).replace("torch.", ""), mode=mode, gbytes=tensors * elem / 1e9,
                   torch_s=None, cnnops_s=None, cnnops_gbps=None, torch_gbps=None, copy_gbps=copy_gbps,
                   ratio=None, max_rel_diff=None, check="-", error=None)
        try:
            rel = max_rel_error(fn_c(), fn_t())
            row.update(max_rel_diff=rel, check="ok" if rel <= TOLERANCE[dtype] else "MISMATCH")
            t_torch, t_cnnops = common.compare_times([fn_t, fn_c], min_run_time)
            row.update(torch_s=t_torch, cnnops_s=t_cnnops, ratio=t_torch / t_cnnops,
                       cnnops_gbps=common.gbps(tensors * elem, t_cnnops),
                       torch_gbps=common.gbps(tensors * elem, t_torch))
        except Exception as exc:  # keep going: one failing case must not hide the others
            row.update(check="ERROR", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        rows.append(row)
    return rows


COLUMNS = common.memory_bound_columns()


def summary_lines(rows):
    lines = []
    for (dtype, mode), med in sorted(common.median_ratios(rows, ("dtype", "mode")).items()):
        lines.append(f"median torch/cnnops {dtype} {mode}: {med:.2f}x")
    for (dtype,), med in sorted(common.median_ratios(rows, ("dtype",)).items()):
        lines.append(f"median torch/cnnops {dtype} over the suite: {med:.2f}x")
    lines.append(common.correctness_line(rows))
    return lines


def main(argv=None):
    parser = common.make_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    device, min_run_time, dtypes = common.resolve_run(parser, args)
    cases = common.select(parser, args, suite())

    env = common.environment(device)
    env["min_run_time"] = min_run_time
    copy_gbps = common.copy_bandwidth(device)
    env["copy_gbps"] = copy_gbps
    header = ["# cnnops normalization vs torch", ""]
    header += [f"- {line}" for line in common.environment_lines(env)[:-1]]
    header += [f"- Physical limit: copy bandwidth {copy_gbps:.1f} GB/s (dst.copy_(src) of 256 MiB, read + write).",
               "- Median time of torch.utils.benchmark blocked_autorange, torch and cnnops alternating "
               f"in 2 turns, min_run_time {min_run_time} s in all. torch/cnnops > 1: cnnops faster.",
               "- GB/s: fwd moves x and y (2 tensors), fwd+bwd also dy, x, dx (5); fwd runs under no_grad. "
               "N=32, C=64, 56x56; layer norm NHWC is ConvNeXt-style over C of an (N, H, W, C) tensor.",
               "- check: max |cnnops - torch| / max |torch| per tensor (output and grads) within "
               "the dtype's tolerance.", ""]
    common.run_suite("norm", "norm_" + common.device_slug(device), args.out, header, COLUMNS, summary_lines,
                     lambda case, dtype: run_case(case, dtype, device, min_run_time, copy_gbps),
                     cases, dtypes, device, env)


if __name__ == "__main__":
    main()
