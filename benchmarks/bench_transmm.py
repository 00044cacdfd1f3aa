"""TransMM and FeatureGatedTransMM against one forward+backward of the model.

Targets: TransMM ≤ 1.5 × one forward+backward of the model; FeatureGatedTransMM
(SAEs on 3 layers) ≤ 1.3 × TransMM. Models are Hugging Face ViTs with random
weights (timing does not depend on the weights): "tiny" (ViT-Ti/16-sized: hidden 192,
12 blocks, 3 heads, 224×224) and "base" (ViT-B/16-sized: hidden 768, 12 blocks, 12
heads). The floor is the forward pass of the batch plus the backward pass of the
target logits to the input, with the model's own attention (SDPA) and, for
reference, with eager attention (which TransMM needs to see the probabilities).

Measured with ``benchmarks/_harness.py``: all methods of one model interleaved in one
process (a warm-up round, then ``--rounds`` rounds), median seconds and within-round
ratios, peak memory of each method read in its warm-up call.

    python -m benchmarks.bench_transmm                    # tiny and base, batch 16
    python -m benchmarks.bench_transmm --models tiny --rounds 5
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import _harness as harness
from captum_faithful import FeatureGatedTransMM, TransMM
from captum_faithful.vit import eager_attention

SAE_LAYERS = (3, 6, 9)
METHODS = (
    "floor_sdpa",
    "floor_eager",
    "transmm",
    "encode_standard_x8",
    "fg_standard_x8",
    "encode_topk128_x64",
    "fg_topk128_x64",
)


def build_saes(method: str, hidden: int) -> dict:
    if method.endswith("standard_x8"):
        return harness.sparse_saes(hidden, SAE_LAYERS, 8, "standard")
    return harness.sparse_saes(hidden, SAE_LAYERS, 64, "topk", k=128)


def make_runner(model, method: str, batch: int):
    """A zero-argument function that runs ``method`` once on a fixed batch."""
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    target = torch.arange(batch) % 1000
    hidden = model.config.hidden_size

    if method.startswith("floor"):

        def run():
            inputs = x.detach().requires_grad_(True)
            if method == "floor_eager":
                with eager_attention(model):
                    logits = model(inputs).logits
            else:
                logits = model(inputs).logits
            y = logits.gather(1, target.view(-1, 1)).sum()
            torch.autograd.grad(y, inputs)

    elif method.startswith("encode"):
        # the SAE work FeatureGatedTransMM cannot avoid: encoding the patch tokens
        saes = build_saes(method, hidden)
        residual = torch.randn(batch, 196, hidden)

        def run():
            with torch.no_grad():
                for sae in saes.values():
                    sae.encode(residual)

    else:
        if method == "transmm":
            explainer = TransMM(model)
        else:
            explainer = FeatureGatedTransMM(model, build_saes(method, hidden))

        def run():
            explainer.attribute(x, target=target)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,base")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=16)
    harness.add_arguments(parser, rounds=3)
    args = parser.parse_args()
    print(harness.configure())
    methods = args.methods.split(",")
    print(
        f"batch {args.batch}, {args.rounds} interleaved rounds after a warm-up, "
        f"SAEs on blocks {SAE_LAYERS}\n"
    )
    print(
        "| model | method | seconds | / floor (sdpa) | / floor (eager) "
        "| / TransMM | / (TransMM + SAE encodes) | peak MB |"
    )
    print("|" + "---|" * 8)
    for model_name in args.models.split(","):
        model = harness.hf_vit(model_name)
        runners = {method: make_runner(model, method, args.batch) for method in methods}
        t = harness.interleave(runners, args.rounds, peaks=True)
        for method in methods:
            with_encodes = "–"
            encodes = method.replace("fg_", "encode_")
            if method.startswith("fg_") and "transmm" in t and encodes in t:
                t.derive(f"transmm+{encodes}", {"transmm": 1, encodes: 1})
                with_encodes = harness.ratio_cell(t, method, f"transmm+{encodes}")
            print(
                f"| {model_name} | {method} | {harness.seconds_cell(t, method)} | "
                f"{harness.ratio_cell(t, method, 'floor_sdpa')} | "
                f"{harness.ratio_cell(t, method, 'floor_eager')} | "
                f"{harness.ratio_cell(t, method, 'transmm')} | {with_encodes} | "
                f"{harness.peak_cell(t, method)} |",
                flush=True,
            )
    print(f"\n({harness.load_note()})")


if __name__ == "__main__":
    main()
