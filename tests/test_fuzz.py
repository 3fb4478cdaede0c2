"""Bad-argument fuzzing of cnnops.functional and of every raw op (torch.ops.cnnops.*).

Arguments reach the extremes (0, 1, 2^31 +- 1, 2^62, 2^63 - 1, negative values, wrong list
lengths, empty and mismatched shapes, other dtypes). Every call runs in a worker process
(tests/fuzz_worker.py, restarted after a death), so a crash or a hang fails the test instead
of killing pytest. A public function's outcome must be torch's: the same exception type, or
results of the same shapes. Exceptions to that, each a stated rule below:
- cnnops raises NotImplementedError (a named gap) or MemoryError (a buffer torch does not need)
  where torch returns a result; cnnops' NotImplementedError for a non-floating dtype may also
  come before an error torch raises for another argument;
- torch's own size arithmetic overflows int64 (its outcome is then undefined: wrapped sizes,
  sometimes a crash of torch itself): cnnops must only not crash;
- torch crashes or hangs: cnnops must only not crash.
The raw ops have no twin: any Python exception is an acceptable outcome, a crash is not.

CNNOPS_FUZZ_EXAMPLES sets the examples per test (default 60 for CI; try 2000 locally) and
CNNOPS_FUZZ_SEED a random seed (default: hypothesis' derandomized, repeatable run).
"""
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cnnops  # noqa: E402

EXAMPLES = int(os.environ.get("CNNOPS_FUZZ_EXAMPLES", "60"))
SEED = os.environ.get("CNNOPS_FUZZ_SEED")
INT64_MAX = 2**63 - 1
CALL_TIMEOUT = float(os.environ.get("CNNOPS_FUZZ_TIMEOUT", "30"))

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=SEED is None,
    suppress_health_check=list(HealthCheck),
)
if SEED is not None:
    SETTINGS = settings(SETTINGS, derandomize=False)


