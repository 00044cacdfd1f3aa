"""Speed and agreement of the faithfulness metrics (not run by CI).

For a batch of 16 images on the harness's small CNN at 3x32x32 and 3x64x64 it
prints:

1. the floor — the forward passes a metric cannot avoid (its perturbed copies plus
   the clean pass), timed as model calls on ready-made tensors — at several chunk
   sizes, and the metric itself at the same chunk sizes (this is how the default
   ``max_examples_per_batch`` was chosen);
2. per metric: time at the default chunk size, the floor at the fastest chunk size,
   their ratio, the time of a straightforward per-image reference loop (one image
   and one perturbation per forward), the speed-up over it and the largest
   |difference| of the values;
3. with ``quantus`` installed: Quantus ``PixelFlipping`` and
   ``FaithfulnessCorrelation`` at matched settings (same features, zero baseline,
   same subsets), the speed-up over Quantus and the largest |difference|.

Measured with ``benchmarks/_harness.py`` (interleaved rounds, wall clock, one
thread, median seconds and within-round ratios); the reference loops are slow and
timed once, next to one call of the metric.

Usage::

    python -m benchmarks.bench_metrics [--rounds 5] [--sizes 32 64]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks import _harness as harness
from captum_faithful.metrics import (
    blur_baseline,
    deletion_auc,
    faithfulness_correlation,
    insertion_auc,
    mean_baseline,
    saco,
)
from captum_faithful.metrics._core.faithfulness_correlation import (
    faithfulness_correlation_for_subsets,
    random_feature_subsets,
)
from captum_faithful.metrics._utils import (
    DEFAULT_MAX_EXAMPLES_PER_BATCH,
    prepare_metric_inputs,
)

BATCH = 16
CHUNKS = (16, 32, 64, 128, 256, 1024)
N_STEPS = 100
N_GROUPS = 10
N_SAMPLES = 100
SUBSET = 0.25


class Recorder(torch.nn.Module):
    """The model, optionally recording (a copy of) every input batch it sees."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.rows = None

    def forward(self, x):
        if self.rows is not None:
            self.rows.append(x.clone())
        return self.model(x)


@torch.no_grad()
def sweep(model, run, n_rows, rounds):
    """The floor and the metric at every chunk size, interleaved (Timings with
    ``floor{chunk}`` and ``metric{chunk}``).

    The floor forwards exactly the images the metric forwards (recorded from one
    run: the copies it needs plus the clean pass), already built, ``chunk`` at a
    time: the forward cost depends on the image content (e.g. large constant
    regions run faster), so random images would not be a fair floor."""
    model.rows = []
    run(None)
    rows = torch.cat(model.rows)
    model.rows = None
    if rows.shape[0] != n_rows:
        raise RuntimeError(f"the metric forwarded {rows.shape[0]} rows, not {n_rows}")

    def floor(chunk):
        for start in range(0, n_rows, chunk):
            model(rows[start : start + chunk])

    calls = {}
    for chunk in CHUNKS:
        calls[f"floor{chunk}"] = lambda c=chunk: floor(c)
        calls[f"metric{chunk}"] = lambda c=chunk: run(c)
    return harness.interleave(calls, rounds)


# --- per-image reference loops: one image, one perturbation per forward ---------


def _ranking(attr_n, shape):
    scores = attr_n.double().expand(shape).sum(0).flatten()
    return torch.sort(scores, descending=True, stable=True)


def _score(model, img, cls, softmax):
    out = model(img.unsqueeze(0))
    return (torch.softmax(out, 1) if softmax else out)[0, cls]


@torch.no_grad()
def reference_curve(model, x, attr, baseline, n_steps, insertion):
    aucs = []
    for n in range(x.shape[0]):
        order = _ranking(attr[n], x.shape[1:]).indices
        n_features = order.numel()
        cls = int(model(x[n : n + 1]).argmax())
        curve = []
        for k in range(n_steps + 1):
            chosen = torch.zeros(n_features, dtype=torch.bool)
            chosen[order[: round(k * n_features / n_steps)]] = True
            chosen = chosen.view(1, *x.shape[2:])
            img = (
                torch.where(chosen, x[n], baseline[n])
                if insertion
                else torch.where(chosen, baseline[n], x[n])
            )
            curve.append(float(_score(model, img, cls, True)))
        aucs.append(np.trapezoid(curve, dx=1.0 / n_steps))
    return torch.tensor(aucs)


