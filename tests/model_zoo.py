"""Tiny random-weight models for the model-level tests: real architectures from transformers
configs (BERT, LLaMA, GPT-2, ViT, tied-embedding LLaMA) and a small CNN."""

from __future__ import annotations

import torch
from torch import nn

import torchdora

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 64


class SmallCNN(nn.Module):
    """Conv2d → Conv2d (grouped) → Conv1d over rows → Linear head: every conv kind in one model."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.conv3 = nn.Conv1d(8, 6, 2)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(pixel_values))))
        h = torch.relu(self.conv3(h.mean(dim=2)))
        return self.head(torch.relu(self.fc(h.mean(dim=2))))


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def llama(tie_word_embeddings: bool = False) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie_word_embeddings,
    )
    return transformers.LlamaForCausalLM(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=5,
    )
    return transformers.ViTForImageClassification(config)


#: name: (builder, DoRAConfig kwargs that adapt every supported kind the model has)
MODELS = {
    "bert": (bert, {"target_modules": "all-linear", "modules_to_save": ["classifier"]}),
    "llama": (llama, {"target_modules": "all-linear"}),
    "llama-tied": (lambda: llama(tie_word_embeddings=True), {"target_modules": "all-linear"}),
    "gpt2": (gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc", "wte"]}),
    "vit": (  # attention spelled q_proj/v_proj (transformers 5) or query/value (4.x)
        vit,
        {
            "target_modules": ["q_proj", "v_proj", "query", "value", "projection", "classifier"],
            "rank": 4,
        },
    ),
    "cnn": (SmallCNN, {"target_modules": ["conv1", "conv2", "conv3", "fc"], "rank": 4}),
}


def example_inputs(name: str, batch: int = 2) -> dict[str, torch.Tensor]:
    if name in ("vit", "cnn"):
        return {"pixel_values": torch.randn(batch, 3, 16, 16)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, 7))}


def output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


def perturb_adapters(model: nn.Module, std: float = 0.1) -> None:
    """Move every adapter away from its identity init, so adapted ≠ base outputs."""
    with torch.no_grad():
        for _, layer in torchdora.dora_modules(model):
            layer.lora_A.normal_(std=1.0 / layer.in_features**0.5)
            layer.lora_B.normal_(std=std)
            if layer.magnitude is not None:
                layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.8, 1.2))
        for module in model.modules():
            if isinstance(module, torchdora.ModulesToSaveWrapper):
                for param in module.module_to_save.parameters():
                    param.add_(torch.randn_like(param), alpha=std)
