"""Serving a locus plan, or locus's EPLB, through vLLM's EPLB policy interface.

vLLM asks a policy class for ``rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks, old_global_expert_indices=None)`` (vLLM 0.14 and later pass the current map as a sixth
argument; 0.13 passes five), one row per MoE layer. What it takes back changed with vLLM 0.19:
from 0.19 on, ``physical_to_logical_map`` alone (vLLM derives the other two arrays); before,
``(physical_to_logical_map, logical_to_physical_map, logical_replica_count)``. The policies here
answer in the form the installed vLLM's abstract policy declares (the current one, the map alone,
without vLLM). ``plan_policy(path)`` returns a policy that answers with the plan exported by
``locus map export --to vllm`` (whatever the load); ``LocusEplbPolicy`` runs DeepSeek's EPLB in C++
on vLLM's load, keeping an expert that stays on its GPU in its slot. Neither imports vLLM or torch before it is used, so the module loads without them.
"""

from __future__ import annotations

import inspect
import json
import logging
import typing
from typing import Any, Tuple, Union

import numpy as np

from . import FormatError, InvalidInputError, _array, _core, _io_error, _path_text, rebalance_experts

try:  # vLLM's abstract base, when vLLM is installed
    from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy as _Base
except Exception:  # noqa: BLE001 - any import failure means "no vLLM"
    _Base = object


def _returns_map_only(base: type) -> bool:
    """Whether vLLM's abstract policy `base` takes back physical_to_logical_map alone (vLLM 0.19 and
    later, and the answer without vLLM) rather than the three arrays (vLLM 0.13 to 0.18)."""
    method = getattr(base, "rebalance_experts", None)
    if method is None:
        return True
    try:
        ret = inspect.signature(method).return_annotation
    except (TypeError, ValueError):
        return True
    text = ret if isinstance(ret, str) else repr(ret)
    return not (typing.get_origin(ret) is tuple or text.startswith(("tuple", "Tuple", "typing.Tuple")))


def _answer(arrays: Tuple[np.ndarray, np.ndarray, np.ndarray], like: Any) -> Union[Any, Tuple[Any, ...]]:
    """The arrays in the form the installed vLLM takes back, on `like`'s device."""
    out = _to_torch(arrays, like)
    return out[0] if _returns_map_only(_Base) else out


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


def _integers(value: Any, ndim: int) -> bool:
    """Whether `value` (parsed JSON) is a rectangular `ndim`-dimensional list of integers: JSON
    integers only (NumPy would truncate 0.5, read "0" and take true as 1)."""
    if ndim == 0:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, list) and all(_integers(v, ndim - 1) for v in value)


