"""SyncBatchNormFunction: the one Python torch.autograd.Function (it talks to torch.distributed).
Every other op carries its autograd in the dispatcher (csrc/autograd/).

It saves in forward(ctx, ...) rather than in a separate setup_context: with setup_context,
Function.apply binds default arguments through inspect.signature on every call (~50 us).
"""
import torch

from ._ops import ops


def _selected(grads, mask):
    """The backward ops return empty tensors for the gradients output_mask left out: None."""
    return tuple(g if wanted else None for g, wanted in zip(grads, mask))


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------
# The pooling ops have no Function here: their autograd is registered with the ops themselves
# (csrc/autograd/pool.cpp), differentiable to any order and in forward mode, and
# cnnops.functional calls them directly.


# ============================================================================================
# Normalization: autograd of the batch/layer/group norm ops lives in the dispatcher
# (csrc/autograd/norm.cpp); cnnops.functional calls the ops directly.
# ============================================================================================

# ============================================================================================
# SyncBatchNorm
# ============================================================================================
# Batch norm over the union of the ranks' batches (formulas.md §Norm statistics: per channel
# over N x spatial, here N summed over the ranks). Per-element work runs in our kernels; the
# ranks exchange only per-channel vectors through torch.distributed.

import torch.distributed as dist  # noqa: E402


def _merge_rank_stats(counts, means, m2s):
    """Chan et al.'s parallel merge of per-rank (count, mean, m2) in float64, each (W, C):
        mean = sum_i n_i * mean_i / n,   m2 = sum_i (m2_i + n_i * (mean_i - mean)^2).
    Every term is a deviation from a mean, never E[x^2] - E[x]^2, so inputs with a large mean
    keep their variance digits; a rank with n_i = 0 contributes nothing."""
    total = counts.sum(0)
    weights = counts / total.clamp(min=1)
    mean = (weights * means).sum(0)
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return mean, m2


class _NoDoubleBackward(torch.autograd.Function):
    """apply(grad, *anchors) -> grad, recorded as a function of the anchors (what the gradient
    depends on) whose derivative raises. Its edges lead to the anchors, so autograd.grad(...,
    inputs=anchor) reaches it and raises (once_differentiable's DelayedError hangs off fresh
    leaves, which autograd.grad prunes: a silent None)."""

    @staticmethod
    def forward(ctx, grad, *anchors):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("cnnops SyncBatchNorm: double backward (differentiating a gradient computed with "
                           "create_graph=True) is not implemented")


class SyncBatchNormFunction(torch.autograd.Function):
    """Training batch norm synchronized over a process group: apply(input, weight, bias,
    running_mean, running_var, eps, momentum, process_group, world_size) -> output.

    Forward: each rank's per-channel (count, mean, m2) from batch_norm_stats; one all_gather of
    these 2C + 1 numbers per rank (in float64). all_gather rather than an all_reduce of sum(x)
    and sum(x^2): a single round trip that handles unequal batch sizes (counts travel with the
    statistics) and merges with Chan's formula, which stays exact for inputs with a large mean
    where sum(x^2) / n - mean^2 cancels. Every rank then normalizes its slice with the global
    mean and invstd (batch_norm_elemt) and updates the running statistics with the global
    unbiased variance.

    Backward: this rank's sum(dy) and sum(dy * (x - mean)), all-reduced (summed) over the ranks,
    give grad_input through batch_norm_backward_elemt with the global count. grad_weight and
    grad_bias are this rank's share (invstd * local sum(dy * (x - mean)), local sum(dy)), as in
    torch's SyncBatchNorm: DistributedDataParallel sums (averages) them over the ranks.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size):
        channels = input.size(1)
        mean, m2 = ops.batch_norm_stats(input)
        count = input.numel() // channels
        local = torch.cat([torch.tensor([count], dtype=torch.float64, device=input.device),
                           mean.to(torch.float64), m2.to(torch.float64)])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        gathered = torch.stack(gathered)  # world_size x (1 + C + C)
        counts = gathered[:, :1]
        total = int(counts.sum().item())  # one host sync, as torch's SyncBatchNorm
        global_mean, global_m2 = _merge_rank_stats(counts, gathered[:, 1:1 + channels], gathered[:, 1 + channels:])
        # x_hat = (x - E[x]) / sqrt(Var[x] + eps), with the biased variance over all ranks.
        biased_var = global_m2 / max(total, 1)
        stat_dtype = mean.dtype
        mean = global_mean.to(stat_dtype)
        invstd = (biased_var + eps).rsqrt().to(stat_dtype)
        # Running statistics (torch's rule): running = (1 - momentum) * running + momentum *
        # batch, with the unbiased variance m2 / (n - 1); left alone when no rank had values.
        if total > 0:
            if running_mean is not None:
                running_mean.copy_(running_mean.to(torch.float64) * (1 - momentum) + global_mean * momentum)
            if running_var is not None:
                unbiased_var = global_m2 / (total - 1) if total > 1 else torch.full_like(global_m2, float("nan"))
                running_var.copy_(running_var.to(torch.float64) * (1 - momentum) + unbiased_var * momentum)

        out = ops.batch_norm_elemt(input, weight, bias, mean, invstd)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.total = total
        ctx.process_group = process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_output):
        # Not @once_differentiable: that raises only when grad_output requires grad, and
        # create_graph=True with a grad_output that does not (loss = out.sum()) would silently
        # drop the second-order terms through the saved input. The gradient sums cross ranks
        # (all_reduce), so there is no double backward: under create_graph=True any gradient that
        # depends on something requiring grad raises RuntimeError when differentiated, as torch's
        # SyncBatchNorm does (its backward ops have no derivative).
        with torch.no_grad():
            grads = SyncBatchNormFunction._backward(ctx, grad_output)
        input, weight = ctx.saved_tensors[:2]
        anchors = [t for t in (grad_output, input, weight) if t is not None and t.requires_grad]
        if torch.is_grad_enabled() and anchors:
            grads = tuple(None if g is None else _NoDoubleBackward.apply(g, *anchors) for g in grads)
        return grads

    @staticmethod
    def _backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_weight = need_weight and weight is not None
        need_bias = need_bias and ctx.bias_dtype is not None
        channels = input.size(1)
        # This rank's sum(dy) and sum(dy * (x - mean)) come from batch_norm_backward: its
        # grad_weight is invstd * sum(dy * (x - mean)) and its grad_bias sum(dy), so with invstd
        # = 1 (and a unit weight in the statistics' dtype, so half inputs keep float sums) they
        # are exactly the two sums.
        ones = torch.ones(channels, dtype=mean.dtype, device=input.device)
        _, sum_dy_xmu, sum_dy = ops.batch_norm_backward(grad_output, input, ones, mean, ones, True,
                                                        [False, True, True])
        grad_weight = (invstd * sum_dy_xmu).to(weight.dtype) if need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        grad_input = None
        if need_input:
            # Every rank joins the all_reduce (an empty rank with zeros), else its peers hang.
            sums = torch.cat([sum_dy, sum_dy_xmu]).to(torch.float64)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.process_group)
            sums = sums.to(mean.dtype)
            grad_input = ops.batch_norm_backward_elemt(grad_output, input, mean, invstd, weight,
                                                       sums[:channels], sums[channels:], ctx.total)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None
