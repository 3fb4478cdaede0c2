"""torch.fx symbolic tracing of cnnops modules and functions.

A cnnops module called on an FX Proxy is recorded where the tracer records its torch.nn twin:
as one call_module node when the tracer takes the twin for a leaf (torch.fx's default tracer,
torchvision's create_feature_extractor), so a converted model traces to the torch.nn model's
graph, node names included, and the GraphModule runs the cnnops module itself. A tracer that
traces through torch.nn modules traces through the cnnops forward, where cnnops.functional
records each call as one call_function node (a leaf function, as torch.nn.functional's are).

FX graph-mode quantization (prepare_fx, fuse_fx) matches exact torch.nn types and cnnops has no
quantized kernels: its tracer gets NotImplementedError saying to revert first, never a graph
whose cnnops layers are silently left unquantized.
"""
import sys

import torch

_QUANT_TRACER_MODULE = "torch.ao.quantization.fx.tracer"


def _check_not_quantizing(tracer, what):
    quant = sys.modules.get(_QUANT_TRACER_MODULE)
    if quant is not None and isinstance(tracer, quant.QuantizationTracer):
        from .ao import no_quantized_kernels_message

        raise NotImplementedError(no_quantized_kernels_message(what, "FX graph-mode quantization (prepare_fx)"))


def _torch_twin(cls):
    from .conversion import REVERSED

    twin = REVERSED.get(cls)
    if twin is None:  # cnnops.nn.ConvReLU*d: the torch.nn conv it extends
        twin = next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn."))
    return twin


def module_node(module, args, kwargs=None):
    """For module(*args, **kwargs) with an FX Proxy among args: the call_module node's Proxy
    when the tracer takes the module's torch.nn twin for a leaf, else None (trace through)."""
    kwargs = kwargs or {}
    proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
    if proxy is None:
        return None  # not traced: the eager forward raises what it raises for a non-tensor
    tracer = proxy.tracer
    _check_not_quantizing(tracer, type(module))
    if module is getattr(tracer, "root", None):
        return None  # the traced module itself: its forward is traced, as torch traces its twin's
    path = tracer.path_of_module(module)
    stand_in = object.__new__(_torch_twin(type(module)))  # the twin's view of the same attributes
    stand_in.__dict__.update(module.__dict__)
    if not tracer.is_leaf_module(stand_in, path):
        return None
    # what torch.fx.Tracer.call_module does for a leaf (the module is already on its module stack)
    return tracer.create_proxy("call_module", path, args, kwargs)


def handle(function, relevant, *args, **kwargs):
    """cnnops.functional's handle_torch_function: an FX Proxy records `function` as one
    call_function node (a leaf function, as torch.nn.functional's); other __torch_function__
    objects get their override."""
    for a in relevant:
        if isinstance(a, torch.fx.Proxy):
            _check_not_quantizing(a.tracer, function)
    return torch.overrides.handle_torch_function(function, relevant, *args, **kwargs)
