"""``captum-faithful evaluate CONFIG``: run :func:`captum_faithful.evaluate` from a
config file and print the Markdown summary.

The config is a Python file (``.py``) or a YAML file (``.yaml``/``.yml``, needs
pyyaml from the ``demo`` extra) with these keys:

==============  ========  =====================================================
key             required  meaning
==============  ========  =====================================================
``model``       yes       the model, or a factory that returns it
``dataset``     yes       a map-style dataset, or a factory that returns it
``explainers``  yes       method name → explainer (see below)
``metrics``     yes       metric name → metric (see below)
``out``         yes       the run folder (``--out`` overrides it)
``batch_size``  no        default 32
``num_workers`` no        DataLoader workers, default 0
``target``      no        "predicted" (default) or "label"
``seed``        no        default 0
``device``      no        e.g. "cuda"; default CPU (``--device`` overrides it)
==============  ========  =====================================================

A **Python** config defines these names at module level. ``model`` and ``dataset``
may be zero-argument callables; ``explainers`` may be a callable
``explainers(model) -> dict`` (explainers usually need the model)::

    # eval_config.py
    from functools import partial
    from captum.attr import IntegratedGradients, Saliency
    from captum_faithful.metrics import deletion_auc, insertion_auc
    from my_project import build_model, test_set

    model = build_model          # called once, then moved to `device` and .eval()
    dataset = test_set
    def explainers(model):
        return {"saliency": Saliency(model), "ig": IntegratedGradients(model)}
    metrics = {"insertion": insertion_auc, "deletion": partial(deletion_auc, n_steps=50)}
    out = "runs/exp1"
    batch_size = 16

In **YAML**, objects are import paths ``package.module:name`` (or
``package.module.name``); the folder of the config file is importable::

    model: {factory: my_project:build_model, kwargs: {n_classes: 10}}
    dataset: my_project:test_set            # a path alone: called with no arguments
    explainers:
      saliency: captum.attr.Saliency        # a class: constructed with the model
      ig:
        class: captum.attr.IntegratedGradients
        init: {multiply_by_inputs: true}    # constructor keywords (after the model)
        attribute: {n_steps: 32}            # keywords of every .attribute call
      mine: {function: my_project:explain, kwargs: {}}   # (inputs, target) callable
    metrics:
      insertion: captum_faithful.metrics:insertion_auc
      deletion: {function: captum_faithful.metrics:deletion_auc, kwargs: {n_steps: 50}}
    out: runs/exp1
    batch_size: 16

Several processes: ``torchrun --nproc_per_node 4 -m captum_faithful.cli evaluate
eval_config.py``. After the run, rank 0 writes the summary to ``out/summary.md``
and prints it.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import pkgutil
import runpy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from captum_faithful._utils import optional_import

REQUIRED = ("model", "dataset", "explainers", "metrics")
OPTIONAL = {
    "out": None,
    "batch_size": 32,
    "num_workers": 0,
    "target": "predicted",
    "seed": 0,
    "device": None,
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="score attribution methods with metrics over a dataset (resumable)",
        description=(
            "Run captum_faithful.evaluate from a Python or YAML config naming the "
            "model, dataset, explainers and metrics. Launch with torchrun for "
            "several processes."
        ),
    )
    parser.add_argument("config", help="a .py or .yaml/.yml config file")
    parser.add_argument("--out", help="the run folder (overrides the config)")
    parser.add_argument("--device", help="e.g. cpu or cuda (overrides the config)")
    parser.add_argument(
        "--batch-size", type=int, help="batch size (overrides the config)"
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="delete the rows recorded under --out and start over",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )
    parser.set_defaults(func=run)
    return parser


def import_object(path: str) -> Any:
    """The object named by ``package.module:attribute`` or ``package.module.name``
    (:func:`pkgutil.resolve_name`); ValueError naming ``path`` if it cannot be
    imported."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"expected an import path 'module:name', got {path!r}")
    try:
        return pkgutil.resolve_name(path)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from err


def _yaml_factory(spec: Any, key: str) -> Any:
    if isinstance(spec, str):
        return import_object(spec)()
    if isinstance(spec, Mapping) and "factory" in spec:
        return import_object(spec["factory"])(**dict(spec.get("kwargs") or {}))
    raise ValueError(
        f"config key {key!r} must be an import path or {{factory: path, kwargs: {{...}}}}, "
        f"got {spec!r}"
    )


