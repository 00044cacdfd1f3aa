"""``captum-faithful evaluate CONFIG``: run :func:`captum_faithful.evaluate` from a
config file and print the Markdown summary.

The config format, with a complete example, is :data:`CONFIG_HELP`: it is the
epilog of ``captum-faithful evaluate --help``, and the documentation shows that
help text as printed.
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

import torch
from torch import nn
from torch.utils.data import DataLoader

from captum_faithful._cli import UsageError, device, positive_int
from captum_faithful._utils import (
    check_choice,
    check_device_available,
    check_int,
    optional_import,
)
from captum_faithful.evaluation._core import TARGETS

REQUIRED = ("model", "dataset", "explainers", "metrics")
OPTIONAL = {
    "out": None,
    "batch_size": 32,
    "num_workers": 0,
    "target": "predicted",
    "seed": 0,
    "device": None,
}

#: The config format, printed by ``captum-faithful evaluate --help``.
CONFIG_HELP = """\
The config is a Python file (.py) or a YAML file (.yaml/.yml, needs pyyaml from
the evaluate extra) with these keys:

  key          required  meaning
  model        yes       the model (an nn.Module), or a factory that returns it;
                         it is put in eval mode (and moved to `device` if set)
  dataset      yes       a map-style dataset, or a factory that returns it; a
                         batch is a tensor, (inputs, labels, ...) or a dict
  explainers   yes       method name -> Captum attribution object or callable
                         (inputs, target) -> attributions; in a Python config
                         also a function explainers(model) -> dict
  metrics      yes       metric name -> metric, e.g. captum_faithful.metrics
  out          yes       the run folder (--out overrides it; with --out the
                         config may leave it out)
  batch_size   no        images per batch, default 32 (--batch-size overrides it)
  num_workers  no        DataLoader workers, default 0
  target       no        "predicted" (default) or "label" (the dataset's labels)
  seed         no        default 0
  device       no        e.g. "cuda"; default: where the model is (--device)

A complete Python config (it runs as it is: a small CNN with random weights on
random images; put your own model and data in its place):

    # eval_config.py
    from functools import partial

    import torch
    from captum.attr import IntegratedGradients, Saliency
    from torch import nn
    from torch.utils.data import TensorDataset

    from captum_faithful import UnlearnedIntegratedGradients
    from captum_faithful.metrics import deletion_auc, insertion_auc, saco

    def model():                   # a factory: called once
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(128, 10))

    def dataset():                 # (image, label) pairs
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(16, 3, 32, 32, generator=generator)
        return TensorDataset(images, torch.randint(0, 10, (16,), generator=generator))

    def explainers(model):         # explainers need the model
        return {
            "saliency": Saliency(model),
            "ig": partial(IntegratedGradients(model).attribute, n_steps=16),
            "uni": UnlearnedIntegratedGradients(model),
        }

    metrics = {
        "insertion": insertion_auc,
        "deletion": partial(deletion_auc, n_steps=50),
        "saco": saco,
    }
    out = "runs/exp1"
    batch_size = 8
    target = "predicted"
    seed = 0

The same run as YAML. Objects are import paths "package.module:name" (or
"package.module.name"), and the folder of the config file is importable, so
this file can take the model and data of eval_config.py beside it:

    # eval_config.yaml
    model: eval_config:model                  # a path alone is called with no
    dataset: eval_config:dataset              #   arguments; or {factory: path,
                                              #   kwargs: {...}}
    explainers:
      saliency: captum.attr.Saliency          # a class: constructed with the model
      ig:
        class: captum.attr.IntegratedGradients
        init: {multiply_by_inputs: true}      # constructor keywords after the model
        attribute: {n_steps: 16}              # keywords of every .attribute call
      uni: captum_faithful.UnlearnedIntegratedGradients
      # mine: {function: my_module:explain, kwargs: {}}  # (inputs, target) callable
    metrics:
      insertion: captum_faithful.metrics:insertion_auc
      deletion: {function: captum_faithful.metrics:deletion_auc, kwargs: {n_steps: 50}}
      saco: captum_faithful.metrics:saco
    out: runs/exp1
    batch_size: 8
    target: predicted
    seed: 0

Run it:

    captum-faithful evaluate eval_config.py               # or eval_config.yaml

Rows are appended under `out` as each batch finishes; running the same command
again resumes where it stopped (--no-resume starts over). The summary (mean +/-
standard error per method and metric) is printed and written to out/summary.md.

Several processes, each taking a disjoint shard of the dataset (gloo on CPUs,
nccl on GPUs); rank 0 merges the rows and prints the summary:

    torchrun --nproc_per_node 4 -m captum_faithful.cli evaluate eval_config.py

