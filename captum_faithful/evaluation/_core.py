"""The dataset-scale runner behind :func:`captum_faithful.evaluate`."""

from __future__ import annotations

import hashlib
import inspect
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sized
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from captum_faithful._arguments import resolve_target
from captum_faithful._utils import (
    check_bool,
    check_choice,
    check_device_available,
    module_of,
    optional_import,
    preserve_model_state,
    progress,
    run_forward,
)
from captum_faithful.evaluation import _settings
from captum_faithful.evaluation._distributed import ProcessGroup, process_group
from captum_faithful.evaluation._storage import (
    SETTINGS_VERSION,
    Rows,
    RunStorage,
    empty_rows,
)
from captum_faithful.evaluation.results import Results

TARGETS = ("predicted", "label")


def evaluate(
    model: Callable,
    dataloader: DataLoader,
    explainers: Mapping[str, Any],
    metrics: Mapping[str, Callable],
    out: str | os.PathLike,
    target: str = "predicted",
    resume: bool = True,
    show_progress: bool = True,
    device: str | torch.device | None = None,
    seed: int | None = 0,
) -> Results:
    r"""Explain every sample of a dataset with several methods and score each
    explanation with several metrics, resumably, on one process or many.

    For each batch of ``dataloader`` the target classes are fixed once (the
    model's prediction, or the dataset's labels), every explainer attributes the
    batch, and every metric scores every attribution; the rows (sample index,
    method, metric, value, seconds) of the finished batch are written to their own
    file under ``out`` before the next batch starts. The files are written
    atomically (a temporary file, ``fsync``, rename), so a run killed at any moment
    — an exception, Ctrl-C, SIGKILL, a lost node — loses at most the batches in
    flight; ``resume=True`` (the default) skips every batch already recorded and
    never duplicates a row. The settings (see below) are written to
    ``out/settings.json`` once; calling ``evaluate`` again with the same ``out`` but
    other settings is refused instead of mixing results, and so is a batch file of
    another run copied under ``out`` (every file carries its run's fingerprint).

    **Distributed.** When ``torch.distributed`` is initialised, or the environment
    of a launcher such as ``torchrun`` is set (``WORLD_SIZE`` > 1, ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), the batches still to do are split into
    contiguous, disjoint blocks, one per rank (no sampler padding, so no sample is
    evaluated twice); every rank writes its own batch files, and after a barrier rank
    0 merges them into ``out/results.parquet`` (``.csv`` without pyarrow). Batches
    are always the same global batches of ``dataloader.batch_size`` consecutive
    samples, so the merged table equals the single-process table row for row, and a
    run may be resumed with another number of processes. When ``evaluate`` creates
    the process group itself it uses ``nccl`` for CUDA devices and ``gloo``
    otherwise, and destroys it before returning. ``out`` must be a folder every rank
    can read (a shared filesystem on a cluster). Every rank returns the merged
    results.

    **Timing.** ``seconds`` is the wall-clock time of the explainer's call on the
    batch (``explainer.attribute(inputs, target=...)`` or ``explainer(inputs,
    target)``) divided by the number of samples in the batch: the explanation time
    per sample, amortised over the batch. It excludes data loading, the forward pass
    that fixes the predicted targets, the metrics and the writing of results. On a
    CUDA device the device is synchronised before and after the call. All metrics of
    a (sample, method) pair share the same ``seconds``.

    **Randomness.** With ``seed`` set, every batch's randomness is derived from the
    seed and the batch number, never from the state a generator reached in earlier
    batches, so random explainers and metrics give the same rows whether the run is
    single-process, distributed or resumed: the torch random generators are seeded
    with ``seed + batch number`` before each batch, inside ``torch.random.fork_rng``
    (the caller's generator state is restored afterwards), and an explainer or
    metric that takes a ``generator`` argument (``FaithfulnessEnsemble.attribute``,
    ``faithfulness_correlation``, and ``insertion_auc`` and ``deletion_auc`` for
    ``baselines="random_color"``) gets a new generator seeded from the seed, the
    batch and its name, replacing one bound with ``functools.partial``. A metric's
    generator does not depend on the method, so all methods of a batch are scored
    with the same random draws. Randomness hidden in a closure cannot be seen.

    The model is used as given: call ``model.eval()`` first (a warning is issued
    for a model in training mode). Every batch sees the model as the caller left
    it: its mode, ``requires_grad`` flags and buffers (BatchNorm statistics, which
    a model in training mode updates on every forward pass) are restored after each
    batch, also when it raises. Inputs are moved to ``device``; the model is not
    moved.

    Args:
        model (Callable): The forward function (usually an ``nn.Module``) passed
                    to every metric as ``forward_func`` and used to predict the
                    targets. A Hugging Face ``ModelOutput`` is reduced to its
                    logits.
        dataloader (torch.utils.data.DataLoader): A loader over a map-style
                    dataset, in order (no shuffling, ``drop_last=False``), with a
                    ``batch_size``. Each batch is ``inputs``, or a tuple/list
                    ``(inputs, labels, ...)``, or a mapping with ``"inputs"`` or
                    ``"pixel_values"`` and optionally ``"labels"``/``"label"``;
                    ``inputs`` may be a tensor or a tuple of tensors. Its
                    ``num_workers``, ``collate_fn`` and ``pin_memory`` are kept.
        explainers (Mapping[str, Any]): Method name → a Captum attribution object
                    (anything with ``.attribute(inputs, target=...)``) or a
                    callable ``(inputs, target) -> attributions``. Use
                    ``functools.partial(obj.attribute, n_steps=50)`` for keyword
                    arguments of the call.
        metrics (Mapping[str, Callable]): Metric name → a metric of
                    ``captum_faithful.metrics`` or any callable
                    ``(forward_func, inputs, attributions, target=...) -> (N,)``
                    values. Per-metric keyword arguments via ``functools.partial``.
        out (str or os.PathLike): The folder of the run (created if needed).
        target (str, optional): ``"predicted"`` explains and scores the class the
                    model predicts; ``"label"`` the labels the dataloader yields.
                    Default: "predicted"
        resume (bool, optional): Continue a run recorded under ``out`` (it must
                    have the same settings). ``False`` deletes the files of a
                    previous run under ``out`` and starts over.
                    Default: True
        show_progress (bool, optional): Show a progress bar over the batches
                    (on rank 0).
                    Default: True
        device (str or torch.device, optional): Where the inputs go. ``None``
                    means the device of the model's first parameter (CPU for a
                    model without parameters). Under a launcher, ``"cuda"``
                    without an index means ``cuda:LOCAL_RANK``. A CUDA device
                    this machine does not have is refused (ValueError) before any
                    work.
                    Default: None
        seed (int, optional): Base seed of the per-batch generators; ``None``
                    leaves the random generators alone.
                    Default: 0

    Returns:
        Results: The merged table (``results.table``: columns ``index``,
        ``method``, ``metric``, ``value``, ``seconds``) with ``summary()``,
        ``compare(a, b, metric)`` and ``to_markdown()``.

    Examples::

        >>> from functools import partial
        >>> from captum.attr import IntegratedGradients, Saliency
        >>> from captum_faithful import evaluate
        >>> from captum_faithful.metrics import deletion_auc, insertion_auc
        >>> loader = DataLoader(test_set, batch_size=32)
        >>> results = evaluate(
        ...     model.eval(), loader,
        ...     explainers={"ig": IntegratedGradients(model), "saliency": Saliency(model)},
        ...     metrics={"insertion": insertion_auc,
        ...              "deletion": partial(deletion_auc, n_steps=50)},
        ...     out="runs/exp1")
        >>> print(results.to_markdown())

        Several processes (here 4 on one machine):
        ``torchrun --nproc_per_node 4 my_script.py``.
    """
    explainers, metrics = _check_arguments(
        model, dataloader, explainers, metrics, out, target, resume, seed
    )
    optional_import("pandas", "evaluate")
    device = resolve_device(model, device)
    if isinstance(model, nn.Module) and model.training:
        warnings.warn(
            "evaluate: the model is in training mode; call model.eval() first "
            "(dropout and batch-norm statistics change the explanations)",
            stacklevel=2,
        )
    dataset = dataloader.dataset
    # checked above: a map-style dataset with a length, a fixed batch size
    n_samples = len(cast(Sized, dataset))
    batch_size = int(cast(int, dataloader.batch_size))
    n_batches = -(-n_samples // batch_size)
    storage = RunStorage(out)
    settings = {
        "dataset": {"class": _settings.qualname(type(dataset)), "length": n_samples},
        "batch_size": batch_size,
        "target": target,
        "seed": seed,
        "model": _settings.describe_model(model),
        "methods": list(explainers),
        "metrics": list(metrics),
        "explainer_settings": {n: _settings.describe(e) for n, e in explainers.items()},
        "metric_settings": {n: _settings.describe(m) for n, m in metrics.items()},
    }
    with process_group(device) as group:
        _prepare_out(storage, settings, resume, group)
        todo = group.broadcast(
            lambda: sorted(set(range(n_batches)) - set(storage.recorded_batches()))
        )
        first = group.rank * len(todo) // group.size
        last = (group.rank + 1) * len(todo) // group.size
        mine = todo[first:last]
        failure: BaseException | None = None
        try:
            with _preserved_rng(seed, device):
                loader = _loader_over(dataloader, mine, batch_size, n_samples)
                batches = progress(
                    zip(mine, loader, strict=True),
                    show_progress and group.rank == 0,
                    total=len(mine),
                    desc=_progress_label(explainers),
                    unit="batch",
                )
                for batch_id, batch in batches:
                    start = batch_id * batch_size
                    indices = range(start, min(start + batch_size, n_samples))
                    if seed is not None:
                        torch.manual_seed(seed + batch_id)
                    # every batch sees the model as the caller left it (a model in
                    # training mode would carry BatchNorm statistics across batches)
                    with preserve_model_state(module_of(model)):
                        rows = _evaluate_batch(
                            model,
                            batch,
                            batch_id,
                            indices,
                            explainers,
                            metrics,
                            target,
                            device,
                            seed,
                        )
                    storage.write_batch(batch_id, rows)
        except BaseException as err:  # noqa: B036 - re-raised below on every rank
            failure = err
        group.raise_if_any_failed(failure)
        if group.rank == 0:
            try:
                storage.write_results(storage.read_batches())
            except BaseException as err:  # noqa: B036 - re-raised below on every rank
                failure = err
        group.raise_if_any_failed(failure)
    return Results.load(out)


class OtherSettingsError(ValueError):
    """``out`` holds a run recorded with other settings.

    Attributes ``out`` (the folder) and ``changed`` (the settings that differ, e.g.
    ``"explainers['ig'] changed"``) let a caller word its own advice, as the command
    line does with its flags.
    """

    def __init__(self, out: str, changed: list[str]) -> None:
        super().__init__(out, changed)
        self.out = out
        self.changed = list(changed)

    def __str__(self) -> str:
        return (
            f"`out` ({self.out}) holds a run with other settings "
            f"({'; '.join(self.changed) or 'fingerprint differs'}). Choose another "
            "`out`, or pass resume=False to delete the recorded rows and start over."
        )


def _check_arguments(
    model: Any,
    dataloader: Any,
    explainers: Any,
    metrics: Any,
    out: Any,
    target: Any,
    resume: Any,
    seed: Any,
) -> tuple[dict[str, Any], dict[str, Callable]]:
    if not callable(model):
        raise TypeError(
            f"`model` must be callable (an nn.Module), got {type(model).__name__}"
        )
    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            "`dataloader` must be a torch.utils.data.DataLoader over a map-style "
            f"dataset, got {type(dataloader).__name__}"
        )
    if isinstance(dataloader.dataset, IterableDataset) or not hasattr(
        dataloader.dataset, "__len__"
    ):
        raise TypeError(
            "`dataloader` must load a map-style dataset with a length (sample "
            "positions are the result index); an IterableDataset cannot be sharded "
            "or resumed"
        )
    if dataloader.batch_size is None:
        raise ValueError(
            "`dataloader` must have a batch_size (a custom batch_sampler is not "
            "supported: batches must be consecutive samples)"
        )
    if not isinstance(dataloader.sampler, SequentialSampler):
        raise ValueError(
            "`dataloader` must visit the dataset in order (shuffle=False, no "
            f"sampler), got a {type(dataloader.sampler).__name__}"
        )
    if dataloader.drop_last:
        raise ValueError(
            "`dataloader` must have drop_last=False: every sample is evaluated"
        )
    if len(dataloader.dataset) == 0:
        raise ValueError("`dataloader` loads an empty dataset")
    explainers = _check_named("explainers", explainers)
    for name, explainer in explainers.items():
        attribute = getattr(explainer, "attribute", None)
        if not (callable(attribute) or callable(explainer)):
            raise TypeError(
                f"`explainers[{name!r}]` must be a Captum attribution object (with "
                "an .attribute method) or a callable (inputs, target) -> "
                f"attributions, got {type(explainer).__name__}"
            )
    metrics = _check_named("metrics", metrics)
    for name, metric in metrics.items():
        if not callable(metric):
            raise TypeError(
                f"`metrics[{name!r}]` must be a callable (forward_func, inputs, "
                "attributions, target=...) -> one value per sample, got "
                f"{type(metric).__name__}"
            )
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(
            f"`out` must be a folder path (str or os.PathLike), got {type(out).__name__}"
        )
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"`out` must be a folder, but {out} is a file")
    check_choice("target", target, TARGETS)
    check_bool("resume", resume)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"`seed` must be an int or None, got {seed!r}")
    return explainers, metrics


