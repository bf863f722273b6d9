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
import math
import os
import pathlib
import stat
import struct

import ml_dtypes
import numpy as np

from dlm.config import ConfigError
from dlm.folders import plain_file_name

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def _plain_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def check_header(header, where: str, data_bytes: int) -> tuple[dict, dict]:
    """The tensors of a parsed safetensors header, every field checked before anything is
    allocated: a JSON object of name -> {dtype: a known name, shape: non-negative integers,
    data_offsets: [begin, end] integers with end - begin = the shape's bytes}, the tensors inside
    the `data_bytes` after the header and not overlapping; `__metadata__` an object of strings.
    Anything else is one ConfigError sentence naming `where` and the tensor. Returns (tensors,
    metadata)."""
    if not isinstance(header, dict):
        raise ConfigError(f"{where} has a header that is a JSON {type(header).__name__}, not an object: the file is not safetensors.")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ConfigError(f"{where} has a __metadata__ that is not an object of strings: the header is damaged.")
    spans = []
    for name, t in header.items():
        bad = lambda what: ConfigError(f"Tensor {name[:80]!r} in {where} has {what}: the header is damaged or not safetensors.")
        if not isinstance(t, dict):
            raise bad(f"an entry that is a JSON {type(t).__name__}, not an object")
        dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if not isinstance(dtype, str):
            raise bad(f"dtype {dtype!r}, not a name")
        if dtype not in DTYPES:
            raise ConfigError(f"Tensor {name[:80]!r} in {where} has dtype {dtype[:20]}, which dlm does not read.")
        if not isinstance(shape, list) or len(shape) > 16 or not all(_plain_int(d) and d >= 0 for d in shape):
            raise bad(f"shape {str(shape)[:60]}, not a list of at most 16 non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_plain_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"data_offsets {str(offsets)[:60]}, not [begin, end] with 0 <= begin <= end")
        need = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if need != offsets[1] - offsets[0]:
            raise bad(f"{offsets[1] - offsets[0]} bytes for shape {shape} {dtype} ({need} bytes)")
        if offsets[1] > data_bytes:
            raise ConfigError(f"{where} holds {data_bytes} bytes of data but tensor {name[:80]!r} ends at byte {offsets[1]}: "
                              "the file is truncated; download it again.")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1:
            raise ConfigError(f"Tensors {n0[:80]!r} and {n1[:80]!r} in {where} overlap (bytes {b1} to {min(e0, e1)}): the header is damaged.")
    return header, meta or {}


def regular_file(path: pathlib.Path, what: str) -> None:
    """`path` exists and is a regular file (not a FIFO, device or folder, which could block or
    never end), checked with stat before anything opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{str(path)!r} does not exist; the checkpoint folder is missing this {what}.") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{str(path)!r} is not a regular file; a checkpoint's {what} must be one.")


class SafetensorsFile:
    """The header of one .safetensors file, checked against the file's size; `read(name)` reads a
    tensor."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        regular_file(self.path, "shard")
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConfigError(f"{str(self.path)!r} is {size} bytes, too short to be a safetensors file (truncated?).")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ConfigError(f"{str(self.path)!r} declares a {n}-byte header but holds {size} bytes: the file is truncated or not safetensors.")
            try:
                header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise ConfigError(f"{str(self.path)!r} has a header that is not JSON: the file is damaged or not safetensors.") from None
            except _Duplicate as e:
                raise ConfigError(f"{str(self.path)!r} names {str(e.args[0])[:80]!r} twice in its header: the file is damaged.") from None
        self.base = 8 + n
        self.tensors, self.metadata = check_header(header, repr(str(self.path)), size - self.base)

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
            regular_file(index, "index")
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
                raise ConfigError(f"{str(index)!r} is not a safetensors index (no weight_map).") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConfigError(f"{str(index)!r} has a weight_map that is not an object of file names.")
            files = {}
            for key, fname in weight_map.items():
                if not plain_file_name(fname):
                    raise ConfigError(f"{str(index)!r} names {fname[:80]!r} for {key[:80]!r}: a shard must be a plain file name "
                                      "inside the checkpoint folder.")
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
