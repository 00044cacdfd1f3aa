"""The demo's small models: a ReLU CNN, a Hugging Face ViT and sae-lens SAEs.

Everything is trained on the CPU from random weights on :mod:`captum_faithful.demo.data`
and cached under the user cache folder, in a sub-folder named by a hash of the
training recipe, so a change of recipe retrains and an unchanged one loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from captum_faithful._utils import (
    as_logits,
    check_bool,
    check_int,
    optional_import,
    progress,
)
from captum_faithful.demo._stopwatch import Stopwatch
from captum_faithful.demo.data import (
    IMAGE_SIZE,
    N_CLASSES,
    DigitBlocks,
    check_distractor,
    make_blocks,
)

#: Bump when the training code changes in a way the recipe fields do not capture.
RECIPE_VERSION = 4
#: Environment variable that overrides the cache folder.
CACHE_ENV = "CAPTUM_FAITHFUL_CACHE"
#: A feature that has not fired for this many training steps counts as dead, and
#: the auxiliary top-k loss (Gao et al. 2024) trains it to explain the residual error.
DEAD_STEPS = 50
#: Renderings of the validation scans the SAE diagnostics are measured on.
DIAGNOSTIC_RENDERINGS = 8
#: Weight of the auxiliary loss, and its k as a share of the SAE's input width.
AUX_WEIGHT = 1 / 32
AUX_K_SHARE = 0.5


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (hashed into the cache key).

    Epoch ``e`` of the classifiers trains on rendering ``e % renderings`` of the
    training scans (new colours, block order, distractors and noise each time).
    The SAEs are trained on the patch tokens of further renderings, ``sae_steps``
    steps of ``sae_batch_tokens`` tokens each.
    """

    cnn_epochs: int
    cnn_lr: float
    vit_epochs: int
    vit_lr: float
    vit_batch_size: int
    vit_patch_size: int
    vit_hidden_size: int
    vit_layers: int
    vit_heads: int
    vit_init_range: float
    sae_layers: tuple[int, ...]
    sae_expansion: int
    sae_k: int
    sae_steps: int
    sae_lr: float
    renderings: int
    sae_batch_tokens: int = 1024
    batch_size: int = 64

    def key(self, seed: int, distractor: str = "shuffled") -> str:
        """The cache key of this recipe trained with ``seed`` on the rendering with
        ``distractor`` (see :mod:`captum_faithful.demo.data`). The default
        rendering's key leaves ``distractor`` out, so it is the key it always was."""
        fields = {"version": RECIPE_VERSION, "seed": seed, **asdict(self)}
        if check_distractor(distractor) != "shuffled":
            fields["distractor"] = distractor
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


#: About 6 blocks of width 128 on 8-pixel patches (a 4 x 4 grid): measured on one
#: thread, 50 epochs train it in 170 s of CPU to 0.97 validation accuracy, where
#: 4-pixel patches reached 0.86 in 450 s (40 epochs). Each epoch is a new rendering.
#: SAEs: 32x expansion, on the patch tokens of every block but the last (the
#: classifier reads the CLS token only, so the gradient at the last block's patch
#: tokens, and every gate there, is zero), a million tokens each (1000 steps of
#: 1024), from renderings the ViT never saw.
FULL_RECIPE = Recipe(
    cnn_epochs=16,
    cnn_lr=3e-3,
    vit_epochs=50,
    vit_lr=2e-3,
    vit_batch_size=64,
    vit_patch_size=8,
    vit_hidden_size=128,
    vit_layers=6,
    vit_heads=4,
    vit_init_range=0.1,
    sae_layers=(0, 1, 2, 3, 4),
    sae_expansion=32,
    sae_k=32,
    sae_steps=1000,
    sae_lr=3e-3,
    renderings=50,
)

#: The same design, smaller: 4 blocks of width 64, SAEs on blocks 0-2 (200k
#: tokens each); under 90 s of training on two cores.
QUICK_RECIPE = Recipe(
    cnn_epochs=12,
    cnn_lr=3e-3,
    vit_epochs=30,
    vit_lr=3e-3,
    vit_batch_size=64,
    vit_patch_size=8,
    vit_hidden_size=64,
    vit_layers=4,
    vit_heads=4,
    vit_init_range=0.1,
    sae_layers=(0, 1, 2),
    sae_expansion=32,
    sae_k=16,
    sae_steps=400,
    sae_lr=3e-3,
    renderings=30,
    sae_batch_tokens=512,
)


