"""Streaming safetensors: read a (sharded) Hugging Face checkpoint and write one, tensor by tensor.

Format (safetensors): an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``
(offsets relative to the byte buffer after the header), then the raw little-endian tensor bytes.
A sharded checkpoint is ``model-0000k-of-0000n.safetensors`` files plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map":
{name: file}}``); an unsharded one is a single ``model.safetensors``.

Reading is one tensor at a time: ``safetensors.safe_open(framework="numpy")`` lists each
file's tensors with their dtypes and shapes, and the bytes of one tensor are read straight into
one numpy array at the offsets in the header (``np.fromfile``): safe_open's own ``get_tensor``
holds a tensor twice while reading (bytes, then the array), and numpy has no bfloat16, for which
``ml_dtypes.bfloat16`` (shipped with jax) is used. Every tensor is returned as float32
(F16/BF16/F64 are converted); other dtypes (integers, float8) are a one-line ConfigError.
Writing streams too: the header is computed from the shapes up front, then each tensor is
fetched and appended, so host memory holds one tensor at a time.

Example::

    from jaxlm.convert.safetensors_io import Reader
    with Reader("hf_model_dir") as r:
        w = r.get("model.embed_tokens.weight")        # float32 [V, D]
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxlm.config import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_FLOAT = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": ml_dtypes.bfloat16}


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}; fix or replace that file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object; fix or replace that file")
    return data


def weight_map(hf_dir: str) -> dict[str, str]:
    """{tensor name: file path} of the checkpoint in ``hf_dir`` (ConfigError if a file is
    missing)."""
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        wmap = _read_json(index).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise ConfigError(f"{index} has no weight_map; fix or replace that file")
        out = {name: os.path.join(hf_dir, f) for name, f in wmap.items()}
        for path in sorted(set(out.values())):
            if not os.path.isfile(path):
                raise ConfigError(f"missing shard {os.path.basename(path)} in {hf_dir} (listed "
                                  f"in {INDEX}); download it again")
        return out
    single = os.path.join(hf_dir, SINGLE)
    if not os.path.isfile(single):
        raise ConfigError(f"no {SINGLE} or {INDEX} in {hf_dir}; point at a Hugging Face model "
                          "directory saved with safetensors")
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def _header(path: str) -> tuple[int, dict]:
    """(offset of the byte buffer, header dict) of one safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


class Reader:
    """One tensor at a time from a Hugging Face checkpoint directory, as float32 numpy."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        self.map = weight_map(hf_dir)
        self._open: dict[str, object] = {}
        self._headers: dict[str, tuple[int, dict]] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def _handle(self, path: str):
        if path not in self._open:
            handle = safe_open(path, framework="numpy")
            self._open[path] = handle.__enter__()
        return self._open[path]

    def names(self) -> list[str]:
        return list(self.map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as float32 (ConfigError for a dtype jaxlm cannot represent)."""
        path = self.map[name]
        dtype = self._handle(path).get_slice(name).get_dtype()
        if dtype not in _FLOAT:
            raise ConfigError(f"tensor {name} in {os.path.basename(path)} has dtype {dtype}, "
                              f"which jaxlm cannot import (supported: {', '.join(_FLOAT)})")
        if path not in self._headers:
            self._headers[path] = _header(path)
        start, header = self._headers[path]
        info = header[name]
        begin, end = info["data_offsets"]
        dt = np.dtype(_FLOAT[dtype]).newbyteorder("<")
        if (end - begin) != dt.itemsize * int(np.prod(info["shape"], dtype=np.int64)):
            raise ConfigError(f"tensor {name} in {os.path.basename(path)}: its byte range does "
                              "not match its shape (a damaged file); download it again")
        arr = np.fromfile(path, dtype=dt, count=(end - begin) // dt.itemsize,
                          offset=start + begin).reshape(info["shape"])
        return arr if arr.dtype == np.float32 else arr.astype(np.float32)


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of (name, bytes) in order into shards of at most ``max_shard_bytes`` (a
    tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def write_file(path: str, names: list[str], shapes: dict, fetch) -> int:
    """Write float32 tensors ``names`` (``fetch(name)`` -> array of ``shapes[name]``) as one
    safetensors file, one tensor in memory at a time; returns the bytes of tensor data."""
    header, offset = {}, 0
    for name in names:
        n = 4 * int(np.prod(shapes[name], dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned buffer, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            arr = np.ascontiguousarray(fetch(name), dtype="<f4")
            if arr.shape != tuple(shapes[name]):
                raise ValueError(f"{name}: got shape {arr.shape}, expected {shapes[name]}")
            f.write(arr.tobytes())
    return offset


def write_sharded(hf_dir: str, shapes: dict, fetch, max_shard_bytes: int) -> list[str]:
    """``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` in ``hf_dir``;
    ``shapes`` {name: shape} in writing order. Returns the shard file names."""
    sizes = [(name, 4 * int(np.prod(s, dtype=np.int64))) for name, s in shapes.items()]
    shards = plan_shards(sizes, max_shard_bytes)
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    total, wmap = 0, {}
    for fname, names in zip(files, shards):
        total += write_file(os.path.join(hf_dir, fname), names, shapes, fetch)
        wmap.update({name: fname for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": wmap}
    with open(os.path.join(hf_dir, INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return files
