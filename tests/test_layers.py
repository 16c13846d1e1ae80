"""NeuromorphicReLU and SumPool2d against sinabs' layers of the same name."""

from __future__ import annotations

import pytest
import sinabs.layers as sl
import torch

from pipeline.layers import NeuromorphicReLU, SumPool2d


def test_neuromorphic_relu_floors_forward_and_passes_relu_gradient_back() -> None:
    x = torch.randn(4, 3, 5, 5) * 3
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = NeuromorphicReLU()(ours)
    expected = sl.NeuromorphicReLU(quantize=True, fanout=1, stochastic_rounding=False)(ref)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out, torch.relu(x).floor())
    grad = torch.randn_like(x)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(ours.grad, ref.grad)
    torch.testing.assert_close(ours.grad, grad * (x > 0))


def test_sum_pool_adds_each_window() -> None:
    x = torch.randint(0, 5, (2, 3, 8, 8)).float()
    torch.testing.assert_close(SumPool2d(2)(x), sl.SumPool2d(2)(x))
    assert SumPool2d(2)(torch.ones(1, 1, 4, 4)).eq(4).all()
    assert SumPool2d(3, stride=1)(x).shape == (2, 3, 6, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(("side", "kernel"), [(8, 2), (9, 2), (7, 3), (24, 2)])
def test_sum_pool_gradient_is_pytorchs_window_sum_gradient(
        side: int, kernel: int, memory_format: torch.memory_format, dtype: torch.dtype) -> None:
    """Tiled windows take the hand-written backward; its gradient must be autograd's through
    avg_pool2d with divisor 1, including the rows and columns no whole window covers."""
    x = torch.randint(0, 5, (2, 3, side, side - 1)).to(dtype).contiguous(memory_format=memory_format)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = SumPool2d(kernel)(ours)
    expected = torch.nn.functional.avg_pool2d(ref, kernel, kernel, divisor_override=1)
    assert torch.equal(out, expected)
    grad = torch.randint(-3, 4, out.shape).to(dtype)
    out.backward(grad)
    expected.backward(grad)
    assert ours.grad.dtype == dtype and torch.equal(ours.grad, ref.grad)
    assert ours.grad.is_contiguous(memory_format=memory_format)


def test_sum_pool_of_one_unbatched_sample_has_pytorchs_gradient() -> None:
    x = torch.randint(0, 5, (3, 8, 8)).float()
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randint(-3, 4, (3, 4, 4)).float()
    SumPool2d(2)(ours).backward(grad)
    torch.nn.functional.avg_pool2d(ref, 2, 2, divisor_override=1).backward(grad)
    assert torch.equal(ours.grad, ref.grad)
