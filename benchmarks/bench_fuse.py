"""Conv-BN fusion benchmark: a ResNet-18-shaped network in eval mode, batch 8, 3x224x224,
run three ways in the same process on the same input.

    python -m benchmarks.bench_fuse [--device cpu|cuda] [--quick] [--min-run-time S]
                                    [--out benchmarks/results] [--filter contiguous|channels_last]

- torch:          the torch.nn model (eager).
- cnnops unfused: cnnops.convert(copy.deepcopy(model)): every conv, batch norm and pool runs in
                  cnnops, the batch norms as separate passes over the activations.
- cnnops fused:   cnnops.convert(cnnops.fuse_conv_bn(model)): each conv + batch norm (+ ReLU)
                  is one cnnops convolution with bias and a ReLU output step.

The fc layer, the residual adds and the ReLUs after them are torch ops in all three. Each
variant is first checked against torch (max abs diff of the logits; MISMATCH above
TOLERANCE * max |torch logits|), then the three are timed under torch.no_grad() with
torch.utils.benchmark (num_threads = torch.get_num_threads()), alternating in four turns;
median and minimum times are reported (on a shared machine the minimum is the least disturbed).
Results: <out>/fuse_<device>.json and .md; ratio = torch time / cnnops time (above 1: cnnops
faster).
"""
import copy
import os
import statistics

import torch
import torch.nn as nn
from torch.utils import benchmark

import cnnops

from . import common

BATCH, IMAGE = 8, (3, 224, 224)
# Relative to max |logits|: a few float32 ulps per layer over 20 layers, as in bench_conv.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
LAYOUTS = ("contiguous", "channels_last")


# ---------------------------------------------------------------------------------------------
# ResNet-18 (He et al. 2016), written out so the benchmark needs no torchvision
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_model(seed=0):
    """ResNet-18 in eval mode with trained-looking batch norms: running statistics and affine
    parameters away from the identity, so each fold really changes the weights."""
    torch.manual_seed(seed)
    model = ResNet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return model.eval()


def conv_fc_flops(model, x):
    """2 * MACs of the convolutions and the fc layer for one forward (hooks on a dry run)."""
    total = [0]

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            total[0] += 2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total[0] += 2 * out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def variants(model):
    """(name, model) for torch, cnnops unfused and cnnops fused, plus the fusion report."""
    unfused = cnnops.convert(copy.deepcopy(model))
    fused, report = cnnops.fuse_conv_bn(model, report=True)
    fused = cnnops.convert(fused)
    return [("torch", model), ("cnnops unfused", unfused), ("cnnops fused", fused)], report