def cache_root() -> Path:
    """``$CAPTUM_FAITHFUL_CACHE`` or the user cache folder's ``captum_faithful``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "captum_faithful"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No Hugging Face progress bars ("Loading weights", "Writing model shards")
    inside the block: the demo shows its own; the library's setting is restored
    afterwards."""
    logging = optional_import("transformers.utils.logging", "demo")
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


@contextmanager
def _training_threads() -> Iterator[None]:
    """The process's thread count, at most four, while training (these models are
    too small to gain from more: measured on an idle 2-core machine, 2 threads train
    the quick recipe in 0.77x the time of 1); the setting is restored afterwards.

    The process's count is the caller's choice (``captum-faithful demo --threads``,
    ``OMP_NUM_THREADS`` or ``torch.set_num_threads``): on a loaded machine more
    threads than free cores make training slower, not faster. The thread count
    changes the order of floating-point sums, so models trained with different
    counts differ slightly; the cache key (recipe and seed) does not include it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(4, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_cnn() -> nn.Sequential:
    """The demo CNN: four 3×3 conv layers with BatchNorm and ReLU, max-pool, linear.

    Every ReLU is its own module (no reuse), so hooks on layers see one use each.
    """
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(64, N_CLASSES),
    )


def build_vit(recipe: Recipe, seed: int = 0) -> nn.Module:
    """A small ``ViTForImageClassification`` from a config, eager attention.

    The weights are random, with a start that lets a tiny ViT learn this data in a
    few thousand steps (plain initialisation sits on a long plateau: with the ink
    lighter in half of the images and darker in the others, every feature linear in
    the pixels averages out, and the CLS token barely depends on the input):

    - the patch embedding starts as an orthonormal map of the patch's pixels minus
      their per-channel mean (a local contrast code; LayerNorm then removes the
      contrast's scale), the position embeddings with standard deviation 0.1;
    - the CLS token and its position embedding start at zero, so the CLS state is
      what attention brings to it;
    - the other weights are drawn with standard deviation 0.1 (``initializer_range``),
      so the MLPs' nonlinear (polarity-free) features are there from the first step.
    """
    transformers = optional_import("transformers", "demo")
    config = transformers.ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=recipe.vit_patch_size,
        num_channels=3,
        hidden_size=recipe.vit_hidden_size,
        num_hidden_layers=recipe.vit_layers,
        num_attention_heads=recipe.vit_heads,
        intermediate_size=2 * recipe.vit_hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=recipe.vit_init_range,
        num_labels=N_CLASSES,
    )
    torch.manual_seed(seed)
    vit = transformers.ViTForImageClassification._from_config(
        config, attn_implementation="eager"
    )
    embeddings = vit.vit.embeddings
    projection = embeddings.patch_embeddings.projection
    hidden, channels, height, width = projection.weight.shape
    n_pixels = channels * height * width
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pixels = torch.eye(n_pixels).reshape(n_pixels, channels, height, width)
        centred = pixels - pixels.mean((2, 3), keepdim=True)
        # orthonormal columns (hidden >= pixels) or rows (hidden < pixels)
        draw = torch.randn(
            max(hidden, n_pixels), min(hidden, n_pixels), generator=generator
        )
        basis, _ = torch.linalg.qr(draw)
        if hidden < n_pixels:
            basis = basis.T
        projection.weight.copy_(2.0 * torch.einsum("hk,kcij->hcij", basis, centred))
        projection.bias.zero_()
        embeddings.position_embeddings.normal_(0.0, 0.1, generator=generator)
        embeddings.position_embeddings[:, 0].zero_()
        embeddings.cls_token.zero_()
    return vit


@torch.no_grad()
def accuracy(
    model: nn.Module, images: Tensor, labels: Tensor, batch: int = 256
) -> float:
    """Share of ``images`` that ``model`` (in eval mode) classifies as ``labels``."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        correct += int(
            (
                as_logits(model(images[i : i + batch])).argmax(1)
                == labels[i : i + batch]
            ).sum()
        )
    return correct / max(1, len(labels))


