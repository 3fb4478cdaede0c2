"""Whole-model benchmark: torchvision models (weights=None) with torch.nn against the same models
after cnnops.convert, torch and cnnops interleaved in one run.

    python -m benchmarks.bench_models [--models resnet18 ...] [--cases eval1 eval8 train8]
                                      [--layouts contiguous channels_last] [--quick] [--rounds R]
                                      [--min-run-time S] [--threads N] [--out benchmarks/results]
    python -m benchmarks.bench_models --profile MODEL [--profile-case eval8|eval1|train8]
                                      [--profile-layout contiguous|channels_last]

Cases, float32 at 224x224, each in NCHW and channels_last (model and input, as model.to does):
- eval1, eval8: eval mode under torch.no_grad(), batch 1 and 8; three variants: torch, cnnops
  (cnnops.convert of a copy) and cnnops fused (cnnops.convert(cnnops.fuse_conv_bn(model))).
- train8: one training step at batch 8 (forward, cross-entropy loss, backward, SGD with momentum),
  train mode; two variants: torch and cnnops (converted copy, same initial parameters).

Every variant is first checked against torch: eval logits (max abs diff / max |torch logits|
above EVAL_TOLERANCE: MISMATCH), and for train8 the loss and every parameter gradient of the
first step from the same parameters, dropout off (max over parameters of max abs diff / max
|torch grad| above TRAIN_TOLERANCE). Then the variants of a case are timed in alternating turns
(torch.utils.benchmark Timer.timeit, each turn a block of calls lasting at least BLOCK_S), so
load from other processes hits them alike; median and minimum per call are reported. Only the
ops cnnops converts (conv, pooling, normalization) change; linear layers, activations, adds
and the optimizer are torch's in every variant.

Results: <out>/models_<device>.json and .md, rewritten after each model; ratio = torch time /
cnnops time (above 1: cnnops faster).

--profile MODEL: torch.profiler per-op self CPU time of torch and cnnops for one model and case
(the "profile of the worst model"), written to <out>/models_profile_<model>_<device>.md.
"""
import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

import cnnops

from . import common

MODELS = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
          "convnext_tiny", "densenet121", "regnet_y_400mf")
CASES = ("eval1", "eval8", "train8")
LAYOUTS = ("contiguous", "channels_last")
IMAGE = (3, 224, 224)
NUM_CLASSES = 1000
# Relative to max |torch logits| / max |torch grad|: float32 rounding through 20-150 layers
# (bench_fuse uses 1e-4 for ResNet-18's logits; training adds the backward's longer sums).
EVAL_TOLERANCE = 1e-4
TRAIN_TOLERANCE = 2e-3
BLOCK_S = 0.05  # a timed block of calls lasts at least this long (batch-1 forwards take ms)


