"""Run `evaluate` on the test fixtures in a subprocess (a torch.distributed rank when
the launcher variables are set). Usage:

    python eval_worker.py OUT LOG [--fail-after K] [--kill-in-replace K]

with ``PYTHONPATH`` holding the repository root and ``tests/`` (the launching test
passes its own ``sys.path``: ``helpers.child_env``).

LOG receives the first input value of every sample the explainer saw (JSON).
--fail-after K: SIGKILL this process when the explainer is called for batch K+1.
--kill-in-replace K: SIGKILL this process in the (K+1)-th atomic rename, after the
temporary file of that batch is written and fsync-ed but before it gets its name.
"""

import argparse
import json
import os
import signal
from pathlib import Path

import eval_fixtures

from captum_faithful import evaluate
from captum_faithful.evaluation import _storage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("log")
    parser.add_argument("--fail-after", type=int)
    parser.add_argument("--kill-in-replace", type=int)
    args = parser.parse_args()
    if args.kill_in_replace is not None:
        real_replace = os.replace
        done = [0]

        def replace(src, dst):
            if Path(dst).name.startswith("batch-"):
                if done[0] == args.kill_in_replace:
                    os.kill(os.getpid(), signal.SIGKILL)
                done[0] += 1
            real_replace(src, dst)

        _storage.os.replace = replace
    model = eval_fixtures.model()
    log: list = []
    explainers = eval_fixtures.run_explainers(
        model, args.fail_after, how="kill", log=log
    )
    try:
        evaluate(
            model,
            eval_fixtures.loader(),
            explainers,
            eval_fixtures.metrics(),
            out=args.out,
            show_progress=False,
        )
    finally:
        Path(args.log).write_text(json.dumps(log))


if __name__ == "__main__":
    main()
