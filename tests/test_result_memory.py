"""The pool of result storage (csrc/cpu/result_memory.cpp, cnnops.backends.cpu.keep_result_memory):
freed results of 1 MiB and more are reused by the next result of about their size, never while a tensor
still holds them; every op writes each value of a reused block (stale values would show); pooled
tensors behave as torch's (resize, share_memory_, save/load, numpy); the switch, empty_cache() and
the byte limit."""

import io
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_torch

import cnnops
import cnnops.functional as CF
from cnnops import _C

MIB = 1 << 20


def stats():
    held, limit, reuses = _C._cpu_result_memory_stats()
    return held, limit, reuses


@pytest.fixture(autouse=True)
def _fresh_pool():
    cnnops.backends.cpu.empty_cache()
    yield
    _C._set_cpu_result_memory_limit(-1)
    cnnops.backends.cpu.keep_result_memory = True


def conv(x, w):
    return CF.conv2d(x, w, None, padding=1)


def test_freed_result_is_reused_for_the_next_of_its_size():
    x, w = torch.randn(8, 32, 40, 40), torch.randn(32, 32, 3, 3)  # 1.6 MB results
    first = conv(x, w)
    pointer, expected = first.data_ptr(), first.clone()
    assert stats()[0] == 0
    del first
    assert stats()[0] >= 8 * 32 * 40 * 40 * 4
    reuses = stats()[2]
    second = conv(x, w)
    assert second.data_ptr() == pointer
    assert stats()[2] == reuses + 1
    assert torch.equal(second, expected)


def test_live_results_never_share_storage():
    x, w = torch.randn(8, 32, 40, 40), torch.randn(32, 32, 3, 3)
    conv(x, w)  # the pool has a block
    outs = [conv(x, w) for _ in range(4)]
    pointers = {o.data_ptr() for o in outs}
    assert len(pointers) == len(outs)
    ref = F.conv2d(x.double(), w.double(), padding=1)
    for o in outs:
        assert_close_to_torch(o, ref.float(), torch.float32, 32 * 9)


def test_small_results_use_torch_allocator():
    x, w = torch.randn(2, 16, 20, 20), torch.randn(16, 16, 3, 3)  # 51 KB
    before = stats()
    y = conv(x, w)
    del y
    conv(x, w)
    assert stats() == before


def test_pool_threshold_is_one_mib():
    """Results of 1 MiB and more are pooled, smaller ones not (the README's and backends' claim):
    average pooling outputs of 8 x 32 x 32 x 32 floats (1 MiB) and one row less."""
    for rows, pooled in ((32, True), (31, False)):
        cnnops.backends.cpu.empty_cache()
        x = torch.randn(8, 32, 2 * rows, 64)
        y = cnnops.functional.avg_pool2d(x, 2)
        assert (y.nbytes >= MIB) == pooled
        del y
        assert (stats()[0] > 0) == pooled, rows


