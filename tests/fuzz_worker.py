"""The process that runs tests/test_fuzz.py's calls, one after another, so that a crash (a
segfault, an abort) kills this process instead of pytest. Protocol: length-prefixed pickles on
stdin and stdout. A request names an implementation ("cnnops" or "torch"), a function and its
arguments, with tensors given as specs that are built here; the reply is the outcome:
("ok", shapes) or ("err", exception type name, message)."""
import os
import pickle
import resource
import struct
import sys

if len(sys.argv) > 1:  # the folder holding the cnnops package the test imported
    sys.path.insert(0, sys.argv[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cnnops.functional as C  # noqa: E402

# Allocations past this fail (RuntimeError / MemoryError) instead of exhausting the machine.
_LIMIT = int(os.environ.get("CNNOPS_FUZZ_MEMORY_LIMIT", str(6 << 30)))
if "libasan" not in os.environ.get("LD_PRELOAD", ""):  # ASan's shadow memory needs no limit;
    try:                                                 # it caps allocations itself (test_fuzz.py)
        resource.setrlimit(resource.RLIMIT_DATA, (_LIMIT, _LIMIT))
    except (ValueError, OSError):
        pass

torch.set_num_threads(1)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64, "bool": torch.bool}


def build(spec):
    """("tensor", shape, dtype, kind, channels_last, requires_grad) -> a tensor; lists and tuples
    recursively; anything else as is."""
    if isinstance(spec, tuple) and spec and spec[0] == "tensor":
        _, shape, dtype, kind, channels_last, requires_grad = spec
        dtype = DTYPES[dtype]
        g = torch.Generator().manual_seed(0)
        if isinstance(kind, int):  # every element this value (indices)
            t = torch.full(shape, kind, dtype=dtype)
        elif kind == "index":  # small non-negative indices
            t = torch.randint(0, 8, shape, generator=g).to(dtype)
        elif dtype.is_floating_point:
            t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        else:
            t = torch.randint(0, 4, shape, generator=g).to(dtype)
        if channels_last and t.dim() in (4, 5):
            t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
        if requires_grad and t.is_floating_point():
            t.requires_grad_(True)
        return t
    if isinstance(spec, list):
        return [build(s) for s in spec]
    if isinstance(spec, tuple):
        return tuple(build(s) for s in spec)
    return spec


def resolve(impl, name):
    if name.startswith("ops."):
        return getattr(torch.ops.cnnops, name[4:])
    return getattr(C if impl == "cnnops" else F, name)


def shapes(result):
    if isinstance(result, torch.Tensor):
        return tuple(result.shape)
    if isinstance(result, (tuple, list)):
        return tuple(shapes(r) for r in result)
    return repr(type(result))


def run(request):
    impl, name, args, kwargs, backward = request
    try:
        args, kwargs = build(args), {k: build(v) for k, v in kwargs.items()}
    except Exception as e:  # noqa: BLE001  (a spec no tensor has, e.g. a negative size)
        return ("unbuildable", type(e).__name__, str(e)[:300])
    try:
        result = resolve(impl, name)(*args, **kwargs)
        outcome = ("ok", shapes(result))
        if backward:
            outs = result if isinstance(result, (tuple, list)) else (result,)
            outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
            if outs:
                leaves = [a for a in args + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
                grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves, allow_unused=True)
                outcome = ("ok", (outcome[1], tuple(None if g is None else tuple(g.shape) for g in grads)))
        return outcome
    except Exception as e:  # noqa: BLE001  (the outcome is the exception's type)
        return ("err", type(e).__name__, str(e)[:300])


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = stdin.read(4)
        if len(header) < 4:
            return
        (size,) = struct.unpack("<I", header)
        reply = pickle.dumps(run(pickle.loads(stdin.read(size))))
        stdout.write(struct.pack("<I", len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    main()