class Worker:
    """One worker process; call() restarts it after a death or a timeout."""

    def __init__(self):
        self.proc = None
        self.stderr = tempfile.TemporaryFile()
        self.package_root = os.path.dirname(os.path.dirname(os.path.abspath(cnnops.__file__)))

    def start(self):
        self.stderr.seek(0)
        self.stderr.truncate()
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_worker.py")
        env = dict(os.environ)
        if "libasan" in env.get("LD_PRELOAD", ""):  # make sanitize: huge allocations fail, not abort
            env["ASAN_OPTIONS"] = (env.get("ASAN_OPTIONS", "")
                                   + ":max_allocation_size_mb=6144:allocator_may_return_null=1")
        self.proc = subprocess.Popen([sys.executable, worker, self.package_root], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stderr_tail(self):
        self.stderr.seek(0)
        return self.stderr.read()[-2000:].decode(errors="replace")

    def _read(self, n, timeout):
        data = b""
        while len(data) < n:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def call(self, request, timeout=CALL_TIMEOUT):
        """("ok", shapes) | ("err", type, message) | ("crash", detail) | ("timeout", detail)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        payload = pickle.dumps(request)
        try:
            self.proc.stdin.write(struct.pack("<I", len(payload)) + payload)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        header = self._read(4, timeout)
        body = None if header is None else self._read(struct.unpack("<I", header)[0], timeout)
        if body is not None:
            return pickle.loads(body)
        timed_out = self.proc.poll() is None
        self.stop()
        code = self.proc.returncode if self.proc is not None else None
        detail = f"returncode={code}; stderr:\n{self.stderr_tail()}"
        return ("timeout", detail) if timed_out else ("crash", detail)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------

EXTREMES = [0, 1, 2, 3, -1, -2, 2**31 - 1, 2**31, 2**31 + 1, 2**62, INT64_MAX, -(2**63)]
ints = st.one_of(st.integers(0, 4), st.sampled_from(EXTREMES))
small_ints = st.integers(0, 4)


def int_lists(dims):
    """An int, a list of the right length, or (sometimes) a wrong length."""
    return st.one_of(ints, st.lists(ints, min_size=dims, max_size=dims), st.lists(ints, min_size=0, max_size=4))


def tensor(shape, dtype="float32", kind="randn", channels_last=False, requires_grad=False):
    return ("tensor", tuple(shape), dtype, kind, channels_last, requires_grad)


dtypes = st.sampled_from(["float32"] * 6 + ["float64", "float16", "int64"])
sizes = st.one_of(st.sampled_from([0, 1, 2, 3, 5]), st.integers(0, 7))


@st.composite
def random_tensors(draw, max_rank=6, kind="randn"):
    shape = draw(st.lists(sizes, min_size=0, max_size=max_rank))
    return tensor(shape, draw(dtypes), kind, draw(st.booleans()), draw(st.booleans()))


@st.composite
def spatial_input(draw, dims, channels=None):
    """A mostly well-formed N x C x *spatial float tensor (rank and dtype sometimes off)."""
    n = draw(st.sampled_from([0, 1, 2]))
    c = channels if channels is not None else draw(st.sampled_from([0, 1, 2, 3]))
    spatial = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 6]), min_size=dims, max_size=dims))
    shape = [n, c] + spatial
    rank_change = draw(st.sampled_from([0] * 8 + [-1, -2, 1, -dims - 2]))
    if rank_change < 0:
        shape = shape[-rank_change:]
    elif rank_change > 0:
        shape = [1] + shape
    dtype = draw(st.sampled_from(["float32"] * 8 + ["float64", "int64"]))
    return tensor(shape, dtype, "randn", draw(st.booleans()), draw(st.booleans()))


# ---------------------------------------------------------------------------------------------
# torch's own arithmetic and the sizes worth running
# ---------------------------------------------------------------------------------------------

def _per_dim(value, dims):
    if isinstance(value, int):
        return [value] * dims
    value = list(value)
    if len(value) == 1:
        return value * dims
    return value if len(value) == dims else None


def window_sizes(in_sizes, kernel, stride, padding, dilation, ceil_mode=False):
    """Exact output sizes of a window op, and whether any of torch's int64 intermediates
    (in + 2p, d(k-1) + 1, products) leaves int64. None when the arguments are not per-dim lists."""
    dims = len(in_sizes)
    k, s, p, d = (_per_dim(v, dims) for v in (kernel, stride, padding, dilation))
    if None in (k, s, p, d):
        return None, False
    out, wraps = [], False
    for i in range(dims):
        if s[i] <= 0 or k[i] <= 0 or d[i] <= 0 or p[i] < 0:
            return None, False
        padded, extent = in_sizes[i] + 2 * p[i], d[i] * (k[i] - 1) + 1
        wraps |= padded > INT64_MAX or extent > INT64_MAX or padded - extent + s[i] > INT64_MAX
        span = padded - extent + (s[i] - 1 if ceil_mode else 0)
        o = span // s[i] + 1
        if ceil_mode and (o - 1) * s[i] >= in_sizes[i] + p[i]:
            o -= 1
        wraps |= (o - 1) * s[i] > INT64_MAX
        out.append(o)
    return out, wraps


def too_big(*counts):
    """A valid call this large would only measure the allocator: not run."""
    limit = 1 << 22
    total = 1
    for c in counts:
        if c is None:
            continue
        total = max(total, c)
    return total > limit


def prod(values):
    r = 1
    for v in values:
        r *= max(v, 0)
    return r


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------

ACCEPTED_GAPS = ("NotImplementedError", "MemoryError")


def check(worker, name, args, kwargs=None, twin=True, torch_wraps=False, backward=True):
    kwargs = kwargs or {}
    mine = worker.call(("cnnops", name, args, kwargs, backward))
    call = f"{name}(*{args!r}, **{kwargs!r})"
    assert mine[0] not in ("crash", "timeout"), f"cnnops {mine[0]}: {call}\n{mine[1]}"
    if mine[0] == "unbuildable":
        return
    if not twin or name.startswith("ops."):
        return
    theirs = worker.call(("torch", name, args, kwargs, backward))
    if theirs[0] in ("crash", "timeout") or torch_wraps:
        return  # torch's outcome is undefined here; cnnops did not crash
    if mine[0] == "err" and theirs[0] == "ok" and mine[1] in ACCEPTED_GAPS:
        return
    if mine[0] == "err" and mine[1] == "NotImplementedError" and "dtype" in mine[2]:
        return  # cnnops computes floating dtypes only, and says so before torch's other checks
    if mine[0] == "ok" and theirs[0] == "ok":
        assert mine[1] == theirs[1], f"shapes differ from torch's: {call}\ncnnops {mine}\ntorch {theirs}"
    else:
        assert mine[0] == theirs[0] and mine[1] == theirs[1], (
            f"outcome differs from torch's: {call}\ncnnops {mine}\ntorch {theirs}")


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(data=st.data())
def test_fuzz_conv(worker, data):
    dims = data.draw(st.sampled_from([1, 2, 3]))
    x = data.draw(spatial_input(dims))
    groups = data.draw(st.one_of(st.sampled_from([1, 1, 1, 2]), ints))
    cin = x[1][1] if len(x[1]) > 1 else 1
    cout = data.draw(st.sampled_from([0, 1, 2, 4]))
    kernel = data.draw(st.lists(st.sampled_from([0, 1, 2, 3]), min_size=dims, max_size=dims))
    per_group = cin // groups if isinstance(groups, int) and groups > 0 and abs(groups) < 8 else cin
    w_shape = [cout, data.draw(st.sampled_from([per_group, per_group, 0, 1, 3]))] + kernel
    if data.draw(st.integers(0, 9)) == 0:
        w_shape = data.draw(st.lists(sizes, min_size=0, max_size=6))
    w = tensor(w_shape, data.draw(st.sampled_from([x[2]] * 5 + ["float64"])), "randn", False, data.draw(st.booleans()))
    bias = data.draw(st.one_of(st.none(), st.just(tensor([cout], x[2])), random_tensors(max_rank=2)))
    stride, padding, dilation = (data.draw(int_lists(dims)) for _ in range(3))
    if data.draw(st.integers(0, 9)) == 0:
        padding = data.draw(st.sampled_from(["same", "valid", "bogus"]))
    wraps = False
    if len(x[1]) == dims + 2 and len(w_shape) == dims + 2 and not isinstance(padding, str):
        out, wraps = window_sizes(list(x[1][2:]), w_shape[2:], stride, padding, dilation)
        if out is not None and all(o > 0 for o in out) and too_big(x[1][0] * cout * prod(out)):
            return
        p = _per_dim(padding, dims)
        if (p and all(v >= 0 for v in p)
                and too_big(prod(s + 2 * v for s, v in zip(x[1][2:], p)) * max(x[1][0] * cin, 1))):
            return
    elif padding == "same" and len(w_shape) == dims + 2:
        d = _per_dim(dilation, dims)
        if d is None or any(v * max(k - 1, 0) > 1 << 20 for v, k in zip(d, w_shape[2:])):
            return
    check(worker, f"conv{dims}d", [x, w, bias, stride, padding, dilation, groups], torch_wraps=wraps)


@SETTINGS
@given(data=st.data())
def test_fuzz_pool(worker, data):
    dims = data.draw(st.sampled_from([1, 2, 3]))
    kind = data.draw(st.sampled_from(["max", "avg"]))
    x = data.draw(spatial_input(dims))
    kernel = data.draw(int_lists(dims))
    stride = data.draw(st.one_of(st.none(), st.just([]), int_lists(dims)))
    padding = data.draw(int_lists(dims))
    ceil_mode = data.draw(st.booleans())
    if kind == "max":
        dilation = data.draw(int_lists(dims))
        args = [x, kernel, stride, padding, dilation, ceil_mode, data.draw(st.booleans())]
    else:
        dilation = 1
        args = [x, kernel, stride, padding, ceil_mode, data.draw(st.booleans())]
        if dims > 1:
            args.append(data.draw(st.one_of(st.none(), ints)))
    wraps = False
    if len(x[1]) in (dims + 1, dims + 2):
        s = kernel if stride is None or stride == [] else stride
        out, wraps = window_sizes(list(x[1][-dims:]), kernel, s, padding, dilation, ceil_mode)
        if out is not None and all(o > 0 for o in out) and too_big(prod(x[1]) * prod(out)):
            return
        k = _per_dim(kernel, dims)
        if kind == "max" and dims == 1 and k and k[0] > 1 << 24:
            wraps = True  # torch loops over the whole kernel: its twin would hang
            if too_big(k[0] // 64):
                return
    check(worker, f"{kind}_pool{dims}d", args, torch_wraps=wraps)


@SETTINGS
@given(data=st.data())
def test_fuzz_adaptive_pool(worker, data):
    dims = data.draw(st.sampled_from([1, 2, 3]))
    kind = data.draw(st.sampled_from(["max", "avg"]))
    x = data.draw(spatial_input(dims))
    with_none = st.lists(st.one_of(ints, st.none()), min_size=dims, max_size=dims)
    output_size = data.draw(st.one_of(int_lists(dims), with_none))
    sizes_ = _per_dim(output_size, dims)
    if (sizes_ is not None and all(isinstance(v, int) and v >= 0 for v in sizes_)
            and too_big(prod(sizes_) * max(prod(x[1][:2]), 1))):
        return
    args = [x, output_size] + ([data.draw(st.booleans())] if kind == "max" else [])
    check(worker, f"adaptive_{kind}_pool{dims}d", args)


@SETTINGS
@given(data=st.data())
def test_fuzz_max_unpool(worker, data):
    dims = data.draw(st.sampled_from([1, 2, 3]))
    x = data.draw(spatial_input(dims))
    index_kind = data.draw(st.one_of(st.just("index"), st.sampled_from(EXTREMES + [7, 8, 100])))
    idx_shape = x[1] if data.draw(st.integers(0, 5)) else tuple(data.draw(st.lists(sizes, max_size=5)))
    indices = tensor(idx_shape, data.draw(st.sampled_from(["int64"] * 5 + ["float32"])), index_kind)
    kernel = data.draw(st.one_of(small_ints.map(lambda v: v + 1), int_lists(dims)))
    stride = data.draw(st.one_of(st.none(), int_lists(dims)))
    padding = data.draw(st.one_of(st.just(0), int_lists(dims)))
    output_size = data.draw(st.one_of(st.none(), st.lists(ints, min_size=dims, max_size=dims + 2)))
    # the unpooled size: output_size or (in - 1) * stride + kernel - 2 * padding per dim
    k, p = _per_dim(kernel, dims), _per_dim(padding, dims)
    s = k if stride is None else _per_dim(stride, dims)
    if output_size is not None:
        big = prod(output_size[-dims:])
    elif None not in (k, s, p) and len(x[1]) >= dims:
        big = prod((i - 1) * a + b - 2 * c for i, a, b, c in zip(x[1][-dims:], s, k, p))
    else:
        big = 0
    if too_big(big * max(prod(x[1][:-dims]), 1)):
        return
    check(worker, f"max_unpool{dims}d", [x, indices, kernel, stride, padding, output_size])


floats = st.sampled_from([0.0, 1e-5, 0.1, 1.0, -1.0, float("nan"), float("inf"), 1e308])


@SETTINGS
@given(data=st.data())
def test_fuzz_norm(worker, data):
    fn = data.draw(st.sampled_from(["batch_norm", "layer_norm", "group_norm", "instance_norm"]))
    x = data.draw(st.one_of(spatial_input(data.draw(st.sampled_from([0, 1, 2]))), random_tensors(max_rank=4)))
    shape = list(x[1])
    c = shape[1] if len(shape) > 1 else data.draw(st.sampled_from([0, 1, 3]))
    param = st.one_of(st.none(), st.just(tensor([c], x[2])), random_tensors(max_rank=2))
    eps = data.draw(floats)
    if fn == "batch_norm":
        args = [x, data.draw(param), data.draw(param), data.draw(param), data.draw(param), data.draw(st.booleans()),
                data.draw(floats), eps]
    elif fn == "instance_norm":
        args = [x, data.draw(param), data.draw(param), data.draw(param), data.draw(param), data.draw(st.booleans()),
                data.draw(floats), eps]
    elif fn == "layer_norm":
        k = data.draw(st.integers(0, len(shape) + 1))
        normalized = shape[len(shape) - k:] if k <= len(shape) else [1] + shape
        if data.draw(st.integers(0, 4)) == 0:
            normalized = data.draw(st.lists(ints, max_size=3))
        wshape = st.one_of(st.none(), st.just(tensor(normalized, x[2])), random_tensors(max_rank=3))
        args = [x, normalized, data.draw(wshape), data.draw(wshape), eps]
    else:
        groups = data.draw(st.one_of(st.sampled_from([1, 2, 3, c, c + 1]), ints))
        args = [x, groups, data.draw(param), data.draw(param), eps]
    # running statistics are updated in place: give each implementation its own (the specs
    # are rebuilt per call), and compare outcomes only
    check(worker, fn, args)


# ---------------------------------------------------------------------------------------------
# raw ops: any exception, never a crash
# ---------------------------------------------------------------------------------------------

def any_tensor():
    return st.one_of(random_tensors(), random_tensors(kind="index"),
                     st.builds(lambda shape, v: tensor(shape, "int64", v),
                               st.lists(sizes, max_size=5), st.sampled_from(EXTREMES)))


def opt_tensor():
    return st.one_of(st.none(), any_tensor())


int_list = st.lists(ints, min_size=0, max_size=4)
mask = st.lists(st.booleans(), min_size=3, max_size=3)

RAW_OPS = {
    "conv_forward": lambda: [any_tensor(), any_tensor(), opt_tensor(), int_list, int_list, int_list, ints,
                             st.sampled_from(["none", "relu", "bogus"])],
    "conv_backward": lambda: [any_tensor(), any_tensor(), any_tensor(), int_list, int_list, int_list, ints, mask],
    "max_pool_forward": lambda: [any_tensor(), int_list, int_list, int_list, int_list, st.booleans()],
    "max_pool_backward": lambda: [any_tensor(), any_tensor(), any_tensor(), int_list, int_list, int_list, int_list,
                                  st.booleans()],
    "avg_pool_forward": lambda: [any_tensor(), int_list, int_list, int_list, st.booleans(), st.booleans(), ints],
    "avg_pool_backward": lambda: [any_tensor(), any_tensor(), int_list, int_list, int_list, st.booleans(),
                                  st.booleans(), ints],
    "adaptive_avg_pool_forward": lambda: [any_tensor(), int_list],
    "adaptive_avg_pool_backward": lambda: [any_tensor(), any_tensor()],
    "adaptive_max_pool_forward": lambda: [any_tensor(), int_list],
    "adaptive_max_pool_backward": lambda: [any_tensor(), any_tensor(), any_tensor()],
    "max_unpool_forward": lambda: [any_tensor(), any_tensor(), int_list],
    "max_unpool_backward": lambda: [any_tensor(), any_tensor(), any_tensor()],
    "batch_norm_forward": lambda: [any_tensor(), opt_tensor(), opt_tensor(), opt_tensor(), opt_tensor(),
                                   st.booleans(), floats, floats],
    "batch_norm_backward": lambda: [any_tensor(), any_tensor(), opt_tensor(), any_tensor(), any_tensor(),
                                    st.booleans(), mask],
    "layer_norm_forward": lambda: [any_tensor(), int_list, opt_tensor(), opt_tensor(), floats],
    "layer_norm_backward": lambda: [any_tensor(), any_tensor(), int_list, any_tensor(), any_tensor(), opt_tensor(),
                                    mask],
    "group_norm_forward": lambda: [any_tensor(), opt_tensor(), opt_tensor(), ints, floats],
    "group_norm_backward": lambda: [any_tensor(), any_tensor(), any_tensor(), any_tensor(), opt_tensor(), ints,
                                    mask],
    "batch_norm_stats": lambda: [any_tensor()],
    "batch_norm_elemt": lambda: [any_tensor(), opt_tensor(), opt_tensor(), any_tensor(), any_tensor()],
    "cpu_gemm_isa": lambda: [],
    "cpu_weight_cache_clear": lambda: [],
    "cpu_weight_cache_enable": lambda: [st.booleans()],
    "cpu_weight_cache_info": lambda: [],
    "batch_norm_backward_elemt": lambda: [any_tensor(), any_tensor(), any_tensor(), any_tensor(), opt_tensor(),
                                          any_tensor(), any_tensor(), ints],
}


def test_raw_ops_listed():
    """Every op of the schema list is fuzzed."""
    import torch

    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("cnnops::")}
    assert schemas == set(RAW_OPS), sorted(schemas ^ set(RAW_OPS))


@st.composite
def raw_calls(draw):
    name = draw(st.sampled_from(sorted(RAW_OPS)))
    return name, [draw(s) for s in RAW_OPS[name]()]


@SETTINGS
@given(call=raw_calls())
def test_fuzz_raw_ops(worker, call):
    name, args = call
    check(worker, "ops." + name, args, twin=False, backward=False)


@SETTINGS
@given(data=st.data())
def test_fuzz_raw_pool_backward_indices(worker, data):
    """Well-formed pool backward calls with indices anywhere (the scatters and gathers)."""
    dims = data.draw(st.sampled_from([1, 2, 3]))
    n, c = data.draw(st.sampled_from([0, 1, 2])), data.draw(st.sampled_from([1, 3]))
    spatial = data.draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=dims, max_size=dims))
    cl = data.draw(st.booleans())
    x = tensor([n, c] + spatial, "float32", "randn", cl)
    value = data.draw(st.one_of(st.just("index"), st.sampled_from(EXTREMES + [5, 8, 64])))
    which = data.draw(st.sampled_from(["max_pool_backward", "adaptive_max_pool_backward", "max_unpool_forward",
                                       "max_unpool_backward"]))
    if which == "max_pool_backward":
        k = [2] * dims
        out = [max(s // 2, 1) if s >= 2 else 1 for s in spatial]
        pads = [1 if s < 2 else 0 for s in spatial]
        out = [(s + 2 * p - 2) // 2 + 1 for s, p in zip(spatial, pads)]
        g = tensor([n, c] + out, "float32", "randn", cl)
        args = [g, x, tensor([n, c] + out, "int64", value, cl), k, k, pads, [1] * dims, False]
    elif which == "adaptive_max_pool_backward":
        g = tensor([n, c] + [1] * dims, "float32", "randn", cl)
        args = [g, x, tensor([n, c] + [1] * dims, "int64", value, cl)]
    elif which == "max_unpool_forward":
        args = [x, tensor([n, c] + spatial, "int64", value, cl), [2 * s for s in spatial]]
    else:
        g = tensor([n, c] + [2 * s for s in spatial], "float32", "randn", cl)
        args = [g, x, tensor([n, c] + spatial, "int64", value, cl)]
    check(worker, "ops." + which, args, twin=False, backward=False)
