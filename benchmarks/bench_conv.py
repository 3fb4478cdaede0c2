"""Convolution benchmark: cnnops.functional.conv{1,2,3}d against torch.nn.functional, timed in
the same run on the same tensors (same dtype and memory layout).

    python -m benchmarks.bench_conv [--device cpu|cuda] [--dtype float32 ...] [--quick]
                                    [--out benchmarks/results] [--filter SUBSTRING]

The suite: the 3x3 and 1x1 convolutions of ResNet-50 at batch 8, depthwise 3x3, the strided
7x7 stem, one conv1d and one conv3d case, each forward and forward+backward; plus channels_last
variants of the 2d cases (all of them on CUDA, two on the CPU). Then depthwise 5x5 and stride-2
layers, squeeze-excitation 1x1 convolutions on 1x1 maps, ResNet-50's downsampling layers (3x3 and
1x1 stride 2), batch-1 layers ("b1 ..."), RegNet's grouped layers ("regnet ..."), first layers
("first 3x3 s2 3->16", "3->32": MobileNetV3's and EfficientNet's, no input gradient, batch 8 and 1),
and on the CPU channels_last (NDHWC for conv3d) variants of the first layers and of eleven more
cases.

Forward is timed under torch.no_grad(). Forward+backward is one forward and
torch.autograd.grad for input, weight and bias (no input gradient for the stem, whose input is
the image). FLOPs: forward = 2 * output numel * C_in/groups * kernel volume; forward+backward
adds the same again for grad_weight and for grad_input (when computed), i.e. 3x forward (2x
for the stem). Bias FLOPs are not counted. Results: <out>/<device>.json and <out>/<device>.md.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional

from . import common

# Relative error allowed (max |cnnops - torch| / max |torch|, per tensor) before a row is
# flagged. Both sides round to the same dtype, so these are a few units in its last place.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TF32_TOLERANCE = 5e-3  # float32 on CUDA with cudnn.allow_tf32 (both torch and cnnops use TF32)


@dataclasses.dataclass
class Case:
    name: str
    dims: int
    n: int
    cin: int
    cout: int
    spatial: tuple
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    bias: bool = False
    input_grad: bool = True
    channels_last: bool = False

    @property
    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, groups=self.groups)

    def out_spatial(self):
        return [(s + 2 * self.padding - self.kernel) // self.stride + 1 for s in self.spatial]

    def forward_flops(self):
        out_numel = self.n * self.cout * math.prod(self.out_spatial())
        return 2 * out_numel * (self.cin // self.groups) * self.kernel ** self.dims

    def shape(self):
        sp = "x".join(map(str, self.spatial))
        s = f"{self.cin}->{self.cout} {sp} k{self.kernel}"
        s += f" s{self.stride}" if self.stride != 1 else ""
        s += f" g{self.groups}" if self.groups != 1 else ""
        return s + (" +bias" if self.bias else "")


def suite(device):
    cases = []
    for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
        cases.append(Case(f"r50 3x3 {c}", 2, 8, c, c, (hw, hw), 3, padding=1))
    for cin, cout, hw in ((64, 256, 56), (256, 64, 56), (512, 128, 28), (1024, 256, 14)):
        cases.append(Case(f"r50 1x1 {cin}->{cout}", 2, 8, cin, cout, (hw, hw), 1))
    for c, hw in ((64, 56), (256, 28)):
        cases.append(Case(f"dw 3x3 {c}", 2, 8, c, c, (hw, hw), 3, padding=1, groups=c, bias=True))
    cases.append(Case("stem 7x7 s2", 2, 8, 3, 64, (224, 224), 7, stride=2, padding=3, input_grad=False))
    cases.append(Case("conv1d k9", 1, 8, 64, 64, (4096,), 9, padding=4, bias=True))
    cases.append(Case("conv3d 3x3x3", 3, 2, 32, 32, (16, 28, 28), 3, padding=1, bias=True))
    if device.type == "cuda":
        cl = [c for c in cases if c.dims == 2]
    else:  # the CPU suite must stay short: one 3x3 and one 1x1
        cl = [c for c in cases if c.name in ("r50 3x3 64", "r50 1x1 64->256")]
    cases += [dataclasses.replace(c, channels_last=True) for c in cl]
    # Issue 12's rows: MobileNet/EfficientNet depthwise layers (5x5, stride 2), the
    # squeeze-excitation 1x1 convolutions on 1x1 maps, batch 1, and more channels_last layers.
    more = [
        Case("dw 5x5 120", 2, 8, 120, 120, (28, 28), 5, padding=2, groups=120, bias=True),
        Case("dw 5x5 s2 144", 2, 8, 144, 144, (56, 56), 5, stride=2, padding=2, groups=144, bias=True),
        Case("dw 3x3 s2 96", 2, 8, 96, 96, (112, 112), 3, stride=2, padding=1, groups=96, bias=True),
        Case("se 1x1 576->144", 2, 8, 576, 144, (1, 1), 1, bias=True),
        Case("se 1x1 144->576", 2, 8, 144, 576, (1, 1), 1, bias=True),
        # ResNet-50's downsampling layers: the bottleneck's strided 3x3 and the strided 1x1 shortcut
        Case("r50 3x3 s2 128", 2, 8, 128, 128, (56, 56), 3, stride=2, padding=1),
        Case("r50 1x1 s2 512->1024", 2, 8, 512, 1024, (28, 28), 1, stride=2),
    ]
    batch1 = [
        Case("b1 r50 3x3 64", 2, 1, 64, 64, (56, 56), 3, padding=1),
        Case("b1 r50 3x3 512", 2, 1, 512, 512, (7, 7), 3, padding=1),
        Case("b1 r50 1x1 1024->256", 2, 1, 1024, 256, (14, 14), 1),
        Case("b1 r50 1x1 512->2048", 2, 1, 512, 2048, (7, 7), 1),
        Case("b1 se 1x1 576->144", 2, 1, 576, 144, (1, 1), 1, bias=True),
        Case("b1 dw 3x3 256", 2, 1, 256, 256, (28, 28), 3, padding=1, groups=256, bias=True),
        Case("b1 stem 7x7 s2", 2, 1, 3, 64, (224, 224), 7, stride=2, padding=3, input_grad=False),
    ]
    # RegNetY-400MF's grouped 3x3 layers (8 channels a group: the direct narrow-group kernels on the CPU)
    regnet = [
        Case("regnet g6 48", 2, 8, 48, 48, (56, 56), 3, padding=1, groups=6),
        Case("regnet g13 s2 104", 2, 8, 104, 104, (56, 56), 3, stride=2, padding=1, groups=13),
        Case("regnet g26 208", 2, 8, 208, 208, (14, 14), 3, padding=1, groups=26),
        Case("regnet g55 s2 440", 2, 8, 440, 440, (14, 14), 3, stride=2, padding=1, groups=55),
    ]
    # First layers of MobileNetV3 (3->16) and EfficientNet-B0 (3->32): 3x3 stride 2 on the image
    first = []
    for cout in (16, 32):
        for n in (8, 1):
            first.append(Case(f"{'b1 ' if n == 1 else ''}first 3x3 s2 3->{cout}", 2, n, 3, cout, (224, 224), 3,
                              stride=2, padding=1, input_grad=False))
    cases += more + batch1 + regnet + first
    if device.type != "cuda":  # the CUDA suite already has every 2d case in channels_last
        named = {c.name: c for c in cases}
        cases += [dataclasses.replace(named[n], channels_last=True) for n in
                  ("r50 3x3 512", "r50 1x1 1024->256", "dw 3x3 64", "stem 7x7 s2", "conv3d 3x3x3",
                   "b1 r50 3x3 512", "regnet g6 48", "regnet g13 s2 104", "b1 stem 7x7 s2", "r50 3x3 s2 128",
                   "r50 1x1 s2 512->1024")]
        cases += [dataclasses.replace(c, channels_last=True) for c in first]
    return cases


def memory_format(case):
    return torch.channels_last_3d if case.dims == 3 else torch.channels_last


def make_inputs(case, dtype, device, seed=0):
    """Input, weight, bias (None without bias) as leaves, drawn in float32 on the CPU then
    rounded; channels_last cases put input and weight in channels_last (as model.to does)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = randn(case.n, case.cin, *case.spatial)
    fan_in = case.cin // case.groups * case.kernel ** case.dims
    w = randn(case.cout, case.cin // case.groups, *([case.kernel] * case.dims), scale=fan_in ** -0.5)
    b = randn(case.cout) if case.bias else None
    if case.channels_last:
        x = x.contiguous(memory_format=memory_format(case))
        w = w.contiguous(memory_format=memory_format(case))
    x.requires_grad_(case.input_grad)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    return x, w, b


def runners(conv, case, x, w, b, grad_out):
    """(forward, forward+backward) callables of one implementation."""
    kwargs = case.kwargs
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]

    def forward():
        with torch.no_grad():
            return conv(x, w, b, **kwargs)

    def forward_backward():
        y = conv(x, w, b, **kwargs)
        return (y.detach(),) + torch.autograd.grad(y, leaves, grad_out)

    return forward, forward_backward


