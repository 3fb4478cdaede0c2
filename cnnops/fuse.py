"""Conv-BatchNorm folding for inference: ``cnnops.fuse_conv_bn(model)``.

In eval mode a batch norm is a fixed per-channel affine map, so a convolution followed by one is
a single convolution with new weights and a bias (docs/formulas.md §Conv-BN folding). A ReLU right
after it runs inside the convolution's output step (cnnops.nn.ConvReLU1d/2d/3d), so the
activations are written once instead of three times.

How pairs are found
-------------------
1. ``torch.fx`` traces the model (cnnops.nn modules are leaves, as torch.nn ones are). A
   conv ``call_module`` node whose only user is a batch norm ``call_module`` node is a pair;
   when the batch norm's only user is a ReLU (nn.ReLU, F.relu, torch.relu, Tensor.relu, in
   place or not) it joins. The result is the traced ``GraphModule``, rewritten: it has the
   model's forward and submodules (named as before) but not its other methods, as with
   torch.fx.experimental.optimization.fuse.
2. A model fx cannot trace (data-dependent control flow, ...) falls back to walking every
   ``nn.Sequential`` in order and folding adjacent (conv, bn[, nn.ReLU]) children there; the
   batch norm and ReLU become ``nn.Identity`` so the Sequential's indices and state_dict keys
   stay put. This assumes each Sequential is called as a whole (its contract): a forward that
   reads the output of a single child of a Sequential can see a different value.

A batch norm that cannot be folded is left in place, with the reason in the report: no
running statistics (track_running_stats=False), a conv output also used elsewhere, a conv
module called more than once, a channel or dimension mismatch.

The fused copy is for batched input (N, C, ...): there batch norm normalizes dimension 1, the
conv's output channels. (An unbatched (C, L) input to Conv1d + BatchNorm1d would make the
batch norm normalize L instead; such a model is not what this is for.)
"""
import copy
import dataclasses

import torch
import torch.fx
from torch import nn

from . import nn as cnn

__all__ = ["fuse_conv_bn", "FuseReport"]


# Exact types only: a subclass may have its own forward, which folding would silently drop.
_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, cnn.Conv1d: 1, cnn.Conv2d: 2, cnn.Conv3d: 3}
# Spatial dims the batch norm expects (None: any, as SyncBatchNorm accepts every rank >= 2).
_BN_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
            cnn.BatchNorm1d: 1, cnn.BatchNorm2d: 2, cnn.BatchNorm3d: 3,
            nn.SyncBatchNorm: None, cnn.SyncBatchNorm: None}