def read_vllm_arrays(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three arrays of a ``locus map export --to vllm`` file, as int64 NumPy arrays, checked to
    describe one placement: every slot holds an expert, each expert's replica count and slot list
    agree with the slots (vLLM pads the list with -1)."""
    return _read_vllm(path)[:3]


def _read_vllm(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Union[int, None]]:
    """read_vllm_arrays' arrays and the ranks the plan was made for (``num_ranks``; None in files
    written before the export recorded it)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise _io_error(path, e) from None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"locus: format error: {_path_text(path)}: not JSON ({e})") from None
    keys = ("physical_to_logical_map", "logical_to_physical_map", "logical_replica_count")
    missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise InvalidInputError(f"locus: invalid input: {_path_text(path)} has no {missing[0]!r} array (not a vLLM export)")
    arrays = []
    for k, ndim in zip(keys, (2, 3, 2)):
        a = None
        if _integers(doc[k], ndim):
            try:
                a = np.asarray(doc[k], np.int64)
            except (TypeError, ValueError, OverflowError):
                a = None
        if a is None or a.ndim != ndim:
            raise FormatError(f"locus: format error: {_path_text(path)}: {k} is not a {ndim}-dimensional array of integers")
        arrays.append(a)
    phy2log, log2phy, count = arrays
    layers, experts = count.shape
    if phy2log.shape[0] != layers or log2phy.shape[:2] != count.shape or experts == 0 or phy2log.shape[1] == 0:
        raise FormatError(f"locus: format error: {_path_text(path)}: the three arrays disagree on layers and experts")
    slots = phy2log.shape[1]
    bad = np.argwhere((phy2log < 0) | (phy2log >= experts))
    if bad.size:
        l, p = bad[0]
        raise FormatError(f"locus: format error: {_path_text(path)}: layer {l} slot {p} holds expert {phy2log[l, p]}, "
                          f"not one of the {experts} experts")
    for l in range(layers):
        held = np.bincount(phy2log[l], minlength=experts)
        for e in range(experts):
            want = np.flatnonzero(phy2log[l] == e)
            row = log2phy[l, e]
            n = int(count[l, e])
            if n == 0:
                raise FormatError(f"locus: format error: {_path_text(path)}: layer {l} expert {e} has no slot (vLLM could "
                                  "not route its tokens)")
            if n != held[e] or n > row.shape[0] or sorted(row[:n].tolist()) != want.tolist() or (row[n:] != -1).any():
                raise FormatError(f"locus: format error: {_path_text(path)}: layer {l} expert {e}: logical_replica_count "
                                  f"{n} and logical_to_physical_map {row.tolist()} disagree with the {held[e]} "
                                  f"slot(s) {want.tolist()} of physical_to_logical_map")
    ranks = doc.get("num_ranks")
    if ranks is not None and (not _integers(ranks, 0) or ranks <= 0):
        raise FormatError(f"locus: format error: {_path_text(path)}: num_ranks is {ranks!r}, not a positive integer")
    if ranks is not None and slots % ranks:
        raise FormatError(f"locus: format error: {_path_text(path)}: num_ranks {ranks} does not divide its {slots} slots")
    return phy2log, log2phy, count, ranks


def plan_policy(path: str) -> type:
    """A vLLM EPLB policy class that returns the plan in `path` for every rebalance.

    vLLM asks the one policy for each model it balances, the served model first, then a MoE draft
    model of speculative decoding (DeepSeek's MTP layer) with its own layers. Once the plan has
    answered for the served model, a model of the plan's experts, slots and ranks but other layers
    is such a draft model, which the plan does not cover: it gets DeepSeek's EPLB
    (LocusEplbPolicy), said once in vLLM's log. Any other shape is refused."""
    phy2log, log2phy, count, plan_ranks = _read_vllm(path)

    class LocusPlanPolicy(_Base):  # type: ignore[misc, valid-type]
        served_plan = False  # the plan has answered for the served model
        draft_logged = False

        @classmethod
        def rebalance_experts(
            cls,
            weight: Any,
            num_replicas: int,
            num_groups: int,
            num_nodes: int,
            num_ranks: int,
            old_global_expert_indices: Any = None,
        ):
            shape = tuple(np.shape(weight))
            other_layers_only = (
                len(shape) == 2
                and shape[1] == count.shape[1]
                and num_replicas == phy2log.shape[1]
                and num_ranks > 0
                and num_replicas % num_ranks == 0
                and (plan_ranks is None or num_ranks == plan_ranks)
            )
            if other_layers_only and shape[0] == count.shape[0]:
                cls.served_plan = True
                return _answer((phy2log, log2phy, count), weight)
            if other_layers_only and cls.served_plan:
                if not cls.draft_logged:
                    cls.draft_logged = True
                    logging.getLogger("locus.vllm").warning(
                        "locus: the plan in %s covers the served model's %d MoE layers; vLLM also balances a "
                        "model of %d MoE layers (a draft model), which gets DeepSeek's EPLB",
                        _path_text(path), count.shape[0], shape[0])
                return LocusEplbPolicy.rebalance_experts(
                    weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices)
            layers, experts = (shape + (0, 0))[:2]
            on = f" on {plan_ranks} ranks" if plan_ranks is not None else ""
            raise InvalidInputError(
                f"locus: invalid input: the plan in {_path_text(path)} is {count.shape[0]} layers × {count.shape[1]} experts "
                f"in {phy2log.shape[1]} slots{on}; vLLM asks for {layers} × {experts} in {num_replicas} slots on "
                f"{num_ranks} ranks"
            )

    return LocusPlanPolicy


