"""DoRAEmbedding against a float64 reference (explicit adapted table + F.embedding) and PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layer_kinds import (
    assert_matches_reference,
    assert_merge_round_trip,
    assert_no_grad_forward_matches,
    naive_embedding,
    randomize,
)
from reference import rel_err
from torchdora import DoRAEmbedding


def random_embedding(num=11, dim=6, rank=3, dtype=torch.float64, padding_idx=None, **options):
    base = nn.Embedding(num, dim, padding_idx=padding_idx, dtype=dtype)
    layer = DoRAEmbedding(base, rank=rank, alpha=2.0 * rank, **options)
    randomize(layer)
    x = torch.randint(0, num, (3, 7))
    return layer, x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("num", "dim", "rank"), [(11, 6, 3), (5, 9, 2), (4, 3, 8), (30, 1, 2)])
@pytest.mark.parametrize("detach_norm", [False, True])
def test_forward_and_gradients_match_reference(num, dim, rank, dtype, detach_norm):
    layer, x = random_embedding(num, dim, rank, dtype, detach_norm=detach_norm)
    assert_matches_reference(layer, x, naive_embedding(layer.base_layer), dtype, detach_norm)


def test_padding_idx_rows_of_A_get_no_lookup_gradient():
    """As in PEFT, padding_idx applies to the lookups of E and Aᵀ: column p of A is trained only
    through the norm; m and B still see the padding tokens' outputs (the scale is shared)."""
    layer, x = random_embedding(padding_idx=2)
    x[0, :3] = 2  # the padding index is looked up
    assert_matches_reference(layer, x, naive_embedding(layer.base_layer), torch.float64)


def test_magnitude_per_embedding_dimension_and_peft_init():
    base = nn.Embedding(20, 5, dtype=torch.float64)
    layer = DoRAEmbedding(base, rank=4)
    assert layer.magnitude.shape == (5,)
    assert torch.allclose(layer.magnitude, base.weight.norm(dim=0))  # columns of E
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (5, 4)
    assert torch.equal(layer.lora_A, torch.zeros_like(layer.lora_A))
    assert layer.lora_B.abs().sum() > 0
    x = torch.randint(0, 20, (4, 3))
    assert rel_err(layer(x), base(x)) <= 1e-14


def test_no_grad_forward_merge_and_unload():
    layer, x = random_embedding()
    assert_no_grad_forward_matches(layer, x, naive_embedding(layer.base_layer))
    assert_merge_round_trip(layer, x)
    expected = layer(x).detach()
    plain = layer.merge_and_unload()
    assert type(plain) is nn.Embedding
    assert rel_err(plain(x), expected) <= 1e-12


def test_lora_variant():
    layer, x = random_embedding(use_dora=False)
    assert layer.magnitude is None
    naive = naive_embedding(layer.base_layer, use_dora=False)
    assert_matches_reference(layer, x, naive, torch.float64)


class ScaledEmbedding(nn.Embedding):
    """Like Gemma's scaled word embeddings: the lookup is multiplied by ``embed_scale``."""

    def __init__(self, *args, scale: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.embed_scale.to(self.weight.dtype)


def test_embed_scale_scales_the_low_rank_branch_too():
    base = ScaledEmbedding(9, 4, scale=3.0, dtype=torch.float64)
    layer = DoRAEmbedding(base, rank=2)
    randomize(layer)
    x = torch.randint(0, 9, (2, 5))
    naive = naive_embedding(base, embed_scale=3.0)
    assert_matches_reference(layer, x, naive, torch.float64)


def test_unsupported_embedding_options():
    with pytest.raises(ValueError, match="max_norm"):
        DoRAEmbedding(nn.Embedding(5, 3, max_norm=1.0))
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        DoRAEmbedding(nn.Embedding(5, 3, scale_grad_by_freq=True))
    with pytest.raises(TypeError, match=r"nn\.Embedding"):
        DoRAEmbedding(nn.Linear(3, 3))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 6)

    def forward(self, x):
        return self.emb(x)


def test_matches_peft_dora_embedding():
    """Same E, A, B, m as PEFT's DoRA embedding: same outputs and (detached-norm) gradients."""
    peft = pytest.importorskip("peft")
    base = Tiny()
    ours = DoRAEmbedding(nn.Embedding(13, 6), rank=3, alpha=6.0, detach_norm=True)
    ours.base_layer.load_state_dict(base.emb.state_dict())
    randomize(ours)
    config = peft.LoraConfig(r=3, lora_alpha=6.0, target_modules=["emb"], use_dora=True)
    theirs = peft.get_peft_model(base, config)
    layer = theirs.base_model.model.emb
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(ours.lora_A)
        layer.lora_embedding_B["default"].copy_(ours.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    x = torch.randint(0, 13, (4, 5))
    out_ours, out_theirs = ours(x), theirs(x)
    assert rel_err(out_ours, out_theirs) <= 1e-5
    grad_out = torch.randn_like(out_ours)
    out_ours.backward(grad_out)
    out_theirs.backward(grad_out)
    pairs = {
        "A": (ours.lora_A.grad, layer.lora_embedding_A["default"].grad),
        "B": (ours.lora_B.grad, layer.lora_embedding_B["default"].grad),
        "m": (ours.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad),
    }
    for name, (a, b) in pairs.items():
        assert rel_err(a, b) <= 1e-5, name
