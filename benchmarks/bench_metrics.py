"""Speed and agreement of the faithfulness metrics (not run by CI).

For a batch of 16 images on a small CNN at 3x32x32 and 3x64x64 it prints:

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

Timings are process CPU times (run with OMP_NUM_THREADS=1: then CPU time is the
work done, little affected by other processes on a shared machine), minimum over
``--repeats`` runs, the compared functions measured alternately.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_metrics.py [--repeats 5] [--sizes 32 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import small_cnn  # noqa: E402

from captum_faithful.metrics import (  # noqa: E402
    blur_baseline,
    deletion_auc,
    faithfulness_correlation,
    insertion_auc,
    mean_baseline,
    saco,
)
from captum_faithful.metrics._core.faithfulness_correlation import (  # noqa: E402
    faithfulness_correlation_for_subsets,
    random_feature_subsets,
)
from captum_faithful.metrics._utils import (  # noqa: E402
    DEFAULT_MAX_EXAMPLES_PER_BATCH,
    prepare_metric_inputs,
)

BATCH = 16
CHUNKS = (16, 32, 64, 128, 256, 1024)
N_STEPS = 100
N_GROUPS = 10
N_SAMPLES = 100
SUBSET = 0.25


def best_time(fn, repeats):
    """Minimum CPU time of the process over ``repeats`` calls (with one thread, this
    is the work done, little affected by other processes on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def paired_times(first, second, repeats):
    """Minimum times of two functions run alternately (same machine load)."""
    times = ([], [])
    for _ in range(repeats):
        times[0].append(best_time(first, 1))
        times[1].append(best_time(second, 1))
    return min(times[0]), min(times[1])


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
def sweep(model, run, n_rows, repeats):
    """Minimum time per chunk size of the floor and of the metric, measured
    alternately so that both see the same machine load.

    The floor forwards exactly the images the metric forwards (recorded from one
    run: the copies it needs plus the clean pass), already built, ``chunk`` at a
    time: the forward cost depends on the image content (e.g. large constant
    regions run faster), so random images would not be a fair floor."""
    model.rows = []
    run(None)
    rows = torch.cat(model.rows)
    model.rows = None
    assert rows.shape[0] == n_rows, (rows.shape, n_rows)

    def floor(chunk):
        for start in range(0, n_rows, chunk):
            model(rows[start : start + chunk])

    floors = {chunk: [] for chunk in CHUNKS}
    metrics = {chunk: [] for chunk in CHUNKS}
    for _ in range(repeats):
        for chunk in CHUNKS:
            floors[chunk].append(best_time(lambda c=chunk: floor(c), 1))
            metrics[chunk].append(best_time(lambda c=chunk: run(c), 1))
    floors = [min(floors[chunk]) for chunk in CHUNKS]
    metrics = [min(metrics[chunk]) for chunk in CHUNKS]
    return floors, metrics


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Recorder(small_cnn()).eval()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {BATCH}"
    )
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
        print(f"\n=== 3x{size}x{size}, batch {BATCH} ===")
        print("chunk sweep (seconds, min over repeats; floor = model calls only):")
        print(f"{'metric':<30}" + "".join(f"{c:>9}" for c in CHUNKS))
        summary = {}
        for name, (run, n_rows, _) in metrics.items():
            floors, times = sweep(model, run, n_rows, args.repeats)
            summary[name] = (
                times[CHUNKS.index(DEFAULT_MAX_EXAMPLES_PER_BATCH)],
                floors,
            )
            print(f"{name + ' floor':<30}" + "".join(f"{t:9.4f}" for t in floors))
            print(f"{name:<30}" + "".join(f"{t:9.4f}" for t in times))

        print(
            f"\nper metric at the default chunk ({DEFAULT_MAX_EXAMPLES_PER_BATCH}); "
            "floor at the fastest chunk:"
        )
        print(
            f"{'metric':<26}{'time s':>9}{'floor s':>9}{'ratio':>7}"
            f"{'ref loop s':>11}{'speed-up':>9}{'max |Δ|':>10}"
        )
        for name, (run, _, reference) in metrics.items():
            seconds, floors = summary[name]
            floor = min(floors)
            line = f"{name:<26}{seconds:9.4f}{floor:9.4f}{seconds / floor:7.2f}"
            if not args.no_reference:
                start = time.process_time()
                expected = reference()
                ref_seconds = time.process_time() - start
                delta = (run(None).double() - expected.double()).abs().max()
                line += (
                    f"{ref_seconds:11.3f}{ref_seconds / seconds:9.1f}"
                    f"{float(delta):10.2e}"
                )
            print(line)
        compare_with_quantus(model, x, attr, args.repeats)


def compare_with_quantus(model, x, attr, repeats):
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
    print(f"\nvs Quantus {quantus.__version__} (matched settings):")
    print(f"{'metric':<34}{'ours s':>9}{'quantus s':>10}{'speed-up':>9}{'max |Δ|':>10}")

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

    quantus_seconds, ours_seconds = paired_times(run_quantus_pf, run_ours_pf, repeats)
    delta = np.abs(run_ours_pf()[:, 1:].numpy() - run_quantus_pf()).max()
    print(
        f"{f'PixelFlipping ({steps} steps)':<34}{ours_seconds:9.4f}{quantus_seconds:10.4f}"
        f"{quantus_seconds / ours_seconds:9.1f}{delta:10.2e}"
    )

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

    quantus_seconds, ours_seconds = paired_times(run_quantus_fc, run_ours_fc, repeats)
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
    print(
        f"{'FaithfulnessCorrelation':<34}{ours_seconds:9.4f}{quantus_seconds:10.4f}"
        f"{quantus_seconds / ours_seconds:9.1f}{delta:10.2e}"
    )


if __name__ == "__main__":
    main()