# The ReLU spellings fx records: a module, a function, a tensor method.
_RELU_FUNCTIONS = (torch.nn.functional.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")


@dataclasses.dataclass
class FuseReport:
    """What fuse_conv_bn did.

    method: "fx" (traced graph rewritten) or "sequential" (the fallback; ``trace_error`` says
    why tracing failed). fused: (conv name, batch norm name, ReLU name or None) per fold; a
    ReLU module is named by its qualified name, a relu function or method call by its fx node
    name. left: (batch norm name, reason) for each batch norm left in place.
    """

    method: str
    fused: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    trace_error: str = None

    def __str__(self):
        lines = [f"fuse_conv_bn ({self.method}): {len(self.fused)} conv+bn folded, "
                 f"{sum(r is not None for _, _, r in self.fused)} with ReLU, {len(self.left)} batch norm left"]
        if self.trace_error:
            lines.append(f"  fx tracing failed, Sequential fallback: {self.trace_error}")
        lines += [f"  fused  {c} + {b}" + (f" + {r}" if r else "") for c, b, r in self.fused]
        lines += [f"  left   {b}: {why}" for b, why in self.left]
        return "\n".join(lines)


def fuse_conv_bn(model, report=False):
    """An inference copy of ``model`` with every conv + eval batch norm (+ ReLU) folded into
    one cnnops convolution with bias (cnnops.nn.ConvNd, or ConvReLUNd with the ReLU).

    ``model`` and all its submodules must be in eval mode (RuntimeError otherwise); the model
    itself is never modified. Returns the fused copy, or ``(copy, FuseReport)`` with
    ``report=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_conv_bn(): model must be a torch.nn.Module, but got {type(model).__name__}")
    _check_eval(model)

    # Trace a copy, never the model: a forward with side effects must not touch the original.
    traced = copy.deepcopy(model)
    try:
        gm = _trace(traced)
    except Exception as exc:  # TraceError, or a TypeError/RuntimeError from a Proxy in control flow
        fused = copy.deepcopy(model)  # the traced copy may be half-mutated by the failed trace
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        rep = FuseReport("sequential", trace_error=f"{type(exc).__name__}: {first_line}")
        _fuse_sequentials(fused, rep)
    else:
        rep = FuseReport("fx")
        fused = _fuse_graph(gm, rep)
    fused.eval()  # fx's new container modules start in training mode
    return (fused, rep) if report else fused


# ---------------------------------------------------------------------------------------------
# checks and the fold
# ---------------------------------------------------------------------------------------------


def _check_eval(model):
    # torch's own fusers (torch.nn.utils.fuse_conv_bn_eval, torch.fx.experimental.optimization)
    # raise AssertionError("Fusion only for eval!"). AssertionError reads as a broken invariant
    # inside a library; a model left in training mode is a state of the caller's object that
    # the caller must fix, so we raise RuntimeError, naming the module.
    for name, module in model.named_modules():
        if module.training:
            where = f"submodule '{name}'" if name else "the model"
            raise RuntimeError(
                f"fuse_conv_bn(): model must be in eval mode (folding uses the batch norms' running "
                f"statistics), but {where} ({type(module).__name__}) is in training mode; call model.eval() first")


def _why_not_foldable(conv, bn):
    """None when bn can be folded into conv, else the reason."""
    if bn.training:
        return "batch norm in training mode"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False): it normalizes with batch statistics"
    if bn.num_features != conv.out_channels:
        return f"channel mismatch: conv has {conv.out_channels} output channels, batch norm {bn.num_features}"
    bn_dims = _BN_DIMS[type(bn)]
    if bn_dims is not None and bn_dims != _CONV_DIMS[type(conv)]:
        return f"dimension mismatch: {type(conv).__name__} followed by {type(bn).__name__}"
    return None


def _folded_conv(conv, bn, relu):
    """A new cnnops conv (ConvReLU when ``relu``) computing relu?(bn(conv(x))) in eval mode."""
    dims = _CONV_DIMS[type(conv)]
    cls = getattr(cnn, f"ConvReLU{dims}d" if relu else f"Conv{dims}d")
    w = conv.weight.detach()
    with torch.no_grad():
        # Folded in float64, then cast to the conv's dtype.
        f64 = dict(dtype=torch.float64, device=w.device)
        mean, var = bn.running_mean.to(**f64), bn.running_var.to(**f64)
        gamma = bn.weight.detach().to(**f64) if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.detach().to(**f64) if bn.bias is not None else torch.zeros_like(mean)
        b = conv.bias.detach().to(**f64) if conv.bias is not None else torch.zeros_like(mean)
        # formulas.md §Conv-BN folding: y = gamma (x - mu) / sigma + beta, x = w*in + b, sigma = sqrt(var + eps):
        # w' = w * gamma / sigma per output channel, b' = (b - mu) * gamma / sigma + beta
        scale = gamma / torch.sqrt(var + bn.eps)
        new_w = torch.empty_like(w)  # keeps the weight's dtype and memory format (channels_last)
        new_w.copy_(w.to(torch.float64) * scale.reshape((-1,) + (1,) * (w.dim() - 1)))
        new_b = ((b - mean) * scale + beta).to(conv.bias.dtype if conv.bias is not None else w.dtype)

    # skip_init: no random initialization (it would be overwritten and would consume the RNG).
    fused = torch.nn.utils.skip_init(
        cls, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
        padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
    fused.weight = nn.Parameter(new_w, requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(new_b, requires_grad=conv.weight.requires_grad)
    if dims == 1:
        fused.register_forward_pre_hook(_refuse_unbatched_1d)
    return fused.train(False)


def _refuse_unbatched_1d(module, args):
    """Unbatched (C, L) input: the original BatchNorm1d would have normalized the conv's
    (C_out, L) output as a batch of C_out rows of L features, a different function from the
    per-channel fold, so the fused conv refuses it instead of answering differently."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
        raise NotImplementedError("fuse_conv_bn(): a Conv1d folded with its BatchNorm1d takes batched "
                                  f"(N, C, L) input only, got input of size {list(args[0].shape)}")


# ---------------------------------------------------------------------------------------------
# 1. the fx path
# ---------------------------------------------------------------------------------------------


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with cnnops modules as leaves like torch.nn's (so a cnnops conv or
    batch norm shows up as one call_module node, not as its insides)."""

    def is_leaf_module(self, m, module_qualified_name):
        if type(m).__module__.startswith("cnnops.") and not isinstance(m, nn.Sequential):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model):
    tracer = _Tracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _is_relu_of(node, input_node, modules):
    """node computes relu(input_node) (F.relu's second positional argument is ``inplace``)."""
    if not node.args or node.args[0] is not input_node:
        return False
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU and len(node.args) == 1
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and (len(node.args) == 1 or node.target is torch.nn.functional.relu)
    if node.op == "call_method":
        return node.target in _RELU_METHODS and len(node.args) == 1
    return False


def _set_submodule(root, qualified_name, module):
    parent, _, name = qualified_name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _fuse_graph(gm, rep):
    graph = gm.graph
    modules = dict(gm.named_modules())
    # A conv module called at two places, or whose weight the forward reads directly, cannot
    # take new weights without changing those other uses.
    calls, attrs = {}, set()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            attrs.add(node.target.rpartition(".")[0])

    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module" or type(modules[bn_node.target]) not in _BN_DIMS:
            continue
        bn = modules[bn_node.target]
        conv_node = bn_node.args[0] if bn_node.args else None
        if not (isinstance(conv_node, torch.fx.Node) and conv_node.op == "call_module"
                and type(modules[conv_node.target]) in _CONV_DIMS):
            rep.left.append((bn_node.target, "not preceded by a plain convolution"))
            continue
        conv = modules[conv_node.target]
        reason = _why_not_foldable(conv, bn)
        if reason is None and len(conv_node.users) != 1:
            others = ", ".join(n.name for n in conv_node.users if n is not bn_node)
            reason = f"the output of conv '{conv_node.target}' is also used by {others}"
        if reason is None and (calls[conv_node.target] != 1 or conv_node.target in attrs):
            reason = f"conv '{conv_node.target}' is called or read at more than one place"
        if reason is not None:
            rep.left.append((bn_node.target, reason))
            continue

        users = list(bn_node.users)
        relu_node = users[0] if len(users) == 1 and _is_relu_of(users[0], bn_node, modules) else None
        fused = _folded_conv(conv, bn, relu_node is not None)
        _set_submodule(gm, conv_node.target, fused)
        modules[conv_node.target] = fused
        # conv_node now computes relu?(bn(conv(x))): its value replaces the nodes it absorbed.
        for absorbed in (bn_node, relu_node):
            if absorbed is not None:
                absorbed.replace_all_uses_with(conv_node)
                graph.erase_node(absorbed)
        relu_name = None
        if relu_node is not None:
            relu_name = relu_node.target if relu_node.op == "call_module" else relu_node.name
        rep.fused.append((conv_node.target, bn_node.target, relu_name))

    graph.lint()
    gm.delete_all_unused_submodules()  # the absorbed batch norms (and ReLUs no longer called)
    gm.recompile()
    return gm


# ---------------------------------------------------------------------------------------------
# 2. the Sequential fallback
# ---------------------------------------------------------------------------------------------


def _fuse_sequentials(model, rep):
    # How often each module object appears in the tree: a shared conv is not folded.
    appearances = {}
    for _, m in model.named_modules(remove_duplicate=False):
        appearances[id(m)] = appearances.get(id(m), 0) + 1

    for prefix, seq in list(model.named_modules()):
        if type(seq) is not nn.Sequential:
            continue
        names = list(seq._modules.keys())
        qual = {n: f"{prefix}.{n}" if prefix else n for n in names}
        i = 0
        while i < len(names):
            child = seq._modules[names[i]]
            if type(child) not in _BN_DIMS:
                i += 1
                continue
            bn = child
            conv = seq._modules[names[i - 1]] if i > 0 else None
            if type(conv) not in _CONV_DIMS:
                rep.left.append((qual[names[i]], "not preceded by a plain convolution"))
                i += 1
                continue
            reason = _why_not_foldable(conv, bn)
            if reason is None and appearances[id(conv)] != 1:
                reason = f"conv '{qual[names[i - 1]]}' appears at more than one place in the model"
            if reason is not None:
                rep.left.append((qual[names[i]], reason))
                i += 1
                continue
            nxt = seq._modules[names[i + 1]] if i + 1 < len(names) else None
            relu = type(nxt) is nn.ReLU
            seq._modules[names[i - 1]] = _folded_conv(conv, bn, relu)
            seq._modules[names[i]] = nn.Identity()
            if relu:
                seq._modules[names[i + 1]] = nn.Identity()
            rep.fused.append((qual[names[i - 1]], qual[names[i]], qual[names[i + 1]] if relu else None))
            i += 2 if relu else 1