Exit status: 0 done, 2 a mistake in the command line or the config (one line
naming the flag, CONFIG or the config key), 1 a failure while running (one
line; --debug prints the traceback).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score attribution methods with metrics over a dataset (resumable)",
        description=(
            "Run captum_faithful.evaluate from a Python or YAML config naming the\n"
            "model, dataset, explainers and metrics: every explainer is scored by\n"
            "every metric on every sample, the rows are recorded under the run\n"
            "folder as each batch finishes, and a summary table is printed. Launch\n"
            "with torchrun for several processes."
        ),
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", metavar="CONFIG", help="a .py or .yaml/.yml config file (below)"
    )
    parser.add_argument("--out", help="the run folder (overrides the config's `out`)")
    parser.add_argument(
        "--device", type=device, help="e.g. cpu or cuda (overrides the config)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, help="batch size (overrides the config)"
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="delete the rows recorded under the run folder and start over",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )
    parser.set_defaults(func=run)
    return parser


class ConfigError(ValueError):
    """A config file that cannot be turned into the arguments of ``evaluate``."""


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


def _check_spec_keys(label: str, spec: Mapping, known: tuple[str, ...]) -> None:
    """A mapping spec holds only the keys of its form: a misspelt keyword key
    (``kwarg:``) would otherwise be ignored without a word."""
    unknown = sorted(str(key) for key in spec if key not in known)
    if unknown:
        raise ValueError(
            f"{label} in the config has unknown keys {unknown}; a {{{known[0]}: ...}} "
            f"spec takes only {list(known)}"
        )


def _spec_keywords(label: str, spec: Mapping, key: str) -> dict[str, Any]:
    """The keyword arguments under ``spec[key]`` (a mapping, or absent)."""
    keywords = spec.get(key)
    if keywords is None:
        return {}
    if not isinstance(keywords, Mapping) or not all(
        isinstance(name, str) for name in keywords
    ):
        raise ValueError(
            f"{label} in the config: {key!r} must be a mapping of keyword "
            f"arguments, e.g. {{n_steps: 16}}, got {keywords!r}"
        )
    return dict(keywords)


def _yaml_factory(spec: Any, key: str) -> Any:
    if isinstance(spec, str):
        return import_object(spec)()
    if isinstance(spec, Mapping) and "factory" in spec:
        label = f"config key {key!r}"
        _check_spec_keys(label, spec, ("factory", "kwargs"))
        return import_object(spec["factory"])(**_spec_keywords(label, spec, "kwargs"))
    raise ValueError(
        f"config key {key!r} must be an import path or {{factory: path, kwargs: {{...}}}}, "
        f"got {spec!r}"
    )


def _yaml_explainer(name: str, spec: Any, model: nn.Module) -> Any:
    if isinstance(spec, str):
        obj = import_object(spec)
        return obj(model) if isinstance(obj, type) else obj
    label = f"explainers[{name!r}]"
    if isinstance(spec, Mapping) and "class" in spec:
        _check_spec_keys(label, spec, ("class", "init", "attribute"))
        init = _spec_keywords(label, spec, "init")
        keywords = _spec_keywords(label, spec, "attribute")
        explainer = import_object(spec["class"])(model, **init)
        return (
            functools.partial(explainer.attribute, **keywords)
            if keywords
            else explainer
        )
    if isinstance(spec, Mapping) and "function" in spec:
        return _yaml_function(label, spec)
    raise ValueError(
        f"{label} in the config must be an import path, {{class: ..., "
        f"init: ..., attribute: ...}} or {{function: ..., kwargs: ...}}, got {spec!r}"
    )


def _yaml_function(label: str, spec: Mapping) -> Any:
    """A ``{function: path, kwargs: {...}}`` spec: the function, keywords bound."""
    _check_spec_keys(label, spec, ("function", "kwargs"))
    keywords = _spec_keywords(label, spec, "kwargs")
    function = import_object(spec["function"])
    return functools.partial(function, **keywords) if keywords else function


def _yaml_metric(name: str, spec: Any) -> Any:
    if isinstance(spec, str):
        return import_object(spec)
    if isinstance(spec, Mapping) and "function" in spec:
        return _yaml_function(f"metrics[{name!r}]", spec)
    raise ValueError(
        f"metrics[{name!r}] in the config must be an import path or {{function: ..., "
        f"kwargs: ...}}, got {spec!r}"
    )


def _read_config(path: Path) -> dict[str, Any]:
    if path.suffix == ".py":
        namespace = runpy.run_path(
            str(path), run_name=f"captum_faithful_config_{path.stem}"
        )
        return {k: namespace[k] for k in (*REQUIRED, *OPTIONAL) if k in namespace}
    if path.suffix in (".yaml", ".yml"):
        yaml = optional_import("yaml", "evaluate")
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("a YAML config must be a mapping of keys")
        return config
    raise ValueError(f"a config must be a .py or .yaml/.yml file, not {path.name}")