def _yaml_explainer(name: str, spec: Any, model: nn.Module) -> Any:
    if isinstance(spec, str):
        obj = import_object(spec)
        return obj(model) if inspect.isclass(obj) else obj
    if isinstance(spec, Mapping) and "class" in spec:
        explainer = import_object(spec["class"])(model, **dict(spec.get("init") or {}))
        keywords = dict(spec.get("attribute") or {})
        return (
            functools.partial(explainer.attribute, **keywords)
            if keywords
            else explainer
        )
    if isinstance(spec, Mapping) and "function" in spec:
        function = import_object(spec["function"])
        keywords = dict(spec.get("kwargs") or {})
        return functools.partial(function, **keywords) if keywords else function
    raise ValueError(
        f"explainers[{name!r}] in the config must be an import path, {{class: ..., "
        f"init: ..., attribute: ...}} or {{function: ..., kwargs: ...}}, got {spec!r}"
    )


def _yaml_metric(name: str, spec: Any) -> Any:
    if isinstance(spec, str):
        return import_object(spec)
    if isinstance(spec, Mapping) and "function" in spec:
        function = import_object(spec["function"])
        keywords = dict(spec.get("kwargs") or {})
        return functools.partial(function, **keywords) if keywords else function
    raise ValueError(
        f"metrics[{name!r}] in the config must be an import path or {{function: ..., "
        f"kwargs: ...}}, got {spec!r}"
    )


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix == ".py":
        namespace = runpy.run_path(
            str(path), run_name=f"captum_faithful_config_{path.stem}"
        )
        return {k: namespace[k] for k in (*REQUIRED, *OPTIONAL) if k in namespace}
    if path.suffix in (".yaml", ".yml"):
        yaml = optional_import("yaml", "demo")
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"config {path} must be a YAML mapping of keys")
        return config
    raise ValueError(f"config {path} must be a .py or .yaml/.yml file")


def load_config(path: str | Path) -> dict[str, Any]:
    """Build the arguments of :func:`captum_faithful.evaluate` from a config file.

    Returns:
        dict: ``model`` (in eval mode), ``dataset``, ``explainers``, ``metrics`` and
        the optional keys with their defaults (see the module docstring).
    """
    path = Path(path).resolve()
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    raw = _read_config(path)
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"config {path} lacks the keys {missing}")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(
            f"config {path} has unknown keys {unknown}; known keys are "
            f"{[*REQUIRED, *OPTIONAL]}"
        )
    config = {**OPTIONAL, **{k: v for k, v in raw.items() if k in OPTIONAL}}
    yaml_form = path.suffix != ".py"
    if yaml_form:
        model = _yaml_factory(raw["model"], "model")
        dataset = _yaml_factory(raw["dataset"], "dataset")
    else:
        model = raw["model"]
        model = (
            model if isinstance(model, nn.Module) or not callable(model) else model()
        )
        dataset = raw["dataset"]
        if callable(dataset) and not hasattr(type(dataset), "__getitem__"):
            dataset = dataset()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"config key 'model' must give an nn.Module, got {type(model).__name__}"
        )
    config["model"] = model.eval()
    config["dataset"] = dataset
    explainers = raw["explainers"]
    if yaml_form:
        if not isinstance(explainers, Mapping):
            raise ValueError("config key 'explainers' must map names to explainers")
        explainers = {n: _yaml_explainer(n, s, model) for n, s in explainers.items()}
    elif callable(explainers) and not isinstance(explainers, Mapping):
        explainers = explainers(model)
    metrics = raw["metrics"]
    if yaml_form and isinstance(metrics, Mapping):
        metrics = {n: _yaml_metric(n, s) for n, s in metrics.items()}
    config["explainers"] = explainers
    config["metrics"] = metrics
    return config


def run(args: argparse.Namespace) -> int:
    from captum_faithful.evaluation import evaluate
    from captum_faithful.evaluation._core import resolve_device

    config = load_config(args.config)
    for key in ("out", "device", "batch_size"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    if config["device"] is not None:
        config["device"] = resolve_device(None, config["device"])
        config["model"] = config["model"].to(config["device"])
    if config["out"] is None:
        raise ValueError("no run folder: set `out` in the config or pass --out")
    loader = DataLoader(
        config["dataset"],
        batch_size=config["batch_size"],
        num_workers=config["num_workers"],
    )
    results = evaluate(
        config["model"],
        loader,
        config["explainers"],
        config["metrics"],
        out=config["out"],
        target=config["target"],
        resume=not args.no_resume,
        show_progress=not args.no_progress,
        device=config["device"],
        seed=config["seed"],
    )
    if int(os.environ.get("RANK", "0")) == 0:
        report = results.to_markdown()
        (Path(config["out"]) / "summary.md").write_text(report, encoding="utf-8")
        print(report, end="")
    return 0
