"""cnnops.convert(model): swap a model's torch.nn layers for their cnnops twins, in place.

Every cnnops.nn module has its torch.nn twin's attributes and no state of its own (all but
SyncBatchNorm subclass the twin; SyncBatchNorm is, like torch's, a _BatchNorm with a
process_group), so a module is converted by changing its class: the module object stays the same one, and with it every
Parameter and buffer object, hook, training flag, device and dtype. An optimizer, a
state_dict reference or a hook registered before the conversion keeps working.
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


@dataclasses.dataclass
class ConvertReport:
    """What cnnops.convert did. replaced: (name, torch type, cnnops type) per converted module;
    left: (name, type, reason) per leaf module that still runs its own code. Names are
    qualified as in model.named_modules() ('' is the model itself)."""

    replaced: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)

    def __str__(self):
        lines = [f"cnnops.convert: {len(self.replaced)} replaced, {len(self.left)} left as they are"]
        width = max((len(name or "(model)") for name, *_ in self.replaced + self.left), default=0)
        for name, torch_type, cnnops_type in self.replaced:
            lines.append(f"  replaced  {name or '(model)':<{width}}  {torch_type} -> {cnnops_type}")
        for name, type_name, reason in self.left:
            lines.append(f"  left      {name or '(model)':<{width}}  {type_name}: {reason}")
        return "\n".join(lines)


def _why_left(module):
    """Why a leaf module that is not converted keeps running its own forward."""
    kind = type(module)
    if kind in _CNNOPS_TYPES:
        return "already cnnops"
    twin = next((t for t in SUPPORTED if isinstance(module, t)), None)
    if twin is not None:
        return f"a subclass of torch.nn.{twin.__name__}; its own forward is kept"
    return "no cnnops twin; torch runs it"


def convert(model, report=False):
    """Replace, in place, every submodule of `model` whose type is exactly one of the torch.nn
    types in SUPPORTED with its cnnops.nn twin, keeping the same module, Parameter and buffer
    objects. Returns `model`, or `(model, ConvertReport)` when report=True.

    A module shared by several parents is converted once. Subclasses of the supported types
    are left alone (they may override forward) and listed in the report with the reason.
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
        elif next(module.children(), None) is None:
            summary.left.append((name, type(module).__name__, _why_left(module)))
    return (model, summary) if report else model
