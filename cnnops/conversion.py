"""cnnops.convert(model): swap a model's torch.nn layers for their cnnops twins, in place.

Every cnnops.nn module has its torch.nn twin's attributes and no state of its own (all but
SyncBatchNorm subclass the twin; SyncBatchNorm is, like torch's, a _BatchNorm with a
process_group), so a module is converted by changing its class: the module object stays the same one, and with it every
Parameter and buffer object, hook, training flag, device and dtype. An optimizer, a
state_dict reference or a hook registered before the conversion keeps working.
cnnops.revert(model) swaps the classes back: the exact inverse, for the roads cnnops does not
serve itself (eager and FX quantization, which need torch.nn types).
"""
import dataclasses

import torch

from . import nn as cnn

# Exact torch.nn type -> cnnops.nn twin. Subclasses are not in here: they may have their own
# forward, which must keep running.
SUPPORTED = {
    torch.nn.Conv1d: cnn.Conv1d,
    torch.nn.Conv2d: cnn.Conv2d,
    torch.nn.Conv3d: cnn.Conv3d,
    torch.nn.MaxPool1d: cnn.MaxPool1d,
    torch.nn.MaxPool2d: cnn.MaxPool2d,
    torch.nn.MaxPool3d: cnn.MaxPool3d,
    torch.nn.AvgPool1d: cnn.AvgPool1d,
    torch.nn.AvgPool2d: cnn.AvgPool2d,
    torch.nn.AvgPool3d: cnn.AvgPool3d,
    torch.nn.AdaptiveAvgPool1d: cnn.AdaptiveAvgPool1d,
    torch.nn.AdaptiveAvgPool2d: cnn.AdaptiveAvgPool2d,
    torch.nn.AdaptiveAvgPool3d: cnn.AdaptiveAvgPool3d,
    torch.nn.AdaptiveMaxPool1d: cnn.AdaptiveMaxPool1d,
    torch.nn.AdaptiveMaxPool2d: cnn.AdaptiveMaxPool2d,
    torch.nn.AdaptiveMaxPool3d: cnn.AdaptiveMaxPool3d,
    torch.nn.MaxUnpool1d: cnn.MaxUnpool1d,
    torch.nn.MaxUnpool2d: cnn.MaxUnpool2d,
    torch.nn.MaxUnpool3d: cnn.MaxUnpool3d,
    torch.nn.BatchNorm1d: cnn.BatchNorm1d,
    torch.nn.BatchNorm2d: cnn.BatchNorm2d,
    torch.nn.BatchNorm3d: cnn.BatchNorm3d,
    torch.nn.InstanceNorm1d: cnn.InstanceNorm1d,
    torch.nn.InstanceNorm2d: cnn.InstanceNorm2d,
    torch.nn.InstanceNorm3d: cnn.InstanceNorm3d,
    torch.nn.LayerNorm: cnn.LayerNorm,
    torch.nn.GroupNorm: cnn.GroupNorm,
    torch.nn.SyncBatchNorm: cnn.SyncBatchNorm,
}

_CNNOPS_TYPES = frozenset(SUPPORTED.values())
# cnnops.nn twin -> exact torch.nn type (SUPPORTED is one to one).
REVERSED = {twin: torch_type for torch_type, twin in SUPPORTED.items()}


@dataclasses.dataclass
class ConvertReport:
    """What cnnops.convert (or cnnops.revert) did. replaced: (name, old type, new type) per
    converted module; left: (name, type, reason) per module that still runs its own code (every
    leaf module, and every module of a supported kind that was not converted: subclasses,
    parametrized modules). Names are qualified as in model.named_modules() ('' is the model
    itself)."""

    replaced: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    action: str = "cnnops.convert"

    def __str__(self):
        lines = [f"{self.action}: {len(self.replaced)} replaced, {len(self.left)} left as they are"]
        width = max((len(name or "(model)") for name, *_ in self.replaced + self.left), default=0)
        for name, torch_type, cnnops_type in self.replaced:
            lines.append(f"  replaced  {name or '(model)':<{width}}  {torch_type} -> {cnnops_type}")
        for name, type_name, reason in self.left:
            lines.append(f"  left      {name or '(model)':<{width}}  {type_name}: {reason}")
        return "\n".join(lines)