def test_default_limit_is_an_eighth_of_memory_at_most_2_gib():
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert stats()[1] == min(memory // 8, 2 << 30)


def test_switch_off_releases_the_pool_and_reuses_nothing():
    x, w = torch.randn(8, 32, 40, 40), torch.randn(32, 32, 3, 3)
    conv(x, w)  # freed at once: the pool holds its block
    assert stats()[0] > 0
    with cnnops.backends.cpu.flags(keep_result_memory=False):
        assert cnnops.backends.cpu.keep_result_memory is False
        assert stats()[0] == 0
        reuses = stats()[2]
        for _ in range(2):
            y = conv(x, w)
            del y
        assert stats()[0] == 0 and stats()[2] == reuses
    assert cnnops.backends.cpu.keep_result_memory is True


def test_switch_rejects_non_bool():
    with pytest.raises(TypeError, match="bool"):
        cnnops.backends.cpu.keep_result_memory = 1


def test_environment_turns_it_off_at_start():
    code = ("import torch, cnnops, cnnops.functional as CF; from cnnops import _C\n"
            "assert cnnops.backends.cpu.keep_result_memory is False\n"
            "x, w = torch.randn(8, 32, 40, 40), torch.randn(32, 32, 3, 3)\n"
            "for _ in range(2): CF.conv2d(x, w, padding=1)\n"
            "assert _C._cpu_result_memory_stats()[0] == 0 and _C._cpu_result_memory_stats()[2] == 0\n"
            "print('ok')")
    env = dict(os.environ, CNNOPS_KEEP_RESULT_MEMORY="0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_empty_cache_releases_what_the_pool_holds():
    x, w = torch.randn(8, 32, 40, 40), torch.randn(32, 32, 3, 3)
    y = conv(x, w)
    del y
    assert stats()[0] > 0
    cnnops.backends.cpu.empty_cache()
    assert stats()[0] == 0


def test_blocks_freed_past_the_limit_go_back_to_the_system():
    x, w = torch.randn(8, 32, 40, 40), torch.randn(32, 32, 3, 3)
    size = 8 * 32 * 40 * 40 * 4
    _C._set_cpu_result_memory_limit(size + MIB)
    ys = [conv(x, w) for _ in range(3)]
    del ys
    held, limit, _ = stats()
    assert limit == size + MIB
    assert 0 < held <= limit


def same_sized_reuse(make, compare):
    """make() returns a result (or a tuple whose first item is one); it is filled with NaN and freed,
    and make() again, which must reuse that block, must write every value (compare checks against
    torch)."""
    first = make()
    first = first if isinstance(first, tuple) else (first,)
    assert first[0].nbytes >= MIB
    for t in first:
        t.fill_(float("nan") if t.is_floating_point() else -7)
    del first, t
    reuses = stats()[2]
    again = make()
    assert stats()[2] > reuses, "the second result did not reuse a block"
    compare(again)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_op_writes_every_value_of_a_reused_block(layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(8, 32, 40, 40).contiguous(memory_format=fmt)
    w = torch.randn(32, 32, 3, 3).contiguous(memory_format=fmt)
    xd = x.double()

    same_sized_reuse(lambda: conv(x, w), lambda y: assert_close_to_torch(
        y, F.conv2d(xd, w.double(), padding=1).float(), torch.float32, 32 * 9))

    go = torch.randn(8, 32, 40, 40).contiguous(memory_format=fmt)
    same_sized_reuse(lambda: torch.ops.cnnops.conv_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1,
                                                             [True, False, False])[0],
                     lambda dx: assert_close_to_torch(dx, torch.ops.aten.convolution_backward(
                         go.double(), xd, w.double(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                         [True, False, False])[0].float(), torch.float32, 32 * 9))

    xp = torch.randn(8, 32, 80, 80).contiguous(memory_format=fmt)
    same_sized_reuse(lambda: cnnops.functional.max_pool2d(xp, 2, return_indices=True),
                     lambda r: [torch.testing.assert_close(a, b) for a, b in
                                zip(r, F.max_pool2d(xp, 2, return_indices=True))])
    same_sized_reuse(lambda: cnnops.functional.avg_pool2d(xp, 2),
                     lambda y: torch.testing.assert_close(y, F.avg_pool2d(xp, 2)))

    rm, rv = torch.zeros(32), torch.ones(32)
    same_sized_reuse(lambda: cnnops.functional.batch_norm(x, rm.clone(), rv.clone(), training=True),
                     lambda y: torch.testing.assert_close(y, F.batch_norm(x, rm.clone(), rv.clone(), training=True),
                                                          atol=1e-5, rtol=1e-4))
    same_sized_reuse(lambda: cnnops.functional.group_norm(x, 8),
                     lambda y: torch.testing.assert_close(y, F.group_norm(x, 8), atol=1e-5, rtol=1e-4))
    same_sized_reuse(lambda: cnnops.functional.layer_norm(x, (40,)),
                     lambda y: torch.testing.assert_close(y, F.layer_norm(x, (40,)), atol=1e-5, rtol=1e-4))

    xg = x.clone().requires_grad_()
    gy = torch.randn_like(x)

    def norm_grads():
        (dx,) = torch.autograd.grad(cnnops.functional.batch_norm(xg, None, None, training=True), xg, gy)
        return dx

    xr = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(F.batch_norm(xr, None, None, training=True), xr, gy)
    same_sized_reuse(norm_grads, lambda dx: torch.testing.assert_close(dx, ref, atol=1e-4, rtol=1e-4))


def test_pooled_results_behave_as_torch_tensors():
    x, w = torch.randn(8, 32, 40, 40), torch.randn(32, 32, 3, 3)
    y = conv(x, w)
    expected = y.clone()
    # resize_ grows the storage through the pool's allocator and keeps the values
    flat = y.view(-1)
    flat.resize_(flat.numel() * 2)
    assert torch.equal(flat[: expected.numel()].view_as(expected), expected)
    # save and load, numpy, shared memory, in-place ops
    z = conv(x, w)
    buffer = io.BytesIO()
    torch.save(z, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), z)
    assert (z.numpy() == expected.numpy()).all()
    z.share_memory_()
    assert z.is_shared() and torch.equal(z, expected)
    z.add_(1)
    assert torch.equal(z, expected + 1)


def test_results_made_and_freed_on_several_threads():
    x, w = torch.randn(8, 32, 40, 40), torch.randn(32, 32, 3, 3)
    ref = F.conv2d(x.double(), w.double(), padding=1).float()
    errors = []

    def work():
        try:
            for _ in range(10):
                y = conv(x, w)
                assert_close_to_torch(y, ref, torch.float32, 32 * 9)
        except Exception as e:  # noqa: BLE001 (reported in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    held, limit, _ = stats()
    assert held <= limit