def max_errors(got, ref):
    """(max abs difference over all tensors, max over tensors of diff / max |ref|)."""
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    abs_err, rel_err = 0.0, 0.0
    for g, r in zip(got, ref, strict=True):
        if g.shape != r.shape:
            return math.inf, math.inf
        d = (g.double() - r.double()).abs().max().item()
        abs_err = max(abs_err, d)
        rel_err = max(rel_err, d / max(r.double().abs().max().item(), 1e-30))
    return abs_err, rel_err


def run_case(case, dtype, device, min_run_time):
    """Rows for forward and forward+backward of one case (time, GFLOP/s, ratio, error)."""
    x, w, b = make_inputs(case, dtype, device)
    conv_t = getattr(F, f"conv{case.dims}d")
    conv_c = getattr(cnnops.functional, f"conv{case.dims}d")
    with torch.no_grad():
        y = conv_t(x, w, b, **case.kwargs)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grad_out = grad_out.contiguous(memory_format=memory_format(case)) if case.channels_last else grad_out
    fwd_t, fb_t = runners(conv_t, case, x, w, b, grad_out)
    fwd_c, fb_c = runners(conv_c, case, x, w, b, grad_out)
    fwd_flops = case.forward_flops()
    tol = TOLERANCE[dtype]
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        tol = TF32_TOLERANCE
    rows = []
    for mode, fn_t, fn_c, flops in (("fwd", fwd_t, fwd_c, fwd_flops),
                                    ("fwd+bwd", fb_t, fb_c, fwd_flops * (2 + case.input_grad))):
        row = dict(case=case.name, shape=case.shape(), dims=case.dims, batch=case.n,
                   layout="channels_last" if case.channels_last else "contiguous",
                   dtype=str(dtype).replace("torch.", ""), mode=mode, gflop=flops / 1e9,
                   torch_s=None, cnnops_s=None, torch_gflops=None, cnnops_gflops=None,
                   ratio=None, max_abs_diff=None, max_rel_diff=None, check="-", error=None)
        try:
            abs_err, rel_err = max_errors(fn_c(), fn_t())  # also warms up (cudnn.benchmark)
            row.update(max_abs_diff=abs_err, max_rel_diff=rel_err,
                       check="ok" if rel_err <= tol else "MISMATCH")
            t_torch, t_cnnops = common.compare_times([fn_t, fn_c], min_run_time)
            row.update(torch_s=t_torch, cnnops_s=t_cnnops, torch_gflops=flops / t_torch / 1e9,
                       cnnops_gflops=flops / t_cnnops / 1e9, ratio=t_torch / t_cnnops)
        except Exception as exc:  # keep going: one failing case must not hide the others
            row.update(check="ERROR", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        rows.append(row)
    return rows


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("shape (batch)", lambda r: f"{r['shape']} ({r['batch']})"),
    ("layout", lambda r: "NHWC" if r["layout"] == "channels_last" else "NCHW"),
    ("dtype", lambda r: r["dtype"]),
    ("pass", lambda r: r["mode"]),
    ("torch", lambda r: common.fmt_time(r["torch_s"])),
    ("cnnops", lambda r: common.fmt_time(r["cnnops_s"])),
    ("torch GFLOP/s", lambda r: common.fmt_num(r["torch_gflops"])),
    ("cnnops GFLOP/s", lambda r: common.fmt_num(r["cnnops_gflops"])),
    ("torch/cnnops", lambda r: common.fmt_num(r["ratio"], ".2f")),
    ("max abs diff", lambda r: common.fmt_num(r["max_abs_diff"], ".2g")),
    ("check", lambda r: r["check"] if not r["error"] else f"ERROR {r['error'][:60]}"),
]


