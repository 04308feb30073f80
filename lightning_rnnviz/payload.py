"""The probe set's format: one recording's explorer data as one blob, for TensorBoard and the HTML export.

numpy only: the callback's worker writes it, the TensorBoard plugin serves it as it is, and the explorer's
JavaScript (``lightning_rnnviz/explorer/static/explorer.js``, ``decodePayload``) reads it in the browser.

A blob is::

    b"RNNVIZP1"                      8 bytes, the magic (the format and its version)
    header length N                  uint32, little-endian
    header                           N bytes of UTF-8 JSON
    zeros                            up to the next multiple of 4 bytes from the blob's start
    data                             float32 arrays, little-endian, C order, one after another

The header names each array by a reference ``{"offset": bytes into the data section, "shape": [...]}``
wherever it is used; offsets are multiples of 4, so the browser can view the data as a ``Float32Array``
without a copy. What the header holds besides those references is described in ``docs/explorer.md``.

Example::

    >>> import numpy as np
    >>> packer = Packer()
    >>> header = {"step": 3, "hidden": packer.add(np.arange(6, dtype=np.float32).reshape(2, 3))}
    >>> blob = packer.finish(header)
    >>> read, array = unpack(blob)
    >>> read["step"], array(read["hidden"]).tolist()
    (3, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

MAGIC = b"RNNVIZP1"
FORMAT = "rnnviz-probe-set"
VERSION = 1

Ref = dict[str, Any]  # {"offset": int, "shape": list[int]}


class Packer:
    """Collects float32 arrays for one blob; :meth:`add` gives the reference the header stores."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, array: Any) -> Ref:
        """Keep ``array`` (anything numpy reads; converted to little-endian float32) and return its
        reference."""
        data = np.ascontiguousarray(np.asarray(array, dtype="<f4"))
        ref = {"offset": self._size, "shape": list(data.shape)}
        raw = data.tobytes()
        self._parts.append(raw)
        self._size += len(raw)
        return ref

    @property
    def data_bytes(self) -> int:
        """The size of the arrays kept so far."""
        return self._size

    def finish(self, header: Mapping[str, Any]) -> bytes:
        """The blob: ``header`` (``format``, ``version`` and ``bytes`` added) and the arrays kept."""
        fields = {"format": FORMAT, "version": VERSION, **header, "bytes": 0}
        for _ in range(3):  # the size is in the header, whose length depends on it: settles in two rounds
            text = json.dumps(fields, separators=(",", ":"), allow_nan=False).encode()
            start = _aligned(len(MAGIC) + 4 + len(text))
            total = start + self._size
            if fields["bytes"] == total:
                break
            fields["bytes"] = total
        head = MAGIC + struct.pack("<I", len(text)) + text
        return b"".join([head, b"\0" * (start - len(head)), *self._parts])  # one copy of the arrays


def unpack(blob: bytes) -> tuple[dict[str, Any], Callable[[Ref], np.ndarray]]:
    """The header of ``blob`` and a function that gives the array of a reference (a read-only view).

    Raises:
        ValueError: ``blob`` is not a probe set of this version, or a reference points outside it.
    """
    if len(blob) < len(MAGIC) + 4 or not blob.startswith(MAGIC):
        raise ValueError("not a probe set of lightning_rnnviz (no RNNVIZP1 magic)")
    (length,) = struct.unpack_from("<I", blob, len(MAGIC))
    end = len(MAGIC) + 4 + length
    if end > len(blob):
        raise ValueError(f"the probe set's header runs past its end ({end} > {len(blob)} bytes)")
    header = json.loads(blob[len(MAGIC) + 4 : end].decode())
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"a probe set of format {header.get('format')!r} version {header.get('version')!r}; "
                         f"this lightning_rnnviz reads {FORMAT!r} version {VERSION}")
    start = _aligned(end)
    data = memoryview(blob)[start:]

    def array(ref: Ref) -> np.ndarray:
        shape = tuple(int(n) for n in ref["shape"])
        offset, count = int(ref["offset"]), int(np.prod(shape, dtype=np.int64))
        if offset < 0 or offset % 4 or offset + 4 * count > len(data):
            raise ValueError(f"array reference {ref} lies outside the probe set's {len(data)} data bytes")
        return np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape)

    return header, array


def _aligned(size: int) -> int:
    return (size + 3) // 4 * 4
