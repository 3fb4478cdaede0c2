"""cnnops.complexity(model, example_input): learnable parameters and multiply-accumulates,
per layer and in total, measured by running the model once with forward hooks.

The counting rules (docs/formulas.md §Counting):
  convolution  params = C_out * (C_in/groups * K_h * K_w) + C_out (bias)
               MACs   = (outputs) * (C_in/groups * K_h * K_w): each output is one inner product
  linear       MACs   = (outputs) * in_features
  pooling and normalization have no multiply-accumulates in this count; their parameters (the
  affine weight and bias of a norm) are counted.
Bias additions are not multiply-accumulates, so 3x32x32 through 10 filters of 5x5, padding 2,
gives 10 * 32 * 32 outputs * 75 = 768,000 MACs and 10 * 75 + 10 = 760 parameters.
"""
import dataclasses
import math

import torch


@dataclasses.dataclass
class Row:
    name: str  # qualified module name, as in model.named_modules()
    type: str
    output_shape: tuple
    params: int
    macs: int


def _human(n):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@dataclasses.dataclass
class Complexity:
    """.params: learnable parameters of the whole model; .macs: multiply-accumulates of one
    forward pass on the example input; .rows: one Row per call of a leaf module (or of any
    module with parameters or MACs of its own), in execution order. str() prints the table."""

    params: int
    macs: int
    rows: list

    def __str__(self):
        header = ("layer", "type", "output shape", "params", "MACs")
        body = [(r.name or "(model)", r.type, "x".join(map(str, r.output_shape)) or "-", f"{r.params:,}", f"{r.macs:,}")
                for r in self.rows]
        total = ("total", "", "", f"{self.params:,}", f"{self.macs:,}")
        widths = [max(len(row[i]) for row in [header, *body, total]) for i in range(5)]

        def line(cells):
            left = [cells[i].ljust(widths[i]) for i in range(3)]
            right = [cells[i].rjust(widths[i]) for i in range(3, 5)]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, body), rule, line(total),
                          f"{_human(self.params)} parameters, {_human(self.macs)} multiply-accumulates"])


_CONV = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_CONV_TRANSPOSE = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def _macs(module, inputs, output):
    if isinstance(module, _CONV):
        # Each output is an inner product over C_in/groups x K_h x K_w.
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, _CONV_TRANSPOSE):
        # The transpose scatters each input over C_out/groups x K_h x K_w outputs.
        return inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, (torch.nn.Linear, torch.nn.Bilinear)):
        if isinstance(module, torch.nn.Linear):
            per_output = module.in_features
        else:
            per_output = module.in1_features * module.in2_features
        return output.numel() * per_output
    return 0


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((t for t in map(_first_tensor, value) if t is not None), None)
    return None


def complexity(model, example_input):
    """Run `model` once on `example_input` (a tensor, or a tuple of positional arguments) and
    count parameters and MACs per module call. The model is left as it was: it runs in eval
    mode under no_grad (so no running statistics move) and its training flags are restored."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"complexity(): model must be a torch.nn.Module, got {type(model).__name__}")
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)

    rows, seen = [], set()
    names = {module: name for name, module in model.named_modules()}

    def record(module, inputs, output):
        # A module's own parameters count once, however often it is called.
        params = 0 if module in seen else sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        seen.add(module)
        macs = _macs(module, inputs, output)
        if params or macs or next(module.children(), None) is None:
            out = _first_tensor(output)
            shape = tuple(out.shape) if out is not None else ()
            rows.append(Row(names[module], type(module).__name__, shape, params, macs))

    training = {module: module.training for module in model.modules()}
    handles = [module.register_forward_hook(record) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception as error:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        error.add_note(f"complexity(): the model rejected example_input {shapes}")
        raise
    finally:
        for handle in handles:
            handle.remove()
        for module, was_training in training.items():
            module.training = was_training

    # Parameters of modules the example never reached still count (a branch not taken).
    for module, name in names.items():
        own = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        if own and module not in seen:
            rows.append(Row(name, type(module).__name__, (), own, 0))
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Complexity(params=learnable, macs=sum(r.macs for r in rows), rows=rows)
