"""The settings of a run and their fingerprint.

A resumed run must compute exactly what the first run computed, so everything that
decides the rows is described as plain JSON and hashed: the method and metric names
(in order), each explainer and metric (class or function name, the simple
attributes stored on the object — e.g. ``n_steps``, ``pgd_steps`` — and the
arguments bound with ``functools.partial``), a SHA-256 of the model's parameters and
buffers, the dataset class and length, the batch size, the target mode and the seed.
The fingerprint cannot see inside closures: a lambda that reads a changed global
variable looks the same.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

_MAX_DEPTH = 3
_NAMED = {"explainer_settings": "explainers", "metric_settings": "metrics"}


def qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}" if module else name


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.reshape(-1).contiguous().cpu()
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_model(model: Any) -> dict[str, Any]:
    if isinstance(model, nn.Module):
        return {
            "class": qualname(type(model)),
            "state_sha256": tensor_digest(model.state_dict()),
        }
    return {"callable": qualname(model)}


def describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of ``obj`` (see the module docstring)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(obj, Tensor):
        return {
            "tensor": str(obj.dtype),
            "shape": list(obj.shape),
            "sha256": tensor_digest({"": obj}),
        }
    if isinstance(obj, nn.Module):
        return {"module": qualname(type(obj))}
    if isinstance(obj, (torch.device, torch.dtype)):
        return str(obj)
    if depth >= _MAX_DEPTH:
        return {"type": qualname(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [describe(item, depth + 1) for item in obj]
    if isinstance(obj, Mapping):
        return {str(key): describe(value, depth + 1) for key, value in obj.items()}
    if isinstance(obj, functools.partial):
        return {
            "partial": describe(obj.func, depth + 1),
            "args": [describe(arg, depth + 1) for arg in obj.args],
            "keywords": {k: describe(v, depth + 1) for k, v in obj.keywords.items()},
        }
    if inspect.ismethod(obj):
        return {
            "method": obj.__func__.__qualname__,
            "self": describe(obj.__self__, depth + 1),
        }
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj):
        return {"function": qualname(obj)}
    attributes = {
        key: describe(value, depth + 1)
        for key, value in sorted(getattr(obj, "__dict__", {}).items())
        if not key.startswith("__")
    }
    return {"object": qualname(type(obj)), "attributes": attributes}


def fingerprint(settings: dict[str, Any]) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable names of the settings that differ, e.g. ``explainers['ig']``."""
    found = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and key in _NAMED:
            for name in sorted(set(old) | set(new)):
                if old.get(name) != new.get(name):
                    state = (
                        "added"
                        if name not in old
                        else "removed"
                        if name not in new
                        else "changed"
                    )
                    found.append(f"{_NAMED[key]}[{name!r}] {state}")
        elif isinstance(old, dict) or isinstance(new, dict):
            found.append(f"{key} changed")
        else:
            found.append(f"{key} {old!r} -> {new!r}")
    return found
