"""Serving a locus plan, or locus's EPLB, through vLLM's EPLB policy interface.

vLLM asks a policy class for ``rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks)`` and takes back ``(physical_to_logical_map, logical_to_physical_map,
logical_replica_count)`` as torch tensors, one row per MoE layer. ``plan_policy(path)`` returns a
policy that answers with the plan exported by ``locus map export --to vllm`` (whatever the load);
``LocusEplbPolicy`` runs DeepSeek's EPLB in C++ on vLLM's load. Neither imports vLLM or torch
before it is used, so the module loads without them.
"""

from __future__ import annotations

import json
from typing import Any, Tuple

import numpy as np

from . import FormatError, InvalidInputError, rebalance_experts

try:  # vLLM's abstract base, when vLLM is installed
    from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy as _Base
except Exception:  # noqa: BLE001 - any import failure means "no vLLM"
    _Base = object


def _to_torch(arrays: Tuple[np.ndarray, ...], like: Any) -> Tuple[Any, ...]:
    """Torch tensors on `like`'s device when `like` is a torch tensor, NumPy arrays otherwise."""
    if type(like).__module__.startswith("torch"):
        import torch

        return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(like.device) for a in arrays)
    return arrays


def _from_torch(weight: Any) -> np.ndarray:
    if type(weight).__module__.startswith("torch"):
        return weight.detach().float().cpu().numpy()
    return np.asarray(weight, np.float32)


def read_vllm_arrays(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three arrays of a ``locus map export --to vllm`` file, as int64 NumPy arrays."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"locus: format error: {path}: not JSON ({e})") from None
    keys = ("physical_to_logical_map", "logical_to_physical_map", "logical_replica_count")
    missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise InvalidInputError(f"locus: invalid input: {path} has no {missing[0]!r} array (not a vLLM export)")
    arrays = []
    for k, ndim in zip(keys, (2, 3, 2)):
        try:
            a = np.asarray(doc[k], np.int64)
        except (TypeError, ValueError, OverflowError):
            a = None
        if a is None or a.ndim != ndim:
            raise FormatError(f"locus: format error: {path}: {k} is not a {ndim}-dimensional array of integers")
        arrays.append(a)
    phy2log, log2phy, count = arrays
    layers = count.shape[0]
    if phy2log.shape[0] != layers or log2phy.shape[:2] != count.shape:
        raise FormatError(f"locus: format error: {path}: the three arrays disagree on layers and experts")
    return phy2log, log2phy, count


def plan_policy(path: str) -> type:
    """A vLLM EPLB policy class that returns the plan in `path` for every rebalance."""
    phy2log, log2phy, count = read_vllm_arrays(path)

    class LocusPlanPolicy(_Base):  # type: ignore[misc, valid-type]
        @classmethod
        def rebalance_experts(cls, weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int):
            shape = tuple(np.shape(weight))
            if shape != count.shape or num_replicas != phy2log.shape[1] or num_ranks <= 0 or num_replicas % num_ranks:
                layers, experts = (shape + (0, 0))[:2]
                raise InvalidInputError(
                    f"locus: invalid input: the plan in {path} is {count.shape[0]} layers × {count.shape[1]} experts "
                    f"in {phy2log.shape[1]} slots; vLLM asks for {layers} × {experts} in {num_replicas} slots on "
                    f"{num_ranks} ranks"
                )
            return _to_torch((phy2log, log2phy, count), weight)

    return LocusPlanPolicy


class LocusEplbPolicy(_Base):  # type: ignore[misc, valid-type]
    """DeepSeek's EPLB (locus's C++ re-implementation) as a vLLM policy."""

    @classmethod
    def rebalance_experts(cls, weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int):
        return _to_torch(rebalance_experts(_from_torch(weight), num_replicas, num_groups, num_nodes, num_ranks), weight)


def register(path: str) -> type:
    """Makes vLLM's EPLB use the plan in `path`: replaces the "default" entry of vLLM's policy
    table (vLLM chooses policies from that table by name and loads none from a module path, so
    this must run in the serving process before the engine starts, e.g. from a vLLM general
    plugin). Returns the policy class."""
    from vllm.distributed.eplb import policy as vllm_policy

    cls = plan_policy(path)
    vllm_policy.EPLB_POLICIES["default"] = cls
    return cls
