"""Per-call cost: tiny tensors, where the fixed cost of a call (Python, dispatcher, autograd
recording, thread-pool launch, allocation) is the whole cost.

    python -m benchmarks.bench_percall [--quick] [--threads N] [--filter SUBSTRING] [--out DIR]

Each case runs through cnnops.functional and torch.nn.functional on the same tensors, in three
passes: forward under no_grad, forward with inputs that require grad (autograd records the
graph), and forward + backward (torch.autograd.grad of every input). The table reports
cnnops time / torch time (below 1: cnnops is cheaper); the goal is a median of at most 1.2 and
no row above 1.5. Results: <out>/percall_cpu.json and .md.
"""
import dataclasses
import statistics

import torch
import torch.nn.functional as F

import cnnops.functional as CF

from . import common


@dataclasses.dataclass
class Case:
    name: str
    shape: tuple
    params: tuple  # shapes of the parameter tensors
    call: object  # call(functional module, x, *params)


def _batch_norm_eval(M, x, w, b, rm, rv):
    return M.batch_norm(x, rm, rv, w, b, training=False)


CASES = [
    Case("conv 3x3, 1x8x4x4 -> 8", (1, 8, 4, 4), ((8, 8, 3, 3), (8,)), lambda M, x, w, b: M.conv2d(x, w, b, 1, 1)),
    Case("conv 1x1 (SE), 1x64x1x1 -> 16", (1, 64, 1, 1), ((16, 64, 1, 1), (16,)), lambda M, x, w, b: M.conv2d(x, w, b)),
    Case("max pool 3x3 s2 p1, 1x8x4x4", (1, 8, 4, 4), (), lambda M, x: M.max_pool2d(x, 3, 2, 1)),
    Case("adaptive avg pool 1, 1x64x7x7", (1, 64, 7, 7), (), lambda M, x: M.adaptive_avg_pool2d(x, 1)),
    Case("batch norm eval, 1x8x4x4", (1, 8, 4, 4), ((8,), (8,), "running_mean", "running_var"), _batch_norm_eval),
    Case("layer norm (8,), 1x4x4x8", (1, 4, 4, 8), ((8,), (8,)), lambda M, x, w, b: M.layer_norm(x, (8,), w, b)),
    Case("group norm 2, 1x8x4x4", (1, 8, 4, 4), ((8,), (8,)), lambda M, x, w, b: M.group_norm(x, 2, w, b)),
]

MODES = ("forward, no_grad", "forward, recording", "forward+backward")


def make_inputs(case):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=gen)
    params = []
    for shape in case.params:
        if shape == "running_mean":
            params.append(torch.zeros(case.shape[1]))
        elif shape == "running_var":
            params.append(torch.ones(case.shape[1]))
        else:
            params.append(torch.randn(shape, generator=gen))
    return x, params


def make_call(module, case, mode, x, params):
    trainable = [x] + [p for p, s in zip(params, case.params) if not isinstance(s, str)]
    if mode == "forward, no_grad":
        def run():
            with torch.no_grad():
                return case.call(module, x, *params)
        return run
    leaves = [t.detach().requires_grad_() for t in trainable]
    by_id = dict(zip(map(id, trainable), leaves))
    args = [by_id.get(id(p), p) for p in params]
    x_leaf = leaves[0]
    if mode == "forward, recording":
        return lambda: case.call(module, x_leaf, *args)

    def run():
        out = case.call(module, x_leaf, *args)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run


def measure(case, min_run_time):
    x, params = make_inputs(case)
    rows = []
    for mode in MODES:
        fns = [make_call(M, case, mode, x, params) for M in (CF, F)]
        expected = fns[1]()
        got = fns[0]()
        pairs = zip(got, expected) if isinstance(got, tuple) else [(got, expected)]
        ok = all(torch.allclose(g, e, rtol=1e-4, atol=1e-5) for g, e in pairs)
        cnnops_s, torch_s = common.compare_times(fns, min_run_time, rounds=4)
        rows.append(dict(case=case.name, mode=mode, cnnops_s=cnnops_s, torch_s=torch_s,
                         ratio=cnnops_s / torch_s, check="ok" if ok else "MISMATCH"))
    return rows


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("pass", lambda r: r["mode"]),
    ("torch", lambda r: common.fmt_time(r["torch_s"])),
    ("cnnops", lambda r: common.fmt_time(r["cnnops_s"])),
    ("cnnops/torch", lambda r: common.fmt_num(r["ratio"], ".2f")),
    ("check", lambda r: r["check"]),
]


def main():
    parser = common.make_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    device, min_run_time, _ = common.resolve_run(parser, args)
    if device.type != "cpu":
        parser.error("the per-call table is a CPU benchmark")
    env = common.environment(device)
    cases = common.select(parser, args, CASES)
    header = ["# Per-call cost: cnnops.functional / torch.nn.functional on tiny tensors (CPU, float32)", ""]
    header += common.environment_lines(env)[:2] + [""]
    rows = []
    print("\n".join(header))
    print(common.markdown_table(COLUMNS, []))
    for case in cases:
        for row in measure(case, min_run_time):
            rows.append(row)
            print(common.markdown_row(COLUMNS, row), flush=True)
    ratios = [r["ratio"] for r in rows]
    summary = [f"median cnnops/torch {statistics.median(ratios):.2f}, worst {max(ratios):.2f} "
               f"({max(rows, key=lambda r: r['ratio'])['case']}, {max(rows, key=lambda r: r['ratio'])['mode']}); "
               "goal: median <= 1.2, none above 1.5"]
    for mode in MODES:
        summary.append(f"{mode}: median {statistics.median(r['ratio'] for r in rows if r['mode'] == mode):.2f}")
    markdown = "\n".join(header + [common.markdown_table(COLUMNS, rows), ""] + [f"- {s}" for s in summary])
    paths = common.write_results(args.out, "percall_cpu", dict(benchmark="percall", environment=env,
                                                                summary=summary, rows=rows), markdown)
    print("\n" + "\n".join(summary))
    print("wrote " + " and ".join(paths))


if __name__ == "__main__":
    main()
