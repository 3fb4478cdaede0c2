"""Bad input to the normalization functions and modules: cnnops rejects what torch rejects,
with the same exception type (taken from torch inside each test) and a message naming the
argument; what torch accepts at the edges (batch 0, a (C, 1) weight) cnnops accepts too. The raw
ops reject bad arguments with RuntimeError instead of reading or writing out of bounds."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import cnnops
import cnnops.functional
import cnnops.nn


def x4():
    return torch.randn(2, 3, 4, 5)


def ones(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


# name -> (function name, builder() -> (args, kwargs), regex the cnnops message must match)
CASES = {
    # batch norm
    "bn_eval_no_running_mean": ("batch_norm", lambda: ((x4(), None, None), {}), "running_mean"),
    "bn_eval_no_running_var": ("batch_norm", lambda: ((x4(), ones(3), None), {}), "running_var"),
    "bn_running_mean_size": ("batch_norm", lambda: ((x4(), ones(4), ones(3)), dict(training=True)), "running_mean"),
    "bn_running_var_size": ("batch_norm", lambda: ((x4(), ones(3), ones(4)), dict(training=True)), "running_var"),
    "bn_train_only_running_mean": ("batch_norm", lambda: ((x4(), ones(3), None), dict(training=True)),
                                   "running_mean and running_var"),
    "bn_train_only_running_var": ("batch_norm", lambda: ((x4(), None, ones(3)), dict(training=True)),
                                  "running_mean and running_var"),
    "bn_weight_size": ("batch_norm", lambda: ((x4(), ones(3), ones(3), ones(4)), {}), "weight"),
    "bn_bias_size": ("batch_norm", lambda: ((x4(), ones(3), ones(3), None, ones(2)), {}), "bias"),
    "bn_one_value_per_channel": ("batch_norm", lambda: ((torch.randn(1, 3), None, None), dict(training=True)),
                                 "more than 1 value per channel"),
    "bn_one_value_per_channel_4d": ("batch_norm", lambda: ((torch.randn(1, 3, 1, 1), ones(3), ones(3)),
                                                           dict(training=True)), "more than 1 value per channel"),
    "bn_eps_zero_training": ("batch_norm", lambda: ((x4(), None, None), dict(training=True, eps=0.0)), "eps"),
    "bn_eps_negative": ("batch_norm", lambda: ((x4(), ones(3), ones(3)), dict(eps=-1.0)), "eps"),
    "bn_input_1d": ("batch_norm", lambda: ((torch.randn(3), ones(3), ones(3)), {}), "input|running_mean"),
    "bn_input_0d": ("batch_norm", lambda: ((torch.tensor(1.0), ones(1), ones(1)), {}), "input|running_mean"),
    "bn_int_input": ("batch_norm", lambda: ((x4().long(), ones(3), ones(3)), {}), "batch_norm.*not implemented"),
    "bn_complex_input": ("batch_norm", lambda: ((x4().to(torch.complex64), None, None), dict(training=True)),
                         "not implemented"),
    "bn_not_a_tensor": ("batch_norm", lambda: (([1.0, 2.0], None, None), {}), "input"),
    "bn_weight_dtype": ("batch_norm", lambda: ((x4(), ones(3), ones(3), ones(3, dtype=torch.float64)), {}),
                        "weight|dtype"),
    "bn_running_dtype": ("batch_norm", lambda: ((x4(), ones(3, dtype=torch.float64), ones(3, dtype=torch.float64)),
                                                dict(training=True)), "running_mean|dtype"),
    # layer norm
    "ln_shape_mismatch": ("layer_norm", lambda: ((x4(), (4,)), {}), "normalized_shape"),
    "ln_shape_longer_than_input": ("layer_norm", lambda: ((torch.randn(5), (1, 5)), {}), "normalized_shape"),
    "ln_shape_empty": ("layer_norm", lambda: ((x4(), ()), {}), "normalized_shape"),
    "ln_shape_int": ("layer_norm", lambda: ((x4(), 5), {}), "normalized_shape"),
    "ln_shape_float": ("layer_norm", lambda: ((x4(), (5.0,)), {}), "normalized_shape"),
    "ln_shape_negative": ("layer_norm", lambda: ((x4(), (-5,)), {}), "normalized_shape"),
    "ln_weight_shape": ("layer_norm", lambda: ((x4(), (5,), ones(4)), {}), "weight"),
    "ln_weight_2d": ("layer_norm", lambda: ((x4(), (5,), ones(1, 5)), {}), "weight"),
    "ln_bias_shape": ("layer_norm", lambda: ((x4(), (4, 5), None, ones(5)), {}), "bias"),
    "ln_input_0d": ("layer_norm", lambda: ((torch.tensor(1.0), (1,)), {}), "normalized_shape"),
    "ln_int_input": ("layer_norm", lambda: ((x4().long(), (5,)), {}), "not implemented"),
    "ln_weight_dtype": ("layer_norm", lambda: ((x4(), (5,), ones(5, dtype=torch.float64)), {}), "weight|dtype"),
    # group norm
    "gn_not_divisible": ("group_norm", lambda: ((x4(), 2), {}), "num_groups"),
    "gn_more_groups_than_channels": ("group_norm", lambda: ((x4(), 6), {}), "num_groups"),
    "gn_zero_groups": ("group_norm", lambda: ((x4(), 0), {}), ""),
    "gn_negative_groups": ("group_norm", lambda: ((x4(), -1), {}), "num groups|num_groups"),
    "gn_input_1d": ("group_norm", lambda: ((torch.randn(3), 1), {}), "dimensions"),
    "gn_weight_size": ("group_norm", lambda: ((x4(), 3, ones(4)), {}), "weight"),
    "gn_weight_2d": ("group_norm", lambda: ((x4(), 3, ones(3, 1)), {}), "weight"),
    "gn_bias_size": ("group_norm", lambda: ((x4(), 3, None, ones(4)), {}), "bias"),
    "gn_one_value_per_group": ("group_norm", lambda: ((torch.randn(1, 3), 3), {}), "more than 1 value"),
    "gn_one_value_per_group_3d": ("group_norm", lambda: ((torch.randn(1, 4, 1), 4), {}), "more than 1 value"),
    "gn_int_input": ("group_norm", lambda: ((x4().long(), 1), {}), "not implemented"),
    # instance norm
    "in_single_spatial_element": ("instance_norm", lambda: ((torch.randn(2, 3, 1),), {}), "spatial element"),
    "in_single_spatial_element_4d": ("instance_norm", lambda: ((torch.randn(2, 3, 1, 1),), {}), "spatial element"),
    "in_2d_input": ("instance_norm", lambda: ((torch.randn(2, 3),), {}), "spatial element"),
    "in_1d_input": ("instance_norm", lambda: ((torch.randn(5),), {}), "spatial element"),
    "in_only_running_mean": ("instance_norm", lambda: ((x4(), ones(3), None), {}), "running_mean and running_var"),
    "in_only_running_var": ("instance_norm", lambda: ((x4(), None, ones(3)), {}), "running_mean and running_var"),
    "in_use_running_without_stats": ("instance_norm", lambda: ((x4(),), dict(use_input_stats=False)),
                                     "running_mean"),
    "in_weight_size": ("instance_norm", lambda: ((x4(),), dict(weight=ones(4))), "weight"),
    "in_bias_size": ("instance_norm", lambda: ((x4(),), dict(bias=ones(4))), "bias"),
    "in_running_mean_size": ("instance_norm", lambda: ((x4(), ones(4), ones(4)), {}), "running_mean"),
    "in_int_input": ("instance_norm", lambda: ((x4().long(),), {}), "not implemented"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_functional_errors_like_torch(name):
    fn, builder, pattern = CASES[name]
    args, kwargs = builder()
    with pytest.raises(Exception) as torch_exc:
        getattr(F, fn)(*args, **kwargs)
    args, kwargs = builder()
    with pytest.raises(torch_exc.type) as ours:
        getattr(cnnops.functional, fn)(*args, **kwargs)
    assert type(ours.value) is torch_exc.type, f"{type(ours.value).__name__} vs torch's {torch_exc.type.__name__}"
    assert re.search(pattern, str(ours.value)), f"message {str(ours.value)!r} does not name /{pattern}/"


# what torch accepts at the edges, cnnops accepts too (values in test_norm.py)
ACCEPTED = {
    "bn_weight_c_by_1": ("batch_norm", lambda: ((x4(), ones(3), ones(3), torch.randn(3, 1), torch.randn(1, 3)), {})),
    "bn_one_value_per_channel_eval": ("batch_norm", lambda: ((torch.randn(1, 3), ones(3), ones(3)), {})),
    "bn_batch0_training": ("batch_norm", lambda: ((torch.randn(0, 3, 4), ones(3), ones(3)), dict(training=True))),
    "bn_training_without_running": ("batch_norm", lambda: ((x4(), None, None), dict(training=True))),
    "bn_eps_zero_eval": ("batch_norm", lambda: ((x4(), ones(3), ones(3)), dict(eps=0.0))),
    "gn_flat_input": ("group_norm", lambda: ((torch.randn(2, 4), 2), {})),
    "gn_batch0": ("group_norm", lambda: ((torch.randn(0, 4, 3), 2), {})),
    "in_single_spatial_eval": ("instance_norm", lambda: ((torch.randn(2, 3, 1), ones(3), ones(3)),
                                                         dict(use_input_stats=False))),
    "in_batch0": ("instance_norm", lambda: ((torch.randn(0, 3, 4),), {})),
    "ln_torch_size": ("layer_norm", lambda: ((x4(), torch.Size([4, 5])), {})),
    "ln_list": ("layer_norm", lambda: ((x4(), [5]), {})),
    "ln_batch0": ("layer_norm", lambda: ((torch.randn(0, 5), (5,)), {})),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_like_torch(name):
    fn, builder = ACCEPTED[name]
    args, kwargs = builder()
    expected = getattr(F, fn)(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    out = getattr(cnnops.functional, fn)(*args, **kwargs)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_bn_weight_c_by_1_gradient_shape():
    """A (C, 1) weight, which torch's forward accepts (its backward then fails in an accessor),
    gets a (C, 1) gradient: torch's gradient for the same weight as a (C,) vector."""
    x = torch.randn(4, 3, 5)
    w = torch.randn(3, 1)
    wt = w.reshape(-1).clone().requires_grad_()
    F.batch_norm(x, None, None, wt, None, training=True).pow(2).sum().backward()
    wc = w.clone().requires_grad_()
    cnnops.functional.batch_norm(x, None, None, wc, None, training=True).pow(2).sum().backward()
    assert wc.grad.shape == (3, 1)
    torch.testing.assert_close(wc.grad.reshape(-1), wt.grad, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------

MODULE_CASES = {
    "groupnorm_not_divisible": (lambda nn: nn.GroupNorm(2, 3), None),
    "batchnorm2d_channels": (lambda nn: nn.BatchNorm2d(4), x4),
    "batchnorm2d_channels_eval": (lambda nn: nn.BatchNorm2d(4).eval(), x4),
    "batchnorm2d_rank": (lambda nn: nn.BatchNorm2d(3), lambda: torch.randn(2, 3, 4)),
    "batchnorm1d_rank": (lambda nn: nn.BatchNorm1d(3), x4),
    "batchnorm1d_one_value": (lambda nn: nn.BatchNorm1d(3), lambda: torch.randn(1, 3)),
    "instancenorm_affine_channels": (lambda nn: nn.InstanceNorm2d(4, affine=True), x4),
    "instancenorm_rank": (lambda nn: nn.InstanceNorm2d(3), lambda: torch.randn(3, 4)),
    "instancenorm_single_element": (lambda nn: nn.InstanceNorm1d(3), lambda: torch.randn(2, 3, 1)),
    "layernorm_shape": (lambda nn: nn.LayerNorm(4), x4),
    "layernorm_two_dims": (lambda nn: nn.LayerNorm([5, 5]), x4),
    "groupnorm_channels": (lambda nn: nn.GroupNorm(2, 4), lambda: torch.randn(2, 6, 3)),
}


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_module_errors_like_torch(name):
    make, make_input = MODULE_CASES[name]

    def run(nn):
        m = make(nn)
        if make_input is not None:
            m(make_input())

    with pytest.raises(Exception) as torch_exc:
        run(torch.nn)
    with pytest.raises(torch_exc.type) as ours:
        run(cnnops.nn)
    assert type(ours.value) is torch_exc.type, f"{type(ours.value).__name__} vs torch's {torch_exc.type.__name__}"


# --------------------------------------------------------------------------------------------
# raw ops: garbage arguments raise, never read or write out of bounds
# --------------------------------------------------------------------------------------------

ops = torch.ops.cnnops
X = torch.randn(2, 6, 3, 4)
M6, I6 = torch.zeros(6), torch.ones(6)
MASK = [True, True, True]

RAW = {
    "bn_fwd_weight_2d": (lambda: ops.batch_norm_forward(X, ones(6, 1), None, None, None, True, 0.1, 1e-5), "weight"),
    "bn_fwd_running_mean_short": (lambda: ops.batch_norm_forward(X, None, None, ones(5), ones(6), True, 0.1, 1e-5),
                                  "running_mean"),
    "bn_fwd_running_var_long": (lambda: ops.batch_norm_forward(X, None, None, ones(6), ones(9), True, 0.1, 1e-5),
                                "running_var"),
    "bn_fwd_running_mean_only": (lambda: ops.batch_norm_forward(X, None, None, ones(6), None, False, 0.1, 1e-5),
                                 "running"),
    "bn_fwd_0d": (lambda: ops.batch_norm_forward(torch.tensor(1.0), None, None, None, None, True, 0.1, 1e-5), "input"),
    "bn_bwd_grad_output_shape": (lambda: ops.batch_norm_backward(X[:1], X, None, M6, I6, True, MASK), "grad_output"),
    "bn_bwd_mean_short": (lambda: ops.batch_norm_backward(X, X, None, M6[:3], I6, True, MASK), "mean"),
    "bn_bwd_invstd_long": (lambda: ops.batch_norm_backward(X, X, None, M6, ones(12), False, MASK), "invstd"),
    "bn_bwd_weight_short": (lambda: ops.batch_norm_backward(X, X, ones(2), M6, I6, True, MASK), "weight"),
    "ln_fwd_shape": (lambda: ops.layer_norm_forward(X, [3, 5], None, None, 1e-5), "normalized_shape"),
    "ln_fwd_shape_negative": (lambda: ops.layer_norm_forward(X, [-4], None, None, 1e-5), "normalized_shape"),
    "ln_fwd_bias_shape": (lambda: ops.layer_norm_forward(X, [4], None, ones(5), 1e-5), "bias"),
    "ln_bwd_mean_shape": (lambda: ops.layer_norm_backward(X, X, [4], torch.zeros(2, 5), torch.ones(2, 6), None, MASK),
                          "mean"),
    "ln_bwd_invstd_shape": (lambda: ops.layer_norm_backward(X, X, [3, 4], torch.zeros(2, 6), torch.ones(2, 5), None,
                                                            MASK), "invstd"),
    "ln_bwd_grad_output_shape": (lambda: ops.layer_norm_backward(X[:, :3], X, [4], torch.zeros(2, 6, 3),
                                                                 torch.ones(2, 6, 3), None, MASK), "grad_output"),
    "ln_bwd_weight_shape": (lambda: ops.layer_norm_backward(X, X, [4], torch.zeros(2, 6, 3), torch.ones(2, 6, 3),
                                                            ones(3), MASK), "weight"),
    "gn_fwd_negative_groups": (lambda: ops.group_norm_forward(X, None, None, -2, 1e-5), "num_groups"),
    "gn_fwd_not_dividing": (lambda: ops.group_norm_forward(X, None, None, 4, 1e-5), "num_groups"),
    "gn_fwd_more_groups": (lambda: ops.group_norm_forward(X, None, None, 12, 1e-5), "num_groups"),
    "gn_fwd_1d": (lambda: ops.group_norm_forward(torch.randn(6), None, None, 1, 1e-5), "input"),
    "gn_bwd_mean_shape": (lambda: ops.group_norm_backward(X, X, torch.zeros(2, 2), torch.ones(2, 3), None, 3, MASK),
                          "mean"),
    "gn_bwd_invstd_shape": (lambda: ops.group_norm_backward(X, X, torch.zeros(2, 3), torch.ones(3, 3), None, 3, MASK),
                            "invstd"),
    "gn_bwd_groups_mismatch": (lambda: ops.group_norm_backward(X, X, torch.zeros(2, 3), torch.ones(2, 3), None, 2,
                                                               MASK), "mean|num_groups"),
    "gn_bwd_weight_short": (lambda: ops.group_norm_backward(X, X, torch.zeros(2, 3), torch.ones(2, 3), ones(3), 3,
                                                            MASK), "weight"),
    "gn_bwd_grad_output_shape": (lambda: ops.group_norm_backward(X[:, :, :2], X, torch.zeros(2, 3), torch.ones(2, 3),
                                                                 None, 3, MASK), "grad_output"),
}


@pytest.mark.parametrize("name", list(RAW))
def test_raw_op_errors(name):
    call, pattern = RAW[name]
    with pytest.raises(RuntimeError, match=pattern):
        call()
