"""The safetensors format, read one tensor at a time and written one tensor at a time.

A file is an 8-byte little-endian header length n, n bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__"}), then the
data, tensors in row-major order at their offsets. Reading a tensor is one `pread` into a fresh
numpy buffer (no memory map: the pages of a mapped 16 GB file would count in the process's
memory until it closes), so a loader holds one tensor at a time. bfloat16 comes from ml_dtypes.
Nothing in a file is executed: it is bytes and JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

from dlm.config import ConfigError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
    """The header of one .safetensors file, checked against the file's size; `read(name)` reads a
    tensor."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise ConfigError(f"{str(self.path)!r} does not exist; the checkpoint folder is missing this shard.")
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConfigError(f"{str(self.path)!r} is {size} bytes, too short to be a safetensors file (truncated?).")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ConfigError(f"{str(self.path)!r} declares a {n}-byte header but holds {size} bytes: the file is truncated or not safetensors.")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConfigError(f"{str(self.path)!r} has a header that is not JSON: the file is damaged or not safetensors.") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.base = 8 + n
        self.tensors = header
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if self.base + end > size:
            raise ConfigError(f"{str(self.path)!r} is {size} bytes but its tensors need {self.base + end}: the file is truncated; download it again.")
        for name, t in header.items():
            if t["dtype"] not in DTYPES:
                raise ConfigError(f"{name!r} in {str(self.path)!r} has dtype {t['dtype']}, which dlm does not read.")

    def keys(self):
        return list(self.tensors)

    def shape(self, name: str) -> tuple:
        return tuple(self.tensors[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self.tensors[name]["dtype"]])

    def nbytes(self, name: str) -> int:
        b, e = self.tensors[name]["data_offsets"]
        return e - b

    def read(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        b, e = t["data_offsets"]
        out = np.empty(t["shape"], DTYPES[t["dtype"]])
        if out.nbytes != e - b:
            raise ConfigError(f"{name!r} in {str(self.path)!r} has {e - b} bytes for shape {t['shape']} {t['dtype']}: the header is inconsistent.")
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], self.base + b + done)
                if got <= 0:
                    raise ConfigError(f"{str(self.path)!r} ended while reading {name!r}: the file is truncated.")
                done += got
        finally:
            os.close(fd)
        return out


def write(path, tensors, metadata: dict | None = None) -> None:
    """Write `tensors` (an iterable of (name, shape, dtype, produce) where produce() returns the
    array) into one safetensors file, one tensor in memory at a time; into `path`.partial, then
    renamed."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)  # the data starts 8-byte aligned
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in tensors:
            a = np.ascontiguousarray(produce(), dtype=dtype)
            if a.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {a.shape}, declared {tuple(shape)}")
            f.write(a.tobytes())
    os.replace(tmp, path)


class Folder:
    """A checkpoint folder: `model.safetensors`, or shards listed by `model.safetensors.index.json`
    (every listed shard must exist, and every key must be in the shard the index names)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise ConfigError(f"{str(index)!r} is not a safetensors index (no weight_map).") from None
            files = {}
            for key, fname in weight_map.items():
                if fname not in files:
                    files[fname] = SafetensorsFile(self.path / fname)
                if key not in files[fname].tensors:
                    raise ConfigError(f"The index names {fname!r} for {key!r}, but that shard does not hold it: the index and the shards disagree.")
            self.where = {k: files[f] for k, f in weight_map.items()}
            extra = sorted(k for f in files.values() for k in f.tensors if k not in weight_map)
            if extra:
                raise ConfigError(f"The shard of {extra[0]!r} holds it but the index does not list it: the index and the shards disagree.")
        elif single.exists():
            f = SafetensorsFile(single)
            self.where = {k: f for k in f.tensors}
        else:
            found = sorted(p.name for p in self.path.glob("*"))[:6] if self.path.is_dir() else []
            what = "does not exist" if not self.path.exists() else f"holds no model.safetensors or model.safetensors.index.json (it has {found})"
            raise ConfigError(f"{str(self.path)!r} {what}; point at a Hugging Face checkpoint folder (safetensors only: "
                              "pickled .bin weights are not read).")

    def keys(self):
        return list(self.where)

    def __contains__(self, key):
        return key in self.where

    def shape(self, key):
        return self.where[key].shape(key)

    def dtype(self, key):
        return self.where[key].dtype(key)

    def nbytes(self, key):
        return self.where[key].nbytes(key)

    def read(self, key):
        return self.where[key].read(key)
