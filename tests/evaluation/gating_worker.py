"""Run select_gating on the gating fixtures as one torch.distributed rank (the
launcher variables are set by the test). Usage: python gating_worker.py OUT REPORT,
with ``PYTHONPATH`` holding the repository root and ``tests/`` (the launching test
passes its own ``sys.path``: ``helpers.child_env``).

REPORT receives the chosen configuration, the table's means and the dataset
positions of the batches this rank explained (JSON).
"""

import json
import sys
from pathlib import Path

import gating_fixtures as fx

from captum_faithful import select_gating
from captum_faithful.studies import _gating as _selection


def main() -> None:
    out, report = sys.argv[1], sys.argv[2]
    images = fx.images()
    seen: list[int] = []
    original = _selection._Candidate.attribute

    def attribute(self, inputs, target=None):
        if self.explainer.__class__.__name__ == "TransMM":
            for row in inputs:
                matches = (images == row).flatten(1).all(1).nonzero().flatten()
                seen.append(int(matches[0]))
        return original(self, inputs, target=target)

    _selection._Candidate.attribute = attribute
    selection = select_gating(fx.vit(), fx.saes(), images, out=out, **fx.grid())
    Path(report).write_text(
        json.dumps(
            {
                "chosen": selection.configuration.name,
                "means": list(selection.table["mean"]),
                "seen": seen,
            }
        )
    )


if __name__ == "__main__":
    main()
