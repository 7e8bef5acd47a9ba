"""DoRAConv (Conv1d/2d/3d) against a float64 reference: explicit adapted kernel + F.convNd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layer_kinds import (
    assert_matches_reference,
    assert_merge_round_trip,
    assert_no_grad_forward_matches,
    naive_conv,
    randomize,
)
from layer_kinds import reference as layer_reference
from reference import rel_err
from torchdora import DoRAConv

CONVS = {  # name: (constructor, input shape, rank)
    "1d-stride-pad": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11), 2),
    "2d-dilated": (
        lambda: nn.Conv2d(3, 5, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
        (2, 3, 9, 8),
        4,
    ),
    "2d-groups-same": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding="same"), (2, 4, 7, 7), 3),
    "2d-depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False), (2, 4, 6, 6), 2),
    "2d-circular": (
        lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        (1, 3, 6, 5),
        2,
    ),
    "2d-1x1": (lambda: nn.Conv2d(6, 5, 1), (2, 6, 4, 4), 3),
    "3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (2, 2, 4, 5, 3), 2),
    "rank>fan_in": (lambda: nn.Conv1d(2, 5, 1), (3, 2, 4), 4),
}


def random_conv(name: str, dtype=torch.float64, **options) -> tuple[DoRAConv, torch.Tensor]:
    build, x_shape, rank = CONVS[name]
    conv = build().to(dtype)
    with torch.no_grad():
        conv.weight.normal_()
        if conv.bias is not None:
            conv.bias.normal_()
    layer = DoRAConv(conv, rank=rank, alpha=2.0 * rank, **options)
    randomize(layer)
    return layer, torch.randn(x_shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("detach_norm", [False, True])
def test_forward_and_gradients_match_reference(name, dtype, detach_norm):
    layer, x = random_conv(name, dtype, detach_norm=detach_norm)
    if layer.bias is not None:
        layer.bias.requires_grad_(True)  # check the bias gradient too
    assert_matches_reference(layer, x, naive_conv(layer.base_layer), dtype, detach_norm)


def test_trainable_base_kernel_gradient():
    layer, x = random_conv("2d-groups-same", freeze_base=False)
    assert_matches_reference(layer, x, naive_conv(layer.base_layer), torch.float64)


def test_no_grad_forward_and_unbatched_input():
    layer, x = random_conv("2d-dilated")
    naive = naive_conv(layer.base_layer)
    assert_no_grad_forward_matches(layer, x, naive)
    single = x[0]  # (C, H, W): conv layers accept unbatched input
    ref, _ = layer_reference(layer, single, naive)
    assert rel_err(layer(single), ref) <= 1e-10


def test_torch_compile_fullgraph_matches_reference():
    layer, x = random_conv("2d-groups-same")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert_matches_reference(compiled, x, naive_conv(layer.base_layer), torch.float64)


@pytest.mark.parametrize("name", ["1d-stride-pad", "2d-groups-same", "3d"])
def test_lora_variant_matches_plain_lora(name):
    layer, x = random_conv(name, use_dora=False)
    assert layer.magnitude is None
    assert_matches_reference(layer, x, naive_conv(layer.base_layer, use_dora=False), torch.float64)


def test_init_reproduces_base_and_magnitude_is_per_output_channel():
    conv = nn.Conv2d(3, 8, 3, padding=1, dtype=torch.float64)
    layer = DoRAConv(conv, rank=4)
    assert layer.base_layer is conv and not conv.weight.requires_grad
    assert (layer.in_features, layer.out_features) == (3 * 9, 8)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert rel_err(layer(x), conv(x)) <= 1e-14
    assert torch.allclose(layer.magnitude, conv.weight.flatten(1).norm(dim=1))


@pytest.mark.parametrize("name", ["2d-dilated", "2d-groups-same", "2d-depthwise", "3d"])
def test_merge_round_trip_and_unload(name):
    layer, x = random_conv(name)
    assert_merge_round_trip(layer, x)
    expected = layer(x).detach()
    plain = layer.merge_and_unload()
    assert type(plain) is type(layer.base_layer)
    assert rel_err(plain(x), expected) <= 1e-12


def test_merge_writes_through_channels_last_kernel():
    layer, x = random_conv("2d-dilated", dtype=torch.float32)
    layer.base_layer.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    assert not layer.weight.is_contiguous()
    expected = layer(x).detach()
    layer.merge()
    assert rel_err(layer.base_layer(x), expected) <= 1e-5


def test_cache_follows_in_place_edit_of_kernel():
    layer, x = random_conv("1d-stride-pad")
    naive = naive_conv(layer.base_layer)
    assert_no_grad_forward_matches(layer, x, naive)
    with torch.no_grad():
        layer.base_layer.weight.mul_(3.0)
    assert_no_grad_forward_matches(layer, x, naive)


def test_dropout_on_low_rank_branch_only():
    layer, x = random_conv("1d-stride-pad", dropout=0.5)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    conv = layer.base_layer
    with torch.no_grad():
        rows = conv.weight.flatten(1)
        direction = rows + layer.scaling * layer.lora_B @ layer.lora_A
        scale = (layer.magnitude / direction.norm(dim=1)).view(-1, 1)
        kernel = lambda w: w.reshape(conv.weight.shape)  # noqa: E731
        ref = F.conv1d(x, kernel(scale * rows), conv.bias, conv.stride, conv.padding) + F.conv1d(
            dropped,
            kernel(scale * layer.scaling * layer.lora_B @ layer.lora_A),
            None,
            conv.stride,
            conv.padding,
        )
    assert rel_err(out, ref) <= 1e-10


def test_half_precision_input():
    layer, x = random_conv("2d-groups-same", dtype=torch.float32)
    naive = naive_conv(layer.base_layer)
    ref, _ = layer_reference(layer, x, naive)
    layer.base_layer.to(torch.bfloat16)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.magnitude.dtype == torch.float32
    assert rel_err(out, ref) <= 3e-2
    out.float().sum().backward()
    assert layer.magnitude.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()


def test_bad_input_names_the_base_in_channels():
    layer = DoRAConv(nn.Conv2d(4, 6, 3), rank=2)
    with pytest.raises(ValueError, match=r"in_channels=4 .*got shape \(1, 5, 9, 9\)"):
        layer(torch.randn(1, 5, 9, 9))
    with pytest.raises(ValueError, match="2 spatial dims"):
        layer(torch.randn(9, 9))
    with pytest.raises(TypeError, match=r"computes in torch\.float32 .* torch\.float64"):
        layer(torch.randn(1, 4, 9, 9, dtype=torch.float64))


def test_bad_base():
    with pytest.raises(TypeError, match="Conv1d/2d/3d"):
        DoRAConv(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        DoRAConv(nn.ConvTranspose2d(3, 3, 2))
