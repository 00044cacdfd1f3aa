"""Small sae-lens SAEs with random weights, for the FeatureGatedTransMM tests."""

from __future__ import annotations

import torch


def make_sae(
    architecture: str = "standard",
    d_in: int = 32,
    d_sae: int = 64,
    hook_name: str | None = None,
    seed: int = 0,
    k: int = 8,
):
    """An sae-lens SAE of ``architecture`` (standard, topk with ``k``, jumprelu,
    gated)."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": k}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {}),
    }
    sae_class, config_class, extra = classes[architecture]
    metadata = SAEMetadata(hook_name=hook_name) if hook_name else SAEMetadata()
    sae = sae_class(config_class(d_in=d_in, d_sae=d_sae, metadata=metadata, **extra))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "threshold":
                param.fill_(0.05)
            else:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return sae.eval()


def saved_sae(tmp_path, architecture: str = "standard", **kwargs):
    """Save an SAE to a folder and return ``(folder, sae)``."""
    sae = make_sae(architecture, **kwargs)
    folder = (
        tmp_path / f"{architecture}_{kwargs.get('seed', 0)}_{kwargs.get('hook_name')}"
    )
    sae.save_model(folder)
    return folder, sae
