import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import eval_fixtures as fx
import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from helpers import ModelSnapshot
from torch.utils.data import DataLoader, TensorDataset

import captum_faithful
from captum_faithful import Results, evaluate
from captum_faithful.evaluation import _storage


def _deterministic_metrics():
    return {"drop": fx.top_feature_drop, "mass": fx.attribution_mass}


def test_evaluate_is_exported_from_the_package_root():
    assert captum_faithful.evaluate is evaluate
    assert (
        "evaluate" in captum_faithful.__all__ and "Results" in captum_faithful.__all__
    )


def test_importing_the_package_does_not_import_pandas_or_pyarrow():
    code = (
        "import sys, captum_faithful; "
        "print(sorted(m for m in ('pandas', 'pyarrow', 'yaml') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_equals_a_hand_written_loop(tmp_path):
    model = fx.model()
    snapshot = ModelSnapshot.take(model)
    explainers = {"saliency": Saliency(model), "ig": IntegratedGradients(model)}
    metrics = {
        **_deterministic_metrics(),
        "drop_half": functools.partial(fx.top_feature_drop, fraction=0.5),
    }
    rng_before = torch.get_rng_state()
    results = evaluate(
        model, fx.loader(), explainers, metrics, out=tmp_path, show_progress=False
    )
    assert torch.equal(torch.get_rng_state(), rng_before)
    snapshot.assert_same(model)

    expected = {}
    inputs_all, _ = fx.dataset().tensors
    for start in range(0, fx.N_SAMPLES, fx.BATCH_SIZE):
        inputs = inputs_all[start : start + fx.BATCH_SIZE]
        with torch.no_grad():
            target = model(inputs).argmax(dim=1)
        for method, explainer in explainers.items():
            attributions = explainer.attribute(inputs, target=target)
            for metric, fn in metrics.items():
                values = fn(model, inputs, attributions, target=target)
                for offset, value in enumerate(values.tolist()):
                    expected[start + offset, method, metric] = value
    table = results.table
    assert len(table) == fx.N_SAMPLES * len(explainers) * len(metrics) == len(expected)
    got = {(int(r.index), r.method, r.metric): r.value for r in table.itertuples()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert list(table.columns) == ["index", "method", "metric", "value", "seconds"]
    assert table["index"].tolist() == sorted(table["index"].tolist())
    assert (table["seconds"] > 0).all()
    # seconds is shared by every metric of a (sample, method) pair
    assert (table.groupby(["index", "method"])["seconds"].nunique() == 1).all()


def test_files_settings_and_reload(tmp_path):
    model = fx.model()
    results = evaluate(
        model,
        fx.loader(),
        {"saliency": Saliency(model)},
        _deterministic_metrics(),
        out=tmp_path,
        show_progress=False,
    )
    batch_files = sorted(p.name for p in (tmp_path / "batches").iterdir())
    assert batch_files == [f"batch-{b:08d}.parquet" for b in range(5)]
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["settings"]["batch_size"] == fx.BATCH_SIZE
    assert settings["settings"]["dataset"]["length"] == fx.N_SAMPLES
    assert settings["settings"]["methods"] == ["saliency"]
    assert (tmp_path / "results.parquet").exists()
    reloaded = Results.load(tmp_path)
    assert fx.rows(reloaded) == fx.rows(results)
    assert reloaded.table["seconds"].tolist() == results.table["seconds"].tolist()


def test_csv_without_pyarrow_round_trips_exactly(tmp_path, monkeypatch):
    model = fx.model()
    args = (model, fx.loader(), {"saliency": Saliency(model)}, fx.metrics())
    parquet = evaluate(*args, out=tmp_path / "p", show_progress=False)
    monkeypatch.setattr(_storage, "default_format", lambda: "csv")
    csv = evaluate(*args, out=tmp_path / "c", show_progress=False)
    assert (tmp_path / "c" / "results.csv").exists()
    assert (tmp_path / "c" / "batches" / "batch-00000004.csv").exists()
    assert fx.rows(csv) == fx.rows(parquet)
    table = {
        "index": [0, 1],
        "method": ["a", "b,c"],
        "metric": ["m", "m"],
        "value": [math.nan, 0.1 + 0.2],
        "seconds": [1e-7, 2.5],
    }
    for run in (None, "0f" * 32):
        path = tmp_path / "t.csv"
        path.write_bytes(_storage.encode(table, "csv", run))
        back, carried = _storage.decode(path)
        assert carried == run
        assert math.isnan(back["value"][0]) and back["value"][1] == 0.1 + 0.2
        assert back["method"].tolist() == ["a", "b,c"]
        assert back["seconds"].tolist() == [1e-7, 2.5]


@pytest.mark.parametrize("how", ["raise", "interrupt"])
def test_resume_after_an_exception_gives_the_uninterrupted_rows(tmp_path, how):
    reference = fx.uninterrupted_run(tmp_path / "reference")
    out = tmp_path / "run"
    model = fx.model()
    error = RuntimeError if how == "raise" else KeyboardInterrupt
    with pytest.raises(error, match="injected"):
        evaluate(
            model,
            fx.loader(),
            fx.run_explainers(model, fail_after=2, how=how),
            fx.metrics(),
            out=out,
            show_progress=False,
        )
    assert _storage.RunStorage(out).recorded_batches() == [0, 1]
    assert not (out / "results.parquet").exists()
    partial = Results.load(out)
    assert sorted(set(partial.table["index"])) == list(range(8))

    log = []
    resumed = evaluate(
        model,
        fx.loader(),
        fx.run_explainers(model, log=log),
        fx.metrics(),
        out=out,
        show_progress=False,
    )
    # only the three batches not yet recorded were explained again
    assert fx.sample_positions([v for call in log for v in call]) == list(range(8, 18))
    assert fx.rows(resumed) == fx.rows(reference)
    # a second resume has nothing to do and changes nothing
    log.clear()
    again = evaluate(
        model,
        fx.loader(),
        fx.run_explainers(model, log=log),
        fx.metrics(),
        out=out,
        show_progress=False,
    )
    assert log == [] and fx.rows(again) == fx.rows(reference)


def test_resume_false_starts_over(tmp_path):
    model = fx.model()
    args = (model, fx.loader(), {"saliency": Saliency(model)})
    evaluate(*args, {"mass": fx.attribution_mass}, out=tmp_path, show_progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    results = evaluate(
        *args,
        {"drop": fx.top_feature_drop},
        out=tmp_path,
        resume=False,
        show_progress=False,
    )
    assert set(results.table["metric"]) == {"drop"}
    assert len(results.table) == fx.N_SAMPLES
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_torn_temporary_file_is_not_trusted(tmp_path):
    reference = fx.uninterrupted_run(tmp_path / "reference")
    out = tmp_path / "run"
    model = fx.model()
    with pytest.raises(RuntimeError, match="injected failure"):
        evaluate(
            model,
            fx.loader(),
            fx.run_explainers(model, fail_after=1),
            fx.metrics(),
            out=out,
            show_progress=False,
        )
    complete = (out / "batches" / "batch-00000000.parquet").read_bytes()
    torn = out / "batches" / ".batch-00000001.parquet.tmp-12345"
    torn.write_bytes(complete[: len(complete) // 2])
    resumed = evaluate(
        model,
        fx.loader(),
        fx.run_explainers(model),
        fx.metrics(),
        out=out,
        show_progress=False,
    )
    assert not torn.exists()
    assert fx.rows(resumed) == fx.rows(reference)


def test_target_label_uses_the_dataset_labels(tmp_path):
    model = fx.model()
    labels = fx.dataset().tensors[1]
    seen = []

    def explainer(inputs, target):
        seen.extend(target.tolist())
        return inputs * 1.0

    evaluate(
        model,
        fx.loader(),
        {"identity": explainer},
        {"mass": fx.attribution_mass},
        out=tmp_path,
        target="label",
        show_progress=False,
    )
    assert seen == labels.tolist()


def test_mapping_batches_and_tuple_inputs(tmp_path):
    class TwoInputs(torch.nn.Module):
        def forward(self, a, b):
            return torch.stack([a.sum(1), b.sum(1), (a * b).sum(1)], dim=1)

    model = TwoInputs()
    a, b = torch.randn(6, 4), torch.randn(6, 4)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"inputs": (a[i], b[i]), "labels": i % 3}

    def mass(forward_func, inputs, attributions, target=None):
        return sum(x.abs().sum(1) for x in attributions)

    results = evaluate(
        model,
        DataLoader(Pairs(), batch_size=4),
        {"saliency": Saliency(model)},
        {"mass": mass},
        out=tmp_path,
        target="label",
        show_progress=False,
    )
    expected = mass(
        model, (a, b), Saliency(model).attribute((a, b), target=torch.arange(6) % 3)
    )
    assert results.table["value"].tolist() == pytest.approx(expected.tolist())


def test_bad_explainers_and_metrics_are_refused(tmp_path):
    model = fx.model()
    with pytest.raises(TypeError, match=r"explainers\['x'\]"):
        evaluate(model, fx.loader(), {"x": 3}, fx.metrics(), out=tmp_path)
    with pytest.raises(TypeError, match=r"metrics\['insertion'\]"):
        evaluate(
            model,
            fx.loader(),
            {"s": Saliency(model)},
            {"insertion": "auc"},
            out=tmp_path,
        )
    with pytest.raises(ValueError, match="`explainers` must not be empty"):
        evaluate(model, fx.loader(), {}, fx.metrics(), out=tmp_path)
    with pytest.raises(TypeError, match="`metrics` must be a dict"):
        evaluate(
            model,
            fx.loader(),
            {"s": Saliency(model)},
            [fx.attribution_mass],
            out=tmp_path,
        )
    with pytest.raises(ValueError, match="`target`"):
        evaluate(
            model,
            fx.loader(),
            {"s": Saliency(model)},
            fx.metrics(),
            out=tmp_path,
            target="true",
        )
    assert not (tmp_path / "settings.json").exists()


def test_bad_dataloaders_are_refused(tmp_path):
    model = fx.model()
    args = ({"s": Saliency(model)}, fx.metrics())
    with pytest.raises(ValueError, match="in order"):
        evaluate(
            model,
            DataLoader(fx.dataset(), batch_size=4, shuffle=True),
            *args,
            out=tmp_path,
        )
    with pytest.raises(ValueError, match="drop_last"):
        evaluate(
            model,
            DataLoader(fx.dataset(), batch_size=4, drop_last=True),
            *args,
            out=tmp_path,
        )
    with pytest.raises(TypeError, match="DataLoader"):
        evaluate(model, [fx.dataset()[0]], *args, out=tmp_path)


def test_label_target_without_labels_is_refused(tmp_path):
    model = fx.model()
    images_only = DataLoader(TensorDataset(fx.dataset().tensors[0]), batch_size=4)
    with pytest.raises(ValueError, match='target="label" needs labels'):
        evaluate(
            model,
            images_only,
            {"s": Saliency(model)},
            fx.metrics(),
            out=tmp_path,
            target="label",
            show_progress=False,
        )


def test_metric_with_the_wrong_shape_is_refused(tmp_path):
    model = fx.model()
    with pytest.raises(
        ValueError, match="metric 'total' must return one value per sample"
    ):
        evaluate(
            model,
            fx.loader(),
            {"s": Saliency(model)},
            {"total": lambda f, x, a, target=None: a.sum()},
            out=tmp_path,
            show_progress=False,
        )


@pytest.mark.parametrize(
    "change, named",
    [
        ("metric", r"metrics\['noisy'\] removed"),
        ("batch_size", "batch_size 4 -> 6"),
        ("target", "target 'predicted' -> 'label'"),
        ("weights", "model changed"),
        ("partial", r"metrics\['drop'\] changed"),
        ("seed", "seed 0 -> 1"),
    ],
)
def test_other_settings_in_the_same_out_are_refused(tmp_path, change, named):
    model = fx.model()
    log = []
    evaluate(
        model,
        fx.loader(),
        fx.run_explainers(model),
        fx.metrics(),
        out=tmp_path,
        show_progress=False,
    )
    metrics, loader, target, seed = fx.metrics(), fx.loader(), "predicted", 0
    if change == "metric":
        del metrics["noisy"]
    elif change == "batch_size":
        loader = fx.loader(batch_size=6)
    elif change == "target":
        target = "label"
    elif change == "weights":
        model = fx.model()
        with torch.no_grad():
            model[0].bias.add_(1.0)
    elif change == "partial":
        metrics["drop"] = functools.partial(fx.top_feature_drop, fraction=0.5)
    elif change == "seed":
        seed = 1
    with pytest.raises(ValueError, match="holds a run with other settings") as err:
        evaluate(
            model,
            loader,
            fx.run_explainers(model, log=log),
            metrics,
            out=tmp_path,
            target=target,
            show_progress=False,
            seed=seed,
        )
    assert re.search(named, str(err.value)), str(err.value)
    assert log == []  # refused before any work


def test_uni_and_the_package_metrics_equal_a_hand_written_loop(tmp_path):
    from captum_faithful import UnlearnedIntegratedGradients
    from captum_faithful.metrics import deletion_auc, insertion_auc, saco

    model = fx.model()
    explainers = {"uni": UnlearnedIntegratedGradients(model, pgd_steps=3)}
    metrics = {
        "insertion": functools.partial(insertion_auc, n_steps=8),
        "deletion": functools.partial(deletion_auc, n_steps=8),
        "saco": functools.partial(saco, n_groups=4),
    }
    results = evaluate(
        model, fx.loader(n=10), explainers, metrics, out=tmp_path, show_progress=False
    )
    inputs_all, _ = fx.dataset(10).tensors
    expected = []
    for start in range(0, 10, fx.BATCH_SIZE):
        inputs = inputs_all[start : start + fx.BATCH_SIZE]
        with torch.no_grad():
            target = model(inputs).argmax(dim=1)
        attributions = explainers["uni"].attribute(inputs, target=target)
        values = {
            k: m(model, inputs, attributions, target=target) for k, m in metrics.items()
        }
        for offset in range(len(inputs)):
            for name in metrics:
                expected.append(
                    (start + offset, "uni", name, float(values[name][offset]))
                )
    got = fx.rows(results)
    assert [row[:3] for row in got] == [row[:3] for row in expected]
    assert [row[3] for row in got] == pytest.approx(
        [row[3] for row in expected], rel=1e-6, abs=1e-9, nan_ok=True
    )


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 3)])
def test_a_cuda_device_without_a_gpu_is_refused_before_any_work(
    tmp_path, monkeypatch, device
):
    """As the command line's --device does: a ValueError naming `device`, before
    `out` is created or the model is called."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    model = fx.model()
    log = []
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"`device`.*cuda.*CUDA is not available"):
        evaluate(
            model,
            fx.loader(),
            fx.run_explainers(model, log=log),
            fx.metrics(),
            out=out,
            device=device,
            show_progress=False,
        )
    assert log == [] and not out.exists()


def test_a_cuda_index_beyond_the_gpus_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    model = fx.model()
    with pytest.raises(ValueError, match=r"`device`.*'cuda:2'.*2 CUDA devices"):
        evaluate(
            model,
            fx.loader(),
            fx.run_explainers(model),
            fx.metrics(),
            out=tmp_path / "run",
            device="cuda:2",
            show_progress=False,
        )
    assert not (tmp_path / "run").exists()
