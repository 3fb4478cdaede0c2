"""cnnops._C.call, the eager path of cnnops.functional (csrc/python/fast_call.cpp): same results,
gradients and errors as the torch.ops path, and torch.ops wherever it must serve instead
(__torch_function__ overrides, torch.compile)."""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import cnnops.functional as CF
from cnnops import _C
from cnnops._ops import fast_call_ok

CONV = _C.op("conv_forward")


def conv_args():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    return x, w, b


def test_same_result_and_gradients_as_torch_ops():
    x, w, b = conv_args()
    fast = _C.call(CONV, x, w, b, (2, 1), [1, 1], (1, 1), 2, "relu")
    slow = torch.ops.cnnops.conv_forward(x, w, b, [2, 1], [1, 1], [1, 1], 2, "relu")
    assert torch.equal(fast, slow)
    assert fast.grad_fn is not None
    g_fast = torch.autograd.grad(fast.sum(), (x, w, b))
    g_slow = torch.autograd.grad(slow.sum(), (x, w, b))
    for a, e in zip(g_fast, g_slow):
        assert torch.equal(a, e)


def test_tuple_returns():
    out, idx = _C.call(_C.op("max_pool_forward"), torch.randn(1, 2, 4, 4), (2, 2), (2, 2), (0, 0), (1, 1), False)
    assert out.shape == idx.shape == (1, 2, 2, 2) and idx.dtype == torch.int64


@pytest.mark.parametrize("position, bad, error", [
    (1, "w", TypeError),  # a Tensor argument
    (3, 2, TypeError),  # an int[] argument given an int
    (3, (1, "a"), TypeError),  # a non-int element
    (3, (True, 1), TypeError),  # bools are not ints (as torch's schema matching)
    (6, 2.5, TypeError),  # an int argument
    (7, 3, TypeError),  # a str argument
])
def test_bad_argument_types_raise_type_error(position, bad, error):
    x, w, b = conv_args()
    args = [x, w, b, (1, 1), (0, 0), (1, 1), 2, "none"]
    args[position] = bad
    with pytest.raises(error):
        _C.call(CONV, *args)


def test_wrong_argument_count_and_handle():
    x, w, b = conv_args()
    with pytest.raises(TypeError, match="expected 8 arguments"):
        _C.call(CONV, x, w, b)
    with pytest.raises(ValueError, match="unknown op handle"):
        _C.call(10**6, x)
    with pytest.raises(RuntimeError):
        _C.op("no_such_op")


def test_kernel_errors_keep_their_python_type():
    x, w, b = conv_args()
    with pytest.raises(RuntimeError, match="channels"):
        _C.call(CONV, x, w[:, :1], b, (1, 1), (0, 0), (1, 1), 1, "none")
    with pytest.raises(NotImplementedError):
        _C.call(CONV, x.long(), w.long(), None, (1, 1), (0, 0), (1, 1), 2, "none")


def test_torch_function_overrides_take_torch_ops():
    """A TorchFunctionMode sees the op call (torch.ops handles __torch_function__)."""
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, b = conv_args()
    assert fast_call_ok(x, w, b)
    with Record():
        assert not fast_call_ok(x, w, b)
        out = CF.conv2d(x, w, b, groups=2)
    assert any("cnnops.conv_forward" in name for name in seen), seen
    torch.testing.assert_close(out, F.conv2d(x, w, b, groups=2))


def test_compiled_calls_take_torch_ops():
    x, w, b = (t.detach() for t in conv_args())
    compiled = torch.compile(lambda x, w, b: CF.conv2d(x, w, b, groups=2), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), F.conv2d(x, w, b, groups=2))
