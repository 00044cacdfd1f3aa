"""The batch files of a run are trusted only when they hold their batch's rows."""

import os
import shutil

import eval_fixtures as fx
import pytest
from captum.attr import Saliency

from captum_faithful import Results, evaluate
from captum_faithful.evaluation import _storage


def _run(out, explainers=None):
    model = fx.model()
    return evaluate(
        model,
        fx.loader(),
        explainers or {"saliency": Saliency(model)},
        {"mass": fx.attribution_mass, "drop": fx.top_feature_drop},
        out=out,
        show_progress=False,
    )


@pytest.fixture(params=["parquet", "csv"])
def file_format(request, monkeypatch):
    monkeypatch.setattr(_storage, "default_format", lambda: request.param)
    return request.param


def test_truncated_and_empty_batch_files_are_named_and_recomputed(
    tmp_path, file_format
):
    reference = fx.rows(_run(tmp_path / "reference"), sort=True)
    out = tmp_path / "run"
    _run(out)
    (out / f"results.{file_format}").unlink()
    truncated = out / "batches" / f"batch-00000002.{file_format}"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    empty = out / "batches" / f"batch-00000003.{file_format}"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="batch-00000002.*resume=True"):
        Results.load(out)
    with pytest.warns(UserWarning) as caught:
        resumed = _run(out)
    messages = " ".join(str(w.message) for w in caught)
    assert "batch-00000002" in messages and "batch-00000003" in messages
    assert fx.rows(resumed, sort=True) == reference
    assert fx.rows(Results.load(out), sort=True) == reference


def test_foreign_batch_files_are_refused(tmp_path, file_format):
    """A file of another run (a sample index 999 in an 18-sample dataset), a file
    of the other format and one of other methods are never merged."""
    out = tmp_path / "run"
    _run(out)
    (out / f"results.{file_format}").unlink()
    target = out / "batches" / f"batch-00000001.{file_format}"
    # the last batch of a 1000-sample run with the same methods and metrics
    samples = [i for i in range(996, 1000) for _ in ("mass", "drop")]
    rows = {
        "index": samples,
        "method": ["saliency"] * 8,
        "metric": ["mass", "drop"] * 4,
        "value": [0.5] * 8,
        "seconds": [0.1] * 8,
    }
    target.write_bytes(_storage.encode(rows, file_format))
    for call in (lambda: _run(out), lambda: Results.load(out)):
        with pytest.raises(ValueError, match=r"batch-00000001.*samples 996..999"):
            call()
    target.unlink()
    other = "csv" if file_format == "parquet" else "parquet"
    wrong_format = out / "batches" / f"batch-00000001.{other}"
    wrong_format.write_bytes(_storage.encode(rows, other))
    with pytest.raises(ValueError, match=f"batch-00000001.{other}.*{file_format}"):
        _run(out)
    wrong_format.unlink()
    model = fx.model()
    _run(tmp_path / "other", explainers={"ig": Saliency(model)})
    shutil.copy(
        tmp_path / "other" / "batches" / f"batch-00000001.{file_format}", target
    )
    with pytest.raises(ValueError, match=r"batch-00000001.*methods \['ig'\]"):
        _run(out)


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_another_process_in_flight_temporary_file_is_left_alone(tmp_path):
    """A second evaluate on the same folder removes the leftovers of killed
    writers, never the temporary file a live writer holds (it used to delete it,
    and the writer's rename then failed)."""
    import fcntl

    out = tmp_path / "run"
    _run(out)
    batches = out / "batches"
    stale = batches / ".batch-00000001.parquet.tmp-4000000-0a1b2c3d"
    stale.write_bytes(b"left by a killed process")
    in_flight = batches / ".batch-00000002.parquet.tmp-4000001-0a1b2c3d"
    with open(in_flight, "wb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(b"being written")
        _run(out)
        assert in_flight.exists()
    assert not stale.exists()


def test_a_batch_file_of_another_run_with_the_same_layout_is_refused(
    tmp_path, file_format
):
    """Another finished run with other model weights but the same names, dataset
    and batch size writes files that hold exactly the rows batch 1 should hold:
    only the run fingerprint each file carries tells them apart."""
    import torch

    out = tmp_path / "run"
    _run(out)
    (out / f"results.{file_format}").unlink()
    other_model = fx.model()
    with torch.no_grad():
        other_model[0].bias.add_(1.0)
    other = tmp_path / "other"
    evaluate(
        other_model,
        fx.loader(),
        {"saliency": Saliency(other_model)},
        {"mass": fx.attribution_mass, "drop": fx.top_feature_drop},
        out=other,
        show_progress=False,
    )
    name = f"batch-00000001.{file_format}"
    copied = out / "batches" / name
    assert copied.read_bytes() != (other / "batches" / name).read_bytes()
    shutil.copy(other / "batches" / name, copied)
    for call in (lambda: _run(out), lambda: Results.load(out)):
        with pytest.raises(ValueError, match=rf"{name} is not a batch of this run.*"):
            call()
    assert copied.exists()  # refused, not deleted: it is another run's result


def test_a_run_recorded_before_files_carried_the_fingerprint_still_resumes(
    tmp_path, file_format
):
    """settings.json version 1: batch files without a fingerprint are this run's
    (they were written before files carried one), so they are kept and merged."""
    import json

    reference = fx.rows(_run(tmp_path / "reference"), sort=True)
    out = tmp_path / "run"
    _run(out)
    (out / f"results.{file_format}").unlink()
    settings = json.loads((out / "settings.json").read_text())
    settings["version"] = 1
    (out / "settings.json").write_text(json.dumps(settings))
    for path in (out / "batches").iterdir():
        table, run = _storage.decode(path)
        assert run == settings["fingerprint"]
        path.write_bytes(_storage.encode(table, file_format))
    (out / "batches" / f"batch-00000004.{file_format}").unlink()
    assert fx.rows(Results.load(out), sort=True) != reference  # batch 4 is missing
    assert fx.rows(_run(out), sort=True) == reference
