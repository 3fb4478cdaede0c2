"""cnnops.complexity: parameters and multiply-accumulates per layer. Expected counts are worked
out by hand in each test from the counting rules of docs/formulas.md §Counting (each convolution
output is an inner product over C_in/groups x K_h x K_w), not taken from the counter."""
import pytest
import torch
import torch.nn as nn

import cnnops


def test_lecture_example_760_parameters_768000_macs():
    # 3x32x32 input, 10 filters of 5x5, stride 1, padding 2: 10 * (5*5*3) + 10 = 760 parameters,
    # 32 * 32 * 10 outputs of a 75-term inner product = 768,000 multiply-adds.
    result = cnnops.complexity(nn.Conv2d(3, 10, 5, stride=1, padding=2), torch.randn(1, 3, 32, 32))
    assert result.params == 760
    assert result.macs == 768_000
    (row,) = result.rows
    assert (row.name, row.type, row.output_shape, row.params, row.macs) == ("", "Conv2d", (1, 10, 32, 32), 760, 768_000)


def test_a_small_cnn_row_by_row():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),  # 8x16x16 out, 8*27 params
        nn.BatchNorm2d(8),  # 16 params
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8x8
        nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=4),  # 16x8x8, 16*2*9 + 16 params
        nn.GroupNorm(4, 16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),  # 170 params
    )
    result = cnnops.complexity(model, torch.randn(2, 3, 32, 32))
    expected = [
        ("0", "Conv2d", (2, 8, 16, 16), 8 * 27, 2 * 8 * 16 * 16 * 27),
        ("1", "BatchNorm2d", (2, 8, 16, 16), 16, 0),
        ("2", "ReLU", (2, 8, 16, 16), 0, 0),
        ("3", "MaxPool2d", (2, 8, 8, 8), 0, 0),
        ("4", "Conv2d", (2, 16, 8, 8), 16 * 2 * 9 + 16, 2 * 16 * 8 * 8 * (2 * 9)),
        ("5", "GroupNorm", (2, 16, 8, 8), 32, 0),
        ("6", "AdaptiveAvgPool2d", (2, 16, 1, 1), 0, 0),
        ("7", "Flatten", (2, 16), 0, 0),
        ("8", "Linear", (2, 10), 170, 2 * 10 * 16),
    ]
    assert [(r.name, r.type, r.output_shape, r.params, r.macs) for r in result.rows] == expected
    assert result.params == sum(p.numel() for p in model.parameters())
    assert result.macs == sum(e[-1] for e in expected)


def test_1d_3d_and_transposed_convolutions():
    model = nn.Sequential(nn.Conv1d(4, 6, 5, stride=2))  # L: (20 - 5) // 2 + 1 = 8
    assert cnnops.complexity(model, torch.randn(3, 4, 20)).macs == 3 * 6 * 8 * (4 * 5)
    model = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))
    assert cnnops.complexity(model, torch.randn(1, 2, 3, 5, 5)).macs == 4 * 3 * 5 * 5 * (2 * 9)
    # A transposed convolution scatters each input over C_out/groups x K outputs.
    model = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    assert cnnops.complexity(model, torch.randn(1, 4, 5, 5)).macs == 4 * 5 * 5 * (3 * 9)


def test_module_called_twice_counts_its_macs_twice_and_its_parameters_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    result = cnnops.complexity(Twice(), torch.randn(1, 2, 4, 4))
    assert [r.params for r in result.rows if r.name == "conv"] == [6, 0]
    assert result.params == 6 and result.macs == 2 * (2 * 16 * 2)


def test_parameters_of_a_module_not_reached_still_count_and_frozen_ones_do_not():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 2)
            self.frozen = nn.Linear(3, 3)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.used(self.frozen(x))

    result = cnnops.complexity(Branchy(), torch.randn(5, 3))
    assert result.params == 12 + 8
    assert ("unused", "Linear", (), 8, 0) in [(r.name, r.type, r.output_shape, r.params, r.macs) for r in result.rows]
    assert result.macs == 2 * 5 * 3 * 3


def test_table_and_converted_models_count_the_same():
    model = nn.Sequential(nn.Conv2d(3, 10, 5, padding=2), nn.BatchNorm2d(10), nn.MaxPool2d(2))
    before = cnnops.complexity(model, torch.randn(1, 3, 32, 32))
    after = cnnops.complexity(cnnops.convert(model), torch.randn(1, 3, 32, 32))
    assert (after.params, after.macs) == (before.params, before.macs) == (780, 768_000)
    text = str(after)
    assert "768,000" in text and "780" in text and "MaxPool2d" in text and "1x10x16x16" in text


def test_model_state_untouched_by_counting():
    model = cnnops.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)))
    model[2].eval()
    running = model[1].running_mean.clone()
    cnnops.complexity(model, torch.randn(4, 3, 8, 8) + 5)
    assert torch.equal(model[1].running_mean, running) and model[1].num_batches_tracked.item() == 0
    assert model.training and model[1].training and not model[2].training
    assert all(not m._forward_hooks for m in model.modules())


def test_rejected_input_raises_the_models_error_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(RuntimeError) as info:
        cnnops.complexity(model, torch.randn(1, 5, 8, 8))
    assert any("rejected example_input [(1, 5, 8, 8)]" in note for note in info.value.__notes__)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    assert model[1].num_batches_tracked.item() == 0


def test_tuple_inputs_are_positional_arguments():
    class Add(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 3)

        def forward(self, a, b):
            return self.conv(a + b)

    result = cnnops.complexity(Add(), (torch.randn(1, 1, 10), torch.randn(1, 1, 10)))
    assert result.macs == 8 * 3


def test_not_a_module_raises_type_error():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        cnnops.complexity(lambda x: x, torch.randn(1))
