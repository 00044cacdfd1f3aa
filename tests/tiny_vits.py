"""Tiny Vision Transformers built from configs (random weights), for the ViT tests.

Each builder returns a :class:`TinyViT`: the model (left with its default attention
implementation, usually SDPA, so that TransMM must switch it), the forward function
and additional arguments TransMM is called with, and ``attention_modules`` — the
modules whose output holds the attention probabilities, found by explicit paths
(independently of the adapters) for the reference implementation in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

IMAGE = 24

PATCH = 8
GRID = IMAGE // PATCH
HIDDEN = 32
LAYERS = 2
HF_KW = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=IMAGE,
    patch_size=PATCH,
    initializer_range=0.3,
)


@dataclass
class TinyViT:
    name: str
    model: nn.Module
    forward_func: Callable
    attention_modules: list[nn.Module]
    num_prefix_tokens: int
    probabilities: Callable[[Any], Tensor] = lambda output: output[1]
    additional_forward_args: Any = None
    set_eager: Callable[[], None] = field(default=lambda: None)

    def logits(self, x: Tensor) -> Tensor:
        args = (
            () if self.additional_forward_args is None else self.additional_forward_args
        )
        if not isinstance(args, tuple):
            args = (args,)
        out = self.forward_func(x, *args)
        return (
            out
            if isinstance(out, Tensor)
            else (
                out.logits
                if getattr(out, "logits", None) is not None
                else out.logits_per_image
            )
        )


def _hf_eager(model: nn.Module) -> Callable[[], None]:
    return lambda: model.set_attn_implementation("eager")


def hf_vit(seed: int = 0, num_labels: int = 5) -> TinyViT:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**HF_KW, num_labels=num_labels)).eval()
    return TinyViT(
        "vit",
        model,
        model,
        [layer.attention for layer in model.vit.layers],
        1,
        set_eager=_hf_eager(model),
    )


def hf_deit(seed: int = 0) -> TinyViT:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(seed)
    model = DeiTForImageClassificationWithTeacher(
        DeiTConfig(**HF_KW, num_labels=5)
    ).eval()
    return TinyViT(
        "deit",
        model,
        model,
        [layer.attention for layer in model.deit.layers],
        2,
        set_eager=_hf_eager(model),
    )


def hf_clip(seed: int = 0) -> TinyViT:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    config = CLIPConfig(text_config=text, vision_config=HF_KW, projection_dim=16)
    model = CLIPModel(config).eval()
    input_ids = torch.randint(2, 50, (4, 6), generator=torch.Generator().manual_seed(1))

    def forward(pixel_values: Tensor, ids: Tensor) -> Any:
        return model(input_ids=ids, pixel_values=pixel_values)

    layers = model.vision_model.encoder.layers
    return TinyViT(
        "clip",
        model,
        forward,
        [layer.self_attn for layer in layers],
        1,
        additional_forward_args=(input_ids,),
        set_eager=_hf_eager(model),
    )


def hf_dinov2(seed: int = 0, registers: int = 0) -> TinyViT:
    from transformers import (
        Dinov2Config,
        Dinov2ForImageClassification,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersForImageClassification,
    )

    torch.manual_seed(seed)
    if registers:
        config = Dinov2WithRegistersConfig(
            **HF_KW, num_labels=5, num_register_tokens=registers
        )
        model = Dinov2WithRegistersForImageClassification(config).eval()
        backbone = model.dinov2_with_registers
    else:
        model = Dinov2ForImageClassification(Dinov2Config(**HF_KW, num_labels=5)).eval()
        backbone = model.dinov2
    return TinyViT(
        "dinov2" + ("_registers" if registers else ""),
        model,
        model,
        [layer.attention for layer in backbone.encoder.layer],
        1 + registers,
        set_eager=_hf_eager(model),
    )


def timm_vit(seed: int = 0, reg_tokens: int = 0) -> TinyViT:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=HIDDEN,
        depth=LAYERS,
        num_heads=4,
        num_classes=5,
        reg_tokens=reg_tokens,
    ).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    for block in model.blocks:
        block.attn.fused_attn = True

    def set_eager() -> None:
        for block in model.blocks:
            block.attn.fused_attn = False

    return TinyViT(
        "timm",
        model,
        model,
        [block.attn.attn_drop for block in model.blocks],
        1 + reg_tokens,
        probabilities=lambda output: output,
        set_eager=set_eager,
    )


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return self.proj((probs @ v).transpose(1, 2).reshape(n, t, d)), probs


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)

    def forward(self, x):
        return x + self.attn(self.norm(x))[0]


class ToyViT(nn.Module):
    """A hand-written ViT no built-in adapter knows by name."""

    def __init__(self, dim=16, depth=2, patch=4, classes=3):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layers = nn.ModuleList(_Block(dim, 4) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x[:, 0])


def toy_vit(seed: int = 0) -> TinyViT:
    """A hand-written ViT found by the generic adapter (patch 8, 24x24 images)."""
    torch.manual_seed(seed)
    model = ToyViT(dim=HIDDEN, depth=LAYERS, patch=PATCH, classes=5).eval()
    return TinyViT("toy", model, model, [block.attn for block in model.layers], 1)


BUILDERS = {
    "vit": hf_vit,
    "deit": hf_deit,
    "clip": hf_clip,
    "dinov2": hf_dinov2,
    "dinov2_registers": lambda seed=0: hf_dinov2(seed, registers=2),
    "timm": timm_vit,
    "timm_registers": lambda seed=0: timm_vit(seed, reg_tokens=2),
    "generic": toy_vit,
}


def images(n: int = 3, seed: int = 0) -> Tensor:
    return torch.randn(
        n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed)
    )


def reference_transmm(
    tiny: TinyViT,
    x: Tensor,
    target: Tensor | None = None,
    start_layer: int = 0,
    gates: dict[int, Tensor] | None = None,
) -> Tensor:
    """TransMM written out: hooks on the probabilities, explicit R <- R + Ā R.

    Runs on ``tiny.model`` switched to eager attention by the test (``set_eager``);
    ``gates`` ``{layer: (N, n_patches)}`` scale the patch columns of Ā.
    Returns ``(N, n_patches)``.
    """
    captured: list[Tensor] = []
    handles = [
        module.register_forward_hook(
            lambda mod, inp, out: captured.append(tiny.probabilities(out))
        )
        for module in tiny.attention_modules
    ]
    try:
        logits = tiny.logits(x)
    finally:
        for handle in handles:
            handle.remove()
    if target is None:
        target = logits.argmax(dim=1)
    y = logits.gather(1, target.view(-1, 1)).sum()
    grads = torch.autograd.grad(y, captured)
    n, _, t, _ = captured[0].shape
    prefix = tiny.num_prefix_tokens
    relevance = torch.eye(t).repeat(n, 1, 1)
    for layer in range(start_layer, len(captured)):
        bar = (grads[layer] * captured[layer]).clamp(min=0).mean(dim=1)
        if gates is not None and layer in gates:
            scale = torch.cat([torch.ones(n, prefix), gates[layer]], dim=1)
            bar = bar * scale.unsqueeze(1)
        relevance = relevance + bar @ relevance
    return relevance[:, 0, prefix:].detach()
