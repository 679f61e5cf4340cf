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
    except ValueError as e:
        raise FormatError(f"locus: format error: {path}: header is not JSON ({e})") from None
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise FormatError(f"locus: format error: {path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
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
    with open(meta_path) as f:
        meta = json.load(f)
    experts = int(meta["num_experts"])
    files = sorted(glob.glob(os.path.join(path, "rank*.safetensors")))
    if not files:
        raise InvalidInputError(f"locus: invalid input: {path} has no rank*.safetensors files")
    totals: Dict[int, np.ndarray] = {}
    for file in files:
        for key, counts in read_safetensors(file).items():
            try:
                it, layer = (int(x) for x in key.split("_"))
            except ValueError:
                raise FormatError(f"locus: format error: {file}: tensor name {key!r} is not ITERATION_LAYER") from None
            if (iter_start is not None and it < iter_start) or (iter_stop is not None and it >= iter_stop):
                continue
            if counts.shape != (experts,):
                raise FormatError(f"locus: format error: {file}: {key} has shape {counts.shape}, expected ({experts},)")
            totals[layer] = totals.get(layer, np.zeros(experts)) + counts.astype(np.float64)
    layers = sorted(totals)
    return layers, np.stack([totals[l] for l in layers]) if layers else np.zeros((0, experts))


def load_sglang_logical_count(dump: Any, moe_layers: List[int] = None) -> Tuple[List[int], np.ndarray]:
    """SGLang's ``logical_count`` (a dump dict, a ``.pt``/``.json`` path, or the array itself):
    ``(model layer ids, load [layers, experts])`` summed over steps. Hidden layers without any
    routed token (dense layers) are dropped unless ``moe_layers`` names the layers to keep."""
    if isinstance(dump, str):
        if dump.endswith(".json"):
            with open(dump) as f:
                dump = json.load(f)
        else:
            import torch  # a .pt dump is a torch pickle

            dump = torch.load(dump, map_location="cpu", weights_only=True)
    if isinstance(dump, dict):
        if "logical_count" not in dump:
            raise InvalidInputError(f"locus: invalid input: the dump has no logical_count (keys: {sorted(dump)})")
        dump = dump["logical_count"]
    if type(dump).__module__.startswith("torch"):
        dump = dump.detach().cpu().numpy()
    count = np.asarray(dump, np.float64)
    if count.ndim == 3:
        count = count.sum(axis=0)
    if count.ndim != 2:
        raise InvalidInputError(f"locus: invalid input: logical_count has shape {count.shape}; expected [steps, layers, experts]")
    layers = list(moe_layers) if moe_layers is not None else [l for l in range(count.shape[0]) if count[l].sum() > 0]
    return layers, count[layers]