def train_classifier(
    model: nn.Module,
    rendering: Callable[[int], DigitBlocks],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    show_progress: bool = False,
    desc: str = "train",
) -> nn.Module:
    """AdamW with a one-cycle schedule and cross-entropy.

    Epoch e trains on ``rendering(e)`` (a :class:`DigitBlocks` of the training
    scans, rendered anew).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    data = rendering(0)
    steps_per_epoch = math.ceil(len(data.labels) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    model.train()
    for epoch in progress(range(epochs), show_progress, desc=desc, leave=False):
        data = data if epoch == 0 else rendering(epoch)
        order = torch.randperm(len(data.labels), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(
                as_logits(model(data.images[batch])), data.labels[batch]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return model


@torch.no_grad()
def patch_tokens(
    vit: nn.Module, images: Tensor, layers: tuple[int, ...], batch: int = 256
) -> dict[int, Tensor]:
    """Outputs of the given 0-based ViT blocks at the patch tokens (the CLS token
    left out, as the thesis trains its SAEs), ``(N * patches, hidden)`` per block."""
    chunks: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for i in range(0, len(images), batch):
        hidden = vit(
            pixel_values=images[i : i + batch], output_hidden_states=True
        ).hidden_states
        for layer in layers:
            tokens = hidden[layer + 1][:, 1:]
            chunks[layer].append(tokens.reshape(-1, tokens.shape[-1]))
    return {layer: torch.cat(parts) for layer, parts in chunks.items()}


def held_out_tokens(
    vit: nn.Module, layers: tuple[int, ...], seed: int = 0, distractor: str = "shuffled"
) -> dict[int, Tensor]:
    """Patch tokens of :data:`DIAGNOSTIC_RENDERINGS` renderings of the validation
    scans, which neither the ViT nor the SAEs saw: what the SAEs' explained variance
    and dead features are measured on. One rendering has too few tokens for rare
    features: with 2,000 tokens and features firing once in 1,000, a third of the
    features of a well-trained SAE never fire on it. ``distractor`` names the
    rendering (:func:`~captum_faithful.demo.data.make_blocks`)."""
    parts = [
        patch_tokens(
            vit,
            make_blocks("validation", seed, rendering=r, distractor=distractor).images,
            layers,
        )
        for r in range(DIAGNOSTIC_RENDERINGS)
    ]
    return {layer: torch.cat([part[layer] for part in parts]) for layer in layers}


# The SAEs are sae-lens objects (an optional dependency without type information,
# imported through optional_import), hence ``Any`` below.


def explained_variance(sae: Any, activations: Tensor) -> float:
    """1 − ‖x − x̂‖² / ‖x − mean(x)‖² over all vectors of ``activations``."""
    x = activations.reshape(-1, activations.shape[-1])
    with torch.no_grad():
        reconstruction = sae.decode(sae.encode(x))
    residual = (x - reconstruction).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return float(1 - residual / total)


def dead_fraction(sae: Any, activations: Tensor) -> float:
    """Share of the SAE's features that are zero on every vector of
    ``activations``."""
    x = activations.reshape(-1, activations.shape[-1])
    fired = torch.zeros(sae.W_dec.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for chunk in x.split(4096):
            fired |= (sae.encode(chunk) > 0).any(0)
    return float(1 - fired.float().mean())


def _new_topk_sae(
    d_in: int, layer: int, recipe: Recipe, model_name: str, tokens: Tensor
) -> Any:
    """A sae-lens ``TopKSAE`` for ``blocks.{layer}.hook_resid_post``, with unit-norm
    decoder rows, the encoder their transpose and ``b_dec`` the tokens' median."""
    sae_lens = optional_import("sae_lens", "demo")
    config = sae_lens.TopKSAEConfig(
        d_in=d_in,
        d_sae=recipe.sae_expansion * d_in,
        k=recipe.sae_k,
        metadata=sae_lens.saes.sae.SAEMetadata(
            model_name=model_name,
            hook_name=f"blocks.{layer}.hook_resid_post",
            hook_layer=layer,
        ),
    )
    sae = sae_lens.TopKSAE(config)
    with torch.no_grad():
        sae.b_dec.copy_(tokens.median(0).values)
        sae.W_dec.copy_(F.normalize(sae.W_dec, dim=1))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


