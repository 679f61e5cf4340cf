# Typed interface of the C++ extension locus._core (the documented API is in locus/__init__.py).
import os
from typing import List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

#: A file path: str, bytes or os.PathLike (a NUL character in it is refused).
_Path = Union[str, bytes, "os.PathLike[str]"]

__version__: str
#: The library's limits the package checks arguments against: experts, top_k, trace_layers,
#: hidden_layers, ranks, anneal, expert_bytes, esft_top_k, eplb_slots, mtp_layers.
_limits: dict
_planners: List[str]

class LocusError(Exception): ...
class ConfigError(LocusError, ValueError): ...
class InvalidInputError(LocusError, ValueError): ...
class FormatError(LocusError, ValueError): ...
class LocusIOError(LocusError, OSError): ...

class Trace:
    @property
    def experts(self) -> int: ...
    @property
    def top_k(self) -> int: ...
    @property
    def layers(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def domains(self) -> List[str]: ...  # bytes that are not UTF-8 as surrogate escapes (os.fsdecode)
    @property
    def request_ids(self) -> List[int]:
        """Each request's id, in trace order (numbered 0, 1, ... where the source named requests by strings)."""
    @property
    def request_names(self) -> List[str]:
        """Each request's name, in trace order, where the source named requests by strings (a route JSONL's
        string req_ids, string request_ids given to trace_from_arrays); empty otherwise."""
    @property
    def model_layer_ids(self) -> List[int]:
        """Hidden-layer index of each traced layer (0..layers-1 when the source did not say)."""
    @property
    def has_model_layers(self) -> bool: ...
    @property
    def hidden_layers(self) -> int:
        """The model's hidden-layer count, dense layers included (0: unknown)."""
    def layer_ids(self, layer: int) -> npt.NDArray[np.uint16]:
        """Read-only view [tokens, top_k] of layer `layer`'s expert ids (no copy)."""
    def with_prefill_tokens(self, tokens: int) -> Trace: ...
    def _phase_counts(self) -> Tuple[int, int, int]:
        """Tokens marked (prefill, decode, unknown)."""
    def __getstate__(self) -> bytes:
        """The trace in the binary trace format: what pickle sends (round trips are exact)."""
    def __setstate__(self, state: bytes) -> None:
        """Rebuilds a trace from __getstate__'s bytes; damaged bytes raise FormatError."""

class WorkloadModel:
    """The workload-aware grouping model (request clusters, their nodes, the prefill classifier)."""
    @property
    def clusters(self) -> int: ...
    @property
    def nodes(self) -> int: ...
    @property
    def layers(self) -> int: ...
    @property
    def experts(self) -> int: ...
    @property
    def cluster_node(self) -> List[int]: ...
    def save(self, path: _Path) -> None:
        """Writes the model as versioned JSON (what `locus simulate --grouping` reads)."""
    def classify(self, trace: Trace, prefill_tokens: int) -> npt.NDArray[np.int64]:
        """Cluster of each request of `trace` from its first `prefill_tokens` tokens (-1: not confident)."""
    def __getstate__(self) -> bytes:
        """The model as its grouping JSON (UTF-8), what pickle sends: the copy classifies and groups
        exactly as the original (as with save(), which training request fell in which cluster is not kept)."""
    def __setstate__(self, state: bytes) -> None:
        """Rebuilds a model from __getstate__'s bytes; damaged bytes raise FormatError."""

def load_grouping(path: _Path) -> WorkloadModel: ...

def rebalance_experts(
    weight: npt.NDArray[np.float32], num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def _trace_from_arrays(
    ids: npt.NDArray[np.int32],
    experts: int,
    weights: npt.NDArray[np.float32],
    requests: npt.NDArray[np.uint64],
    phases: npt.NDArray[np.uint8],
    domains: npt.NDArray[np.uint32],
    domain_names: List[str],
    layer_ids: List[int],
    hidden_layers: int,
    request_names: List[str],
) -> Trace: ...
def _import_trtllm_statistics(
    path: _Path, iter_start: Optional[int] = None, iter_stop: Optional[int] = None
) -> Tuple[List[int], npt.NDArray[np.float64]]: ...
def read_trace(path: _Path) -> Trace: ...
def write_trace(trace: Trace, path: _Path) -> None: ...
def import_esft(path: _Path, experts: int = 64) -> Trace: ...
def split_by_request(trace: Trace, test_fraction: float, seed: int) -> Tuple[Trace, Trace]: ...
def expert_load(trace: Trace, decode_only: bool = False) -> npt.NDArray[np.float64]: ...
def layer_imbalance(trace: Trace) -> List[dict]: ...
def _plan_from_load(
    load: npt.NDArray[np.float64],
    nodes: int,
    gpus_per_node: int,
    slots_per_rank: Optional[int],
    redundant_slots: int,
    placement: str,
    eplb_groups: int,
) -> npt.NDArray[np.int32]: ...
def _redundant_slots_for_total(experts: int, ranks: int, total: int) -> int: ...
def _plan_from_trace(
    train: Trace,
    nodes: int,
    gpus_per_node: int,
    placement: str,
    redundant_slots: int,
    eplb_groups: int,
    clusters: int,
    seed: int,
    prefill_tokens: int,
    hedge_replicas: Optional[int],
    copies: str,
    anneal: int,
    fill_slack: float,
    hedge_class_spread: float,
    hedge_cost_budget: Optional[float],
) -> Tuple[npt.NDArray[np.int32], Optional[WorkloadModel], int]: ...
def _simulate(
    test: Trace,
    maps: npt.NDArray[np.int32],
    nodes: int,
    gpus_per_node: int,
    grouper: str,
    model: Optional[WorkloadModel],
    transport: str,
    batch_per_rank: int,
    hidden: int,
    arrival_rate: float,
    seed: int,
    replica_rule: str,
    replica_slack: float,
    expert_read_us: float,
    balance_window: int,
) -> str: ...
def _replan(
    maps: npt.NDArray[np.int32],
    experts: int,
    nodes: int,
    gpus_per_node: int,
    window: Trace,
    homes: Optional[npt.NDArray[np.int64]],
    model: Optional[WorkloadModel],
    prior: Optional[Trace],
    budget: Optional[float],
    prior_requests: float,
    transport: str,
    replan_slack: float,
    expert_bytes: int,
    prefill_tokens: int,
    map_layers: List[int],
    replica_rule: str,
) -> Tuple[npt.NDArray[np.int32], str]: ...
def _keep_slots_in_place(
    before: npt.NDArray[np.int32], after: npt.NDArray[np.int32], experts: int
) -> npt.NDArray[np.int32]: ...
def _fill_empty_slots(
    maps: npt.NDArray[np.int32], experts: int, load: npt.NDArray[np.float64], gpus_per_node: int
) -> npt.NDArray[np.int32]: ...
def _export_text(maps: npt.NDArray[np.int32], experts: int, to: str, layer_ids: List[int], hidden_layers: int,
                 mtp_layers: int) -> str: ...
def _unplanned_layer(layer_ids: List[int], hidden_layers: int, mtp_layers: int) -> int: ...
def _write_text(path: _Path, text: str) -> None:
    """Writes `text` to `path` atomically (locus::write_file_atomically)."""
def _load_expert_maps(path: _Path) -> Tuple[npt.NDArray[np.int32], int, List[int], int, int]: ...
def _save_expert_maps(
    path: _Path, maps: npt.NDArray[np.int32], experts: int, layer_ids: List[int], hidden_layers: int, gpus_per_node: int
) -> None: ...
