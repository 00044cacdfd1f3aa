"""Sparse autoencoders for FeatureGatedTransMM, loaded through sae-lens.

:func:`load_sae` accepts an SAE object, a local sae-lens folder (or a folder of
them, one per ``sae_id``) or a pretrained ``(release, sae_id)``. Any sae-lens architecture with ``encode`` and ``W_dec``
(``d_sae × d_in``) works: standard, topk, jumprelu, gated, and the others.

Converting a Prisma-style vision SAE (ViT-Prisma: weights ``W_enc`` ``(d_in, d_sae)``,
``b_enc``, ``W_dec`` ``(d_sae, d_in)``, ``b_dec``, encoding ``act(W_enc^T (x - b_dec) +
b_enc)``; a config with ``d_in``, ``d_sae`` and ``hook_point`` such as
``blocks.6.hook_resid_post``) into a sae-lens folder: the weight names, shapes and the
encoder are sae-lens's standard (ReLU) or topk SAE, so write the weights as safetensors
next to a ``cfg.json`` that keeps Prisma's config keys::

    import json, pathlib, torch
    from safetensors.torch import save_file

    # a plain state dict; a checkpoint that pickles Prisma's config object
    # ({"cfg": ..., "state_dict": ...}) needs weights_only=False and vit_prisma
    # installed -- only for files you trust
    state = torch.load("prisma_sae.pt", map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    folder = pathlib.Path("my_sae")
    folder.mkdir(exist_ok=True)
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    save_file({k: state[k].float().contiguous() for k in names},
              folder / "sae_weights.safetensors")
    cfg = {  # sae-lens reads this flat, pre-6.0 layout with Prisma's key names
        "d_in": state["W_dec"].shape[1],
        "d_sae": state["W_dec"].shape[0],
        "hook_point": "blocks.6.hook_resid_post",  # from the Prisma config
        "activation_fn_str": "relu",  # or "topk" with "activation_fn_kwargs": {"k": 64}
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True,  # Prisma encodes x - b_dec
        "normalize_activations": "none",
        "dtype": "float32",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(folder)

Prisma's ``blocks.{l}`` counts the same transformer blocks as our adapters (0-based),
so ``hook_name`` lets FeatureGatedTransMM check that the SAE sits on the block it is
attached to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from captum_faithful._utils import optional_import

__all__ = ["load_sae", "sae_d_in", "sae_hook_name"]


def _is_sae(obj: Any) -> bool:
    return callable(getattr(obj, "encode", None)) and isinstance(
        getattr(obj, "W_dec", None), torch.Tensor
    )


def load_sae(
    source: Any,
    sae_id: str | None = None,
    device: str | torch.device | None = None,
) -> Any:
    r"""Load a sparse autoencoder with sae-lens.

    Args:
        source (SAE, str, Path or tuple[str, str]): An SAE object (anything with
                    ``encode`` and a ``W_dec`` tensor, returned as is and not moved);
                    a local folder written by ``SAE.save_model`` (``cfg.json`` and
                    ``sae_weights.safetensors``, loaded with ``SAE.load_from_disk``);
                    or a pretrained ``(release, sae_id)`` pair, loaded with
                    ``SAE.from_pretrained`` — the only call in captum-faithful that
                    uses the network. A ``Path``, or a string naming an existing
                    folder, is always local, never a release name.
        sae_id (str, optional): With a release name as ``source``, the SAE inside
                    that release; with a local folder, the subfolder
                    ``source/sae_id`` holding that SAE (a folder of saved SAEs,
                    one per id; an id may be nested, e.g. ``"layer_6/width_16k"``).
                    Default: None
        device (str or torch.device, optional): Where to load the SAE.
                    Default: None (``"cpu"``)

    Returns:
        The ``sae_lens.SAE``.

    Examples::

        >>> sae = load_sae("runs/sae_layer6")                       # local folder
        >>> sae = load_sae("runs/saes", "blocks.6.hook_resid_post")  # its subfolder
        >>> sae = load_sae(("my-release", "blocks.6.hook_resid_post"))  # pretrained
    """
    if _is_sae(source):
        return source
    if isinstance(source, tuple):
        if len(source) != 2 or not all(isinstance(s, str) for s in source):
            raise ValueError(
                f"`source` as a tuple must be (release, sae_id) strings, got {source!r}"
            )
        if sae_id is not None:
            raise ValueError(
                "pass `sae_id` either in `source` or as `sae_id`, not both"
            )
        source, sae_id = source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "`source` must be an SAE, a folder path or a (release, sae_id) tuple, "
            f"got {type(source).__name__}"
        )
    if sae_id is not None and not isinstance(sae_id, str):
        raise TypeError(f"`sae_id` must be a string, got {type(sae_id).__name__}")
    device = "cpu" if device is None else str(torch.device(device))
    sae_lens = optional_import("sae_lens", "sae")
    local = not isinstance(source, str) or Path(source).is_dir()
    if sae_id is not None and local:
        source = _subfolder(Path(source), sae_id)
        sae_id = None
    if sae_id is None:
        path = Path(source)
        if not path.is_dir():
            raise ValueError(
                f"`source` {str(source)!r} is not a folder; pass a folder written by "
                "SAE.save_model, or a pretrained SAE as (release, sae_id)"
            )
        sae = _load_folder(sae_lens, path, device)
    else:
        sae = sae_lens.SAE.from_pretrained(str(source), sae_id, device=device)
    if not _is_sae(sae):
        raise TypeError(f"the loaded {type(sae).__name__} has no `encode` and `W_dec`")
    return sae


def _subfolder(folder: Path, sae_id: str) -> Path:
    """``folder / sae_id``, the saved SAE of that id inside a local folder."""
    if not folder.is_dir():
        raise ValueError(
            f"`source` {str(folder)!r} is not a folder; pass a folder of saved SAEs "
            "with `sae_id` its subfolder, or a pretrained SAE as (release, sae_id) "
            "strings"
        )
    relative = Path(sae_id)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(
            f"`sae_id` {sae_id!r} must name a subfolder inside `source` "
            f"({folder}), e.g. 'blocks.6.hook_resid_post'"
        )
    path = folder / relative
    if not (path / "cfg.json").is_file():
        found = sorted(
            config.parent.relative_to(folder).as_posix()
            for config in folder.rglob("cfg.json")
        )
        raise ValueError(
            f"`sae_id` {sae_id!r}: the local folder {folder} holds no saved SAE "
            f"{relative.as_posix()}/ (cfg.json); it holds {found[:20] or 'none'}"
        )
    return path


def _load_folder(sae_lens: Any, path: Path, device: str) -> Any:
    """``SAE.load_from_disk(path)``, with errors that name the file at fault."""
    config = path / "cfg.json"
    if not config.is_file():
        raise ValueError(
            f"`source` {str(path)!r} holds no cfg.json; pass a folder written by "
            f"SAE.save_model (cfg.json and sae_weights.safetensors), found "
            f"{sorted(p.name for p in path.iterdir()) or 'an empty folder'}"
        )
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON: {err}") from err
    try:
        return sae_lens.SAE.load_from_disk(path, device=device)
    except Exception as err:  # noqa: BLE001 - sae-lens and safetensors raise many kinds
        raise ValueError(
            f"cannot load the SAE in {path} (is it complete, and written by "
            f"SAE.save_model?): {type(err).__name__}: {err}"
        ) from err


def sae_d_in(sae: Any) -> int:
    """Width of the activations the SAE reads: ``cfg.d_in``, else ``W_dec.shape[1]``."""
    d_in = getattr(getattr(sae, "cfg", None), "d_in", None)
    return int(d_in) if d_in is not None else int(sae.W_dec.shape[1])


def sae_hook_name(sae: Any) -> str | None:
    """The place the SAE was trained on (``cfg.metadata.hook_name`` or older
    ``cfg.hook_name``), or None."""
    cfg = getattr(sae, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    for owner in (metadata, cfg):
        name = getattr(owner, "hook_name", None)
        if isinstance(name, str):
            return name
    return None