def _check_option(key: str, value: Any) -> Any:
    """An optional key's value, checked (``ValueError`` naming the key if wrong)."""
    if key == "batch_size":
        return check_int("batch_size", value, minimum=1)
    if key == "num_workers":
        return check_int("num_workers", value, minimum=0)
    if key == "seed":
        return None if value is None else check_int("seed", value)
    if key == "target":
        return check_choice("target", value, TARGETS)
    if key == "device" and value is not None:
        try:
            device = torch.device(value)
        except (TypeError, RuntimeError, ValueError) as err:
            raise ValueError(
                f"`device` must name a torch device, got {value!r}"
            ) from err
        return check_device_available("device", device)
    if key == "out" and value is not None and not isinstance(value, (str, Path)):
        raise TypeError(f"`out` must be a folder path, got {value!r}")
    return value


def load_config(path: str | Path) -> dict[str, Any]:
    """Build the arguments of :func:`captum_faithful.evaluate` from a config file.

    Args:
        path (str or Path): a ``.py`` or ``.yaml``/``.yml`` file in the format of
                    :data:`CONFIG_HELP`.

    Returns:
        dict: ``model`` (in eval mode), ``dataset``, ``explainers``, ``metrics`` and
        the optional keys, checked, with their defaults.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ConfigError: anything else that goes wrong while the config is read or its
            objects are built (the message names the file and the key; the original
            exception is chained).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        return _build_config(path)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config {path}: {err}") from err
    except Exception as err:  # noqa: BLE001 - the user's code in the config failed
        raise ConfigError(f"config {path}: {type(err).__name__}: {err}") from err


def _build_config(path: Path) -> dict[str, Any]:
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    raw = _read_config(path)
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"the config lacks the keys {missing}")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(
            f"the config has unknown keys {unknown}; known keys are "
            f"{[*REQUIRED, *OPTIONAL]}"
        )
    config = {
        key: _check_option(key, raw.get(key, default))
        for key, default in OPTIONAL.items()
    }
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
    if not hasattr(type(dataset), "__getitem__") or not hasattr(
        type(dataset), "__len__"
    ):
        raise TypeError(
            "config key 'dataset' must give a map-style dataset (with __getitem__ "
            f"and __len__), got {type(dataset).__name__}"
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
    for key, named in (("explainers", explainers), ("metrics", metrics)):
        if isinstance(named, Mapping):
            for name, obj in named.items():
                _check_bound_keywords(f"{key}[{name!r}]", obj)
    config["explainers"] = explainers
    config["metrics"] = metrics
    return config


def _check_bound_keywords(label: str, obj: Any) -> None:
    """A ``functools.partial`` whose arguments its function does not take fails here,
    before the run, rather than on the first batch."""
    if not isinstance(obj, functools.partial):
        return
    try:
        signature = inspect.signature(obj.func)
    except (TypeError, ValueError):
        return
    try:
        signature.bind_partial(*obj.args, **obj.keywords)
    except TypeError as err:
        name = getattr(obj.func, "__qualname__", repr(obj.func))
        raise TypeError(
            f"{label}: {name}() does not take these arguments: {err}"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Load the config, apply the flags, run ``evaluate``, print the summary.

    Raises:
        UsageError: the config file is missing or wrong (``CONFIG``), the run folder
            is missing or is a file, or holds a run with other settings (``--out``,
            ``--no-resume``).
    """
    from captum_faithful.evaluation import evaluate
    from captum_faithful.evaluation._core import OtherSettingsError, _check_arguments

    if not Path(args.config).is_file():
        raise UsageError(f"argument CONFIG: no such file {args.config!r}")
    try:
        config = load_config(args.config)
    except ConfigError as err:
        raise UsageError(f"argument CONFIG: {err}") from err
    for key in ("out", "device", "batch_size"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    if config["out"] is None:
        raise UsageError(
            "argument --out: no run folder; pass --out or set `out` in the config"
        )
    out = Path(config["out"])
    where = "argument --out" if args.out is not None else f"`out` in {args.config}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"{where}: {out} is a file, not a folder")
    if config["device"] is not None:
        config["model"] = config["model"].to(config["device"])
    loader = DataLoader(
        config["dataset"],
        batch_size=config["batch_size"],
        num_workers=config["num_workers"],
    )
    try:
        _check_arguments(
            config["model"],
            loader,
            config["explainers"],
            config["metrics"],
            out,
            config["target"],
            not args.no_resume,
            config["seed"],
        )
    except (TypeError, ValueError) as err:
        raise UsageError(f"argument CONFIG: config {args.config}: {err}") from err
    try:
        results = evaluate(
            config["model"],
            loader,
            config["explainers"],
            config["metrics"],
            out=out,
            target=config["target"],
            resume=not args.no_resume,
            show_progress=not args.no_progress,
            device=config["device"],
            seed=config["seed"],
        )
    except OtherSettingsError as err:
        raise UsageError(
            f"{where}: the run folder {err.out} holds a run with other settings "
            f"({'; '.join(err.changed) or 'fingerprint differs'}); pass another "
            "--out, or --no-resume to delete its rows and start over"
        ) from err
    if int(os.environ.get("RANK", "0")) == 0:
        report = results.to_markdown()
        (out / "summary.md").write_text(report, encoding="utf-8")
        print(report, end="")
    return 0
