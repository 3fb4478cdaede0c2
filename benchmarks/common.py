"""Helpers shared by the cnnops benchmarks: timing, environment metadata, tables, result files.

Every benchmark times cnnops and torch in the same process on the same tensors and reports
ratio = torch_time / cnnops_time (above 1 means cnnops is faster).
"""
import datetime
import json
import os
import platform
import re
import statistics
import subprocess

import torch
from torch.utils import benchmark


def _timer(fn):
    # The Timer synchronizes the accelerator around each block; it runs with the process's
    # thread count (its default of 1 thread would understate a multi-core CPU).
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def median_time(fn, min_run_time):
    """Median seconds per call of ``fn()``, from torch.utils.benchmark's blocked_autorange."""
    return _timer(fn).blocked_autorange(min_run_time=min_run_time).median


def compare_times(fns, min_run_time, rounds=2):
    """Median seconds per call of each of ``fns``, measured in ``rounds`` alternating turns of
    min_run_time / rounds each, so a change in machine load affects all of them alike."""
    timers = [_timer(fn) for fn in fns]
    times = [[] for _ in fns]
    for _ in range(rounds):
        for timer, acc in zip(timers, times):
            acc.extend(timer.blocked_autorange(min_run_time=min_run_time / rounds).times)
    return [statistics.median(t) for t in times]


def device_slug(device):
    """'cpu', or the CUDA device name in lower case with dashes: 'nvidia-h100-80gb-hbm3'."""
    if torch.device(device).type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def cnnops_cpu_isa():
    """The GEMM micro-kernel the cnnops CPU kernels run: avx512, avx2 or portable."""
    import cnnops  # noqa: F401  (registers the ops)

    return torch.ops.cnnops.cpu_gemm_isa()


def _git_revision():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except Exception:
        return None


def _cpu_model():
    """The CPU's name and family/model (Linux /proc/cpuinfo), or platform.processor()."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        family = f" (family {info['cpu family']}, model {info['model']})" if "cpu family" in info else ""
        return info.get("model name", platform.processor()) + family
    except (OSError, ValueError, KeyError):
        return platform.processor() or None


def _cpu_caches():
    """Data and unified cache sizes of CPU 0 by level, from Linux sysfs ("L1d 48K, L2 1024K, L3 32768K")."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        parts = []
        for index in sorted(i for i in os.listdir(root) if i.startswith("index")):
            read = lambda name: open(os.path.join(root, index, name)).read().strip()  # noqa: E731
            if read("type") in ("Data", "Unified"):
                parts.append(f"L{read('level')}{'d' if read('type') == 'Data' else ''} {read('size')}")
        return ", ".join(parts) or None
    except OSError:
        return None


def _fma_peak_gflops():
    """One core's float32 FMA throughput on registers (cnnops' AVX-512 FMA loop), or None."""
    try:
        from cnnops import _C

        if cnnops_cpu_isa() != "avx512" or not hasattr(_C, "fma_peak_gflops"):
            return None
        return _C.fma_peak_gflops(200000, 3)
    except Exception:
        return None


def environment(device):
    """Metadata stored beside the numbers: versions, machine, threads, backend settings."""
    import cnnops

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "cnnops": getattr(cnnops, "__version__", None),
        "git": _git_revision(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": _cpu_model(),
        "cpu_caches": _cpu_caches(),
        "fma_peak_gflops_per_core": _fma_peak_gflops(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cnnops_cpu_isa": cnnops_cpu_isa(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            cnnops_has_cuda=bool(cnnops.has_cuda()),
        )
    return env


def environment_lines(env):
    """Human-readable environment summary, with the note on the physical limit."""
    lines = [f"torch {env['torch']}, cnnops {env['cnnops']} (git {env['git']}), {env['date']}",
             f"CPU capability {env['cpu_capability']}, {env['threads']} threads of "
             f"{env['cpu_count']} CPUs, cnnops CPU micro-kernel ISA: "
             f"{env['cnnops_cpu_isa'] or 'not exposed'}, load average {env['load_average_1min']:.2f} "
             "at start (other processes on the cores skew CPU timings, torch's OpenMP the most)",
             f"CPU {env.get('cpu_model')}, caches {env.get('cpu_caches')} (a session's machine may be another CPU: "
             "compare tables only where this line is the same)"]
    if "device_name" in env:
        lines.append(f"GPU {env['device_name']} (sm_{env['capability'].replace('.', '')}, "
                     f"{env['sm_count']} SMs), CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
                     f"cudnn.benchmark={env['cudnn_benchmark']}, "
                     f"cudnn.allow_tf32={env['cudnn_allow_tf32']} (applies to both)")
    peak = env.get("fma_peak_gflops_per_core")
    if peak:
        lines.append(f"Physical limit: FLOPs / the FMA peak, {peak:.0f} GFLOP/s on one core (cnnops' AVX-512 FMA "
                     f"loop on registers), so {peak * env['threads']:.0f} at {env['threads']} threads.")
    else:
        lines.append("Physical limit: FLOPs / the FMA peak, which is not measured on this CPU here; "
                     "compare GFLOP/s with the peak of the hardware above.")
    return lines


def fmt_time(seconds):
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_num(value, spec=".3g"):
    return "-" if value is None else format(value, spec)


def markdown_table(columns, rows):
    """columns: list of (header, function row -> str); rows: list of dicts."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += [markdown_row(columns, row) for row in rows]
    return "\n".join(lines)


def markdown_row(columns, row):
    return "| " + " | ".join(f(row) for _, f in columns) + " |"


def median_ratios(rows, group_keys):
    """Median of row['ratio'] per group (a tuple of the group_keys values); skips failed rows."""
    groups = {}
    for row in rows:
        if row.get("ratio") is not None:
            groups.setdefault(tuple(row[k] for k in group_keys), []).append(row["ratio"])
    return {key: statistics.median(values) for key, values in groups.items()}


def write_results(out_dir, name, payload, markdown):
    """Write <out_dir>/<name>.json (payload) and <out_dir>/<name>.md (markdown); returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    for path, text in ((json_path, json.dumps(payload, indent=1) + "\n"), (md_path, markdown + "\n")):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # a run killed mid-write leaves the previous complete file
    return json_path, md_path


def copy_bandwidth(device, nbytes=256 * 2**20, min_run_time=0.5):
    """The machine's copy bandwidth in GB/s: bytes read plus bytes written by dst.copy_(src) on
    a buffer far larger than the caches. Memory-bound kernels (pooling, normalization) quote
    their GB/s beside it."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), min_run_time)
    return 2 * nbytes / seconds / 1e9


def gbps(nbytes, seconds):
    """GB/s for a kernel that must move nbytes (each input read once, each output written once)."""
    return nbytes / seconds / 1e9 if seconds else None


def make_parser(description):
    """The command line every benchmark takes."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", default=["float32"],
                        choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="short min_run_time (noisier)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per case and pass (default 1.0 CPU / 0.2 CUDA, --quick 0.1 / 0.05)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--filter", default=None, help="only cases whose name contains this")
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def resolve_run(parser, args):
    """(device, min_run_time, dtypes) from make_parser's arguments; a CUDA run needs a GPU and
    cnnops' CUDA kernels, and lets cuDNN pick its best algorithm per shape, for fairness."""
    import cnnops

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device")
        if not cnnops.has_cuda():
            parser.error("--device cuda: cnnops was built without CUDA kernels")
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True
    min_run_time = args.min_run_time
    if min_run_time is None:
        min_run_time = (0.05 if args.quick else 0.2) if device.type == "cuda" else (0.1 if args.quick else 1.0)
    return device, min_run_time, [getattr(torch, d) for d in args.dtype]