class LocusEplbPolicy(_Base):  # type: ignore[misc, valid-type]
    """DeepSeek's EPLB (locus's C++ re-implementation) as a vLLM policy; with vLLM's map in service
    (the sixth argument), an expert that stays on its GPU keeps its slot."""

    @classmethod
    def rebalance_experts(
        cls,
        weight: Any,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: Any = None,
    ):
        arrays = rebalance_experts(_from_torch(weight), num_replicas, num_groups, num_nodes, num_ranks)
        if old_global_expert_indices is not None:
            # vLLM's map in service: an expert EPLB leaves on its GPU keeps its slot (as vLLM's own
            # policy does), so that only the experts that change GPU move; the loads are EPLB's.
            arrays = _kept_in_place(arrays[0], _ints(old_global_expert_indices), num_ranks, int(np.shape(weight)[1]))
        return _answer(arrays, weight)


def _ints(a: Any) -> np.ndarray:
    """vLLM's current map as int32 expert ids: a value that is no whole number or does not fit is
    refused (a cast wrapped 2^40 and truncated 0.5 to an id)."""
    if type(a).__module__.startswith("torch"):
        a = a.detach().cpu().numpy()
    return _array(a, np.int32, 2, "old_global_expert_indices")


def _kept_in_place(
    phy2log: np.ndarray, old: np.ndarray, num_ranks: int, experts: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays of `phy2log` with each rank's slots reordered so that an expert the rank holds in
    `old` keeps its slot there (placement::keep_slots_in_place)."""
    if old.shape != phy2log.shape:
        raise InvalidInputError(f"locus: invalid input: vLLM's current map has shape {old.shape}, the new one "
                                f"{phy2log.shape}")
    layers, slots = phy2log.shape
    shape = (layers, num_ranks, slots // num_ranks)
    try:  # EPLB's new map is valid: a map the core refuses is vLLM's current one
        kept = _core._keep_slots_in_place(np.ascontiguousarray(old.reshape(shape)),
                                          phy2log.astype(np.int32).reshape(shape), experts)
    except InvalidInputError as e:
        raise InvalidInputError(f"locus: invalid input: vLLM's current map (old_global_expert_indices): "
                                f"{str(e).removeprefix('locus: invalid input: ')}") from None
    doc = json.loads(_core._export_text(kept, experts, "vllm", list(range(layers)), layers, 0))
    return tuple(np.asarray(doc[k], np.int64)  # type: ignore[return-value]
                 for k in ("physical_to_logical_map", "logical_to_physical_map", "logical_replica_count"))


def register(path: str) -> type:
    """Makes vLLM's EPLB use the plan in `path`: replaces the "default" entry of vLLM's policy
    table (vLLM 0.13 and later; vLLM chooses policies from that table by name and loads none from
    a module path). The EPLB state lives in vLLM's worker processes, so this must run in each of
    them before the model is loaded: from a vLLM general plugin (entry point group
    ``vllm.general_plugins``, which vLLM loads in every process). Returns the policy class."""
    try:
        from vllm.distributed.eplb import policy as vllm_policy
    except ImportError as e:
        raise ImportError(f"locus: vLLM's EPLB policy table is missing ({e}); locus.vllm.register needs vLLM "
                          "0.13 or later") from None

    cls = plan_policy(path)
    vllm_policy.EPLB_POLICIES["default"] = cls
    return cls