def _check_named(name: str, mapping: Any) -> dict[str, Any]:
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"`{name}` must be a dict of name -> object, got {type(mapping).__name__}"
        )
    if not mapping:
        raise ValueError(f"`{name}` must not be empty")
    for key in mapping:
        if not isinstance(key, str) or not key:
            raise TypeError(f"`{name}` keys must be non-empty strings, got {key!r}")
    return dict(mapping)


def resolve_device(model: Any, device: Any) -> torch.device:
    if device is None:
        if isinstance(model, nn.Module):
            for tensor in (*model.parameters(), *model.buffers()):
                return tensor.device
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"`device` must name a torch device, got {device!r}") from err
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return check_device_available("device", device)


def _prepare_out(
    storage: RunStorage, settings: dict[str, Any], resume: bool, group: ProcessGroup
) -> None:
    fingerprint = _settings.fingerprint(settings)
    fingerprints = group.all_gather(fingerprint)
    if len(set(fingerprints)) > 1:
        raise ValueError(
            "evaluate was called with different settings on different ranks "
            f"(fingerprints {fingerprints}); every rank must build the same model, "
            "dataset, explainers and metrics"
        )

    def prepare() -> str:
        storage.out.mkdir(parents=True, exist_ok=True)
        if not resume:
            storage.clear()
        recorded = storage.read_settings()
        if recorded is not None and recorded.get("fingerprint") != fingerprint:
            changed = _settings.differences(recorded.get("settings", {}), settings)
            raise OtherSettingsError(str(storage.out), changed)
        storage.remove_temporary_files()
        if recorded is None:
            storage.write_settings(
                {
                    "version": SETTINGS_VERSION,
                    "fingerprint": fingerprint,
                    "file_format": storage.file_format,
                    "created": datetime.now(timezone.utc).isoformat(),
                    "settings": settings,
                }
            )
        else:
            storage.file_format = recorded.get("file_format", storage.file_format)
        return storage.file_format

    storage.file_format = group.broadcast(prepare)
    storage.run = fingerprint
    storage.batch_dir.mkdir(parents=True, exist_ok=True)


