"""Benchmarks of captum-faithful (not part of the package or of the test suite).

Run each from the repository root as a module, e.g. ``python -m benchmarks.bench_uni``,
or all of them with ``python -m benchmarks`` (see ``benchmarks/__main__.py``). How
they measure is in ``benchmarks/_harness.py`` and ``docs/performance.md``.

One thread per process: importing this package before torch sets the thread count of
the math libraries to 1 (they read it once, when torch is first imported);
:func:`benchmarks._harness.configure` then sets torch's own count. Imported after
torch (as the tests do), it changes nothing.
"""

import os
import sys

if "torch" not in sys.modules:
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_variable] = "1"
