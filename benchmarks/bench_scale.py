"""Real scale: every method and metric on ImageNet-sized models (not run by CI).

Models, all with random weights (nothing is downloaded; timings and memory do not
depend on the weights): torchvision ResNet-50 and VGG16, a ViT-B/16 from Hugging Face
(``ViTForImageClassification`` built from a ``ViTConfig``) and from timm
(``vit_base_patch16_224``, ``pretrained=False``), all on 3x224x224 images, a
BERT-base-sized ``BertForSequenceClassification`` (sequences of ``--seq-len`` tokens),
and two decoder-only language models, GPT-2 small (``GPT2LMHeadModel`` from a default
``GPT2Config``) and a Pythia-160m-shaped ``GPTNeoXForCausalLM`` (12 blocks, width 768,
rotary on a quarter of each head), on prompts of ``--seq-len`` random tokens.

Parts (``--parts``):

``methods``
    UNI (defaults) next to Captum ``IntegratedGradients(n_steps=50)``, both with
    ``internal_batch_size=--ibs``; FEI (defaults, ``n_iter=--fei-iters``; the time per
    iteration is reported); on the ViTs TransMM and FeatureGatedTransMM with 32x
    sae-lens SAEs on blocks 3, 6 and 9 (built from configs, saved to a temporary
    folder and loaded with ``load_sae``); on BERT, LayerUNI on
    ``bert.embeddings`` next to Captum ``LayerIntegratedGradients(n_steps=50)``.
    On the language models: attribution patching (``AttributionPatching``, n_steps=1,
    every residual-stream site) from UNI's learned baseline and from a corrupted
    prompt (other random tokens), exact activation patching from the same corrupted
    prompt (one patched forward per site and token, ``--patch-chunk`` rows per
    forward), and Captum's ``LLMGradientAttribution`` for one target token with
    ``LayerIntegratedGradients(n_steps=50)`` and with
    ``LayerUnlearnedIntegratedGradients`` (defaults) on the token embeddings. The
    column ``x_activation_patching`` is each time over exact activation patching's:
    attribution patching exists because activation patching needs one forward per
    site and token (``(blocks + 1) x seq_len`` of them).
    Floors: UNI = ``pgd_steps`` forward+backward passes of the batch + ``n_steps`` x
    batch path points forward+backward in chunks of ``--ibs`` + the per-sample
    unlearning written as a plain loop (forward, parameter gradient, forward, batch
    of one); FEI = one forward+backward of the N x K insertion images per
    iteration; TransMM = one forward+backward with eager attention.
``metrics``
    Each metric with its defaults (``max_examples_per_batch=None``), against its
    floor: the images the metric forwards (recorded from one run by a forward
    pre-hook on the model), already built, forwarded with no hooks in chunks of
    each size in ``--floor-chunks``; the fastest chunk is the floor.
``memory``
    Peak memory against each chunking argument, one fresh subprocess per
    configuration: UNI's ``internal_batch_size`` and ``unlearning_batch_size``
    (ResNet-50, and VGG16 for the unlearning), LayerUNI's ``internal_batch_size``
    (BERT) and the metrics' ``max_examples_per_batch`` (ResNet-50): the chunk held
    while the batch grows 4x, and the chunk grown; with one PGD step and with step
    counts that just fill the largest chunk (memory depends on the rows per pass,
    not on how many passes).

Time and peak memory: ``benchmarks/_harness.py`` (interleaved rounds, wall clock,
one thread, median and within-round ratios; peak memory read in each call's warm-up
call, or, with ``--no-warmup``, in its one timed call). In the ``methods`` and
``metrics`` parts every configuration of one model runs in one subprocess per part;
the ``memory`` part uses a fresh subprocess per configuration.

Usage (run from the repository root)::

    python -m benchmarks.bench_scale                  # everything
    python -m benchmarks.bench_scale --only resnet50  # one model
    python -m benchmarks.bench_scale --only vit_hf,vit_timm --parts methods --rounds 3
    python -m benchmarks.bench_scale --parts memory --only resnet50
    python -m benchmarks.bench_scale --only resnet50 --parts metrics \\
        --metrics activation_deviation,insertion_activation_deviation
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import _harness as harness
from captum_faithful._utils import as_logits

ROOT = Path(__file__).resolve().parents[1]

IMAGE_MODELS = ("resnet50", "vgg16", "vit_hf", "vit_timm")
LM_MODELS = ("gpt2", "pythia160m")
MODELS = (*IMAGE_MODELS, "bert", *LM_MODELS)
PARTS = ("methods", "metrics", "memory")
METHOD_GROUPS = ("uni", "fei", "transmm", "patching")
METRICS = (
    "insertion_auc",
    "deletion_auc",
    "saco",
    "faithfulness_correlation",
    "path_monotonicity",
    "activation_deviation",
    "insertion_activation_deviation",
)
VITS = ("vit_hf", "vit_timm")
SAE_BLOCKS = (3, 6, 9)
SAE_EXPANSION = 32
UNI_N_STEPS, UNI_PGD_STEPS = 15, 10  # UNI's defaults (SPEC section 3)
FEI_QUANTILES = 5  # FEI's default K
IG_N_STEPS = 50


def timed(fns: dict[str, Callable[[], Any]], args: argparse.Namespace):
    """The harness's round-robin with this script's options (peaks always read)."""
    return harness.interleave(fns, args.rounds, warmup=args.warmup, peaks=True)


# ------------------------------------------------------------------- models


class Bench:
    """A model with its inputs, target and forward function (logits)."""

    def __init__(self, name: str, batch: int, seq_len: int) -> None:
        torch.manual_seed(0)
        self.name = name
        self.model = build_model(name)
        generator = torch.Generator().manual_seed(0)
        if name in LM_MODELS:
            vocab = self.model.config.vocab_size
            self.inputs = torch.randint(0, vocab, (batch, seq_len), generator=generator)
            self.corrupted = torch.randint(
                0, vocab, (batch, seq_len), generator=generator
            )
            self.args = None
        elif name == "bert":
            vocab = self.model.config.vocab_size
            self.inputs = torch.randint(1, vocab, (batch, seq_len), generator=generator)
            self.mask = torch.ones(batch, seq_len, dtype=torch.long)
            self.mask[1:, seq_len - seq_len // 4 :] = 0  # padding in all but sample 0
            self.args: tuple | None = (self.mask,)
        else:
            self.inputs = torch.rand(batch, 3, 224, 224, generator=generator)
            self.args = None
        with torch.no_grad():
            self.target = self.forward(self.inputs, *(self.args or ())).argmax(1)

    def forward(self, x: Tensor, *args: Tensor) -> Tensor:
        if self.name in LM_MODELS:  # next-token logits at the last position
            return self.model(x).logits[:, -1]
        if self.name == "bert":
            return self.model(input_ids=x, attention_mask=args[0]).logits
        return as_logits(self.model(x))

    def layers(self) -> Any:
        """Where FEI's ClipGrad and activation deviation look: convs or blocks."""
        if self.name in VITS:
            from captum_faithful.vit import get_adapter

            return get_adapter(self.model).blocks
        return "conv"


