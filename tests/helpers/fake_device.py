"""A stand-in for a GPU on a machine without one: tensors that behave as if they lived on a device.

Inside :class:`FakeDevice`, a tensor made by :func:`to_device` (or computed from one) reports the device
``meta`` and follows the rules a CUDA tensor follows, strictly:

- ``.numpy()`` and ``np.asarray`` raise, as they do for a CUDA tensor (the code must copy to the host);
- an operation that mixes it with a host tensor of one or more dimensions raises (CUDA allows only 0-dim
  CPU tensors there); factories given ``device=<its device>`` make device tensors;
- every copy to the host (``.cpu()``, ``.to("cpu")``, ``.tolist()``, ``.item()``, ``float()``, ...) is
  counted in :attr:`FakeDevice.transfers` (bytes) and :attr:`FakeDevice.syncs` (how many).

So code that passes under it reduces on the device and copies only what it counts; the values are
computed on the CPU and are the same as a CPU run's.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from dataclasses import fields, is_dataclass, replace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

DEVICE = torch.device("meta")


class DeviceTensor(torch.Tensor):
    """A CPU tensor that stands for one on the device (see the module docstring)."""


def to_device(t: torch.Tensor) -> DeviceTensor:
    return t.detach().clone().as_subclass(DeviceTensor)


def record_to_device(record: Any, keep: tuple[str, ...] = ("lengths", "key_lengths")) -> Any:
    """A copy of a probe record with every tensor field but ``keep`` (which stay on the host) on the device."""
    assert is_dataclass(record)
    changes = {}
    for f in fields(record):
        if not f.init or f.name in keep:
            continue
        value = getattr(record, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = to_device(value)
        elif isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()):
            changes[f.name] = {k: to_device(v) for k, v in value.items()}
    return replace(record, **changes)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _is_device(value: Any) -> bool:
    return value == DEVICE or value == "meta"


def _is_host(value: Any) -> bool:
    return isinstance(value, (str, torch.device)) and torch.device(value).type == "cpu"


_TO_HOST = ("cpu", "tolist", "item", "__float__", "__int__", "__bool__", "__index__")
_REFUSED = ("numpy", "__array__")


class FakeDevice(TorchFunctionMode):
    """Makes :class:`DeviceTensor` s behave as device tensors and counts what crosses to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.transfers = 0  # bytes copied to the host
        self.syncs = 0  # copies to the host (each a synchronisation on a real device)
        self.largest = 0  # bytes of the largest single copy
        self.copies: list[tuple[int, tuple[int, ...], str]] = []  # (bytes, shape, where) of each copy

    def _count(self, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.transfers += size
        self.syncs += 1
        self.largest = max(self.largest, size)
        caller = next((f for f in traceback.extract_stack()[::-1] if "lightning_rnnviz" in f.filename), None)
        where = f"{caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}" if caller else "?"
        self.copies.append((size, tuple(tensor.shape), where))

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:
            return DEVICE if isinstance(args[0], DeviceTensor) else func(*args)
        on = any(isinstance(t, DeviceTensor) for t in _tensors((args, kwargs)))
        name = getattr(func, "__name__", "")
        method = getattr(torch.Tensor, name, None)
        is_method = method is not None and func == method
        if on and is_method and name in _REFUSED:
            raise TypeError(f"can't convert a device tensor to numpy (`{name}`); copy it to the host first")
        to_host = on and is_method and name in _TO_HOST
        to_device = "device" in kwargs and _is_device(kwargs["device"])
        if to_device:
            kwargs["device"] = "cpu"
        if on and is_method and name == "to":
            targets = list(args[1:]) + [kwargs.get("device")]
            if any(_is_host(a) for a in targets):
                to_host = True
            elif any(_is_device(a) for a in targets):
                args = tuple(a for a in args if not _is_device(a))
        elif not on and is_method and name == "to" and any(_is_device(a) for a in args[1:]):
            args, to_device = tuple(a for a in args if not _is_device(a)), True
        if on and not to_host:
            plain = [t for t in _tensors((args, kwargs)) if not isinstance(t, DeviceTensor) and t.dim() > 0]
            if plain:
                raise RuntimeError(f"`{name or func}` mixes device tensors with a host tensor of shape "
                                   f"{tuple(plain[0].shape)}: expected all tensors on the same device")
        if to_host:
            self._count(args[0])
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if to_host:
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        if on or to_device:
            return _wrap(out)
        return out


def _wrap(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out if isinstance(out, DeviceTensor) else out.as_subclass(DeviceTensor)
    if isinstance(out, tuple) and not hasattr(out, "_fields"):  # torch.return_types are structseqs
        return type(out)([_wrap(o) for o in out])
    if isinstance(out, list):
        return [_wrap(o) for o in out]
    return out