class _TopKTrainer:
    """Adam on the parameters of a sae-lens ``TopKSAE``: the reconstruction MSE of
    its own ``encode``/``decode``, plus the auxiliary top-k loss that gives dead
    features a gradient (Gao et al. 2024); decoder rows are kept at unit norm.

    The forward pass is ``encode``/``decode`` written for speed: the pre-activation
    as ``x W_enc + (b_enc - b_dec W_enc)`` (so ``b_dec``'s gradient through the
    encoder is a vector product, not a matrix product), the top-k values gathered
    from it, and the decoder as a weighted sum of the k selected rows.
    """

    def __init__(self, sae: Any, recipe: Recipe) -> None:
        self.sae = sae
        self.k = recipe.sae_k
        self.aux_k = max(1, int(AUX_K_SHARE * sae.W_dec.shape[1]))
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=recipe.sae_lr)
        # constant, then a linear decay to 0 over the last fifth of the steps
        decay = max(1, recipe.sae_steps // 5)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: min(1.0, (recipe.sae_steps - step) / decay),
        )
        self.last_fired = torch.zeros(sae.W_dec.shape[0], dtype=torch.long)
        self.step_count = 0

    def _decode(self, pre: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        values = torch.relu(pre.gather(1, indices))
        decoded = F.embedding_bag(
            indices, self.sae.W_dec, per_sample_weights=values, mode="sum"
        )
        return values, decoded

    def step(self, x: Tensor) -> float:
        sae = self.sae
        pre = torch.addmm(sae.b_enc - sae.b_dec @ sae.W_enc, x, sae.W_enc)
        with torch.no_grad():
            indices = pre.topk(self.k, dim=-1, sorted=False).indices
        values, decoded = self._decode(pre, indices)
        error = x - (decoded + sae.b_dec)
        loss = error.pow(2).sum(-1).mean()
        dead = self.last_fired < self.step_count - DEAD_STEPS
        if bool(dead.any()):
            with torch.no_grad():
                masked = pre.masked_fill(~dead, -math.inf)
                k = min(self.aux_k, int(dead.sum()))
                aux = masked.topk(k, dim=-1, sorted=False).indices
            _, aux_decoded = self._decode(pre, aux)
            aux_loss = (error.detach() - aux_decoded).pow(2).sum(-1).mean()
            loss = loss + AUX_WEIGHT * aux_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        with torch.no_grad():
            sae.W_dec.copy_(F.normalize(sae.W_dec, dim=1))
            self.last_fired[indices[values.detach() > 0]] = self.step_count
        self.step_count += 1
        return float(loss.detach())


def train_saes(
    vit: nn.Module,
    rendering: Callable[[int], DigitBlocks],
    recipe: Recipe,
    seed: int,
    show_progress: bool = False,
    model_name: str = "captum-faithful-demo-vit",
) -> dict[int, Any]:
    """sae-lens top-k SAEs on the patch tokens of ``recipe.sae_layers``.

    sae-lens's own training runner drives a language model; here every SAE is
    fitted by :class:`_TopKTrainer` to the ViT's patch tokens of fresh renderings
    of the training scans (``rendering(r)``, r = 0, 1, ...): each rendering's tokens
    are computed once for all blocks, shuffled, and cut into batches of
    ``recipe.sae_batch_tokens``, one step of every SAE per batch.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    steps = iter(
        progress(range(recipe.sae_steps), show_progress, desc="train SAEs", leave=False)
    )
    trainers: dict[int, _TopKTrainer] = {}
    done, index = 0, 0
    while done < recipe.sae_steps:
        tokens = patch_tokens(vit, rendering(index).images, recipe.sae_layers)
        index += 1
        for layer in recipe.sae_layers:
            if layer not in trainers:
                sae = _new_topk_sae(
                    tokens[layer].shape[-1], layer, recipe, model_name, tokens[layer]
                )
                trainers[layer] = _TopKTrainer(sae, recipe)
        n_tokens = len(tokens[recipe.sae_layers[0]])
        order = torch.randperm(n_tokens, generator=generator)
        batch = recipe.sae_batch_tokens
        for start in range(0, n_tokens - batch + 1, batch):
            if next(steps, None) is None:
                break
            rows = order[start : start + batch]
            for layer, trainer in trainers.items():
                trainer.step(tokens[layer][rows])
            done += 1
    return {layer: trainer.sae.eval() for layer, trainer in trainers.items()}


def _load_sae(path: Path, device: str) -> Any:
    from captum_faithful.sae import load_sae

    return load_sae(path, device=device)


def train_with_cnn_recipe(
    model: nn.Module,
    recipe: Recipe,
    seed: int,
    rendering: Callable[[int], DigitBlocks],
    show_progress: bool,
    desc: str,
) -> nn.Module:
    """Train ``model`` as the demo trains its CNN: torch seeded with ``seed``, then
    :func:`train_classifier` with the recipe's CNN epochs, learning rate and batch
    size (the demo CNN and the residual CNN of the FEI ablations share it)."""
    torch.manual_seed(seed)
    return train_classifier(
        model,
        rendering,
        recipe.cnn_epochs,
        recipe.cnn_lr,
        recipe.batch_size,
        seed,
        show_progress=show_progress,
        desc=desc,
    )


def train_all(
    recipe: Recipe,
    seed: int,
    folder: Path,
    show_progress: bool = False,
    distractor: str = "shuffled",
) -> dict:
    """Train the CNN, the ViT and the SAEs; write them and ``meta.json`` to ``folder``.

    Every image comes from the rendering with ``distractor``
    (:func:`~captum_faithful.demo.data.make_blocks`). ``meta.json`` holds the
    recipe, the distractor, the test accuracies, each SAE's explained variance and
    share of dead features (:func:`held_out_tokens`), and the CPU and wall seconds
    of every training phase with the thread count.
    """
    check_distractor(distractor)
    clock = Stopwatch()

    def rendering(index: int) -> DigitBlocks:
        return make_blocks(
            "train", seed, rendering=index % recipe.renderings, distractor=distractor
        )

    def sae_rendering(index: int) -> DigitBlocks:
        # renderings the classifiers never saw: more distinct training images
        return make_blocks(
            "train", seed, rendering=recipe.renderings + index, distractor=distractor
        )

    with clock.phase("cnn"):
        cnn = train_with_cnn_recipe(
            build_cnn(), recipe, seed, rendering, show_progress, "train CNN"
        )
    with clock.phase("vit"):
        torch.manual_seed(seed)
        # a transformers ViTForImageClassification (set_attn_implementation,
        # save_pretrained)
        vit: Any = build_vit(recipe, seed)
        # PyTorch's fused attention trains about 10 % faster; the saved model
        # computes the same function with eager attention, which TransMM reads
        vit.set_attn_implementation("sdpa")
        vit = train_classifier(
            vit,
            rendering,
            recipe.vit_epochs,
            recipe.vit_lr,
            recipe.vit_batch_size,
            seed,
            weight_decay=0.05,
            show_progress=show_progress,
            desc="train ViT",
        )
        vit.set_attn_implementation("eager")
    with clock.phase("saes"):
        saes = train_saes(vit, sae_rendering, recipe, seed, show_progress)

    test = make_blocks("test", seed, distractor=distractor)
    diagnostic_tokens = held_out_tokens(vit, recipe.sae_layers, seed, distractor)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors = optional_import("safetensors.torch", "demo")
    safetensors.save_file(cnn.state_dict(), str(folder / "cnn.safetensors"))
    with quiet_transformers():
        vit.save_pretrained(str(folder / "vit"))
    for layer, sae in saes.items():
        sae.save_model(folder / f"sae_block{layer}")
    meta = {
        "recipe": asdict(recipe),
        "seed": seed,
        "distractor": distractor,
        "accuracy": {
            "cnn": accuracy(cnn, test.images, test.labels),
            "vit": accuracy(vit, test.images, test.labels),
        },
        "sae_explained_variance": {
            str(layer): explained_variance(sae, diagnostic_tokens[layer])
            for layer, sae in saes.items()
        },
        "sae_dead_fraction": {
            str(layer): dead_fraction(sae, diagnostic_tokens[layer])
            for layer, sae in saes.items()
        },
        "training_threads": torch.get_num_threads(),
        "training_phases": clock.phases,
        "training_cpu_seconds": clock.total("cpu_seconds"),
        "training_seconds": clock.total("wall_seconds"),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def cache_folder(recipe: Recipe, seed: int, distractor: str = "shuffled") -> Path:
    """The cache folder of ``(recipe, seed, distractor)``: ``demo-<key>`` under
    :func:`cache_root` (:meth:`Recipe.key`)."""
    return cache_root() / f"demo-{recipe.key(seed, distractor)}"


def ensure_trained(
    recipe: Recipe, seed: int, show_progress: bool = False, distractor: str = "shuffled"
) -> Path:
    """The cache folder of ``(recipe, seed, distractor)``, training into it first if
    needed."""

    def train(staging: Path) -> None:
        with _training_threads():
            train_all(
                recipe,
                seed,
                staging,
                show_progress=show_progress,
                distractor=distractor,
            )

    return cached_training(cache_folder(recipe, seed, distractor), train)


def cached_training(folder: Path, train: Callable[[Path], None]) -> Path:
    """``folder``, after ``train(staging)`` has filled it, unless it holds a
    ``meta.json`` already (a finished training).

    Training writes into a temporary sibling folder that is renamed at the end, so an
    interrupted run never leaves a half-written cache and concurrent runs do not mix.
    """
    if (folder / "meta.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        train(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_models(
    folder: Path,
    device: str = "cpu",
    sae_loader: Callable[[Path, str], Any] = _load_sae,
) -> tuple[nn.Module, nn.Module, dict, dict]:
    """Load the CNN, ViT, SAEs and metadata from a cache folder written by train_all."""
    meta = json.loads((folder / "meta.json").read_text())
    recipe = Recipe(
        **{**meta["recipe"], "sae_layers": tuple(meta["recipe"]["sae_layers"])}
    )
    safetensors = optional_import("safetensors.torch", "demo")
    cnn = build_cnn()
    cnn.load_state_dict(safetensors.load_file(str(folder / "cnn.safetensors")))
    transformers = optional_import("transformers", "demo")
    with quiet_transformers():
        vit = transformers.ViTForImageClassification.from_pretrained(
            str(folder / "vit"), attn_implementation="eager"
        )
    saes = {
        layer: sae_loader(folder / f"sae_block{layer}", device)
        for layer in recipe.sae_layers
    }
    return cnn.to(device).eval(), vit.to(device).eval(), saes, meta


# ---------------------------------------------------------------------------
# A small residual CNN, for FEI's architecture ablations
# (``python -m benchmarks.fei_ablations``). The demo job never trains it: it is
# trained and cached on the first call of :func:`load_residual_cnn`.

#: Bump when the residual CNN's architecture or training code changes.
RESIDUAL_VERSION = 1


class ResidualBlock(nn.Module):
    r"""Two 3×3 convolutions with BatchNorm and a shortcut, as in ResNet's basic block.

    .. math::
        y = \mathrm{ReLU}\big(\mathrm{BN}(W_2 * \mathrm{ReLU}(\mathrm{BN}(W_1 * x)))
            + s(x)\big)

    with :math:`s` the identity when the channel counts agree, else a 1×1
    convolution and BatchNorm (the projection shortcut). Every ReLU is its own module.
    The shortcut is defined after the two convolutions, so in definition order (the
    order of ``layers="early"`` / ``"late"``) the projection follows the block's main
    path.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("out_channels", out_channels, minimum=1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1),
                nn.BatchNorm2d(out_channels),
            )
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        main = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(main + self.shortcut(x))


