"""TransMM and FeatureGatedTransMM against one forward+backward of the model.

Targets: TransMM ≤ 1.5 × one forward+backward of the model; FeatureGatedTransMM
(SAEs on 3 layers) ≤ 1.3 × TransMM. Models are Hugging Face ViTs with random
weights (timing does not depend on the weights): "tiny" (ViT-Ti/16-sized: hidden 192,
12 blocks, 3 heads, 224×224) and "base" (ViT-B/16-sized: hidden 768, 12 blocks, 12
heads). The floor is the forward pass of the batch plus the backward pass of the
target logits to the input, with the model's own attention (SDPA) and, for
reference, with eager attention (which TransMM needs to see the probabilities).

Timings run all methods round-robin in one process (one warm-up each, then
``--repeats`` rounds), so that load from other processes on a shared machine hits
every method alike; the table reports the median and the minimum time and the
ratios of the medians. Peak memory is read in a separate subprocess per method (one
call on top of the built model).

    python benchmarks/bench_transmm.py                    # tiny and base, batch 16
    python benchmarks/bench_transmm.py --models tiny --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": dict(hidden_size=192, num_attention_heads=3, intermediate_size=768),
    "base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
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


def build_model(name: str):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        **MODELS[name],
        num_hidden_layers=12,
        image_size=224,
        patch_size=16,
        num_labels=1000,
    )
    return ViTForImageClassification(config).eval()


def build_saes(method: str, hidden: int) -> dict:
    import sae_lens

    expansion, arch = (
        (8, "standard") if method.endswith("standard_x8") else (64, "topk")
    )
    saes = {}
    for layer in SAE_LAYERS:
        if arch == "standard":
            cfg = sae_lens.StandardSAEConfig(d_in=hidden, d_sae=expansion * hidden)
            sae = sae_lens.StandardSAE(cfg)
            with torch.no_grad():
                # a trained SAE is sparse: shift the encoder so that ~2% of the
                # features fire, as in SAEs with an L0 of ~100 per token
                sae.b_enc.fill_(-2.0 * sae.W_enc.norm(dim=0).mean())
        else:
            cfg = sae_lens.TopKSAEConfig(d_in=hidden, d_sae=expansion * hidden, k=128)
            sae = sae_lens.TopKSAE(cfg)
        saes[layer] = sae.eval()
    return saes


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def make_runner(model, method: str, batch: int):
    """A zero-argument function that runs ``method`` once on a fixed batch."""
    sys.path.insert(0, str(ROOT))
    from captum_faithful import FeatureGatedTransMM, TransMM
    from captum_faithful.vit import eager_attention

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


def time_child(model_name: str, methods: list[str], batch: int, repeats: int) -> dict:
    """All methods round-robin in one process, so that load changes on a shared
    machine hit every method alike; one warm-up each, then ``repeats`` rounds."""
    model = build_model(model_name)
    runners = {method: make_runner(model, method, batch) for method in methods}
    for run in runners.values():
        run()
    times: dict[str, list[float]] = {method: [] for method in methods}
    for _ in range(repeats):
        for method, run in runners.items():
            start = time.perf_counter()
            run()
            times[method].append(time.perf_counter() - start)
    return times


def memory_child(model_name: str, method: str, batch: int) -> float:
    """Peak resident memory (MB) one call adds on top of the built model."""
    model = build_model(model_name)
    run = make_runner(model, method, batch)
    base = _rss_mb()
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def _child(args: list[str]) -> str:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,base")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-child", metavar="MODEL")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "METHOD"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    if args.time_child:
        times = time_child(args.time_child, methods, args.batch, args.repeats)
        print(json.dumps(times))
        return
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, args.batch)))
        return

    print(
        f"batch {args.batch}, {args.repeats} round-robin repeats after a warm-up, "
        f"torch threads {args.threads}, SAEs on blocks {SAE_LAYERS}"
    )
    print(
        "| model | method | median s | min s | / floor (sdpa) | / floor (eager) "
        "| / TransMM | / (TransMM + SAE encodes) | peak extra MB |"
    )
    print("|" + "---|" * 9)
    common = ["--batch", str(args.batch), "--threads", str(args.threads)]
    for model_name in args.models.split(","):
        times = json.loads(
            _child(
                [
                    "--time-child",
                    model_name,
                    "--methods",
                    args.methods,
                    "--repeats",
                    str(args.repeats),
                    *common,
                ]
            )
        )
        results = {}
        for method in methods:
            memory = json.loads(_child(["--memory-child", model_name, method, *common]))
            results[method] = {"times": times[method], "peak_extra_mb": memory}
            print(_row(model_name, method, results), flush=True)


def _median(results: dict, method: str) -> float | None:
    if method not in results:
        return None
    return statistics.median(results[method]["times"])


def _row(model_name: str, method: str, results: dict) -> str:
    median = _median(results, method)

    def ratio(floor: float | None) -> str:
        return "-" if floor is None else f"{median / floor:.2f}"

    with_encodes = None
    if method.startswith("fg_"):
        transmm = _median(results, "transmm")
        encodes = _median(results, method.replace("fg_", "encode_"))
        if transmm is not None and encodes is not None:
            with_encodes = transmm + encodes
    return (
        f"| {model_name} | {method} | {median:.3f} | "
        f"{min(results[method]['times']):.3f} | "
        f"{ratio(_median(results, 'floor_sdpa'))} | "
        f"{ratio(_median(results, 'floor_eager'))} | "
        f"{ratio(_median(results, 'transmm'))} | {ratio(with_encodes)} | "
        f"{results[method]['peak_extra_mb']:.0f} |"
    )


if __name__ == "__main__":
    main()
