"""Reading the expert statistics serving engines record, as ``[layers, experts]`` loads that
``locus.plan`` (linear, round_robin, eplb) and ``locus.rebalance_experts`` plan from.

- TensorRT-LLM (``EXPERT_STATISTIC_PATH``): a folder with ``meta_info.json`` and one
  ``rank*.safetensors`` per rank whose tensors are named ``"{iteration}_{layer}"`` and hold
  routed-token counts per expert. Read by the library's C++ reader (no torch needed).
- SGLang expert distribution recorder: a dump (dict or ``.pt`` file, which needs torch) with
  ``logical_count [steps, hidden layers, experts]`` (or ``[hidden layers, experts]``).
- Per-token routed experts ``[tokens, hidden layers, k]`` (vLLM / SGLang return them per request,
  a dense layer's row all expert 0): ``locus.load_routed_experts(..., layer_ids=moe_layers)`` or
  ``locus.trace_from_arrays`` on the MoE layers, then ``locus.expert_load``.

The loads are plain arrays, returned with the model layer id of each row: pass them on to the
plan, whose exports number the engines' layers by them (dense layers included), as ``locus plan
--load`` does::

    layer_ids, load = locus.engines.load_trtllm_statistics(path)
    plan = locus.plan(load, nodes, gpus_per_node, layer_ids=layer_ids, hidden_layers=num_hidden_layers)

(``hidden_layers``: the model's ``num_hidden_layers``, for dense layers after the last MoE layer;
for an SGLang dump, ``logical_count``'s hidden-layer dimension.)
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional, Tuple

import numpy as np

from . import FormatError, InvalidInputError, _checked, _core, _int_list, _io_error, _path_text


@_checked
def load_trtllm_statistics(
    path: str, iter_start: Optional[int] = None, iter_stop: Optional[int] = None
) -> Tuple[List[int], np.ndarray]:
    """TensorRT-LLM expert statistics: ``(model layer ids, load [layers, experts])`` summed over
    ranks and iterations ``[iter_start, iter_stop)`` (default: all), read by the library's reader
    (the one ``locus plan --load`` uses): every tensor is checked, whatever its iteration."""
    if not os.path.isdir(path):
        raise InvalidInputError(f"locus: invalid input: {_path_text(path)} is not a folder (TensorRT-LLM statistics are a folder "
                                "of meta_info.json and rank*.safetensors)")
    layers, load = _core._import_trtllm_statistics(path, iter_start, iter_stop)
    return list(layers), load


@_checked
def load_sglang_logical_count(dump: Any, moe_layers: Optional[List[int]] = None) -> Tuple[List[int], np.ndarray]:
    """SGLang's ``logical_count`` (a dump dict, a ``.pt``/``.json`` path, or the array itself):
    ``(model layer ids, load [layers, experts])`` summed over steps. Hidden layers without any
    routed token (dense layers) are dropped unless ``moe_layers`` names the layers to keep."""
    if isinstance(dump, (str, bytes, os.PathLike)):
        path = os.fsdecode(dump)
        shown = _path_text(path)
        if path.endswith(".json"):
            try:
                with open(path) as f:
                    dump = json.load(f)
            except OSError as e:
                raise _io_error(path, e) from None
            except (ValueError, RecursionError) as e:
                raise FormatError(f"locus: format error: {shown}: not JSON ({e})") from None
        elif path.endswith((".pt", ".pth")):
            try:
                import torch  # a .pt dump is a torch pickle
            except ImportError:
                raise InvalidInputError(f"locus: invalid input: {shown}: reading a .pt dump needs PyTorch; without it, "
                                        "pass the logical_count array or a .json dump") from None
            try:
                dump = torch.load(path, map_location="cpu", weights_only=True)
            except OSError as e:
                raise _io_error(path, e) from None
        else:  # any other path was read as a torch pickle: a .npy asked for torch
            raise InvalidInputError(f"locus: invalid input: {shown}: expected a .pt or .json dump of SGLang's "
                                    "expert distribution recorder")
    if isinstance(dump, dict):
        if "logical_count" not in dump:
            keys = sorted(map(repr, dump))  # keys of any type: sorted() of mixed ones raised TypeError
            raise InvalidInputError(f"locus: invalid input: the dump has no logical_count (keys: {', '.join(keys)})")
        dump = dump["logical_count"]
    if type(dump).__module__.startswith("torch"):
        dump = dump.detach().cpu().numpy()
    # Counts are integers or reals: a complex array lost its imaginary part with a warning, and
    # strings ("2") or booleans were read as numbers.
    try:
        raw = np.asarray(dump)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"locus: invalid input: logical_count is not an array of numbers ({e})") from None
    if raw.dtype.kind not in "iuf":
        raise InvalidInputError(f"locus: invalid input: logical_count holds {raw.dtype} values, not counts "
                                "(integers or reals)")
    count = raw.astype(np.float64)
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
        layers = _int_list(moe_layers, "moe_layers")  # a lone number or True (layer 1) is refused
        bad = [l for l in layers if not 0 <= l < count.shape[0]]
        if bad:  # -1 would index the last layer
            raise InvalidInputError(f"locus: invalid input: moe_layers {bad} are not among the {count.shape[0]} "
                                    "hidden layers of logical_count")
        if any(b <= a for a, b in zip(layers, layers[1:])):  # refused only later, at export
            raise InvalidInputError(f"locus: invalid input: moe_layers {layers} must ascend without repeats")
    if not layers:
        raise InvalidInputError(f"locus: invalid input: no layer of logical_count ({count.shape[0]} layers × "
                                f"{count.shape[1]} experts) has a routed token" if moe_layers is None
                                else "locus: invalid input: moe_layers is empty")
    return layers, count[layers]
