"""Algorithm switches of the cnnops kernels, in the style of ``torch.backends.cudnn``.

``cnnops.backends.cpu.allow_winograd`` (default ``True``): float32 3x3 stride-1 convolutions on
the CPU may run the Winograd algorithm F(4x4, 3x3), or F(2x2, 3x3) on small maps at small batches
(Lavin & Gray 2016), instead of the direct one. It trades rounding for speed: Winograd does about
2-4x fewer multiplications on the layers where it is chosen, but its transforms round differently,
so results are not bitwise equal to the direct path (the error stays within the float32 test
tolerances; ``benchmarks/winograd_error.py`` measures it against a float64 reference). float64
always runs the direct path; bfloat16 and float16 inputs compute in float32 and may take Winograd
too. It covers the forward pass, the stride-1 input gradient (computed as a forward convolution)
and the weight gradient (F(4x4, 3x3) only).

``cnnops.backends.cpu.cache_packed_weights`` (default ``False``; ``CNNOPS_WEIGHT_CACHE=1`` sets
it at start): under ``torch.no_grad()`` the CPU convolutions keep each weight's packed GEMM
panels between calls and reuse them while the weight is the same tensor with the same version
counter. Every in-place op, optimizer step and ``load_state_dict`` bumps that counter; a write
through ``param.data``, a numpy array or a DLPack alias does not, and the cache would then serve
the old weight: turn it on only for inference code that never writes weights that way (or call
``torch.ops.cnnops.cpu_weight_cache_clear()`` after such a write).

``cnnops.backends.cpu.keep_result_memory`` (default ``True``; ``CNNOPS_KEEP_RESULT_MEMORY=0`` turns
it off at start): the storage of a tensor that a cnnops CPU op returned (a convolution's, a norm's
or a pooling's output or input gradient) of 1 MiB or more is kept when the tensor is freed and given
to the next result it holds with at most an eighth to spare (sizes rounded up to 64 KiB), instead of
going back to the system, which would map it fresh, page by page, for the next one: a network's
activations are tens of MB each, and page faults took a fifth of a ResNet-50 step at batch 8. The
pool holds at most an eighth of the machine's memory, 2 GiB at most (a block freed past that goes
back to the system); ``cnnops.backends.cpu.empty_cache()`` releases what it holds, and turning the
switch off releases it too. Like torch's CUDA caching allocator, it makes the process hold memory it
is not using: after a training step, up to the size of the step's activations.

The kernels read the flags at run time, on every call: setting it takes effect on the next call,
in eager mode and in graphs compiled with ``torch.compile`` alike (no recompilation; the
compiled graph calls the same op). Set it outside compiled regions.
"""
import contextlib

import torch

from . import _C

__all__ = ["cpu"]


class _CpuBackend:
    """``cnnops.backends.cpu``: switches of the CPU kernels."""

    @property
    def allow_winograd(self) -> bool:
        """Whether float32 3x3 stride-1 convolutions may use Winograd F(4x4, 3x3) or F(2x2, 3x3)
        (faster, rounds differently from the direct path; float64 never does). Read by every call."""
        return _C._get_cpu_allow_winograd()

    @allow_winograd.setter
    def allow_winograd(self, value: bool) -> None:
        _C._set_cpu_allow_winograd(value)

    @property
    def cache_packed_weights(self) -> bool:
        """Whether convolutions under no_grad reuse a weight's packed panels while its version
        counter is unchanged (off by default: writes through ``.data`` are not seen)."""
        previous = torch.ops.cnnops.cpu_weight_cache_enable(False)
        torch.ops.cnnops.cpu_weight_cache_enable(previous)
        return previous

    @cache_packed_weights.setter
    def cache_packed_weights(self, value: bool) -> None:
        torch.ops.cnnops.cpu_weight_cache_enable(bool(value))
        if not value:
            torch.ops.cnnops.cpu_weight_cache_clear()

    @property
    def keep_result_memory(self) -> bool:
        """Whether the storage of freed cnnops CPU results (1 MiB and more) is kept for the next
        result of about its size (default ``True``; see the module's docstring). Off releases it."""
        return _C._get_cpu_keep_result_memory()

    @keep_result_memory.setter
    def keep_result_memory(self, value: bool) -> None:
        _C._set_cpu_keep_result_memory(value)

    def empty_cache(self) -> None:
        """Releases the storage that ``keep_result_memory`` holds for reuse."""
        _C._cpu_release_result_memory()

    @contextlib.contextmanager
    def flags(self, allow_winograd=None, cache_packed_weights=None, keep_result_memory=None):
        """Sets the given switches for the duration of a ``with`` block, then restores them."""
        previous = self.allow_winograd, self.cache_packed_weights, self.keep_result_memory
        try:
            if allow_winograd is not None:
                self.allow_winograd = allow_winograd
            if cache_packed_weights is not None:
                self.cache_packed_weights = cache_packed_weights
            if keep_result_memory is not None:
                self.keep_result_memory = keep_result_memory
            yield
        finally:
            self.allow_winograd, self.cache_packed_weights, self.keep_result_memory = previous

    def __repr__(self):
        return (f"cnnops.backends.cpu(allow_winograd={self.allow_winograd}, "
                f"cache_packed_weights={self.cache_packed_weights}, keep_result_memory={self.keep_result_memory})")


cpu = _CpuBackend()