def _why_left(module):
    """Why a module that is not converted keeps running its own forward: a leaf module, or a
    module of a supported kind (a subclass or a parametrized one, which has children)."""
    kind = type(module)
    if kind in _CNNOPS_TYPES:
        return "already cnnops"
    if torch.nn.utils.parametrize.is_parametrized(module):
        # register_parametrization swapped its class for a generated subclass of its own class
        base = torch.nn.utils.parametrize.type_before_parametrizations(module)
        names = ", ".join(module.parametrizations.keys())
        return (f"parametrized {base.__name__} ({names} under torch.nn.utils.parametrize); "
                "torch runs it. Remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) "
                "to convert it, or register it after cnnops.convert")
    twin = next((t for t in SUPPORTED if isinstance(module, t)), None)
    if twin is not None:
        return f"a subclass of torch.nn.{twin.__name__}; its own forward is kept"
    return "no cnnops twin; torch runs it"


def _reported(module):
    """A module convert/revert leaves is reported when it is a leaf or is of a supported kind."""
    return next(module.children(), None) is None or isinstance(module, tuple(SUPPORTED))


def convert(model, report=False):
    """Replace, in place, every submodule of `model` whose type is exactly one of the torch.nn
    types in SUPPORTED with its cnnops.nn twin, keeping the same module, Parameter and buffer
    objects. Returns `model`, or `(model, ConvertReport)` when report=True.

    A module shared by several parents is converted once. Subclasses of the supported types
    are left alone (they may override forward), parametrized modules too (their class is one
    torch.nn.utils.parametrize generated); the report lists each with the reason, beside every
    leaf module that has no cnnops twin. A module with the old hook-based weight_norm or
    spectral_norm (torch.nn.utils.weight_norm) keeps its type and is converted: the hook sets
    its weight before each forward, which cnnops then reads.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert(): model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("convert(): model is a TorchScript module; convert the eager model before scripting it")
    summary = ConvertReport()
    # named_modules() yields each module object once, so shared modules are not converted twice.
    for name, module in model.named_modules():
        twin = SUPPORTED.get(type(module))
        if twin is not None:
            torch_name = type(module).__name__
            module.__class__ = twin
            summary.replaced.append((name, f"torch.nn.{torch_name}", f"cnnops.nn.{twin.__name__}"))
        elif _reported(module):
            summary.left.append((name, type(module).__name__, _why_left(module)))
    return (model, summary) if report else model


_NO_TORCH_TWIN = "no single torch.nn twin (cnnops' fused conv + ReLU from cnnops.fuse_conv_bn); cnnops runs it"
_PARAMETRIZED_CNNOPS = "a cnnops module parametrized after convert; remove the parametrization to revert it"


def revert(model, report=False):
    """The exact inverse of cnnops.convert: every submodule whose type is exactly a cnnops.nn
    twin in SUPPORTED gets its torch.nn type back, in place; the module, Parameter and buffer
    objects, hooks and flags stay the same. Returns `model`, or `(model, ConvertReport)` when
    report=True (replaced: cnnops type -> torch.nn type; left: the modules that stay as they
    are, with the reason; cnnops.nn.ConvReLU*d from fuse_conv_bn, which has no single torch.nn
    twin, among them).

    For the roads cnnops does not serve itself: eager and FX graph-mode quantization
    (torch.ao.quantization matches exact torch.nn types and cnnops has no quantized kernels).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"cnnops.revert: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("cnnops.revert: model is a TorchScript module; revert the eager model before scripting it")
    summary = ConvertReport(action="cnnops.revert")
    for name, module in model.named_modules():
        torch_type = REVERSED.get(type(module))
        if torch_type is not None:
            cnnops_name = type(module).__name__
            module.__class__ = torch_type
            summary.replaced.append((name, f"cnnops.nn.{cnnops_name}", f"torch.nn.{torch_type.__name__}"))
        elif type(module).__module__ == "cnnops.nn":
            summary.left.append((name, type(module).__name__, _NO_TORCH_TWIN))
        elif torch.nn.utils.parametrize.is_parametrized(module) and isinstance(module, tuple(REVERSED)):
            summary.left.append((name, type(module).__name__, _PARAMETRIZED_CNNOPS))
    return (model, summary) if report else model
