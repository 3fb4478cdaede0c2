"""torch.ao.quantization and cnnops modules (registered when cnnops is imported).

Eager fusion: torch.ao.quantization.fuse_modules (and fuse_modules_qat) look fusers up by the
exact module types. For every torch fuser (conv-bn, conv-bn-relu, conv-relu, linear-bn,
bn-relu, convtranspose-bn; 1d/2d/3d) the same fuser is registered for the cnnops twins. It runs
torch's fuser on the modules seen as their torch.nn types and converts what it builds, so
fuse_modules(cnnops.convert(m)) is cnnops.convert(fuse_modules(m)): the same modules (a folded
conv, nni.ConvReLU2d, nni.ConvBn2d, ...) with cnnops computing inside, same values.

Quantization: cnnops has no quantized kernels. Eager prepare (and prepare_qat, quantize)
raises NotImplementedError at the first cnnops module that would be observed, naming it and
saying to call cnnops.revert(model) first; convert raises the same where a custom config
bypassed that check. FX graph-mode quantization (prepare_fx) raises it while tracing
(cnnops/_fx.py). A silently unquantized layer is never the result.
"""
import importlib
import itertools

import torch
from torch.ao.quantization import fuser_method_mappings, quantization_mappings

from . import nn as cnn
from .conversion import REVERSED, SUPPORTED, convert

__all__ = []

# the module torch.ao.quantization.quantize (the package exports a function of that name)
_quantize = importlib.import_module("torch.ao.quantization.quantize")


def _fuser_for_cnnops(torch_fuser):
    """torch_fuser(is_qat, *modules) run on the modules with their torch.nn types; what it
    builds (a folded copy, or torch's fused container of the same modules) is converted."""

    def fuse(is_qat, *modules):
        swapped = [m for m in modules if type(m) in REVERSED]
        for m in swapped:
            m.__class__ = REVERSED[type(m)]
        try:
            fused = torch_fuser(is_qat, *modules)
        finally:
            for m in swapped:
                m.__class__ = SUPPORTED[type(m)]
        return convert(fused)

    return fuse


def _register_fusers():
    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for types, torch_fuser in list(table.items()):
        if not callable(torch_fuser) or isinstance(torch_fuser, type):
            continue  # torch maps some patterns to a module class, not to a fuser function
        options = [(t, SUPPORTED[t]) if t in SUPPORTED else (t,) for t in types]
        for variant in itertools.product(*options):
            if variant != types and variant not in table:
                table[variant] = _fuser_for_cnnops(torch_fuser)


def no_quantized_kernels_message(module_type, where):
    return (f"cnnops has no quantized kernels: {where} cannot quantize {module_type.__module__}."
            f"{module_type.__qualname__}. Call cnnops.revert(model) first: it gives the model its torch.nn "
            "modules back (same Parameter and buffer objects), which torch.ao.quantization quantizes")


class NoQuantizedKernels:
    """Stands for a quantized (or observed) twin of a cnnops module in torch.ao's eager
    mappings: building it raises NotImplementedError saying what to do."""

    @classmethod
    def from_float(cls, mod, *args, **kwargs):
        raise NotImplementedError(no_quantized_kernels_message(type(mod), "torch.ao.quantization"))

    from_observed = from_float


def _register_quantization_errors():
    cnnops_types = [t for t in vars(cnn).values() if isinstance(t, type) and issubclass(t, torch.nn.Module)
                    and t.__module__ == cnn.__name__]
    # prepare / prepare_qat / quantize: the default custom-module mapping is consulted for every
    # module that has a qconfig, before observers are inserted
    custom = _quantize.get_default_custom_config_dict()
    for t in cnnops_types:
        custom["float_to_observed_custom_module_class"].setdefault(t, NoQuantizedKernels)
    # convert with a custom prepare config that bypassed the check above
    for t in cnnops_types:
        quantization_mappings.DEFAULT_STATIC_QUANT_MODULE_MAPPINGS.setdefault(t, NoQuantizedKernels)


_register_fusers()
_register_quantization_errors()
