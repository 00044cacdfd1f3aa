"""Runs in subprocesses: two gloo ranks on CPU, and a real SIGKILL mid-run."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import eval_fixtures as fx
import pytest
from helpers import child_env, free_port

from captum_faithful import Results, evaluate
from captum_faithful.evaluation import _storage

WORKER = Path(__file__).resolve().parent / "eval_worker.py"


def _env(**extra):
    env = child_env(OMP_NUM_THREADS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in extra:
            env.pop(key, None)
    return env


def _launch_ranks(out, logs, world_size=2):
    """Start one worker per rank with the variables torchrun would set."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), str(logs / f"rank{rank}.json")],
            env=_env(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world_size)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output
    return [
        fx.sample_positions(
            [
                v
                for call in json.loads((logs / f"rank{r}.json").read_text())
                for v in call
            ]
        )
        for r in range(world_size)
    ]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    reference = fx.uninterrupted_run(tmp_path / "reference")
    seen = _launch_ranks(tmp_path / "run", tmp_path)
    # 5 batches: rank 0 takes batches 0-1, rank 1 batches 2-4; contiguous, disjoint
    assert seen[0] == list(range(0, 8))
    assert seen[1] == list(range(8, 18))
    merged = Results.load(tmp_path / "run")
    assert (tmp_path / "run" / "results.parquet").exists()
    # includes a metric that draws from the global generator: seeding is per batch
    assert fx.rows(merged) == fx.rows(reference)


def test_two_ranks_resume_a_single_process_run(tmp_path):
    reference = fx.uninterrupted_run(tmp_path / "reference")
    out = tmp_path / "run"
    model = fx.model()
    with pytest.raises(RuntimeError, match="injected"):
        evaluate(
            model,
            fx.loader(),
            fx.run_explainers(model, fail_after=1),
            fx.metrics(),
            out=out,
            show_progress=False,
        )
    seen = _launch_ranks(out, tmp_path)
    # batches 1-4 remain: two per rank
    assert seen == [list(range(4, 12)), list(range(12, 18))]
    assert fx.rows(Results.load(out)) == fx.rows(reference)


@pytest.mark.parametrize("where", ["between batches", "inside the atomic write"])
def test_sigkill_then_resume_gives_the_uninterrupted_rows(tmp_path, where):
    reference = fx.uninterrupted_run(tmp_path / "reference")
    out = tmp_path / "run"
    flag = "--fail-after" if where == "between batches" else "--kill-in-replace"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(tmp_path / "log.json"), flag, "3"],
        env=_env(),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    storage = _storage.RunStorage(out)
    assert storage.recorded_batches() == [0, 1, 2]
    leftovers = list((out / "batches").glob(".*.tmp-*"))
    if where == "inside the atomic write":
        assert len(leftovers) == 1  # batch 3 complete on disk, never renamed
    assert not (out / "results.parquet").exists()

    model = fx.model()
    log = []
    resumed = evaluate(
        model,
        fx.loader(),
        fx.run_explainers(model, log=log),
        fx.metrics(),
        out=out,
        show_progress=False,
    )
    assert fx.sample_positions([v for call in log for v in call]) == list(range(12, 18))
    assert not list((out / "batches").glob(".*.tmp-*"))
    assert fx.rows(resumed) == fx.rows(reference)