@torch.no_grad()
def reference_saco(model, x, attr, baseline, n_groups):
    values = []
    for n in range(x.shape[0]):
        sorted_scores, order = _ranking(attr[n], x.shape[1:])
        cls = int(model(x[n : n + 1]).argmax())
        clean = float(_score(model, x[n], cls, True))
        s, delta = [], []
        for group, group_scores in zip(
            order.tensor_split(n_groups),
            sorted_scores.tensor_split(n_groups),
            strict=True,
        ):
            removed = torch.zeros(order.numel(), dtype=torch.bool)
            removed[group] = True
            img = torch.where(removed.view(1, *x.shape[2:]), baseline[n], x[n])
            s.append(float(group_scores.sum()))
            delta.append(clean - float(_score(model, img, cls, True)))
        num = den = 0.0
        for i in range(n_groups):
            for j in range(i + 1, n_groups):
                w = s[i] - s[j] if delta[i] >= delta[j] else s[j] - s[i]
                num, den = num + w, den + abs(w)
        values.append(num / den)
    return torch.tensor(values)


@torch.no_grad()
def reference_faithfulness_correlation(model, x, attr, subsets):
    """Zero baseline, raw outputs, pixel features; ``subsets`` (N, S, F) bool."""
    values = []
    for n in range(x.shape[0]):
        scores = attr[n].double().expand(x.shape[1:]).sum(0).flatten()
        cls = int(model(x[n : n + 1]).argmax())
        clean = float(_score(model, x[n], cls, False))
        sums, drops = [], []
        for members in subsets[n]:
            img = torch.where(members.view(1, *x.shape[2:]), 0.0, x[n])
            sums.append(float(scores[members].sum()))
            drops.append(clean - float(_score(model, img, cls, False)))
        values.append(np.corrcoef(sums, drops)[0, 1])
    return torch.tensor(values)


def make_metrics(model, x, attr, subsets):
    """name -> (run at chunk size c, number of forwarded rows, reference loop)."""
    return {
        "insertion_auc": (
            lambda c: insertion_auc(
                model, x, attr, n_steps=N_STEPS, max_examples_per_batch=c
            ),
            BATCH * (N_STEPS + 1),
            lambda: reference_curve(
                model, x, attr, blur_baseline(x), N_STEPS, insertion=True
            ),
        ),
        "deletion_auc": (
            lambda c: deletion_auc(
                model, x, attr, n_steps=N_STEPS, max_examples_per_batch=c
            ),
            BATCH * (N_STEPS + 1),
            lambda: reference_curve(
                model, x, attr, torch.zeros_like(x), N_STEPS, insertion=False
            ),
        ),
        "saco": (
            lambda c: saco(model, x, attr, n_groups=N_GROUPS, max_examples_per_batch=c),
            BATCH * (N_GROUPS + 1),
            lambda: reference_saco(model, x, attr, mean_baseline(x), N_GROUPS),
        ),
        "faithfulness_correlation": (
            lambda c: faithfulness_correlation(
                model,
                x,
                attr,
                subset_size=SUBSET,
                n_samples=N_SAMPLES,
                max_examples_per_batch=c,
                generator=torch.Generator().manual_seed(0),
            ),
            BATCH * (N_SAMPLES + 1),
            lambda: reference_faithfulness_correlation(model, x, attr, subsets),
        ),
    }