def summary_lines(rows):
    lines = []
    for (dtype, mode), med in sorted(common.median_ratios(rows, ("dtype", "mode")).items()):
        lines.append(f"median torch/cnnops {dtype} {mode}: {med:.2f}x")
    for mode, med in sorted(common.median_ratios(rows, ("mode",)).items()):
        lines.append(f"median torch/cnnops all dtypes {mode[0]}: {med:.2f}x")
    lines.append(common.correctness_line(rows))
    return lines


def main(argv=None):
    parser = common.make_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    device, min_run_time, dtypes = common.resolve_run(parser, args)
    cases = common.select(parser, args, suite(device))

    env = common.environment(device)
    env["min_run_time"] = min_run_time
    header = ["# cnnops convolution vs torch" + (" (cuDNN)" if device.type == "cuda" else ""), ""]
    header += [f"- {line}" for line in common.environment_lines(env)]
    header += ["- Median time of torch.utils.benchmark blocked_autorange, torch and cnnops alternating "
               f"in 2 turns, min_run_time {min_run_time} s in all. torch/cnnops > 1: cnnops faster.",
               "- GFLOP/s: fwd = 2 * out numel * C_in/groups * kernel volume; fwd+bwd = 3x fwd "
               "(grad_input + grad_weight), 2x for the stem (no grad_input). fwd runs under no_grad.",
               "- max abs diff: cnnops vs torch in the same dtype, max over output (and grads).", ""]
    common.run_suite("conv", common.device_slug(device), args.out, header, COLUMNS, summary_lines,
                     lambda case, dtype: run_case(case, dtype, device, min_run_time), cases, dtypes, device, env)


if __name__ == "__main__":
    main()