def build_model(name: str) -> nn.Module:
    if name in ("resnet50", "vgg16"):
        import torchvision

        return getattr(torchvision.models, name)(weights=None).eval()
    if name == "vit_hf":
        return harness.hf_vit("base")
    if name == "vit_timm":
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    if name == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(num_labels=2)).eval()
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config()).eval()
    if name == "pythia160m":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        config = GPTNeoXConfig(
            vocab_size=50304,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            rotary_pct=0.25,
            max_position_embeddings=2048,
        )
        return GPTNeoXForCausalLM(config).eval()
    raise ValueError(f"unknown model {name!r}")


def saved_and_loaded_saes(hidden: int, folder: Path) -> dict:
    """32x standard sae-lens SAEs from configs, saved and loaded with ``load_sae``.

    About 2% of the features fire (:func:`benchmarks._harness.sparse_saes`).
    """
    from captum_faithful import load_sae

    saes = {}
    built = harness.sparse_saes(hidden, SAE_BLOCKS, SAE_EXPANSION, "standard")
    for block, sae in built.items():
        path = folder / f"block_{block}"
        sae.save_model(path)
        saes[block] = load_sae(path)
    return saes


# ------------------------------------------------------------------- floors


def forward_backward(forward: Callable, x: Tensor, target: Tensor, *args) -> None:
    x = x.detach().requires_grad_(True)
    out = forward(x, *args)
    torch.autograd.grad(out.gather(1, target.view(-1, 1)).sum(), x)