def build_residual_cnn() -> nn.Sequential:
    """A residual counterpart of :func:`build_cnn` at about its cost per image.

    A 3×3 stem (16 channels), then three :class:`ResidualBlock` s, 16 → 16 at 32×32
    (identity shortcut), 16 → 32 at 16×16 and 32 → 64 at 8×8 (projection shortcuts),
    with a max-pool before the second and third, a global max-pool and a linear layer:
    nine convolutions, seven on the main path (the demo CNN has four), and about 12
    million multiply-adds per image (the demo CNN: about 12 million too).
    """
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        ResidualBlock(16, 16),
        nn.MaxPool2d(2),
        ResidualBlock(16, 32),
        nn.MaxPool2d(2),
        ResidualBlock(32, 64),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(64, N_CLASSES),
    )


def residual_key(recipe: Recipe, seed: int) -> str:
    """Cache key of the residual CNN: the fields of ``recipe`` its training reads
    (the CNN's), the data and residual versions and ``seed``."""
    blob = json.dumps(
        {
            "model": "residual-cnn",
            "version": RECIPE_VERSION,
            "residual_version": RESIDUAL_VERSION,
            "seed": seed,
            "epochs": recipe.cnn_epochs,
            "lr": recipe.cnn_lr,
            "batch_size": recipe.batch_size,
            "renderings": recipe.renderings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_residual_cnn(
    recipe: Recipe, seed: int, folder: Path, show_progress: bool = False
) -> dict:
    """Train :func:`build_residual_cnn` exactly as :func:`train_all` trains the demo
    CNN (same renderings, epochs, learning rate, batch size, schedule and seeds); write
    ``residual_cnn.safetensors`` and ``meta.json`` (recipe fields, seed, test
    accuracy, parameter count, thread count, CPU and wall seconds) to ``folder``."""
    clock = Stopwatch()

    def rendering(index: int) -> DigitBlocks:
        return make_blocks("train", seed, rendering=index % recipe.renderings)

    with clock.phase("residual_cnn"):
        model = train_with_cnn_recipe(
            build_residual_cnn(),
            recipe,
            seed,
            rendering,
            show_progress,
            "train residual CNN",
        )
    test = make_blocks("test", seed)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors = optional_import("safetensors.torch", "demo")
    safetensors.save_file(model.state_dict(), str(folder / "residual_cnn.safetensors"))
    meta = {
        "model": "residual-cnn",
        "residual_version": RESIDUAL_VERSION,
        "recipe": {
            "cnn_epochs": recipe.cnn_epochs,
            "cnn_lr": recipe.cnn_lr,
            "batch_size": recipe.batch_size,
            "renderings": recipe.renderings,
        },
        "seed": seed,
        "accuracy": accuracy(model, test.images, test.labels),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_threads": torch.get_num_threads(),
        "training_cpu_seconds": clock.total("cpu_seconds"),
        "training_seconds": clock.total("wall_seconds"),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def ensure_residual_trained(
    recipe: Recipe, seed: int, show_progress: bool = False
) -> Path:
    """The cache folder of the residual CNN for ``(recipe, seed)``, training into it
    first if needed (see :func:`cached_training`)."""

    def train(staging: Path) -> None:
        with _training_threads():
            train_residual_cnn(recipe, seed, staging, show_progress=show_progress)

    return cached_training(
        cache_root() / f"residual-cnn-{residual_key(recipe, seed)}", train
    )


def load_residual_cnn(
    quick: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
) -> tuple[nn.Sequential, dict]:
    """The residual CNN (:func:`build_residual_cnn`) trained like the demo CNN of
    ``load_demo(quick, seed=seed)``, in eval mode, and its ``meta.json``.

    Trained on first use (about as long as the demo CNN: under a minute on one
    thread with the full recipe) and cached next to the demo's models, in a folder
    keyed by the training fields of the recipe and ``seed``; later calls load the
    cache. The demo job does not use it; FEI's ablations do.

    Args:
        quick (bool, optional): the quick recipe's CNN training. Default: False
        seed (int, optional): seed of the data and the training. Default: 0
        device (str or torch.device, optional): where the model goes.
            Default: "cpu"
        show_progress (bool, optional): a progress bar while training.
            Default: False

    Returns:
        tuple: ``(model, meta)``; ``meta["accuracy"]`` is the accuracy on the demo's
        test part (``load_demo(quick, seed=seed).x_test``).
    """
    check_bool("quick", quick)
    check_int("seed", seed, minimum=0)
    check_bool("show_progress", show_progress)
    device = torch.device(device)
    recipe = QUICK_RECIPE if quick else FULL_RECIPE
    folder = ensure_residual_trained(recipe, seed, show_progress=show_progress)
    meta = json.loads((folder / "meta.json").read_text())
    safetensors = optional_import("safetensors.torch", "demo")
    model = build_residual_cnn()
    model.load_state_dict(
        safetensors.load_file(str(folder / "residual_cnn.safetensors"))
    )
    return model.to(device).eval(), meta
