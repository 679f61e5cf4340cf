"""Reading the expert statistics serving engines record, as ``[layers, experts]`` loads that
``locus.plan`` (linear, round_robin, eplb) and ``locus.rebalance_experts`` plan from.

- TensorRT-LLM (``EXPERT_STATISTIC_PATH``): a folder with ``meta_info.json`` and one
  ``rank*.safetensors`` per rank whose tensors are named ``"{iteration}_{layer}"`` and hold
  routed-token counts per expert. Read with a small safetensors reader (no torch needed).
- SGLang expert distribution recorder: a dump (dict or ``.pt`` file, which needs torch) with
  ``logical_count [steps, hidden layers, experts]`` (or ``[hidden layers, experts]``).
- Per-token routed experts ``[tokens, layers, k]`` (vLLM / SGLang return them per request):
  ``locus.load_routed_experts`` or ``locus.trace_from_arrays``, then ``locus.expert_load``.
"""

from __future__ import annotations

import glob
import json
import math
import operator
import os
import struct
from typing import Any, Dict, List, Tuple

import numpy as np

from . import FormatError, InvalidInputError

_SAFETENSORS_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "I32": np.int32,
    "U32": np.uint32,
    "I64": np.int64,
    "U64": np.uint64,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a safetensors file (8-byte little-endian header size, JSON header of
    dtype/shape/data_offsets, then the data) as NumPy arrays."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise FormatError(f"locus: format error: {path}: too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise FormatError(f"locus: format error: {path}: header of {n} bytes runs past the end of the file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as e:
        raise FormatError(f"locus: format error: {path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"locus: format error: {path}: header is {type(header).__name__}, expected a JSON object")
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise FormatError(f"locus: format error: {path}: tensor {name} is {info!r:.40}, expected an object")
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise FormatError(f"locus: format error: {path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        offsets, shape = info.get("data_offsets"), info.get("shape")
        # Whole numbers only (JSON's true is an int to Python, 4.0 is not one).
        def whole(v: Any) -> bool:
            return type(v) is int and v >= 0

        if not (isinstance(offsets, list) and len(offsets) == 2 and all(whole(v) for v in offsets)):
            raise FormatError(f"locus: format error: {path}: tensor {name} has data_offsets {offsets!r:.40}, "
                              "expected [begin, end]")
        if not (isinstance(shape, list) and all(whole(v) for v in shape)):
            raise FormatError(f"locus: format error: {path}: tensor {name} has shape {shape!r:.40}, "
                              "expected a list of sizes")
        begin, end = offsets
        shape = tuple(shape)
        count = math.prod(shape)  # exact: np.prod wraps around at 2^63
        if not (0 <= begin <= end <= len(body)) or end - begin != count * np.dtype(dtype).itemsize:
            raise FormatError(f"locus: format error: {path}: tensor {name} has offsets {begin}..{end} that do not fit")
        out[name] = np.frombuffer(body[begin:end], dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()
    return out


def load_trtllm_statistics(path: str, iter_start: int = None, iter_stop: int = None) -> Tuple[List[int], np.ndarray]:
    """TensorRT-LLM expert statistics: ``(model layer ids, load [layers, experts])`` summed over
    ranks and iterations ``[iter_start, iter_stop)`` (default: all)."""
    meta_path = os.path.join(path, "meta_info.json")
    if not os.path.exists(meta_path):
        raise InvalidInputError(f"locus: invalid input: {path} has no meta_info.json (not a TensorRT-LLM statistics folder)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"locus: format error: {meta_path}: not JSON ({e})") from None
    experts = meta.get("num_experts") if isinstance(meta, dict) else None
    if type(experts) is not int or experts < 1:
        raise FormatError(f"locus: format error: {meta_path}: num_experts is {experts!r:.40}, expected a positive integer")
    files = sorted(glob.glob(os.path.join(path, "rank*.safetensors")))
    if not files:
        raise InvalidInputError(f"locus: invalid input: {path} has no rank*.safetensors files")
    totals: Dict[int, np.ndarray] = {}
    for file in files:
        for key, counts in read_safetensors(file).items():
            parts = key.split("_")
            if len(parts) != 2 or not all(x.isascii() and x.isdigit() for x in parts):
                raise FormatError(f"locus: format error: {file}: tensor name {key!r} is not ITERATION_LAYER")
            it, layer = (int(x) for x in parts)
            if (iter_start is not None and it < iter_start) or (iter_stop is not None and it >= iter_stop):
                continue
            if counts.shape != (experts,):
                raise FormatError(f"locus: format error: {file}: {key} has shape {counts.shape}, expected ({experts},)")
            counts = counts.astype(np.float64)
            if not (np.isfinite(counts).all() and (counts >= 0).all()):
                raise FormatError(f"locus: format error: {file}: {key} holds a negative or non-finite count")
            totals[layer] = totals.get(layer, np.zeros(experts)) + counts
    layers = sorted(totals)
    return layers, np.stack([totals[l] for l in layers]) if layers else np.zeros((0, experts))


def load_sglang_logical_count(dump: Any, moe_layers: List[int] = None) -> Tuple[List[int], np.ndarray]:
    """SGLang's ``logical_count`` (a dump dict, a ``.pt``/``.json`` path, or the array itself):
    ``(model layer ids, load [layers, experts])`` summed over steps. Hidden layers without any
    routed token (dense layers) are dropped unless ``moe_layers`` names the layers to keep."""
    if isinstance(dump, (str, os.PathLike)):
        path = os.fspath(dump)
        if path.endswith(".json"):
            try:
                with open(path) as f:
                    dump = json.load(f)
            except (ValueError, RecursionError) as e:
                raise FormatError(f"locus: format error: {path}: not JSON ({e})") from None
        else:
            import torch  # a .pt dump is a torch pickle

            dump = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(dump, dict):
        if "logical_count" not in dump:
            raise InvalidInputError(f"locus: invalid input: the dump has no logical_count (keys: {sorted(dump)})")
        dump = dump["logical_count"]
    if type(dump).__module__.startswith("torch"):
        dump = dump.detach().cpu().numpy()
    try:
        count = np.asarray(dump, np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"locus: invalid input: logical_count is not an array of numbers ({e})") from None
    if count.ndim == 3:
        count = count.sum(axis=0)
    if count.ndim != 2:
        raise InvalidInputError(f"locus: invalid input: logical_count has shape {count.shape}; expected [steps, layers, experts]")
    # A NaN or negative count would make its layer look dense (no positive sum) and vanish.
    if not (np.isfinite(count).all() and (count >= 0).all()):
        raise InvalidInputError("locus: invalid input: logical_count holds a negative or non-finite count")
    if moe_layers is None:
        layers = [l for l in range(count.shape[0]) if count[l].sum() > 0]
    else:
        layers = [operator.index(l) for l in moe_layers]
        bad = [l for l in layers if not 0 <= l < count.shape[0]]
        if bad:  # -1 would index the last layer
            raise InvalidInputError(f"locus: invalid input: moe_layers {bad} are not among the {count.shape[0]} "
                                    "hidden layers of logical_count")
    return layers, count[layers]