def select(parser, args, items, name=lambda item: item.name):
    """The items whose name contains --filter (all without one); none is a usage error."""
    chosen = [item for item in items if not args.filter or args.filter in name(item)]
    if not chosen:
        parser.error(f"--filter {args.filter!r} matches nothing")
    return chosen


def correctness_line(rows):
    """'correctness: K rows ok, M failed', naming each failed row on a line of its own."""
    bad = [r for r in rows if r["check"] in ("MISMATCH", "ERROR")]
    return (f"correctness: {len(rows) - len(bad)} rows ok, {len(bad)} failed"
            + "".join(f"\n  {r['check']}: {r['case']} {r['layout']} {r['dtype']} {r['mode']}"
                      f" rel {fmt_num(r['max_rel_diff'], '.2g')} {r['error'] or ''}" for r in bad))


def run_suite(benchmark, name, out_dir, header, columns, summary_lines, measure, cases, dtypes, device, env):
    """Measures every (dtype, case) with measure(case, dtype) -> rows, printing each row as it
    comes and rewriting <out_dir>/<name>.json and .md after every case, so a run cut short by a
    timeout keeps what it measured. Returns the rows."""
    print("\n".join(header), flush=True)
    print(markdown_table(columns, []), flush=True)
    rows, paths = [], ()
    for dtype in dtypes:
        for case in cases:
            for row in measure(case, dtype):
                rows.append(row)
                print(markdown_row(columns, row), flush=True)
            summary = summary_lines(rows)
            payload = dict(benchmark=benchmark, environment=env, summary=summary, rows=rows,
                           median_ratio={f"{d} {m}": v for (d, m), v in median_ratios(rows, ("dtype", "mode")).items()})
            markdown = "\n".join(header + [markdown_table(columns, rows), ""] + [f"- {line}" for line in summary])
            paths = write_results(out_dir, name, payload, markdown)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\n" + "\n".join(summary_lines(rows)))
    print("wrote " + " and ".join(paths))
    return rows


def memory_bound_columns(layout=lambda r: r["layout"], extra=()):
    """Table columns of a memory-bound benchmark (pooling, normalization): times, the ratio,
    GB/s of both sides beside the copy bandwidth, then `extra` and the correctness check."""
    return [
        ("case", lambda r: r["case"]),
        ("layout", layout),
        ("dtype", lambda r: r["dtype"]),
        ("pass", lambda r: r["mode"]),
        ("torch", lambda r: fmt_time(r["torch_s"])),
        ("cnnops", lambda r: fmt_time(r["cnnops_s"])),
        ("torch/cnnops", lambda r: fmt_num(r["ratio"], ".2f")),
        ("torch GB/s", lambda r: fmt_num(r["torch_gbps"], ".1f")),
        ("cnnops GB/s", lambda r: fmt_num(r["cnnops_gbps"], ".1f")),
        ("copy GB/s", lambda r: fmt_num(r["copy_gbps"], ".1f")),
        *extra,
        ("check", lambda r: r["check"] if not r["error"] else f"ERROR {r['error'][:60]}"),
    ]