def _loader_over(
    dataloader: DataLoader, batch_ids: list[int], batch_size: int, n_samples: int
) -> DataLoader:
    """A loader with the user's loading options over the given global batches."""
    batches = [
        list(range(b * batch_size, min((b + 1) * batch_size, n_samples)))
        for b in batch_ids
    ]
    options: dict[str, Any] = {
        "num_workers": dataloader.num_workers,
        "collate_fn": dataloader.collate_fn,
        "pin_memory": dataloader.pin_memory,
        "timeout": dataloader.timeout,
        "worker_init_fn": dataloader.worker_init_fn,
        "multiprocessing_context": dataloader.multiprocessing_context,
        "generator": dataloader.generator,
    }
    if dataloader.num_workers > 0:
        options["prefetch_factor"] = dataloader.prefetch_factor
        options["persistent_workers"] = dataloader.persistent_workers
    return DataLoader(dataloader.dataset, batch_sampler=batches, **options)


def _preserved_rng(seed: int | None, device: torch.device) -> AbstractContextManager:
    """With a seed, the caller's torch generator state is restored on exit."""
    if seed is None:
        return nullcontext()
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """(inputs, labels or None) of a batch (forms in :func:`evaluate`)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        for key in ("inputs", "pixel_values", "input"):
            if key in batch:
                inputs = batch[key]
                break
        else:
            raise ValueError(
                "a dataloader batch that is a mapping must hold 'inputs' or "
                f"'pixel_values'; got keys {list(batch)}"
            )
        labels = batch.get("labels", batch.get("label"))
        return inputs, labels
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], batch[1] if len(batch) > 1 else None
    raise TypeError(
        "a dataloader batch must be a tensor, a tuple/list (inputs, labels, ...) or "
        f"a mapping, got {type(batch).__name__}"
    )


def _to_device(inputs: Any, device: torch.device) -> Tensor | tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if (
        isinstance(inputs, (tuple, list))
        and inputs
        and all(isinstance(t, Tensor) for t in inputs)
    ):
        return tuple(t.to(device) for t in inputs)
    raise TypeError(
        "the inputs of a dataloader batch must be a tensor or a tuple of tensors, got "
        f"{type(inputs).__name__}"
    )


def _parameters(func: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}


def _generator_keywords(
    func: Callable, seed: int | None, *key: Any
) -> dict[str, torch.Generator]:
    """``{"generator": a generator seeded from (seed, *key)}`` when ``func`` takes a
    ``generator`` argument and the run has a seed; else nothing.

    A generator object carries state from call to call, so a resumed run (a new
    process, a fresh generator) would draw what the first batch drew. Each call
    gets its own, seeded from the run's seed and the batch: the same rows in an
    uninterrupted, resumed or distributed run.
    """
    parameter = _parameters(func).get("generator")
    if (
        seed is None
        or parameter is None
        or parameter.kind
        not in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
    ):
        return {}
    digest = hashlib.sha256(repr((seed, *key)).encode("utf-8")).digest()
    return {
        "generator": torch.Generator().manual_seed(
            int.from_bytes(digest[:8], "big") >> 1
        )
    }


def _call_explainer(
    explainer: Any, inputs: Any, target: Tensor, seed: int | None, key: tuple
) -> Any:
    attribute = getattr(explainer, "attribute", None)
    if callable(attribute):
        return attribute(
            inputs, target=target, **_generator_keywords(attribute, seed, *key)
        )
    keywords = _generator_keywords(explainer, seed, *key)
    if "target" in _parameters(explainer):
        return explainer(inputs, target=target, **keywords)
    return explainer(inputs, target, **keywords)


def _as_values(values: Any, n: int, name: str) -> list[float]:
    if isinstance(values, Tensor):
        values = values.detach().to("cpu", torch.float64)
    else:
        try:
            values = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"metric {name!r} must return one number per sample (a tensor of "
                f"shape ({n},)), got {type(values).__name__}"
            ) from err
    if values.numel() != n:
        raise ValueError(
            f"metric {name!r} must return one value per sample, shape ({n},); got "
            f"shape {tuple(values.shape)}"
        )
    return values.reshape(n).tolist()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _evaluate_batch(
    model: Callable,
    batch: Any,
    batch_id: int,
    indices: range,
    explainers: dict[str, Any],
    metrics: dict[str, Callable],
    target: str,
    device: torch.device,
    seed: int | None,
) -> Rows:
    inputs, labels = _split_batch(batch)
    inputs = _to_device(inputs, device)
    first = inputs if isinstance(inputs, Tensor) else inputs[0]
    n = len(indices)
    if first.shape[0] != n:
        raise ValueError(
            f"a dataloader batch holds {first.shape[0]} samples where {n} were expected "
            "(a collate_fn must keep one row per sample)"
        )
    if target == "label":
        if labels is None:
            raise ValueError(
                'target="label" needs labels, but the dataloader yields batches '
                'without them; yield (inputs, labels) or use target="predicted"'
            )
        labels = torch.as_tensor(labels).to(device)
        if labels.is_floating_point() or labels.shape != (n,):
            raise ValueError(
                f"the labels of a batch must be integer class indices of shape ({n},), "
                f"got dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        targets = labels.long()
    else:
        with torch.no_grad():
            as_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
            targets = resolve_target(run_forward(model, as_tuple), None)
    values: dict[tuple[str, str], list[float]] = {}
    seconds: dict[str, float] = {}
    for method, explainer in explainers.items():
        _synchronize(device)
        start = time.perf_counter()
        with torch.enable_grad():
            attributions = _call_explainer(
                explainer, inputs, targets, seed, (batch_id, "explainer", method)
            )
        _synchronize(device)
        seconds[method] = (time.perf_counter() - start) / n
        if isinstance(attributions, Tensor):
            attributions = attributions.detach()
        elif isinstance(attributions, tuple):
            attributions = tuple(
                a.detach() if isinstance(a, Tensor) else a for a in attributions
            )
        for metric_name, metric in metrics.items():
            # the same draws for every method: the methods are compared on equal terms
            keywords = _generator_keywords(
                metric, seed, batch_id, "metric", metric_name
            )
            result = metric(model, inputs, attributions, target=targets, **keywords)
            values[method, metric_name] = _as_values(result, n, metric_name)
        del attributions
    rows = empty_rows()
    for position, index in enumerate(indices):
        for method in explainers:
            for metric_name in metrics:
                rows["index"].append(index)
                rows["method"].append(method)
                rows["metric"].append(metric_name)
                rows["value"].append(values[method, metric_name][position])
                rows["seconds"].append(seconds[method])
    return rows


def _progress_label(explainers: Mapping[str, Any]) -> str:
    """The progress bar's label: the method's name, or how many methods run."""
    names = list(explainers)
    if len(names) == 1:
        return f"evaluate {names[0]}"
    return f"evaluate {len(names)} methods"
