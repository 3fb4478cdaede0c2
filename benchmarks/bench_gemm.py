"""The CPU GEMM (csrc/cpu/gemm.h) against torch.mm on convolution-shaped products, timed in the
same run on the same tensors.

    python -m benchmarks.bench_gemm [--threads 1] [--quick] [--dtype float32 ...]
                                    [--out benchmarks/results] [--filter SUBSTRING]

C[M, N] = A[M, K] * B[K, N], row-major, as a convolution lays them out: M output channels, K input
channels times taps, N output positions. cnnops runs cnnops._C.gemm (variant 'packed': A and B
packed on every call, C written in place) on the calling thread, the GEMM being serial (the
convolutions split it between threads); torch.mm(a, b, out=c) runs with --threads (default 1, the
per-core comparison). FLOPs = 2 M N K. Results: <out>/gemm_<device>.json and .md.
"""
import dataclasses

import torch

from . import common

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}  # max |cnnops - torch| / max |torch|


@dataclasses.dataclass
class Case:
    name: str
    m: int
    k: int
    n: int

    @property
    def flops(self):
        return 2 * self.m * self.k * self.n


def suite():
    shapes = [  # (what it is, M, K, N)
        ("r50 1x1 64->256 56x56 b1", 256, 64, 3136),
        ("r50 1x1 256->64 56x56 b1", 64, 256, 3136),
        ("r50 1x1 512->128 28x28 b1", 128, 512, 784),
        ("r50 1x1 1024->256 14x14 b1", 256, 1024, 196),
        ("r50 3x3 512 7x7 b8", 512, 4608, 392),
        ("256x256 N4096", 256, 256, 4096),
        ("r50 3x3 64 56x56 b1", 64, 576, 3136),
        ("r50 1x1 512->2048 7x7 b8", 2048, 512, 392),
        ("r50 3x3 256 14x14 b1", 256, 2304, 196),
        ("stem 7x7 112x112 b1", 64, 147, 12544),
        ("r50 1x1 2048->512 7x7 b1", 512, 2048, 49),
        ("conv 3x3 3->16 112x112", 16, 27, 12544),
    ]
    return [Case(f"{name} ({m}x{k}x{n})", m, k, n) for name, m, k, n in shapes]


def run_case(case, dtype, min_run_time):
    from cnnops import _C

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(case.m, case.k, dtype=dtype, generator=gen)
    b = torch.randn(case.k, case.n, dtype=dtype, generator=gen)
    c_torch = torch.empty(case.m, case.n, dtype=dtype)
    c_cnnops = torch.empty(case.m, case.n, dtype=dtype)
    row = dict(case=case.name, m=case.m, k=case.k, n=case.n, dtype=str(dtype).replace("torch.", ""), mode="fwd",
               torch_s=None, cnnops_s=None, torch_gflops=None, cnnops_gflops=None, ratio=None, max_rel_diff=None,
               check="-", error=None)

    def run_torch():
        torch.mm(a, b, out=c_torch)

    def run_cnnops():
        _C.gemm(a, b, c_cnnops, None, False, 0, -1, "none", "packed", True)

    try:
        run_torch()
        run_cnnops()
        rel = ((c_cnnops.double() - c_torch.double()).abs().max() / c_torch.double().abs().max()).item()
        row.update(max_rel_diff=rel, check="ok" if rel <= TOLERANCE[dtype] else "MISMATCH")
        t_torch, t_cnnops = common.compare_times([run_torch, run_cnnops], min_run_time)
        row.update(torch_s=t_torch, cnnops_s=t_cnnops, ratio=t_torch / t_cnnops,
                   torch_gflops=case.flops / t_torch / 1e9, cnnops_gflops=case.flops / t_cnnops / 1e9)
    except Exception as exc:  # keep going: one failing case must not hide the others
        row.update(check="ERROR", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return [row]


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("dtype", lambda r: r["dtype"]),
    ("torch", lambda r: common.fmt_time(r["torch_s"])),
    ("cnnops", lambda r: common.fmt_time(r["cnnops_s"])),
    ("torch GF/s", lambda r: common.fmt_num(r["torch_gflops"], ".0f")),
    ("cnnops GF/s", lambda r: common.fmt_num(r["cnnops_gflops"], ".0f")),
    ("torch/cnnops", lambda r: common.fmt_num(r["ratio"], ".2f")),
    ("check", lambda r: r["check"] if not r["error"] else f"ERROR {r['error'][:60]}"),
]


def summary_lines(rows):
    lines = [f"median torch/cnnops {dtype}: {med:.2f}x"
             for (dtype,), med in sorted(common.median_ratios(rows, ("dtype",)).items())]
    bad = [r for r in rows if r["check"] in ("MISMATCH", "ERROR")]
    lines.append(f"correctness: {len(rows) - len(bad)} rows ok, {len(bad)} failed"
                 + "".join(f"\n  {r['check']}: {r['case']} {r['dtype']} {r['error'] or ''}" for r in bad))
    return lines


def micro_kernel_line(seconds=3.0):
    """The float32 micro-kernel alone with its panels in L1 (cnnops._C.gemm_micro_kernel) beside
    the FMA throughput on registers, best of alternating trials for `seconds` (AVX-512 only)."""
    import time

    from cnnops import _C

    if _C.gemm_spec()["name"] != "avx512":
        return None
    best = {}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for name, fn in (("peak", lambda: _C.fma_peak_gflops(200000, 1)),
                         ("8x32", lambda: _C.gemm_micro_kernel(False, 256, 1000, 1)["gflops"]),
                         ("wide", lambda: _C.gemm_micro_kernel(True, 256, 700, 1)["gflops"])):
            best[name] = max(best.get(name, 0.0), fn())
    wide_mr = _C.gemm_micro_kernel(True, 8, 1, 1)["mr"]
    return (f"micro-kernel alone, panels in L1, kc 256 (best of {seconds:g} s): "
            f"{_C.gemm_spec()['mr']}x32 {best['8x32']:.0f} GF/s, {wide_mr}x32 (gemm_shifted_a_packed_b) "
            f"{best['wide']:.0f} GF/s; FMA peak on registers {best['peak']:.0f} GF/s.")


def main(argv=None):
    parser = common.make_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(threads=1)
    args = parser.parse_args(argv)
    device, min_run_time, dtypes = common.resolve_run(parser, args)
    if device.type != "cpu":
        parser.error("--device: the GEMM benchmark is CPU only")
    dtypes = [d for d in dtypes if d in TOLERANCE] or parser.error("--dtype: float32 or float64")
    cases = common.select(parser, args, suite())
    env = common.environment(device)
    env["min_run_time"] = min_run_time
    header = ["# cnnops CPU GEMM vs torch.mm", ""]
    header += [f"- {line}" for line in common.environment_lines(env)[:-1]]
    header += ["- C = A * B, A M x K, B K x N, row-major; cnnops._C.gemm packs A and B on every call and runs "
               "on one thread; torch.mm(out=c) on the threads above.",
               "- Median time of torch.utils.benchmark blocked_autorange, torch and cnnops alternating in 2 "
               f"turns, min_run_time {min_run_time} s in all. torch/cnnops > 1: cnnops faster. GF/s = 2MNK / time.",
               "- check: max |cnnops - torch| / max |torch| within the dtype's tolerance."]
    micro = micro_kernel_line()
    header += ([f"- {micro}"] if micro else []) + [""]
    common.run_suite("gemm", "gemm_" + common.device_slug(device), args.out, header, COLUMNS, summary_lines,
                     lambda case, dtype: run_case(case, dtype, min_run_time), cases, dtypes, device, env)


if __name__ == "__main__":
    main()