def element_mask(x):
    return torch.arange(x[0].numel()).view(1, *x.shape[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, rounds=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()
    print(harness.configure())
    model = Recorder(harness.small_cnn()).eval()
    torch.manual_seed(0)
    default = DEFAULT_MAX_EXAMPLES_PER_BATCH
    for size in args.sizes:
        shape = (3, size, size)
        x = torch.rand(BATCH, *shape)
        attr = torch.randn(BATCH, 1, size, size)
        n_pixels = size * size
        # the subsets faithfulness_correlation draws from the same seed
        subsets = random_feature_subsets(
            BATCH,
            N_SAMPLES,
            n_pixels,
            round(SUBSET * n_pixels),
            torch.Generator().manual_seed(0),
        )
        metrics = make_metrics(model, x, attr, subsets)
        print(f"\n## 3x{size}x{size}, batch {BATCH}, {args.rounds} rounds\n")
        print("Chunk sweep, median seconds (floor = the model calls only):\n")
        sweep_rows, summary_rows = [], []
        for name, (run, n_rows, reference) in metrics.items():
            t = sweep(model, run, n_rows, args.rounds)
            for kind in ("floor", "metric"):
                sweep_rows.append(
                    {
                        "": f"{name} {kind}" if kind == "floor" else name,
                        **{f"{c}": t.median(f"{kind}{c}") for c in CHUNKS},
                    }
                )
            best = min(CHUNKS, key=lambda c: t.median(f"floor{c}"))
            row = {
                "metric": name,
                f"s at chunk {default}": harness.seconds_cell(t, f"metric{default}"),
                "floor s": harness.seconds_cell(t, f"floor{best}"),
                "/ floor": harness.ratio_cell(t, f"metric{default}", f"floor{best}"),
                "floor chunk": best,
            }
            if not args.no_reference:
                expected = {}
                ref = harness.interleave(
                    {
                        "reference": lambda r=reference, e=expected: e.update(v=r()),
                        "metric": lambda r=run: r(None),
                    },
                    rounds=1,
                    warmup=False,
                )
                delta = (run(None).double() - expected["v"].double()).abs().max()
                row["reference loop s"] = ref.median("reference")
                row["speed-up"] = ref.ratio("reference", "metric")
                row["max |Δ|"] = f"{float(delta):.2e}"
            summary_rows.append(row)
        print(harness.markdown_table(sweep_rows))
        print(
            f"\nPer metric at the default chunk ({default}); floor at the fastest "
            "chunk; speed-up over the per-image reference loop:\n"
        )
        print(harness.markdown_table(summary_rows))
        compare_with_quantus(model, x, attr, args.rounds)
    print(f"\n({harness.load_note()})")


def compare_with_quantus(model, x, attr, rounds):
    try:
        import quantus
    except ImportError:
        print("\n(quantus not installed: no Quantus comparison)")
        return
    y = model(x).argmax(1)
    # Quantus works on input elements (it broadcasts the attribution to the input
    # and flattens it), so the matched settings use element features and a
    # per-element attribution (no ties, whose order Quantus leaves to numpy).
    attr = torch.randn_like(x)
    mask = element_mask(x)
    x_np, y_np, a_np = x.numpy(), y.numpy(), attr.numpy()
    print(f"\nAgainst Quantus {quantus.__version__} (matched settings):\n")

    # PixelFlipping = our deletion curve without its first (clean) point, with
    # features_in_step elements removed per step.
    steps = 96
    n_elements = x[0].numel()
    pixels_per_step = n_elements // steps
    pixel_flipping = quantus.PixelFlipping(
        features_in_step=pixels_per_step,
        perturb_baseline=0.0,
        normalise=False,
        abs=False,
        disable_warnings=True,
    )

    def run_quantus_pf():
        return np.asarray(
            pixel_flipping(
                model=model,
                x_batch=x_np,
                y_batch=y_np,
                a_batch=a_np,
                softmax=True,
                device="cpu",
                channel_first=True,
            )
        )

    def run_ours_pf():
        return deletion_auc(
            model,
            x,
            attr,
            target=y,
            baselines="zero",
            feature_mask=mask,
            n_steps=steps,
            return_curves=True,
        )[1]

    t = harness.interleave({"quantus": run_quantus_pf, "ours": run_ours_pf}, rounds)
    delta = np.abs(run_ours_pf()[:, 1:].numpy() - run_quantus_pf()).max()
    rows = [quantus_row(f"PixelFlipping ({steps} steps)", t, delta)]

    # FaithfulnessCorrelation: Quantus's features are input elements; replay its
    # random subsets (same numpy seed, same draw order) for the value comparison.
    subset_size = round(SUBSET * n_elements)
    correlation = quantus.FaithfulnessCorrelation(
        nr_runs=N_SAMPLES,
        subset_size=subset_size,
        perturb_baseline=0.0,
        normalise=False,
        abs=False,
        return_aggregate=False,
        disable_warnings=True,
    )

    def run_quantus_fc():
        np.random.seed(0)
        return np.asarray(
            correlation(
                model=model,
                x_batch=x_np,
                y_batch=y_np,
                a_batch=a_np,
                softmax=False,
                device="cpu",
                channel_first=True,
            )
        )

    def run_ours_fc():
        return faithfulness_correlation(
            model,
            x,
            attr,
            target=y,
            baselines="zero",
            feature_mask=mask,
            subset_size=subset_size,
            n_samples=N_SAMPLES,
            generator=torch.Generator().manual_seed(0),
        )

    t = harness.interleave({"quantus": run_quantus_fc, "ours": run_ours_fc}, rounds)
    np.random.seed(0)
    replay = np.zeros((BATCH, N_SAMPLES, n_elements), dtype=bool)
    for run in range(N_SAMPLES):
        for n in range(BATCH):
            replay[n, run, np.random.choice(n_elements, subset_size, replace=False)] = (
                True
            )
    ours = faithfulness_correlation_for_subsets(
        model,
        prepare_metric_inputs(x, attr, "zero", mask, y, None),
        torch.from_numpy(replay),
        "pearson",
        False,
    )
    delta = np.abs(ours.numpy() - run_quantus_fc()).max()
    rows.append(quantus_row("FaithfulnessCorrelation", t, delta))
    print(harness.markdown_table(rows))


def quantus_row(name, t, delta):
    return {
        "metric": name,
        "ours s": harness.seconds_cell(t, "ours"),
        "quantus s": harness.seconds_cell(t, "quantus"),
        "speed-up (quantus / ours)": harness.ratio_cell(t, "quantus", "ours"),
        "max |Δ|": f"{delta:.2e}",
    }


if __name__ == "__main__":
    main()