def path_rows(bench: Bench, n_steps: int, chunk: int) -> None:
    """``n_steps`` x batch path points forward+backward, ``chunk`` rows at a time."""
    x, n = bench.inputs, bench.inputs.shape[0]
    steps_per_chunk = max(1, chunk // n)
    for first in range(0, n_steps, steps_per_chunk):
        count = min(steps_per_chunk, n_steps - first)
        rows = torch.cat([x * ((first + k + 1) / n_steps) for k in range(count)])
        forward_backward(bench.forward, rows, bench.target.repeat(count))


def unlearning_loop(bench: Bench) -> None:
    """Per sample: forward, gradient of the loss w.r.t. the parameters, forward."""
    params = [p for p in bench.model.parameters() if p.requires_grad]
    for i in range(bench.inputs.shape[0]):
        sample = bench.inputs[i : i + 1]
        args = tuple(a[i : i + 1] for a in bench.args or ())
        loss = F.cross_entropy(bench.forward(sample, *args), bench.target[i : i + 1])
        torch.autograd.grad(loss, params)
        with torch.no_grad():
            bench.forward(sample, *args)


def bert_embedding_forward(bench: Bench) -> Callable:
    """BERT's forward from the word embeddings: what LayerUNI differentiates."""

    def forward(embeddings: Tensor, mask: Tensor) -> Tensor:
        return bench.model(inputs_embeds=embeddings, attention_mask=mask).logits

    return forward


# ------------------------------------------------------------------ methods


def methods_rows(bench: Bench, args: argparse.Namespace) -> list[dict]:
    if bench.name == "bert":
        return bert_rows(bench, args)
    if bench.name in LM_MODELS:
        return language_model_rows(bench, args)
    from captum.attr import IntegratedGradients

    from captum_faithful import (
        FaithfulnessEnsemble,
        FeatureGatedTransMM,
        TransMM,
        UnlearnedIntegratedGradients,
    )
    from captum_faithful.vit import eager_attention

    x, target, ibs = bench.inputs, bench.target, args.ibs
    n = x.shape[0]
    uni = UnlearnedIntegratedGradients(bench.forward, model=bench.model)
    ig = IntegratedGradients(bench.forward)
    fei = FaithfulnessEnsemble(
        bench.forward, model=bench.model, layers=bench.layers(), n_iter=args.fei_iters
    )
    # the insertion images of one FEI iteration: N x K soft blends of x and a colour
    blends = torch.cat(
        [x * (k + 1) / (FEI_QUANTILES + 1) for k in range(FEI_QUANTILES)]
    )
    groups = set(args.methods)
    fns: dict[str, Callable] = {}
    if "uni" in groups:
        fns.update(
            {
                "uni": lambda: uni.attribute(x, target=target, internal_batch_size=ibs),
                "ig50": lambda: ig.attribute(
                    x, target=target, n_steps=IG_N_STEPS, internal_batch_size=ibs
                ),
                "pass": lambda: forward_backward(bench.forward, x, target),
                "path": lambda: path_rows(bench, UNI_N_STEPS, ibs),
                "unlearn": lambda: unlearning_loop(bench),
            }
        )
    if "fei" in groups:
        fns.update(
            {
                "fei": lambda: fei.attribute(
                    x, target=target, generator=torch.Generator().manual_seed(0)
                ),
                "fei_iteration": lambda: forward_backward(
                    bench.forward, blends, target.repeat(FEI_QUANTILES)
                ),
            }
        )
    tmp = None
    if bench.name in VITS and "transmm" in groups:
        from captum_faithful.vit import get_adapter

        tmp = tempfile.TemporaryDirectory()
        hidden = get_adapter(bench.model).hidden_size
        transmm = TransMM(bench.model)
        gated = FeatureGatedTransMM(
            bench.model, saved_and_loaded_saes(hidden, Path(tmp.name))
        )

        def eager_pass() -> None:
            with eager_attention(bench.model):
                forward_backward(bench.forward, x, target)

        fns["transmm"] = lambda: transmm.attribute(x, target=target)
        fns["fg_transmm"] = lambda: gated.attribute(x, target=target)
        fns["eager_pass"] = eager_pass
    t = timed(fns, args)
    if tmp is not None:
        tmp.cleanup()

    def x_ig50(name: str) -> float | None:
        return t.ratio(name, "ig50") if "ig50" in t else None

    rows = []
    if "uni" in t:
        t.derive("uni_floor", {"pass": UNI_PGD_STEPS, "path": 1, "unlearn": 1})
        rows += [
            row(
                bench,
                "UNI",
                f"defaults, internal_batch_size={ibs}",
                t,
                "uni",
                ig50=x_ig50("uni"),
                floor=t.ratio("uni", "uni_floor"),
                note=f"floor {t.median('uni_floor') / n:.3g} s/image",
            ),
            row(
                bench,
                "Captum IG",
                f"n_steps=50, internal_batch_size={ibs}",
                t,
                "ig50",
                ig50=1.0,
            ),
        ]
    if "fei" in t:
        iters = args.fei_iters
        per_iteration = t.median("fei") / iters
        rows.append(
            row(
                bench,
                "FEI",
                f"{iters} iterations (default n_iter=100)",
                t,
                "fei",
                # FEI's default n_iter is 100: projected from the timed iterations
                ig50=100 / iters * t.ratio("fei", "ig50") if "ig50" in t else None,
                floor=t.ratio("fei", "fei_iteration") / iters,
                note=f"{per_iteration / n:.3g} s/iteration/image; "
                "x IG50 is for 100 iterations, projected",
            )
        )
    if "transmm" in t:
        rows += [
            row(
                bench,
                "TransMM",
                "",
                t,
                "transmm",
                ig50=x_ig50("transmm"),
                floor=t.ratio("transmm", "eager_pass"),
            ),
            row(
                bench,
                "FeatureGatedTransMM",
                f"{SAE_EXPANSION}x SAEs on blocks {','.join(map(str, SAE_BLOCKS))}",
                t,
                "fg_transmm",
                ig50=x_ig50("fg_transmm"),
                floor=t.ratio("fg_transmm", "eager_pass"),
                note=f"{t.ratio('fg_transmm', 'transmm'):.2f} x TransMM",
            ),
        ]
    return rows


def bert_rows(bench: Bench, args: argparse.Namespace) -> list[dict]:
    from captum.attr import LayerIntegratedGradients

    from captum_faithful import LayerUnlearnedIntegratedGradients

    ids, mask, target, ibs = bench.inputs, bench.mask, bench.target, args.ibs
    n = ids.shape[0]
    layer = bench.model.bert.embeddings
    uni = LayerUnlearnedIntegratedGradients(bench.forward, layer, model=bench.model)
    lig = LayerIntegratedGradients(bench.forward, layer)
    embed = bench.model.bert.embeddings.word_embeddings
    from_embeddings = bert_embedding_forward(bench)

    def embedding_pass(copies: int = 1) -> None:
        with torch.no_grad():
            start = embed(ids).repeat(copies, 1, 1)
        forward_backward(
            from_embeddings, start, target.repeat(copies), mask.repeat(copies, 1)
        )

    def path() -> None:
        per_chunk = max(1, ibs // n)
        for first in range(0, UNI_N_STEPS, per_chunk):
            embedding_pass(min(per_chunk, UNI_N_STEPS - first))

    fns = {
        "uni": lambda: uni.attribute(
            ids,
            target=target,
            additional_forward_args=(mask,),
            internal_batch_size=ibs,
        ),
        "lig50": lambda: lig.attribute(
            ids,
            baselines=torch.zeros_like(ids),
            target=target,
            additional_forward_args=(mask,),
            n_steps=IG_N_STEPS,
            internal_batch_size=ibs,
        ),
        "pass": embedding_pass,
        "path": path,
        "unlearn": lambda: unlearning_loop(bench),
    }
    t = timed(fns, args)
    t.derive("floor", {"pass": UNI_PGD_STEPS, "path": 1, "unlearn": 1})
    settings = f"bert.embeddings, {ids.shape[1]} tokens, internal_batch_size={ibs}"
    return [
        row(
            bench,
            "LayerUNI",
            f"defaults, {settings}",
            t,
            "uni",
            ig50=t.ratio("uni", "lig50"),
            floor=t.ratio("uni", "floor"),
        ),
        row(bench, "Captum LayerIG", f"n_steps=50, {settings}", t, "lig50", ig50=1.0),
    ]


def numbered_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer whose word ``t{i}`` is token ``i``, for Captum's
    ``TextTokenInput`` on a model with random weights (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0")


def language_model_rows(bench: Bench, args: argparse.Namespace) -> list[dict]:
    from captum.attr import (
        LayerIntegratedGradients,
        LLMGradientAttribution,
        TextTokenInput,
    )

    from captum_faithful import (
        AttributionPatching,
        LayerUnlearnedIntegratedGradients,
        activation_patching,
    )

    model, ids, corrupted = bench.model, bench.inputs, bench.corrupted
    n, seq_len = ids.shape
    patching = AttributionPatching(model)
    n_sites = len(patching.site_names)
    embeddings = model.get_input_embeddings()
    tokenizer = numbered_tokenizer(model.config.vocab_size)
    prompts = [" ".join(f"t{i}" for i in row.tolist()) for row in ids]
    llm_lig = LLMGradientAttribution(
        LayerIntegratedGradients(model, embeddings), tokenizer
    )
    llm_uni = LLMGradientAttribution(
        LayerUnlearnedIntegratedGradients(model, embeddings), tokenizer
    )

    def llm(attribution: Any, **kwargs: Any) -> Callable[[], None]:
        def run() -> None:
            for prompt, token in zip(prompts, bench.target.tolist(), strict=True):
                attribution.attribute(
                    TextTokenInput(prompt, tokenizer),
                    target=torch.tensor([token]),
                    **kwargs,
                )

        return run

    fns: dict[str, Callable] = {
        "ap_unlearned": lambda: patching.attribute(ids, baselines="unlearned"),
        "ap_corrupted": lambda: patching.attribute(ids, baselines=corrupted),
        "llm_lig": llm(llm_lig, n_steps=IG_N_STEPS, internal_batch_size=args.ibs),
        "llm_uni": llm(llm_uni, internal_batch_size=args.ibs),
    }
    t = timed(fns, args)
    sites = f"{n_sites} residual sites x {seq_len} tokens"
    one_target = f"1 target token, internal_batch_size={args.ibs}"
    rows = []
    exact = None
    if "patching" in args.methods:
        # exact activation patching is (blocks + 1) x seq_len forwards per prompt:
        # timed once, after the others, no warm-up (its cost is linear in the
        # patched rows, minutes per prompt); its ratios are of medians
        exact = harness.interleave(
            {
                "act": lambda: activation_patching(
                    model, ids, corrupted, chunk_size=args.patch_chunk
                )
            },
            1,
            warmup=False,
            peaks=True,
        )
        rows.append(
            row(bench, "activation_patching", f"corrupted prompt, {sites}, "
                f"chunk_size={args.patch_chunk}", exact, "act",
                note=f"{n_sites * seq_len} patched forwards per prompt")
        )  # fmt: skip

    def versus_exact(name: str) -> str:
        if exact is None:
            return ""
        return f"x_act {t.median(name) / exact.median('act'):.4f}"

    return rows + [
        row(bench, "AttributionPatching", f"unlearned baseline, {sites}",
            t, "ap_unlearned", note=versus_exact("ap_unlearned")),
        row(bench, "AttributionPatching", f"corrupted prompt, {sites}",
            t, "ap_corrupted", note=versus_exact("ap_corrupted")),
        row(bench, "LLMGradientAttribution + LayerIG", f"n_steps=50, {one_target}",
            t, "llm_lig", ig50=1.0, note=versus_exact("llm_lig")),
        row(bench, "LLMGradientAttribution + LayerUNI", f"defaults, {one_target}",
            t, "llm_uni", ig50=t.ratio("llm_uni", "llm_lig"),
            note=versus_exact("llm_uni")),
    ]  # fmt: skip


def row(
    bench: Bench,
    method: str,
    settings: str,
    timings: harness.Timings,
    name: str,
    ig50: float | None = None,
    floor: float | None = None,
    note: str = "",
) -> dict:
    """One table row: ``name``'s median seconds per example and its peak."""
    n = bench.inputs.shape[0]
    low, high = timings.spread(name)
    return {
        "model": bench.name,
        "method": method,
        "settings": settings,
        "batch": n,
        "s_per_image": timings.median(name) / n,
        "range": f"{low / n:.3g}–{high / n:.3g}",
        "x_captum_ig50": ig50,
        "x_floor": floor,
        "peak_mb": timings.peaks.get(name),
        "note": note,
    }


# ------------------------------------------------------------------ metrics


class RowRecorder:
    """Records (copies of) the images a metric forwards.

    ``forward`` stands in for the model where a metric takes a forward function
    (it returns zero logits: the images a metric builds do not depend on the
    scores when the target is given); the metrics that take the model itself are
    recorded by a forward pre-hook while ``active``.
    """

    def __init__(self, model: nn.Module, n_classes: int) -> None:
        self.rows: list[Tensor] = []
        self.active = False
        self.n_classes = n_classes
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if self.active and args:
            self.rows.append(args[0].detach().clone())

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        self.rows.append(x.detach().clone())
        return x.new_zeros(x.shape[0], self.n_classes)

    def record(self, fn: Callable[[], Any]) -> Tensor:
        self.rows, self.active = [], True
        try:
            fn()
        finally:
            self.active = False
        rows, self.rows = torch.cat(self.rows), []
        return rows


def metric_calls(bench: Bench) -> dict[str, tuple[str, Callable[[Callable], Any]]]:
    """name -> (settings, call(forward_func)); the activation metrics run the model."""
    from captum_faithful import metrics

    model, x, target = bench.model, bench.inputs, bench.target
    attributions = torch.rand(
        x.shape[0], 1, *x.shape[2:], generator=torch.Generator().manual_seed(1)
    )
    perturbed = metrics.blur_baseline(x)
    layers = bench.layers()
    return {
        "insertion_auc": (
            "n_steps=100, blur",
            lambda forward: metrics.insertion_auc(
                forward, x, attributions, target=target
            ),
        ),
        "deletion_auc": (
            "n_steps=100, zero",
            lambda forward: metrics.deletion_auc(
                forward, x, attributions, target=target
            ),
        ),
        "saco": (
            "n_groups=10, mean",
            lambda forward: metrics.saco(forward, x, attributions, target=target),
        ),
        "faithfulness_correlation": (
            "n_samples=100, 25%, zero",
            lambda forward: metrics.faithfulness_correlation(
                forward,
                x,
                attributions,
                target=target,
                generator=torch.Generator().manual_seed(0),
            ),
        ),
        "path_monotonicity": (
            "n_steps=15, blur",
            lambda forward: metrics.path_monotonicity(
                forward, x, "blur", target=target
            ),
        ),
        "activation_deviation": (
            f"{layer_label(layers)}, x vs blur(x)",
            lambda forward: metrics.activation_deviation(model, layers, x, perturbed),
        ),
        "insertion_activation_deviation": (
            f"{layer_label(layers)}, n_steps=20",
            lambda forward: metrics.insertion_activation_deviation(
                model, layers, x, attributions, n_steps=20
            ),
        ),
    }


def layer_label(layers: Any) -> str:
    return "all Conv2d" if layers == "conv" else f"{len(layers)} blocks"


def metrics_rows(bench: Bench, args: argparse.Namespace) -> list[dict]:
    with torch.no_grad():
        n_classes = bench.forward(bench.inputs[:1]).shape[1]
    recorder = RowRecorder(bench.model, n_classes)
    rows = []
    for name, (settings, run) in metric_calls(bench).items():
        if name not in args.metrics:
            continue
        forwarded = recorder.record(lambda run=run: run(recorder.forward))

        def call(run: Callable = run) -> Any:
            return run(bench.forward)

        def floor(chunk: int, forwarded: Tensor = forwarded) -> None:
            with torch.no_grad():
                for start in range(0, forwarded.shape[0], chunk):
                    bench.forward(forwarded[start : start + chunk])

        fns = {"metric": call}
        for chunk in args.floor_chunks:
            fns[f"floor{chunk}"] = lambda c=chunk: floor(c)
        t = timed(fns, args)
        best = min(args.floor_chunks, key=lambda c: t.median(f"floor{c}"))
        rows.append(
            row(
                bench,
                name,
                settings,
                t,
                "metric",
                floor=t.ratio("metric", f"floor{best}"),
                note=f"{forwarded.shape[0]} images forwarded; floor at chunk {best}",
            )
        )
    return rows


# ------------------------------------------------------------------- memory


#: The largest chunk of each sweep; the step counts are chosen so that every batch
#: size fills it (more steps would only repeat the same chunks).
UNI_CHUNKS, METRIC_CHUNKS = (8, 16), (8, 32)


def memory_sweeps(models: list[str]) -> list[tuple]:
    """``(sweep, model, batch size, chunk)`` configurations of the memory part.

    Each sweep holds the chunk and grows the batch 4x (memory must not follow),
    then grows the chunk at the larger batch or the smaller one (memory follows)."""
    configs = []
    if "resnet50" in models:
        # the last: a chunk below the batch size
        configs += [
            ("uni internal_batch_size", "resnet50", n, c)
            for n, c in ((2, 8), (8, 8), (2, 16), (8, 2))
        ]
        configs += [
            ("uni unlearning_batch_size", "resnet50", n, c)
            for n, c in ((2, 1), (8, 1), (2, 2), (4, 4))
        ]
        for metric in (
            "insertion_auc",
            "path_monotonicity",
            "insertion_activation_deviation",
        ):
            configs += [
                (f"{metric} max_examples_per_batch", "resnet50", n, c)
                for n, c in ((2, 8), (8, 8), (8, 32))
            ]
        configs += [
            ("activation_deviation max_examples_per_batch", "resnet50", n, c)
            for n, c in ((4, 2), (16, 2), (16, 8))
        ]
    if "vgg16" in models:
        configs += [("uni unlearning_batch_size", "vgg16", 2, c) for c in (1, 2)]
    if "bert" in models:
        configs += [("layer_uni internal_batch_size", "bert", n, 8) for n in (2, 8)]
    return configs


def _steps_to_fill(chunks: tuple[int, ...], n: int) -> int:
    return max(2, -(-max(chunks) // n))


def memory_child(sweep: str, model: str, n: int, chunk: int, seq_len: int) -> dict:
    from captum_faithful import (
        LayerUnlearnedIntegratedGradients,
        UnlearnedIntegratedGradients,
        metrics,
    )

    bench = Bench(model, n, seq_len)
    x, target = bench.inputs, bench.target
    uni_steps = _steps_to_fill(UNI_CHUNKS, n)
    metric_steps = _steps_to_fill(METRIC_CHUNKS, n)
    if sweep == "uni internal_batch_size":
        # one PGD step: the baseline matching's memory does not depend on T
        uni = UnlearnedIntegratedGradients(
            bench.forward, model=bench.model, pgd_steps=1, unlearning_batch_size=1
        )

        def call() -> Any:
            return uni.attribute(
                x, target=target, n_steps=uni_steps, internal_batch_size=chunk
            )

    elif sweep == "uni unlearning_batch_size":
        # pgd_steps=0: the learned baseline is x itself, only the unlearning runs
        uni = UnlearnedIntegratedGradients(
            bench.forward,
            model=bench.model,
            pgd_steps=0,
            unlearning_batch_size=chunk,
        )

        def call() -> Any:
            return uni.compute_baselines(x, target=target)

    elif sweep == "layer_uni internal_batch_size":
        uni = LayerUnlearnedIntegratedGradients(
            bench.forward,
            bench.model.bert.embeddings,
            model=bench.model,
            pgd_steps=1,
            unlearning_batch_size=1,
        )

        def call() -> Any:
            return uni.attribute(
                x,
                target=target,
                additional_forward_args=(bench.mask,),
                n_steps=uni_steps,
                internal_batch_size=chunk,
            )

    else:
        metric = sweep.split()[0]
        attributions = torch.rand(n, 1, 224, 224)
        calls = {
            "insertion_auc": lambda: metrics.insertion_auc(
                bench.forward,
                x,
                attributions,
                target=target,
                n_steps=metric_steps,
                max_examples_per_batch=chunk,
            ),
            "path_monotonicity": lambda: metrics.path_monotonicity(
                bench.forward,
                x,
                0.0,
                target=target,
                n_steps=metric_steps,
                max_examples_per_batch=chunk,
            ),
            "activation_deviation": lambda: metrics.activation_deviation(
                bench.model, "conv", x, x.flip(0), max_examples_per_batch=chunk
            ),
            "insertion_activation_deviation": lambda: (
                metrics.insertion_activation_deviation(
                    bench.model,
                    "conv",
                    x,
                    attributions,
                    n_steps=metric_steps,
                    max_examples_per_batch=chunk,
                )
            ),
        }
        call = calls[metric]
    return {
        "sweep": sweep,
        "model": model,
        "batch": n,
        "chunk": chunk,
        "peak_mb": harness.peak_memory_mb(call),
    }


# ---------------------------------------------------------------- the parent


def _child(argv: list[str]) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_scale", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise RuntimeError(f"child {argv} failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def chunk_table(rows: list[dict]) -> str:
    """One line per (sweep, model, batch), one column per chunk size."""
    chunks = sorted({r["chunk"] for r in rows})
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["sweep"], r["model"], r["batch"]), {})[r["chunk"]] = r
    lines = [
        {
            "sweep": sweep,
            "model": model,
            "batch": n,
            **{
                str(c): f"{by_chunk[c]['peak_mb']:.0f}" if c in by_chunk else ""
                for c in chunks
            },
        }
        for (sweep, model, n), by_chunk in groups.items()
    ]
    return harness.markdown_table(lines, ["sweep", "model", "batch", *map(str, chunks)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default=",".join(MODELS),
        help=f"comma-separated subset of {','.join(MODELS)}",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)}",
    )
    parser.add_argument("--batch", type=int, default=2)
    harness.add_arguments(parser, rounds=1)
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="no warm-up call (halves the run; the first call's one-off costs are "
        "then timed, and peaks are read in the timed call)",
    )
    parser.add_argument(
        "--ibs",
        type=int,
        default=16,
        help="internal_batch_size of UNI, LayerUNI and Captum IG",
    )
    parser.add_argument("--fei-iters", type=int, default=3)
    parser.add_argument(
        "--methods",
        default=",".join(METHOD_GROUPS),
        help="comma-separated subset of the methods part's cells: uni (UNI, Captum "
        "IG and their floors), fei, transmm (TransMM and FeatureGatedTransMM, ViTs), "
        "patching (exact activation patching on the language models, one forward "
        "per site and token); without uni the memory part skips UNI's sweeps",
    )
    parser.add_argument(
        "--metrics",
        default=",".join(METRICS),
        help="comma-separated subset of the metrics part's rows (and of the memory "
        f"part's metric sweeps): {','.join(METRICS)}",
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--patch-chunk",
        type=int,
        default=32,
        help="rows per forward of exact activation patching (language models)",
    )
    parser.add_argument("--floor-chunks", default="16,64")
    parser.add_argument("--json", help="also write every row to this file")
    parser.add_argument(
        "--child", nargs=2, metavar=("MODEL", "PART"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--memory-child",
        nargs=4,
        metavar=("SWEEP", "MODEL", "N", "CHUNK"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    args.floor_chunks = [int(c) for c in args.floor_chunks.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHOD_GROUPS for m in args.methods):
        parser.error(f"--methods must be a subset of {','.join(METHOD_GROUPS)}")
    args.metrics = [m for m in args.metrics.split(",") if m]
    if any(m not in METRICS for m in args.metrics):
        parser.error(f"--metrics must be a subset of {','.join(METRICS)}")
    machine = harness.configure()
    warnings.filterwarnings("ignore")
    if args.child:
        bench = Bench(args.child[0], args.batch, args.seq_len)
        rows = {"methods": methods_rows, "metrics": metrics_rows}[args.child[1]](
            bench, args
        )
        print(json.dumps(rows))
        return
    if args.memory_child:
        sweep, model, n, chunk = args.memory_child
        print(json.dumps(memory_child(sweep, model, int(n), int(chunk), args.seq_len)))
        return

    models = [m for m in args.only.split(",") if m]
    parts = [p for p in args.parts.split(",") if p]
    unknown = [m for m in models if m not in MODELS] + [
        p for p in parts if p not in PARTS
    ]
    if unknown:
        parser.error(f"unknown model or part: {unknown}")
    print(machine)
    print(
        f"batch {args.batch}, {args.rounds} round(s)"
        f"{' after a warm-up' if args.warmup else ', no warm-up'}, "
        f"internal_batch_size {args.ibs}, FEI {args.fei_iters} iterations"
    )
    common = [
        "--batch",
        str(args.batch),
        "--rounds",
        str(args.rounds),
        *([] if args.warmup else ["--no-warmup"]),
        "--ibs",
        str(args.ibs),
        "--fei-iters",
        str(args.fei_iters),
        "--seq-len",
        str(args.seq_len),
        "--patch-chunk",
        str(args.patch_chunk),
        "--floor-chunks",
        ",".join(map(str, args.floor_chunks)),
        "--methods",
        ",".join(args.methods),
        "--metrics",
        ",".join(args.metrics),
    ]
    keys = [
        "model",
        "method",
        "settings",
        "s_per_image",
        "range",
        "x_captum_ig50",
        "x_floor",
        "peak_mb",
        "note",
    ]
    everything: list[dict] = []
    for part in ("methods", "metrics"):
        if part not in parts:
            continue
        rows = []
        for model in models:
            if part == "metrics" and model in ("bert", *LM_MODELS):
                continue
            rows += _child(["--child", model, part, *common])
            print(f"  ({part}: {model} done)", file=sys.stderr, flush=True)
        print(f"\n## {part}\n")
        print(harness.markdown_table(rows, keys))
        everything += rows
    if "memory" in parts:
        rows = []
        sweeps = [
            config
            for config in memory_sweeps(models)
            if config[0].split()[0] in (*args.metrics, "layer_uni")
            or (config[0].startswith("uni ") and "uni" in args.methods)
        ]
        for sweep, model, n, chunk in sweeps:
            rows.append(
                _child(["--memory-child", sweep, model, str(n), str(chunk), *common])
            )
            print(
                f"  (memory: {sweep} {model} N={n} chunk={chunk}: "
                f"{rows[-1]['peak_mb']:.0f} MB)",
                file=sys.stderr,
                flush=True,
            )
        print("\n## peak MB against the chunking argument (columns)\n")
        print(chunk_table(rows))
        everything += rows
    print(f"\n({harness.load_note()})")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
