"""Quickstart: wrap an nn.Linear with DoRA, fit a synthetic target, merge.

The "pretrained" layer is random; the target layer differs from it by a rescaling of each
output row and a rank-4 rotation, which is exactly what DoRA's magnitude and low-rank
direction update can express. Run: .venv/bin/python examples/quickstart.py
"""

import torch
from torch import nn

from torchdora import DoRALinear

torch.manual_seed(0)
d_in, d_out = 64, 32
pretrained = nn.Linear(d_in, d_out)

with torch.no_grad():  # target = rescaled rows of (W + low-rank change)
    change = 0.3 * torch.randn(d_out, 4) @ torch.randn(4, d_in) / d_in**0.5
    target = nn.Linear(d_in, d_out)
    target.weight.copy_((pretrained.weight + change) * torch.empty(d_out, 1).uniform_(0.5, 1.5))
    target.bias.copy_(pretrained.bias)

layer = DoRALinear.from_linear(pretrained, rank=8, alpha=16)
total = sum(p.numel() for p in layer.parameters())
print(f"DoRALinear({d_in} -> {d_out}), rank {layer.rank}, alpha {layer.alpha:g}")
print(f"trainable parameters: {layer.num_trainable_parameters()} of {total}")

optimizer = torch.optim.AdamW(
    [
        {"params": [layer.lora_A, layer.lora_B], "lr": 3e-3},
        {"params": [layer.magnitude], "lr": 1e-2, "weight_decay": 0.0},
    ]
)
for step in range(301):
    x = torch.randn(128, d_in)
    loss = nn.functional.mse_loss(layer(x), target(x))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step:4d}  loss {loss.item():.6f}")

x = torch.randn(16, d_in)
with torch.no_grad():
    unmerged = layer(x)
    merged_linear = layer.merge_and_unload()
    merged = merged_linear(x)
err = (merged - unmerged).abs().max().item()
print(f"merged into a plain {type(merged_linear).__name__}: max |merged - unmerged| = {err:.2e}")
assert err < 1e-5, "merged output differs from the adapter's"