def run_layout(layout, dtype, device, min_run_time):
    model = make_model().to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((BATCH,) + IMAGE, generator=gen).to(device=device, dtype=dtype)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    models, report = variants(model)
    flops = conv_fc_flops(model, x)

    def forward(m):
        def fn():
            with torch.no_grad():
                return m(x)
        return fn

    fns = [forward(m) for _, m in models]
    reference = fns[0]()  # torch's logits (also a warm-up)
    scale = reference.abs().max().item()
    rows = []
    for (name, _), fn in zip(models, fns):
        row = dict(case="resnet18", layout=layout, dtype=str(dtype).replace("torch.", ""), mode="fwd",
                   variant=name, batch=BATCH, gflop=flops / 1e9, time_s=None, min_s=None, runs=None,
                   gflops=None, ratio=None, ratio_min=None, max_abs_diff=None, max_rel_diff=None, check="-", error=None)
        try:
            diff = (fn().double() - reference.double()).abs().max().item()
            row.update(max_abs_diff=diff, max_rel_diff=diff / scale,
                       check="ok" if diff <= TOLERANCE[dtype] * scale else "MISMATCH")
        except Exception as exc:  # keep going: the other variants still get measured
            row.update(check="ERROR", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        print(f"correctness {layout} {name}: max abs diff vs torch {row['max_abs_diff']} "
              f"(max |logit| {scale:.3g}) {row['check']}", flush=True)
        rows.append(row)

    ok = [i for i, r in enumerate(rows) if r["error"] is None]
    for i, times in zip(ok, alternating_times([fns[i] for i in ok], min_run_time)):
        rows[i].update(time_s=statistics.median(times), min_s=min(times), runs=len(times),
                       gflops=flops / statistics.median(times) / 1e9)
    first = rows[0]
    for r in rows:
        if r.get("time_s") and first.get("time_s"):
            r.update(ratio=first["time_s"] / r["time_s"], ratio_min=first["min_s"] / r["min_s"])
    return rows, report


def alternating_times(fns, min_run_time, rounds=4):
    """Seconds per call of each of ``fns`` (every blocked_autorange block), in ``rounds``
    alternating turns so that a burst of load from other processes hits all of them alike.
    (common.compare_times, keeping every time: the minimum is reported beside the median,
    as the run least disturbed on a shared machine.)"""
    timers = [benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for fn in fns]
    times = [[] for _ in fns]
    for _ in range(rounds):
        for timer, acc in zip(timers, times):
            acc.extend(timer.blocked_autorange(min_run_time=min_run_time / rounds).times)
    return times


COLUMNS = [
    ("model", lambda r: f"{r['case']} batch {r['batch']}"),
    ("layout", lambda r: "NHWC" if r["layout"] == "channels_last" else "NCHW"),
    ("dtype", lambda r: r["dtype"]),
    ("variant", lambda r: r["variant"]),
    ("time (median)", lambda r: common.fmt_time(r["time_s"])),
    ("time (min)", lambda r: common.fmt_time(r.get("min_s"))),
    ("GFLOP/s", lambda r: common.fmt_num(r["gflops"])),
    ("torch/variant", lambda r: common.fmt_num(r["ratio"], ".2f")),
    ("torch/variant (min)", lambda r: common.fmt_num(r.get("ratio_min"), ".2f")),
    ("max abs diff vs torch", lambda r: common.fmt_num(r["max_abs_diff"], ".2g")),
    ("check", lambda r: r["check"] if not r["error"] else f"ERROR {r['error'][:60]}"),
]


def summary_lines(rows):
    lines = []
    by = {(r["layout"], r["variant"]): r for r in rows}
    for layout in LAYOUTS:
        for key, what in (("time_s", "medians"), ("min_s", "minima")):
            t, u, f = (by.get((layout, v), {}).get(key) for v in ("torch", "cnnops unfused", "cnnops fused"))
            if t and u and f:
                lines.append(f"{layout} ({what}): torch/cnnops unfused {t / u:.2f}x, torch/cnnops fused "
                             f"{t / f:.2f}x, fusion speed-up (unfused/fused) {u / f:.2f}x")
    lines.append(common.correctness_line(rows))
    return lines


def main(argv=None):
    parser = common.make_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    device, min_run_time, dtypes = common.resolve_run(parser, args)
    if args.min_run_time is None:  # one forward is ~0.1-1 s: time longer than the per-op suites
        min_run_time = (1.0 if args.quick else 4.0) if device.type == "cpu" else min_run_time
    layouts = common.select(parser, args, LAYOUTS, name=str)

    env = common.environment(device)
    env["min_run_time"] = min_run_time
    header = ["# cnnops conv-BN fusion: ResNet-18 inference, torch vs cnnops unfused vs cnnops fused", ""]
    header += [f"- {line}" for line in common.environment_lines(env)]
    header += [f"- ResNet-18 (stem 7x7 s2 + BN + ReLU + max pool 3x3 s2, 4 stages of 2 basic blocks "
               f"64/128/256/512, adaptive avg pool, fc 1000) in eval mode, batch {BATCH}, "
               f"{'x'.join(map(str, IMAGE))}, under torch.no_grad().",
               "- unfused = cnnops.convert(deepcopy(model)); fused = cnnops.convert(cnnops.fuse_conv_bn(model)). "
               "fc, residual adds and the ReLUs after them are torch ops in all three.",
               f"- Median time of torch.utils.benchmark blocked_autorange, the three alternating in 4 turns, "
               f"min_run_time {min_run_time} s each; the minimum beside the median (the least disturbed run "
               "on a shared machine). torch/variant > 1: faster than torch.",
               "- GFLOP/s: 2 * MACs of the convolutions and the fc layer (the same count for all three).", ""]
    print("\n".join(header), flush=True)
    rows, reports = [], {}
    for dtype in dtypes:
        for layout in layouts:
            new_rows, report = run_layout(layout, dtype, device, min_run_time)
            rows += new_rows
            reports[layout] = str(report)
            for r in new_rows:
                print(common.markdown_row(COLUMNS, r), flush=True)
    env["load_average_1min_end"] = os.getloadavg()[0]
    summary = summary_lines(rows) + [f"load average (1 min) {env['load_average_1min']:.2f} at start, "
                                     f"{env['load_average_1min_end']:.2f} at the end"]
    fusion = next(iter(reports.values()), "").splitlines()[0] if reports else ""
    payload = dict(benchmark="fuse", environment=env, summary=summary, fusion=reports, rows=rows)
    markdown = "\n".join(header + [common.markdown_table(COLUMNS, rows), ""]
                         + [f"- {line}" for line in summary] + [f"- {fusion}"])
    paths = common.write_results(args.out, f"fuse_{common.device_slug(device)}", payload, markdown)
    print("\n" + "\n".join(summary))
    print(fusion)
    print("wrote " + " and ".join(paths))


if __name__ == "__main__":
    main()