def build_model(name, seed=0):
    """torchvision model `name`, weights=None, with batch norms away from the identity (random
    running statistics and affine parameters), so fusing really changes the weights."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                if m.affine:
                    m.weight.normal_(1, 0.1)
                    m.bias.normal_(0, 0.1)
    return model


def make_input(batch, layout, seed=1):
    x = torch.randn((batch,) + IMAGE, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def to_layout(model, layout):
    return model.to(memory_format=torch.channels_last) if layout == "channels_last" else model


def eval_variants(model, layout):
    """[(variant name, eval model)] for torch, cnnops and cnnops fused."""
    model = to_layout(copy.deepcopy(model), layout).eval()
    converted = cnnops.convert(copy.deepcopy(model))
    fused = to_layout(cnnops.convert(cnnops.fuse_conv_bn(model)), layout)
    return [("torch", model), ("cnnops", converted), ("cnnops fused", fused)]


def eval_step(model, x):
    def fn():
        with torch.no_grad():
            return model(x)
    return fn


class TrainStep:
    """forward + cross-entropy + backward + SGD step of one model on a fixed batch."""

    def __init__(self, model, x, target):
        self.model, self.x, self.target = model.train(), x, target
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def loss_and_grads(self):
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.target)
        loss.backward()
        return loss

    def __call__(self):
        self.loss_and_grads()
        self.opt.step()


def train_variants(model, layout, x):
    target = torch.randint(0, NUM_CLASSES, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    model = to_layout(copy.deepcopy(model), layout)
    converted = cnnops.convert(copy.deepcopy(model))
    return [("torch", TrainStep(model, x, target)), ("cnnops", TrainStep(converted, x, target))]


def check_eval(fns):
    """[(max abs diff, max rel diff, check)] of each variant's logits against torch's (fns[0])."""
    reference = fns[0]().double()
    scale = max(reference.abs().max().item(), 1e-30)
    out = []
    for fn in fns:
        diff = (fn().double() - reference).abs().max().item()
        out.append((diff, diff / scale, "ok" if diff <= EVAL_TOLERANCE * scale else "MISMATCH"))
    return out


def first_step(step):
    """(loss, [parameter gradients in float64]) of one step with dropout and stochastic depth
    off (their masks would depend on the dtype's sampling); no optimizer step."""
    from torchvision.ops import StochasticDepth

    random_layers = [m for m in step.model.modules()
                     if isinstance(m, (nn.modules.dropout._DropoutNd, StochasticDepth)) and m.training]
    for m in random_layers:
        m.eval()
    loss = step.loss_and_grads().item()
    grads = [p.grad.detach().double().clone() if p.grad is not None else None for p in step.model.parameters()]
    step.opt.zero_grad(set_to_none=True)
    for m in random_layers:
        m.train()
    return loss, grads


def train_error(result, reference):
    """(max abs diff, max rel diff) of a first step's loss and gradients against a reference's."""
    (loss, grads), (ref_loss, ref_grads) = result, reference
    # A gradient that is zero in exact arithmetic (the bias of a batch norm whose output feeds
    # another train-mode batch norm through a conv: its mean is subtracted again) is rounding
    # noise on both sides, so each parameter's scale is at least 1% of the largest gradient.
    floor = 1e-2 * max((r.abs().max().item() for r in ref_grads if r is not None and r.numel()), default=0.0)
    rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    abs_max = abs(loss - ref_loss)
    for g, r in zip(grads, ref_grads, strict=True):
        if (g is None) != (r is None):
            return float("inf"), float("inf")
        if r is not None and r.numel():
            d = (g - r).abs().max().item()
            abs_max = max(abs_max, d)
            rel = max(rel, d / max(r.abs().max().item(), floor, 1e-30))
    return abs_max, rel


def check_train(steps):
    """The first step's loss and parameter gradients against torch's, from identical parameters.
    Train-mode batch norms over few values (7x7 maps at batch 8) amplify float32 rounding, so a
    variant off by more than TRAIN_TOLERANCE is then compared with a float64 torch step: it is a
    MISMATCH only if its error against float64 is over twice torch's own float32 error. torch's
    error depends on its thread count (its reductions split by thread), so torch's error is the
    larger of its steps at the benchmark's thread count and at one thread: a lucky split of torch's
    must not make a cnnops variant of the same accuracy read MISMATCH."""
    results = [first_step(step) for step in steps]
    out = [train_error(r, results[0]) for r in results]
    checks = ["ok" if rel <= TRAIN_TOLERANCE else "?" for _, rel in out]
    if "?" in checks:
        ref = steps[0]
        exact = TrainStep(copy.deepcopy(ref.model).double(), ref.x.double(), ref.target)
        reference = first_step(exact)
        torch_error = train_error(results[0], reference)[1]
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
            try:
                torch_error = max(torch_error, train_error(first_step(ref), reference)[1])
            finally:
                torch.set_num_threads(threads)
        for i, r in enumerate(results):
            if checks[i] == "?":
                error = train_error(r, reference)[1]
                checks[i] = "ok (float64)" if error <= max(2 * torch_error, TRAIN_TOLERANCE) else "MISMATCH"
    return [(a, rel, check) for (a, rel), check in zip(out, checks, strict=True)]


def alternating_times(fns, min_run_time, min_rounds):
    """Seconds per call of each of `fns`: blocks of `number` calls (a block lasts >= BLOCK_S),
    the variants alternating block by block, until each has min_run_time of blocks and at least
    min_rounds of them."""
    per_call = []
    for fn in fns:  # warm-up call, which also sizes the blocks
        start = time.perf_counter()
        fn()
        per_call.append(time.perf_counter() - start)
    numbers = [max(1, int(BLOCK_S / max(t, 1e-6))) for t in per_call]
    timers = [benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for fn in fns]
    times = [[] for _ in fns]
    spent = [0.0 for _ in fns]
    rounds = 0
    while rounds < min_rounds or min(spent) < min_run_time:
        for i, (timer, number) in enumerate(zip(timers, numbers)):
            m = timer.timeit(number)
            times[i].append(m.median)
            spent[i] += m.median * number
        rounds += 1
    return times


def run_case(name, model, case, layout, min_run_time, min_rounds):
    batch = int(case[-1])
    x = make_input(batch, layout)
    train = case.startswith("train")
    variants = train_variants(model, layout, x) if train else \
        [(v, eval_step(m, x)) for v, m in eval_variants(model, layout)]
    rows = []
    for variant, _ in variants:
        rows.append({"model": name, "case": case, "mode": "train" if train else "eval", "batch": batch,
                     "layout": layout, "dtype": "float32", "variant": variant, "time_s": None, "min_s": None,
                     "runs": None, "ratio": None, "ratio_min": None, "max_abs_diff": None, "max_rel_diff": None,
                     "check": "-", "error": None})
    fns = [fn for _, fn in variants]
    try:
        checks = check_train(fns) if train else check_eval(fns)
    except Exception as exc:  # noqa: BLE001  (keep going: the other models still get measured)
        for row in rows:
            row.update(check="ERROR", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return rows
    for row, (abs_err, rel_err, check) in zip(rows, checks):
        row.update(max_abs_diff=abs_err, max_rel_diff=rel_err, check=check)
    for row, t in zip(rows, alternating_times(fns, min_run_time, min_rounds)):
        row.update(time_s=statistics.median(t), min_s=min(t), runs=len(t))
    for row in rows:
        row.update(ratio=rows[0]["time_s"] / row["time_s"], ratio_min=rows[0]["min_s"] / row["min_s"])
    return rows


COLUMNS = [
    ("model", lambda r: r["model"]),
    ("case", lambda r: f"{r['mode']} batch {r['batch']}"),
    ("layout", lambda r: "NHWC" if r["layout"] == "channels_last" else "NCHW"),
    ("variant", lambda r: r["variant"]),
    ("time (median)", lambda r: common.fmt_time(r["time_s"])),
    ("time (min)", lambda r: common.fmt_time(r["min_s"])),
    ("blocks", lambda r: common.fmt_num(r["runs"], "d")),
    ("torch/variant", lambda r: common.fmt_num(r["ratio"], ".2f")),
    ("torch/variant (min)", lambda r: common.fmt_num(r["ratio_min"], ".2f")),
    ("max rel diff", lambda r: common.fmt_num(r["max_rel_diff"], ".2g")),
    ("check", lambda r: r["check"] if not r["error"] else f"ERROR {r['error'][:60]}"),
]

SUMMARY_COLUMNS = ["model"] + [f"{c} {'NCHW' if lay == 'contiguous' else 'NHWC'}" for c in
                               ("eval1", "eval1 fused", "eval8", "eval8 fused", "train8") for lay in LAYOUTS]


def summary_table(rows):
    """One line per model: torch/cnnops per case and layout (the headline table)."""
    by = {(r["model"], r["case"], r["layout"], r["variant"]): r["ratio"] for r in rows if r["variant"] != "torch"}
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "|".join(" --- " for _ in SUMMARY_COLUMNS) + "|"]
    for model in models:
        cells = [model]
        for c in ("eval1", "eval1 fused", "eval8", "eval8 fused", "train8"):
            case, variant = (c.split()[0], "cnnops fused") if c.endswith("fused") else (c, "cnnops")
            for layout in LAYOUTS:
                cells.append(common.fmt_num(by.get((model, case, layout, variant)), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_lines(rows):
    lines = []
    ratios = {}
    for r in rows:
        if r["variant"] != "torch" and r["ratio"] is not None:
            ratios.setdefault((r["mode"], r["variant"]), []).append(r)
    for (mode, variant), rs in sorted(ratios.items()):
        values = [r["ratio"] for r in rs]
        worst = min(rs, key=lambda r: r["ratio"])
        below = sorted({f"{r['model']} {r['case']} {'NHWC' if r['layout'] == 'channels_last' else 'NCHW'}"
                        for r in rs if r["ratio"] < 1.0})
        lines.append(f"{mode} {variant}: median torch/cnnops {statistics.median(values):.2f}x over {len(values)} "
                     f"rows, worst {worst['ratio']:.2f}x ({worst['model']} {worst['case']} {worst['layout']}); "
                     f"{len(below)} below 1.0")
    lines.append(common.correctness_line([dict(r, case=f"{r['model']} {r['case']} {r['variant']}") for r in rows]))
    return lines


def header_lines(env, args):
    head = ["# cnnops whole models vs torch.nn (torchvision, weights=None)", ""]
    head += [f"- {line}" for line in common.environment_lines(env)]
    head += [(f"- float32, {IMAGE[1]}x{IMAGE[2]}. eval: eval mode under no_grad, cnnops = cnnops.convert(copy), "
             "cnnops fused = cnnops.convert(cnnops.fuse_conv_bn(model)). train: forward + cross-entropy + backward "
             "+ SGD(momentum 0.9) step in train mode, cnnops = cnnops.convert(copy) from the same parameters."),
             ("- NCHW / NHWC: model and input contiguous / channels_last. Linear layers, activations, adds and "
             "the optimizer are torch's in every variant."),
             (f"- Times per call: torch.utils.benchmark Timer.timeit blocks of >= {BLOCK_S} s, the variants of a "
             f"case alternating block by block, >= {args.rounds} blocks and >= {args.min_run_time} s each; median "
             "and minimum of the blocks. torch/variant > 1: cnnops faster."),
             (f"- check: eval logits within {EVAL_TOLERANCE} x max |torch logits|, train loss and every parameter "
             f"gradient of the first step within {TRAIN_TOLERANCE} x max |torch grad| of that parameter, at least "
             "1% of the largest (max rel diff); past it, 'ok (float64)' when cnnops' error against a float64 torch "
             "step is at most twice torch's own float32 error (the larger of torch's at these threads and at "
             "1 thread)."), ""]
    return head


def write(args, env, header, rows, device):
    summary = summary_lines(rows)
    table = summary_table(rows)
    payload = {"benchmark": "models", "environment": env, "summary": summary, "rows": rows}
    markdown = "\n".join(header + ["## torch/cnnops per model", ""] + table + [""]
                         + [f"- {line}" for line in summary] + ["", "## all rows", "",
                                                                 common.markdown_table(COLUMNS, rows)])
    return common.write_results(args.out, f"models_{common.device_slug(device)}", payload, markdown)


def profile(args, device):
    """Per-op self CPU time of torch and cnnops for one model and case."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    name, case, layout = args.profile, args.profile_case, args.profile_layout
    model = build_model(name)
    batch = int(case[-1])
    x = make_input(batch, layout)
    if case.startswith("train"):
        variants = train_variants(model, layout, x)
    else:
        variants = [(v, eval_step(m, x)) for v, m in eval_variants(model, layout) if v != "cnnops fused"]
    lines = [f"# per-op self CPU time: {name} {case} {layout}, torch vs cnnops", ""]
    env = common.environment(device)
    lines += [f"- {line}" for line in common.environment_lines(env)]
    lines += [f"- torch.profiler over {args.profile_steps} calls after 2 warm-up calls; self CPU time per call.", ""]
    totals = {}
    for variant, fn in variants:
        for _ in range(2):
            fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                fn()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / args.profile_steps
        totals[variant] = total
        lines += [f"## {variant}: {total / 1e3:.1f} ms self CPU per call", "",
                  "| op | calls per step | self CPU per step | share |", "| --- | --- | --- | --- |"]
        for e in events[:args.profile_top]:
            per = e.self_cpu_time_total / args.profile_steps
            lines.append(f"| {e.key} | {e.count // args.profile_steps} | {per / 1e3:.2f} ms | {per / total:.1%} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"models_profile_{name}_{common.device_slug(device)}.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    print("wrote " + path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="MODEL")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--quick", action="store_true", help="fewer blocks (noisier)")
    parser.add_argument("--rounds", type=int, default=None, help="minimum blocks per variant (default 5, --quick 2)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="minimum seconds of blocks per variant and case (default 0.6, --quick 0.1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--profile", choices=MODELS, default=None, help="profile one model instead")
    parser.add_argument("--profile-case", choices=CASES, default="eval8")
    parser.add_argument("--profile-layout", choices=LAYOUTS, default="contiguous")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--profile-top", type=int, default=25)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.profile:
        return profile(args, device)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.min_run_time = args.min_run_time if args.min_run_time is not None else (0.1 if args.quick else 0.6)

    env = common.environment(device)
    env.update(min_run_time=args.min_run_time, rounds=args.rounds, models=args.models, cases=args.cases,
               layouts=args.layouts)
    header = header_lines(env, args)
    print("\n".join(header), flush=True)
    print(common.markdown_table(COLUMNS, []), flush=True)
    rows, paths, start = [], (), time.perf_counter()
    for name in args.models:
        model = build_model(name)
        for case in args.cases:
            for layout in args.layouts:
                for row in run_case(name, model, case, layout, args.min_run_time, args.rounds):
                    rows.append(row)
                    print(common.markdown_row(COLUMNS, row), flush=True)
        env["elapsed_s"] = round(time.perf_counter() - start, 1)
        env["load_average_1min_end"] = os.getloadavg()[0]
        paths = write(args, env, header, rows, device)
    print("\n" + "\n".join(summary_table(rows) + [""] + summary_lines(rows)))
    print(f"elapsed {time.perf_counter() - start:.0f} s; wrote " + " and ".join(paths))


if __name__ == "__main__":
    main()
