"""locus for Python: expert-activation traces from NumPy arrays, their statistics, the expert-map
planners, the decode simulator, DeepSeek's EPLB (``rebalance_experts``) and the files serving
engines take (SGLang, vLLM, TensorRT-LLM, EPLB).

Arrays go in as anything NumPy can read (NumPy arrays, lists, objects with ``__array__`` or
``__dlpack__`` such as CPU torch tensors) and come out as NumPy arrays. Errors raise
``LocusError`` subclasses carrying the C++ library's message; an argument of the wrong type (a
string for a count, None where a value is needed, a boolean for a number) is a ``TypeError``
naming it, and a count or number outside its documented range a ``ConfigError`` naming it and the
range. The long calls (``plan`` of a trace or a load, ``simulate``, ``replan``,
``rebalance_experts``, exports and fills of big plans, building, splitting and pickling traces) and
file I/O release the GIL, so other Python threads run meanwhile; a Ctrl-C stops a long call on the
main thread (the one that runs signal handlers) within a fraction of a second, its
KeyboardInterrupt raised and its result dropped (the planners, the simulator and the re-planner
stop within a layer or a step; the other calls when they end).
"""

from __future__ import annotations

import functools
import contextlib
import copyreg
import inspect
import json
import numbers
import operator
import os
import sys
import typing
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._core import (
    ConfigError,
    FormatError,
    InvalidInputError,
    LocusError,
    LocusIOError,
    Trace,
    WorkloadModel,
)

__version__ = _core.__version__

__all__ = [
    "ConfigError",
    "ExpertPlan",
    "FormatError",
    "InvalidInputError",
    "LocusError",
    "LocusIOError",
    "Trace",
    "WorkloadModel",
    "expert_load",
    "export",
    "export_text",
    "import_esft",
    "layer_imbalance",
    "load_grouping",
    "load_routed_experts",
    "plan",
    "read_trace",
    "rebalance_experts",
    "replan",
    "simulate",
    "split_by_request",
    "trace_from_arrays",
    "write_trace",
]

PHASES = {"prefill": 0, "decode": 1, "unknown": 2}


def _array(x: Any, dtype: Any, ndim: Optional[int] = None, name: str = "array") -> np.ndarray:
    """A C-contiguous NumPy array of `dtype` from `x` (no copy when it already is one). Values
    that the conversion would change (an id of 2.5, of NaN, of 2^40 into int32; a complex load)
    are refused, not rounded or wrapped. None is a TypeError naming the argument (NumPy read it as
    an array of no dimensions)."""
    if x is None:
        raise _wrong_type(name, x, "an array of numbers")
    if not isinstance(x, np.ndarray) and not hasattr(x, "__array__") and hasattr(x, "__dlpack__"):
        x = np.from_dlpack(x)
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"locus: invalid input: {name} is not an array of numbers ({e})") from None
    if ndim is not None and a.ndim != ndim:
        raise InvalidInputError(f"locus: invalid input: {name} must have {ndim} dimensions, not {a.ndim} (shape {a.shape})")
    to = np.dtype(dtype)
    if a.dtype.kind not in "biuf":
        raise InvalidInputError(f"locus: invalid input: {name} holds {a.dtype} values, expected numbers")
    if a.dtype.kind == "b":  # True as a rank, an id or a load of 1 is a mistake, not a number
        raise InvalidInputError(f"locus: invalid input: {name} holds booleans, expected "
                                f"{'whole numbers' if to.kind in 'iu' else 'numbers'}")
    if to.kind in "iu" and a.size:
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a) | (a != np.trunc(a))
            if bad.any():
                at = tuple(int(i) for i in np.argwhere(bad)[0])
                raise InvalidInputError(f"locus: invalid input: {name}{list(at)} is {a[at]}, expected a whole number")
            # Past 2^(mantissa bits + 1) a float holds no longer every whole number: an id of 2049
            # in float16 arrives as 2048, whole and wrong.
            exact = 2.0 ** (np.finfo(a.dtype).nmant + 1)
            if np.abs(a).max() > exact:
                raise InvalidInputError(f"locus: invalid input: {name} is {a.dtype} with values above {exact:.0f}, "
                                        f"which {a.dtype} cannot hold exactly; give an integer array")
        info = np.iinfo(to)
        if to.kind == "u" and a.min().item() < 0:  # an id of -5 wrapped to 18446744073709551611
            at = tuple(int(i) for i in np.argwhere(a < 0)[0])
            raise InvalidInputError(f"locus: invalid input: {name}{list(at)} is {a[at]}, expected a whole number "
                                    f">= 0")
        # As Python numbers: a float16 array compared with int32's bounds cast them to inf (a warning).
        if a.min().item() < info.min or a.max().item() > info.max:
            raise InvalidInputError(f"locus: invalid input: {name} has values outside the range of {to}")
    if to.kind == "f" and to.itemsize < a.dtype.itemsize and a.dtype.kind == "f" and a.size:
        # A finite value past the narrower type's range would become inf (with NumPy's warning).
        big = np.isfinite(a) & (np.abs(a) > np.finfo(to).max)
        if big.any():
            at = tuple(int(i) for i in np.argwhere(big)[0])
            raise InvalidInputError(f"locus: invalid input: {name}{list(at)} is {a[at]}, outside the range of {to}")
    return np.ascontiguousarray(a, dtype=to)


def _loads(x: Any, dtype: Any, name: str) -> np.ndarray:
    """`x` as a ``[layers, experts]`` load table of `dtype` (see _array), each load finite and not
    negative: the library's refusal named its own function (plan_input, fill_empty_slots)."""
    a = _array(x, dtype, 2, name)
    bad = ~np.isfinite(a) | (a < 0)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidInputError(f"locus: invalid input: {name}{list(at)} is {a[at]}, expected a finite number >= 0")
    return a


#: The library's limits (experts, layers, ranks, ...), checked here to name the argument.
_LIMITS = _core._limits


def _whole(x: int, name: str, lo: int = 0, hi: Optional[int] = None) -> int:
    """The count `x` (an int: see _checked) if in ``[lo, hi]``, else a ConfigError naming the argument
    and its range (the library's words named its own function, or 0 to 2^64-1 for any count)."""
    if x < lo or (hi is not None and x > hi):
        span = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"locus: configuration error: {name} is {x}, expected a whole number {span}")
    return x


def _finite(x: float, name: str, lo: float = 0.0, hi: Optional[float] = None) -> float:
    """The real `x` if finite and in ``[lo, hi]``, else a ConfigError naming the argument."""
    if not (np.isfinite(x) and x >= lo and (hi is None or x <= hi)):
        span = f"from {lo:g} to {hi:g}" if hi is not None else f">= {lo:g}"
        raise ConfigError(f"locus: configuration error: {name} is {x:g}, expected a finite number {span}")
    return x


def _check_model_layers(ids: Optional[list], layers: int, hidden: int, ids_name: str, hidden_name: str,
                        mtp: int = 0) -> None:
    """Layer ids (`ids`, None: 0..layers-1) and a model's hidden-layer count (0: not known) as the
    exports and the map files take them: one id per layer, ascending, below the count (plus `mtp`
    MTP layers after it, which an export may hold) and the library's limit. Refused naming the
    arguments (the library named "model layers", "trace")."""
    top = _LIMITS["hidden_layers"]
    _whole(hidden, hidden_name, 0, top)
    if ids is None:
        if hidden and layers > hidden:
            raise ConfigError(f"locus: configuration error: {hidden_name} is {hidden}, fewer than the {layers} "
                              "layers")
        return
    if len(ids) != layers:
        raise ConfigError(f"locus: configuration error: {ids_name} has {len(ids)} ids for {layers} layers")
    for i, (a, b) in enumerate(zip(ids, ids[1:])):
        if b <= a:
            raise ConfigError(f"locus: configuration error: {ids_name} must ascend ({ids_name}[{i}] is {a}, "
                              f"[{i + 1}] is {b})")
    # An unknown count (0) bounds the ids by the library's limit only: its MTP layers follow the
    # last MoE layer (an MTP count with no hidden count bounded them to the MTP layers' own ids).
    for i, v in enumerate(ids):
        if not 0 <= v < (hidden + mtp if hidden else top):
            raise ConfigError(f"locus: configuration error: {ids_name}[{i}] is {v}, expected a hidden layer from 0 "
                              f"to {(hidden or top) - 1}" + (f" ({hidden_name} is {hidden})" if hidden else "")
                              + (f" or one of its {mtp} MTP layers" if mtp else ""))


def _warn(text: str) -> None:
    """A UserWarning attributed to the caller's line outside this module (export calls export_text,
    each through its argument check): a fixed stacklevel named a line of locus's own."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(text, stacklevel=level)


def _type_name(x: Any) -> str:
    """`x`'s type as the C++ core's messages name it (numpy.float64, str)."""
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _short_repr(x: Any, limit: int = 80) -> str:
    """`repr(x)`, cut to `limit` characters (a plan's repr runs to pages)."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _wrong_type(name: str, x: Any, expected: str) -> TypeError:
    return TypeError(f"{name} is {_short_repr(x)} ({_type_name(x)}), expected {expected}")


def _int_list(x: Any, name: str) -> list:
    """`x` as a list of ints (a sequence of whole numbers), else a TypeError naming the argument:
    a lone number or a string was iterated or refused in the words of Python's internals."""
    if isinstance(x, (str, bytes, numbers.Number)) or not hasattr(x, "__iter__"):
        raise _wrong_type(name, x, "a sequence of whole numbers")
    out = []
    for i, v in enumerate(x):
        if isinstance(v, (bool, np.bool_)):  # True as an index is a slip, not 1
            raise _wrong_type(f"{name}[{i}]", v, "a whole number")
        out.append(_index(v, f"{name}[{i}]"))
    return out


def _real(x: Any, name: str) -> float:
    """`x` as a float; a string or None is a TypeError naming the argument (float() took "0.1" and
    named nothing on None). Ranges are the library's to check."""
    if isinstance(x, numbers.Real):
        return float(x)
    raise _wrong_type(name, x, "a number")


def _index(x: Any, name: str) -> int:
    """`x` as an int (anything with __index__), else a TypeError naming the argument, in the words
    of the C++ core's count arguments."""
    try:
        return operator.index(x)
    except TypeError:
        raise _wrong_type(name, x, "a whole number") from None


def _check_argument(name: str, x: Any, hint: Any, default: Any) -> Any:
    """`x` checked against its annotation `hint` (and made a plain int, float or bool): see _checked."""
    if x is None and default is None:
        return x
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        if x is None:
            return x
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else Any
    if hint is bool:
        if isinstance(x, (bool, np.bool_)):
            return bool(x)
        raise _wrong_type(name, x, "True or False")
    if hint in (int, float) and isinstance(x, (bool, np.bool_)):  # True as a count is a slip, not 1
        raise _wrong_type(name, x, "a whole number" if hint is int else "a number")
    if hint is int:
        return _index(x, name)
    if hint is float:
        return _real(x, name)
    if hint is str:
        # Paths may be bytes or any os.PathLike (the core reads them with os.fspath).
        if isinstance(x, str) or (isinstance(x, (bytes, os.PathLike)) and (name == "path" or name.endswith("_path"))):
            return x
        raise _wrong_type(name, x, "a path" if name == "path" or name.endswith("_path") else "a string")
    if isinstance(hint, type) and hint.__module__.startswith("locus") and not isinstance(x, hint):
        raise _wrong_type(name, x, f"a locus.{hint.__name__}")
    return x


def _path_text(path: Any) -> str:
    """`path` (str, bytes or os.PathLike) as a message shows it: bytes that are no UTF-8 escaped
    (\\xff), as the C++ core's messages show them (a surrogate left in made print() fail)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _io_error(path: Any, e: OSError) -> LocusIOError:
    """The library's I/O error for an OSError Python raised on `path` (the C++ core words its own so)."""
    return LocusIOError(f"locus: I/O error: {_path_text(path)}: {e.strerror or e}")


def _checked(fn: Any) -> Any:
    """Checks the arguments annotated int, float, str, bool or a locus class (None too where the
    annotation is Optional or the default None) before the C++ core sees them: its bindings refused
    a wrong type by printing a private function's signature, naming no argument, and a str for a
    float went through float(). Other annotations (arrays, sequences) are checked where used."""
    sig = inspect.signature(fn)
    hints: Optional[dict] = None

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal hints
        if hints is None:  # resolved on first use: the annotations name classes defined after fn
            hints = typing.get_type_hints(fn)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:  # "got an unexpected keyword argument 'x'", naming no function
            raise TypeError(f"{fn.__name__}(): {e}") from None
        for name, x in bound.arguments.items():
            p = sig.parameters[name]
            if name in hints and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                bound.arguments[name] = _check_argument(name, x, hints[name], p.default)
        return fn(*bound.args, **bound.kwargs)

    return run


def _unpickle_trace(state: bytes) -> Trace:
    """A Trace from its pickled state (Trace.__getstate__'s binary trace)."""
    t = Trace.__new__(Trace)
    t.__setstate__(state)
    return t


def _unpickle_model(state: bytes) -> WorkloadModel:
    """A WorkloadModel from its pickled state (its grouping JSON)."""
    m = WorkloadModel.__new__(WorkloadModel)
    m.__setstate__(state)
    return m


# Pickled through a function of this package, so that every protocol takes them: protocols 0 and 1
# refused the extension types ("cannot pickle 'Trace' object"), which pickle by __getstate__ only
# from protocol 2 on.
copyreg.pickle(Trace, lambda t: (_unpickle_trace, (t.__getstate__(),)))
copyreg.pickle(WorkloadModel, lambda m: (_unpickle_model, (m.__getstate__(),)))


@_checked
def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek's EPLB with its arguments and results: ``weight`` is ``[layers, experts]`` load;
    returns ``(phy2log [layers, num_replicas], log2phy [layers, experts, X] padded with -1,
    logcnt [layers, experts])``, all int64. Hierarchical policy when ``num_groups`` is a multiple
    of ``num_nodes``, global otherwise. Loads are taken as 32-bit floats, as the reference does. At
    most 65,536 copies of each expert and 2^24 slots over all layers (DeepSeek-V3: 58 × 288). Loads
    are finite and not negative; booleans are refused."""
    w = _loads(weight, np.float32, "weight")
    for name, v in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                    ("num_gpus", num_gpus)):
        _whole(v, name, 1)
    return _core.rebalance_experts(w, num_replicas, num_groups, num_nodes, num_gpus)


@_checked
def trace_from_arrays(
    topk_ids: Any,
    experts: int,
    topk_weights: Any = None,
    request_ids: Any = None,
    phases: Any = None,
    domains: Any = None,
    domain_names: Optional[Sequence[str]] = None,
    layer_ids: Optional[Sequence[int]] = None,
    hidden_layers: int = 0,
) -> Trace:
    """A trace from per-token routing ``topk_ids [tokens, layers, k]`` (what engines return per
    request as routed experts). Optional, one value per token: ``topk_weights [tokens, layers, k]``,
    ``request_ids`` (whole numbers from 0 to 2^64 - 1, as a trace keeps them: a uint64 array or
    Python ints are taken exactly; or strings such as vLLM's request ids, which the trace keeps as
    ``request_names`` and numbers 0, 1, ...; default: one request), ``phases`` (0/"prefill",
    1/"decode", 2/"unknown"; default unknown), ``domains`` (indexes into ``domain_names``, or
    names). ``experts``: 1 to 65,536. ``layer_ids``: the model's hidden-layer index of each traced
    layer (engines number dense layers too; ascending), and ``hidden_layers`` the model's layer count
    (0: not known; at most 4,096); exports use them. A request's tokens are kept in the
    order given (its prefill tokens before its decode tokens, all of one domain); requests in order
    of first appearance."""
    _whole(experts, "experts", 1, _LIMITS["experts"])
    ids = _array(topk_ids, np.int32, 3, "topk_ids")
    tokens, layers, k = ids.shape
    # The trace's limits, named as the arguments (the library's words were "trace: top_k is 20").
    if not 1 <= k <= min(experts, _LIMITS["top_k"]):
        raise InvalidInputError(f"locus: invalid input: topk_ids has {k} choices per token (shape {ids.shape}); "
                                f"expected 1 to {min(experts, _LIMITS['top_k'])} (experts is {experts})")
    if not 1 <= layers <= _LIMITS["trace_layers"]:
        raise InvalidInputError(f"locus: invalid input: topk_ids has {layers} layers (shape {ids.shape}); expected 1 "
                                f"to {_LIMITS['trace_layers']}")
    lids = _int_list(layer_ids, "layer_ids") if layer_ids is not None else None
    _check_model_layers(lids, layers, hidden_layers, "layer_ids", "hidden_layers")
    weights = np.zeros((0, 0, 0), np.float32) if topk_weights is None else _array(topk_weights, np.float32, 3, "topk_weights")
    request_names: list = []
    if request_ids is None:
        req = np.zeros(tokens, np.uint64)
    else:
        # Strings are looked at one by one, not through np.asarray: that turns [7, "7"] into two
        # equal strings, b"a" into "a", and drops a name's trailing NUL.
        r = request_ids
        if isinstance(r, np.ndarray) and r.dtype.kind == "S":
            raise InvalidInputError("locus: invalid input: request_ids holds bytes; give the ids as str or int")
        values = r.tolist() if isinstance(r, np.ndarray) and r.dtype.kind in "UO" else r
        if isinstance(values, (list, tuple)) and any(isinstance(x, (str, bytes)) for x in values):
            if any(isinstance(x, bytes) for x in values):
                raise InvalidInputError("locus: invalid input: request_ids holds bytes; give the ids as str or int")
            if not all(isinstance(x, str) for x in values):
                raise InvalidInputError("locus: invalid input: request_ids mixes strings and numbers; give one kind "
                                        "(strings are numbered 0, 1, ... and kept as names, numbers are the ids)")
            number: dict = {}
            for x in values:
                number.setdefault(x, len(number))
            if "" in number:
                raise InvalidInputError("locus: invalid input: request_ids holds an empty string (a name names a request)")
            request_names = list(number)
            r = np.array([number[x] for x in values], np.uint64)
        elif isinstance(values, (list, tuple)) and all(
                isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) for x in values):
            # Python ints as they are: NumPy made [-1, 2**64 - 1] a float64 array, its ids rounded.
            for i, x in enumerate(values):
                if not 0 <= x < 2**64:
                    raise InvalidInputError(f"locus: invalid input: request_ids[{i}] is {x}, expected a whole number "
                                            "from 0 to 2^64 - 1")
            r = np.array([int(x) for x in values], np.uint64)
        # Ids are 64-bit unsigned, as the trace keeps them (a uint64 array's ids >= 2^63 included).
        req = _array(r, np.uint64, 1, "request_ids")
    if phases is None:
        ph = np.full(tokens, 2, np.uint8)
    else:
        p = np.asarray(phases)
        if p.dtype.kind == "S":
            raise InvalidInputError("locus: invalid input: phases holds bytes; give prefill, decode, unknown as str "
                                    "or 0, 1, 2")
        if p.dtype.kind in "US" and p.ndim == 1:
            try:
                p = np.array([PHASES[str(x)] for x in p], np.uint8)
            except KeyError as e:
                raise InvalidInputError(f"locus: invalid input: unknown phase {e} (prefill, decode, unknown)") from None
        ph = _array(p, np.uint8, 1, "phases")
    if isinstance(domain_names, (str, bytes)):  # "law" was taken as the names l, a, w
        raise _wrong_type("domain_names", domain_names, "a sequence of str")
    names = list(domain_names or [])
    if domains is None:
        dom = np.zeros(tokens, np.uint32)
    else:
        d = np.asarray(domains)
        if d.dtype.kind == "S" or (d.dtype.kind == "O" and any(isinstance(x, bytes) for x in d.flat)):
            # str(b"law") is "b'law'": a name no one gave
            raise InvalidInputError("locus: invalid input: domains holds bytes; give the names as str")
        if d.dtype.kind in "US" and d.ndim == 1:
            for x in d:
                if str(x) not in names:
                    names.append(str(x))
            d = np.array([names.index(str(x)) for x in d], np.uint32)
        dom = _array(d, np.uint32, 1, "domains")
    return _core._trace_from_arrays(ids, experts, weights, req, ph, dom, names, lids or [], hidden_layers,
                                    request_names)


@_checked
def load_routed_experts(
    path: str, experts: int, key: Optional[str] = None, layer_ids: Optional[Sequence[int]] = None
) -> Trace:
    """A trace from a ``.npy`` or ``.npz`` file of routed experts ``[tokens, layers, k]`` (an
    ``.npz`` may hold one array per request; each becomes a request, in the archive's order, named by
    its array's name: the trace's ``request_names``; ``key``: that one array). ``layer_ids``: the MoE layers
    to keep, for arrays with a row per hidden layer as vLLM and SGLang return them; without it the
    dense layers' rows (expert 0 for every choice: with k >= 2, or for at least 16 tokens with k = 1)
    are left out, as ``locus plan --load`` does. The trace records the layers kept as its model layer ids and the arrays' layer count as
    the model's."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise _io_error(path, e) from None
    npy = magic == b"\x93NUMPY"
    if not npy and magic[:2] != b"PK":  # a zip (an empty .npz starts with its end record)
        # NumPy's own words for such a file suggest unpickling it (allow_pickle=True).
        raise FormatError(f"locus: format error: {_path_text(path)}: not a .npy or .npz array file")
    # An .npz is read from a file this function opens and closes, also when the archive is damaged
    # (np.load of a path left that file open when the zip was refused).
    with contextlib.ExitStack() as stack:
        try:
            # An .npy is mapped, not read: a header that claims more than the file holds is refused
            # before anything of that size is allocated.
            if npy:
                data = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                data = stack.enter_context(np.load(stack.enter_context(open(path, "rb")), allow_pickle=False))
        except OSError as e:
            raise _io_error(path, e) from None
        except (ValueError, EOFError, zipfile.BadZipFile) as e:  # a damaged .npy or .npz
            raise FormatError(f"locus: format error: {_path_text(path)}: not a readable .npy or .npz array file "
                              f"({e})") from None
        return _routed_experts_trace(data, path, experts, key, layer_ids)


def _routed_experts_trace(data: Any, path: str, experts: int, key: Optional[str],
                          layer_ids: Optional[Sequence[int]]) -> Trace:
    """load_routed_experts' trace from the loaded array (.npy) or archive (.npz)."""
    if isinstance(data, np.ndarray):
        if key is not None:  # an argument that would change nothing is refused, not dropped
            raise ConfigError(f"locus: configuration error: key {key!r} names an array of an .npz file; "
                              f"{_path_text(path)} is a .npy file, one array")
        ids, kept, hidden = _moe_layers(data, layer_ids, _path_text(path))
        return trace_from_arrays(ids, experts, layer_ids=kept, hidden_layers=hidden)
    # The archive's order (np.savez's): sorted as text, "req10" came before "req2".
    names = [key] if key is not None else list(data.files)
    missing = [n for n in names if n not in data.files]
    if not names or missing:
        raise InvalidInputError(f"locus: invalid input: {_path_text(path)} has no array {missing or ''} "
                                f"(arrays: {sorted(data.files)})")
    try:
        parts = []
        for n in names:
            # A member whose header claims more than its stored size is damaged, not read.
            info = data.zip.getinfo(n + ".npy") if n + ".npy" in data.zip.namelist() else None
            if info is not None:
                with data.zip.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    shape, _, dtype = read_header(member) if read_header else ((), None, np.dtype(np.uint8))
                if float(np.prod(shape, dtype=np.float64)) * dtype.itemsize > info.file_size:
                    raise ValueError(f"array {n} claims shape {shape} of {dtype}, more than its {info.file_size} "
                                     "bytes")
            try:
                parts.append(np.asarray(data[n]))
            except MemoryError:  # a member that inflates past what this process may allocate
                raise InvalidInputError(f"locus: invalid input: {_path_text(path)}: array {n} inflates to more "
                                        "than this process can allocate") from None
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FormatError(f"locus: format error: {_path_text(path)}: {e}") from None
    for n, p in zip(names, parts):
        if p.ndim != 3 or p.shape[1:] != parts[0].shape[1:]:
            raise InvalidInputError(f"locus: invalid input: {_path_text(path)}: array {n} has shape {p.shape}; "
                                    f"expected [tokens, {parts[0].shape[1:] if parts[0].ndim == 3 else 'layers, k'}]")
    ids, kept, hidden = _moe_layers(np.concatenate(parts, axis=0), layer_ids, _path_text(path))
    # Each request named by its array (the names were dropped: requests 0, 1, ...).
    req = [n for n, p in zip(names, parts) for _ in range(len(p))]
    return trace_from_arrays(ids, experts, request_ids=req, layer_ids=kept, hidden_layers=hidden)


def _moe_layers(ids: np.ndarray, layer_ids: Optional[Sequence[int]], path: str) -> Tuple[np.ndarray, Any, int]:
    """`ids` with only the layers `layer_ids`, those ids and the hidden-layer count. Without
    `layer_ids`, the rows of dense layers are left out as `locus plan --load` leaves them: engines
    return a row for every hidden layer and fill a dense layer's with expert 0 for every choice,
    which no router chooses twice (k >= 2), nor for every one of many tokens (k = 1: the core's
    dense_top1_tokens)."""
    if ids.ndim != 3:  # trace_from_arrays names a wrong shape
        return ids, None, 0
    if layer_ids is None:
        tokens, layers, k = ids.shape
        if tokens == 0 or (k < 2 and tokens < _core._limits["dense_top1_tokens"]):
            return ids, None, 0
        moe = [l for l in range(layers) if not (ids[:, l] == 0).all()]
        if len(moe) == layers:
            return ids, None, 0
        if not moe:
            raise InvalidInputError(f"locus: invalid input: {path}: every layer routes every token to expert 0 {k} "
                                    f"times (dense layers' rows): no MoE layer in the array")
        return ids[:, moe], moe, layers
    kept = _int_list(layer_ids, "layer_ids")
    layers = ids.shape[1]
    bad = [l for l in kept if not 0 <= l < layers]
    if bad or not kept:  # -1 would index the last layer
        raise InvalidInputError(f"locus: invalid input: {path}: layer_ids {bad or kept} are not among the "
                                f"{layers} layers of the routed experts")
    return ids[:, kept], kept, layers


# The core's own functions, behind the same argument checks as the rest of the package.
@_checked
def read_trace(path: str) -> Trace:
    """A trace from a locus binary trace file (``locus trace`` writes them; docs/trace-format.md)."""
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        raise LocusIOError(f"locus: I/O error: {os.fspath(path)}: a folder, not a locus binary trace file (an ESFT "
                           "expert_scores folder is read by locus.import_esft; `locus trace import` converts a "
                           "folder of route JSONL into a binary trace)")
    return _core.read_trace(path)


@_checked
def write_trace(trace: Trace, path: str) -> None:
    """Writes ``trace`` as a locus binary trace file, atomically (whole or not at all)."""
    _core.write_trace(trace, path)


@_checked
def import_esft(path: str, experts: int = 64) -> Trace:
    """A trace from a folder of ESFT expert scores (one sub-folder per domain, one file per MoE
    layer; docs/trace-format.md). ``experts``: the model's routed experts, every id below it (as
    ``locus trace import --experts``; ESFT's model has 64); each token chooses 6."""
    k = _LIMITS["esft_top_k"]
    _whole(experts, "experts", 1, _LIMITS["experts"])
    if experts < k:
        raise ConfigError(f"locus: configuration error: experts is {experts}, fewer than the {k} experts each token "
                          "of an ESFT folder chooses")
    return _core.import_esft(path, experts)


@_checked
def load_grouping(path: str) -> WorkloadModel:
    """The workload-aware grouping model ``locus plan`` saved beside its map (``*.grouping.json``)."""
    return _core.load_grouping(path)


@_checked
def split_by_request(trace: Trace, test_fraction: float, seed: int) -> Tuple[Trace, Trace]:
    """``(train, test)``: each request drawn into the test split with probability ``test_fraction``
    (a seeded draw per request, as ``--split random`` in the driver)."""
    return _core.split_by_request(trace, test_fraction, seed)


@_checked
def layer_imbalance(trace: Trace) -> list:
    """Per MoE layer, a dict of its expert load's ``max_over_mean``, ``cv`` (coefficient of
    variation) and ``gini`` (Gini index)."""
    if trace.tokens == 0:  # no load is no balance: 1.0 and zeros would read as perfect
        raise ConfigError("locus: configuration error: the trace has no tokens, so no expert load to measure")
    return _core.layer_imbalance(trace)


@_checked
def expert_load(trace: Trace, decode_only: bool = False) -> np.ndarray:
    """``[layers, experts]`` routed (token, expert) pairs of the trace (of its decode tokens with
    ``decode_only``, which needs the trace's phases: an ESFT import records none)."""
    if decode_only is True and trace.tokens > 0 and trace._phase_counts()[:2] == (0, 0):
        # Its decode load would be all zeros, as if nothing decoded.
        raise ConfigError("locus: configuration error: decode_only needs the trace's phases, and it records none (an "
                          "ESFT import records none): mark them first, e.g. trace.with_prefill_tokens(32)")
    return _core.expert_load(trace, decode_only)


@dataclass(eq=False)
class ExpertPlan:
    """One expert map per MoE layer: ``maps[layer, rank, slot]`` is the expert in that slot (-1:
    empty). ``model`` is the workload-aware grouping fitted with the plan, when planned on a trace.
    ``replicas`` and ``hedge_copies`` count the extra copies, as ``locus plan --json`` does.
    ``nodes × gpus_per_node`` is the topology the plan was made for; a plan whose two do not make its
    ranks (the defaults of a plan made by hand, a map file saved without its topology) exports as
    one GPU per node, as ``locus map export`` does, and is refused by ``simulate`` and ``replan``.
    Plans compare equal (``==``) when their maps, experts, topology, layer ids, hidden-layer count
    and grouping model (compared by content: its grouping JSON) agree; ``hedge_copies``, which a plan
    read from a file does not know, is not compared. A plan is mutable, so it is not hashable."""

    maps: np.ndarray
    experts: int
    nodes: int = 1
    gpus_per_node: int = 1
    model: Optional[WorkloadModel] = None
    #: Hidden-layer index of each planned layer (None: 0..layers-1) and the model's layer count.
    layer_ids: Optional[Sequence[int]] = None
    hidden_layers: int = 0
    # Set by the planner (locus.plan), which alone knows which copies are hedges.
    _hedge_copies: Optional[int] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A nested list is taken as NumPy reads it; `.shape` on it was an AttributeError, and an
        # array of other dimensions an IndexError of `ranks`.
        self.maps = _array(self.maps, np.int32, 3, "maps")
        self._check_fields()

    def _check_fields(self) -> None:
        """The fields' types and ranges, checked where a method uses them (they may be set after
        construction): a wrong one reached the core, which printed a private function's signature or
        named its own functions. Layer ids are kept as a list of ints (an iterator given was used
        up by this check, and the plan saved without them)."""
        if np.ndim(self.maps) != 3:  # not [layers, ranks, slots]: named as _array names it
            _array(self.maps, np.int32, 3, "maps")
        for name in ("experts", "nodes", "gpus_per_node", "hidden_layers"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)):
                raise _wrong_type(f"ExpertPlan.{name}", v, "a whole number")
            _whole(_index(v, f"ExpertPlan.{name}"), f"ExpertPlan.{name}", 0 if name == "hidden_layers" else 1)
        if self.model is not None and not isinstance(self.model, WorkloadModel):
            raise _wrong_type("ExpertPlan.model", self.model, "a locus.WorkloadModel or None")
        if self.layer_ids is not None and not (isinstance(self.layer_ids, list) and
                                               all(type(x) is int for x in self.layer_ids)):
            self.layer_ids = _int_list(self.layer_ids, "ExpertPlan.layer_ids")
        layers, ranks, slots = np.shape(self.maps)
        _check_model_layers(self.layer_ids, layers, _index(self.hidden_layers, "ExpertPlan.hidden_layers"),
                            "ExpertPlan.layer_ids", "ExpertPlan.hidden_layers")
        if ranks * slots < self.experts:  # the library's words: "expert_map: 4 slots cannot host 8 experts"
            raise ConfigError(f"locus: configuration error: the maps' {ranks} ranks × {slots} slots cannot host "
                              f"ExpertPlan.experts {self.experts}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertPlan):
            return NotImplemented
        if self is other:
            return True
        # The fields as they are, unchecked and unchanged: a comparison neither raises for a plan a
        # method would refuse nor consumes an iterator set as layer_ids (it compares by identity).
        def ids(p: "ExpertPlan") -> Any:
            return list(p.layer_ids) if isinstance(p.layer_ids, (list, tuple)) else p.layer_ids
        a, b = self.model, other.model
        same_model = a is b or (isinstance(a, WorkloadModel) and isinstance(b, WorkloadModel)
                                and a.__getstate__() == b.__getstate__())
        try:
            same_maps = bool(np.array_equal(np.asarray(self.maps), np.asarray(other.maps)))
        except (TypeError, ValueError):
            same_maps = False
        return (same_maps and same_model
                and (self.experts, self.nodes, self.gpus_per_node, ids(self), self.hidden_layers)
                == (other.experts, other.nodes, other.gpus_per_node, ids(other), other.hidden_layers))

    __hash__ = None  # type: ignore[assignment]  # mutable and equal by content

    def _topology(self, what: str) -> Tuple[int, int]:
        """``(nodes, gpus_per_node)`` where they make the plan's ranks, else a ConfigError saying which
        argument gives them (`what`: the call that needs them)."""
        self._check_fields()
        if self.nodes * self.gpus_per_node != self.ranks:
            raise ConfigError(f"locus: configuration error: {what} needs the plan's topology, and its nodes × "
                              f"gpus_per_node ({self.nodes} × {self.gpus_per_node}) do not make its {self.ranks} "
                              "ranks: give gpus_per_node (or nodes) to ExpertPlan.load for a map saved without its "
                              "topology, or set plan.nodes and plan.gpus_per_node")
        return self.nodes, self.gpus_per_node

    @property
    def layers(self) -> int:
        self._check_fields()
        return int(np.shape(self.maps)[0])

    @property
    def ranks(self) -> int:
        self._check_fields()
        return int(np.shape(self.maps)[1])

    @property
    def slots_per_rank(self) -> int:
        self._check_fields()
        return int(np.shape(self.maps)[2])

    @property
    def replicas(self) -> int:
        """Replica slots used, over all layers: the slots holding an expert beyond its first copy
        (``replicas`` of ``locus plan --json``). Counted on ``maps``, so ``filled()`` adds to it."""
        m = self._maps()
        return int(sum(np.count_nonzero(layer >= 0) - np.unique(layer[layer >= 0]).size for layer in m))

    @property
    def hedge_copies(self) -> Optional[int]:
        """How many of the ``replicas`` hold balance hedges, over all layers (``hedge_copies`` of
        ``locus plan --json``): copies of experts held only by GPUs that run hot when the training
        requests are resampled, placed with locality and redundant slots (``hedge_replicas`` of
        ``locus.plan``; docs/engines.md). 0 for a plan no hedge went into; None where that is not
        known: a plan read with ``ExpertPlan.load`` (the file does not say) or made by hand."""
        return self._hedge_copies

    def _maps(self) -> np.ndarray:
        self._check_fields()
        return _array(self.maps, np.int32, 3, "maps")

    @_checked
    def filled(self, load: Any = None) -> "ExpertPlan":
        """The plan with every empty slot filled (engines accept none): the expert not yet on the
        slot's rank with the largest load per replica (`load` ``[layers, experts]``; without it,
        the fewest replicas), then the lowest id. A Trace as `load` stands for its
        ``expert_load(trace)``."""
        if isinstance(load, Trace):
            # A trace is the usual source of the loads ("load must have 2 dimensions, not 0" said nothing
            # of that); one of another model is named as such, not as rows of a table.
            if (load.layers, load.experts) != (self.layers, self.experts):
                raise ConfigError(f"locus: configuration error: load: the trace has {load.layers} layers of "
                                  f"{load.experts} experts; the plan has {self.layers} layers of {self.experts}")
            load = expert_load(load)
        w = np.zeros((0, 0)) if load is None else _loads(load, np.float64, "load")
        if self.ranks % self.gpus_per_node:  # the library named its fill_empty_slots
            raise ConfigError(f"locus: configuration error: ExpertPlan.gpus_per_node is {self.gpus_per_node}, which "
                              f"does not divide the plan's {self.ranks} ranks")
        if load is not None and w.shape != (self.layers, self.experts):
            # (0, 0) is the core's "no load": an empty table passed for the plan's went through as none.
            raise ConfigError(f"locus: configuration error: load has shape {w.shape}; the plan has {self.layers} "
                              f"layers of {self.experts} experts")
        maps = _core._fill_empty_slots(self._maps(), self.experts, w, self.gpus_per_node)
        out = ExpertPlan(maps, self.experts, self.nodes, self.gpus_per_node, self.model, self.layer_ids,
                         self.hidden_layers)
        out._hedge_copies = self._hedge_copies  # the filled slots are not hedges
        return out

    @_checked
    def save(self, path: str) -> None:
        """Writes the plan as locus expert-map JSON (what ``locus simulate --map`` reads), with the
        topology it was made for."""
        maps = self._maps()
        ids = _int_list(self.layer_ids, "ExpertPlan.layer_ids") if self.layer_ids is not None else []
        # The topology is saved only when it describes the maps (a hand-made plan keeps the defaults).
        g = self.gpus_per_node if self.nodes * self.gpus_per_node == self.ranks else 0
        _core._save_expert_maps(path, maps, self.experts, ids, self.hidden_layers, g)

    @staticmethod
    @_checked
    def load(path: str, nodes: Optional[int] = None, gpus_per_node: Optional[int] = None) -> "ExpertPlan":
        """Reads a saved plan. Its topology is the one saved with it (``locus plan`` and ``save``
        save it), or ``nodes`` nodes or nodes of ``gpus_per_node`` GPUs. A file without one, read
        without either, keeps the defaults ``nodes=1, gpus_per_node=1``, which describe no topology
        of its ranks: exports take it as one GPU per node (as ``locus map export``), and ``simulate``
        and ``replan`` refuse it, as ``locus map replan`` refuses such a file without
        ``--gpus-per-node``."""
        for name, v in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
            if v is not None:
                _whole(v, name, 1)
        maps, experts, ids, hidden, saved = _core._load_expert_maps(path)
        ranks = int(maps.shape[1])
        if saved and gpus_per_node is not None and gpus_per_node != saved:
            raise ConfigError(f"locus: configuration error: the plan in {_path_text(path)} was made for {saved} GPUs "
                              f"per node, not {gpus_per_node} (gpus_per_node)")
        g = gpus_per_node or saved
        if not g and nodes is None:
            return ExpertPlan(maps, experts, 1, 1, None, ids or None, hidden)  # no topology: see above
        if not g:
            if ranks % nodes:
                raise ConfigError(f"locus: configuration error: nodes is {nodes}, which does not divide the plan's "
                                  f"{ranks} ranks")
            g = ranks // nodes
        if ranks % g:
            raise ConfigError(f"locus: configuration error: gpus_per_node is {g}, which does not divide the plan's "
                              f"{ranks} ranks")
        if nodes is not None and nodes * g != ranks:
            raise ConfigError(f"locus: configuration error: nodes is {nodes}: {nodes} nodes × {g} GPUs do not make "
                              f"the plan's {ranks} ranks")
        return ExpertPlan(maps, experts, ranks // g, g, None, ids or None, hidden)


@_checked
def plan(
    source: Any,
    nodes: int,
    gpus_per_node: int,
    placement: str = "eplb",
    redundant_slots: int = 0,
    slots_per_rank: Optional[int] = None,
    eplb_groups: int = 1,
    clusters: Optional[int] = None,  # None: 8, said nothing of when fewer fit (as `locus plan` without --clusters)
    seed: int = 1,
    prefill_tokens: int = 32,
    hedge_replicas: Optional[int] = None,
    copies: str = "both",
    anneal: int = 0,
    fill_slack: float = 0.0,
    hedge_class_spread: float = 0.0,
    hedge_cost_budget: Optional[float] = None,
    layer_ids: Optional[Sequence[int]] = None,
    hidden_layers: Optional[int] = None,
    redundant_experts: Optional[int] = None,  # last: positional calls written before it keep their meaning
) -> ExpertPlan:
    """Plans expert maps on ``nodes × gpus_per_node`` ranks. ``source`` is a Trace (every planner:
    linear, round_robin, eplb, activation_usage, locality; the grouping model is fitted too) or a
    ``[layers, experts]`` load array (linear, round_robin, eplb). Slots per rank: enough for every
    expert once plus ``redundant_slots``, unless ``slots_per_rank`` is given (load arrays only).
    ``redundant_experts`` instead counts the redundant experts over all GPUs, as DeepSeek's EPLB and
    vLLM's ``num_redundant_experts`` do (as ``--redundant-experts``): the experts and these must split
    evenly over the GPUs.
    ``eplb_groups`` (eplb, as ``--eplb-groups``): expert groups; a multiple of ``nodes`` selects
    DeepSeek's hierarchical policy, which splits the experts into that many equal groups.
    ``hedge_replicas``: with locality and redundant slots, at most this many slots per layer first
    hold balance hedges (None: the library's default, one per GPU; 0: off; docs/robust_planning.md).
    ``prefill_tokens``: the grouping model classifies a request by at most this many of its prefill
    tokens; it marks no phases (``trace.with_prefill_tokens(n)`` does, for an ESFT import).
    ``copies`` and ``anneal`` (locality only, as ``locus plan --copies --anneal``): the copies the
    token-level stage minimises ("flat": one per remote GPU, "hierarchical": one per remote node,
    "both": the default of ``locus plan``; ``locus simulate --placement locality`` plans for the
    simulated transport's copies instead) and its annealing proposals per expert after the sweeps
    (0: none; at most 1,048,576). ``fill_slack``
    (locality with redundant slots, as ``--fill-slack``): the replica fill's GPU load bound (0: the
    planner's own); a looser one fills more replica slots, then swaps bring the GPUs back within the
    planner's bound (docs/robust_planning.md). ``hedge_class_spread`` and ``hedge_cost_budget``
    (locality with redundant slots, as ``--hedge-class-spread`` and ``--hedge-cost-budget``): the
    balance hedges' draws also shift the mix of request classes (the grouping model's clusters) by
    this spread, from 0 (resamples only) to 2,
    and the hedges may raise the training sample's inter-node copies by at most this share (None:
    the library's 0.01; 0: no bound).
    ``layer_ids`` and ``hidden_layers`` (load arrays): the model's hidden-layer index of each row of
    the load (engines number dense layers too) and the model's layer count, which the plan keeps
    for its exports and its map file, as ``locus plan --load`` does (None: rows 0, 1, ... of a model
    of that many layers). A trace plan takes both from the trace (its ``model_layer_ids`` and
    ``hidden_layers``). For a load of ``expert_load(trace)``, pass
    ``layer_ids=trace.model_layer_ids, hidden_layers=trace.hidden_layers``; for
    ``locus.engines.load_*``'s ``(layer_ids, load)``, ``layer_ids=layer_ids`` (and ``hidden_layers``,
    the model's ``num_hidden_layers``, for the dense rows after the last MoE layer)."""
    # The documented ranges, named as the arguments (the library named its own functions).
    _whole(nodes, "nodes", 1)
    _whole(gpus_per_node, "gpus_per_node", 1)
    if nodes * gpus_per_node > _LIMITS["ranks"]:
        raise ConfigError(f"locus: configuration error: nodes × gpus_per_node is {nodes} × {gpus_per_node} = "
                          f"{nodes * gpus_per_node} ranks, expected at most {_LIMITS['ranks']}")
    _whole(redundant_slots, "redundant_slots")
    if redundant_experts is not None:
        _whole(redundant_experts, "redundant_experts")
        if redundant_slots or slots_per_rank is not None:
            raise ConfigError("locus: configuration error: give redundant_experts (over all GPUs, as EPLB counts "
                              "them) or redundant_slots / slots_per_rank (per GPU), not both")
    replicas = bool(redundant_slots or redundant_experts)  # replica slots asked for, per GPU or in total
    if slots_per_rank is not None:
        _whole(slots_per_rank, "slots_per_rank", 1)
    _whole(eplb_groups, "eplb_groups", 1)
    clusters_given = clusters is not None
    clusters = 8 if clusters is None else _whole(clusters, "clusters", 1)
    _whole(seed, "seed")  # 2^64 and above: the core's "expected a whole number below 2^64"
    _whole(prefill_tokens, "prefill_tokens", 1)
    if hedge_replicas is not None:
        _whole(hedge_replicas, "hedge_replicas")
    _whole(anneal, "anneal", 0, _LIMITS["anneal"])
    _finite(fill_slack, "fill_slack")
    _finite(hedge_class_spread, "hedge_class_spread", 0.0, 2.0)
    if hedge_cost_budget is not None:
        _finite(hedge_cost_budget, "hedge_cost_budget")
    if (copies != "both" or anneal != 0 or fill_slack != 0) and (placement != "locality" or not isinstance(source, Trace)):
        raise ConfigError("locus: configuration error: copies, anneal and fill_slack apply to locality plans of a trace")
    if fill_slack != 0 and not replicas:
        raise ConfigError("locus: configuration error: fill_slack bounds the replica fill; the plan has no redundant "
                          "slots to fill")
    if (hedge_class_spread != 0 or hedge_cost_budget is not None) and (
            placement != "locality" or not isinstance(source, Trace) or not replicas or hedge_replicas == 0):
        raise ConfigError("locus: configuration error: hedge_class_spread and hedge_cost_budget shape the balance "
                          "hedges of locality plans of a trace with redundant slots (hedge_replicas=0 turns them "
                          "off)")
    if placement not in _core._planners:  # before a trace's phases are checked: a typo is named as one
        raise ConfigError(f"locus: configuration error: unknown placement \"{placement}\" (known: "
                          f"{', '.join(_core._planners)})")
    if eplb_groups != 1 and placement != "eplb":
        # An argument that would change nothing is refused, not dropped.
        raise ConfigError(f"locus: configuration error: eplb_groups applies to placement=\"eplb\", not {placement!r}")

    def check_eplb(experts: int, layers: int, per_rank: int) -> None:
        """What DeepSeek's EPLB refuses in its own words ("rebalance_experts: ..."), named here."""
        if placement != "eplb":
            return
        slots = nodes * gpus_per_node * per_rank
        if eplb_groups % nodes == 0 and experts % eplb_groups:
            raise ConfigError(f"locus: configuration error: eplb_groups is {eplb_groups}, a multiple of nodes "
                              f"({nodes}), which selects the hierarchical policy: the {experts} experts do not split "
                              f"into {eplb_groups} equal groups")
        if per_rank <= experts and layers * slots > _LIMITS["eplb_slots"]:  # else refused as slots per rank
            raise ConfigError(f"locus: configuration error: eplb plans at most {_LIMITS['eplb_slots']} slots over all "
                              f"layers; {layers} layers × {slots} slots are more")

    if isinstance(source, Trace):
        if layer_ids is not None or hidden_layers is not None:
            # The trace says which layers it traced: a second numbering would disagree or change nothing.
            raise ConfigError("locus: configuration error: layer_ids and hidden_layers are for load arrays; a trace "
                              "plan takes them from the trace (trace_from_arrays(..., layer_ids=, hidden_layers=) "
                              "records them)")
        if hedge_replicas and (placement != "locality" or not replicas):  # 0 (off) fits any plan
            raise ConfigError("locus: configuration error: hedge_replicas applies to locality plans with redundant "
                              "slots (the balance hedges fill replica slots)")
        if slots_per_rank is not None:
            raise ConfigError("locus: configuration error: slots_per_rank is for load arrays; a trace plan uses redundant_slots")
        if source.tokens == 0:  # e.g. split_by_request(t, 1.0, seed)[0]; not a matter of phases
            raise ConfigError("locus: configuration error: the trace to plan on has no tokens")
        prefill, decode, _ = source._phase_counts()
        if prefill == 0 and decode == 0:
            # Every plan fits the grouping model, which learns from prefill and decode tokens.
            raise ConfigError("locus: configuration error: the trace records no prefill or decode phases (an ESFT "
                              "import records none): mark them first, e.g. trace.with_prefill_tokens(32) "
                              "(prefill_tokens= bounds what the grouping model reads of them; unlike `locus plan "
                              "--prefill-tokens`, it marks none)")
        if redundant_experts is not None:
            redundant_slots = _core._redundant_slots_for_total(source.experts, nodes * gpus_per_node,
                                                               redundant_experts)
        check_eplb(source.experts, source.layers, -(-source.experts // (nodes * gpus_per_node)) + redundant_slots)
        maps, model, hedges = _core._plan_from_trace(
            source, nodes, gpus_per_node, placement, redundant_slots, eplb_groups, clusters, seed, prefill_tokens,
            hedge_replicas, copies, anneal, fill_slack, hedge_class_spread, hedge_cost_budget,
        )
        if model is not None and clusters_given and model.clusters < clusters:
            # k-means takes one cluster per training request at most (`locus plan --clusters` says so too).
            _warn(f"locus.plan: the grouping model has {model.clusters} clusters, not clusters={clusters}: one per "
                  "training request at most")
        ids = source.model_layer_ids if source.has_model_layers else None
        out = ExpertPlan(maps, source.experts, nodes, gpus_per_node, model, ids, source.hidden_layers)
        out._hedge_copies = int(hedges)
        return out
    if source is None:  # the module's promise: None where a value is needed is a TypeError naming it
        raise _wrong_type("source", source, "a locus.Trace or a [layers, experts] load array")
    if isinstance(source, (str, bytes, os.PathLike)):
        raise ConfigError("locus: configuration error: plan takes a Trace (locus.read_trace(path)) or a load array, "
                          "not a path")
    load = _loads(source, np.float64, "source")
    if (seed, clusters, prefill_tokens) != (1, 8, 32):
        raise ConfigError("locus: configuration error: seed, clusters and prefill_tokens fit the grouping model of a "
                          "trace plan; a load array has no requests to group")
    if hedge_replicas is not None:
        raise ConfigError("locus: configuration error: hedge_replicas is for locality plans of a trace; a load array "
                          "has no requests to resample")
    if slots_per_rank is not None and redundant_slots:
        raise ConfigError("locus: configuration error: give slots_per_rank or redundant_slots, not both")
    layers, experts = load.shape
    if layers == 0 or experts == 0:  # the library's words: "plan_input: no layers in the load table"
        raise InvalidInputError(f"locus: invalid input: source has shape {load.shape}; a load needs at least one "
                                "layer and one expert")
    ranks = nodes * gpus_per_node
    if redundant_experts is not None:
        redundant_slots = _core._redundant_slots_for_total(experts, ranks, redundant_experts)
    if slots_per_rank is not None and not experts <= ranks * slots_per_rank <= ranks * experts:
        raise ConfigError(f"locus: configuration error: slots_per_rank is {slots_per_rank}: {ranks} ranks need "
                          f"{-(-experts // ranks)} to {experts} slots each for the load's {experts} experts (every "
                          "expert at least once, on a GPU at most once)")
    ids = _int_list(layer_ids, "layer_ids") if layer_ids is not None else None
    if hidden_layers is not None:
        _whole(hidden_layers, "hidden_layers", 0, _LIMITS["hidden_layers"])
    _check_model_layers(ids, layers, hidden_layers or 0, "layer_ids", "hidden_layers")
    check_eplb(experts, layers, slots_per_rank or -(-experts // ranks) + redundant_slots)
    maps = _core._plan_from_load(load, nodes, gpus_per_node, slots_per_rank, redundant_slots, placement, eplb_groups)
    out = ExpertPlan(maps, experts, nodes, gpus_per_node, None, ids, hidden_layers or 0)
    out._hedge_copies = 0  # the load planners place no hedges
    return out


@_checked
def simulate(
    test: Trace,
    plan: ExpertPlan,
    grouper: str = "round_robin",
    transport: str = "flat",
    batch_per_rank: int = 32,
    hidden: int = 2048,
    arrival_rate: float = 0.0,
    seed: int = 1,
    model: Optional[WorkloadModel] = None,
    replica_rule: str = "locality_first",
    replica_slack: float = 0.05,
    expert_read_us: float = 0.0,
    balance_window: int = 0,
) -> dict:
    """Decode simulation of the trace's decode tokens on the plan; returns the summary (bytes and
    copies per token, GPU imbalance, modelled layer time: ``expert_read_us``, as ``locus simulate
    --expert-read-us``, is the time model's read of one expert's weights per expert a GPU runs in a
    step, 0 for none). GPU imbalance is given over the run (``gpu_imbalance_aggregate``) and per step
    (``gpu_imbalance_step_weighted``: each step's busiest GPU, weighted by the step's rows, what the
    run's expert time follows where rows decide it); with ``balance_window`` N > 0, as ``locus simulate
    --balance-window``, also over windows of N steps (``gpu_imbalance_window``). ``workload_aware`` grouping uses
    ``model`` or the plan's own. ``replica_rule`` is how a token's copy picks among an expert's
    replicas, as the serving engine does: ``locality_first`` (locus), ``same_gpu_else_random``
    (SGLang's static dispatch), ``random`` (vLLM's EPLB) or ``locality_bounded`` (locality first,
    away from GPUs whose load so far exceeds (1 + ``replica_slack``) × the mean). ``transport``:
    "flat" or "hierarchical"; ``batch_per_rank`` at least 1; ``arrival_rate`` finite, at least 0.
    The plan's topology is the one it was made for (``nodes × gpus_per_node``). ``locus simulate
    --placement locality`` plans with ``--copies`` set to the simulated transport's by default,
    ``locus.plan`` (as ``locus plan``) with "both": to simulate the plan the driver would make, plan
    with ``copies=transport``."""
    _whole(batch_per_rank, "batch_per_rank", 1)
    _finite(arrival_rate, "arrival_rate")
    _finite(expert_read_us, "expert_read_us", 0.0, _LIMITS["expert_read_us"])  # as `locus simulate`
    _whole(balance_window, "balance_window")
    _whole(seed, "seed")
    if transport not in ("flat", "hierarchical"):
        raise ConfigError(f"locus: configuration error: transport {transport!r} is not one of flat, hierarchical")
    nodes, gpus_per_node = plan._topology("simulate")
    if test.tokens == 0:
        raise ConfigError("locus: configuration error: the test trace has no tokens")
    if (test.layers, test.experts) != (plan.layers, plan.experts):
        # The simulator reads the maps with the trace's expert count: a plan of another model was
        # refused as an expert id out of range, or as slots that cannot host the experts.
        raise ConfigError(f"locus: configuration error: the plan has {plan.layers} layers of {plan.experts} experts; "
                          f"the test trace has {test.layers} layers of {test.experts}")
    if test._phase_counts()[1] == 0:
        # A run over no decode token would report zeros as if they were results (the driver refuses too).
        raise ConfigError("locus: configuration error: the test trace has no decode tokens to simulate (its phases "
                          "are not recorded, or every token is prefill): mark them, e.g. test.with_prefill_tokens(32)")
    if model is not None and grouper != "workload_aware":
        raise ConfigError(f"locus: configuration error: model groups requests under grouper=\"workload_aware\", not "
                          f"{grouper!r}")
    if replica_slack != 0.05 and replica_rule != "locality_bounded":
        raise ConfigError(f"locus: configuration error: replica_slack bounds replica_rule=\"locality_bounded\", not "
                          f"{replica_rule!r}")
    m = model if model is not None else plan.model
    out = _core._simulate(
        test, plan._maps(), nodes, gpus_per_node, grouper, m, transport, batch_per_rank, hidden,
        arrival_rate, seed, replica_rule, replica_slack, expert_read_us, balance_window,
    )
    summary = json.loads(out)
    summary["expert_read_us"] = expert_read_us  # as `locus simulate --json` records it: which time model
    return summary


@_checked
def replan(
    plan: ExpertPlan,
    window: Trace,
    budget: Optional[float] = None,
    homes: Any = None,
    prior: Optional[Trace] = None,
    model: Optional[WorkloadModel] = None,
    prior_requests: Optional[float] = None,
    transport: str = "flat",
    replan_slack: float = 0.125,
    expert_bytes: int = 0,
    prefill_tokens: int = 32,
    replica_rule: str = "locality_first",
) -> Tuple[ExpertPlan, dict]:
    """Re-plans the maps in service on a window of recorded routing (its decode tokens), moving at
    most ``budget`` of all slots (None: 0.10, or the least share that moves a pair of slots where
    0.10 of the plan's is under two): the re-planner ``locus simulate --drift-every`` runs, for an
    engine's periodic rebalance. ``homes``: the rank each request of ``window`` ran on (``[requests]``);
    without it, a request's node is its class's under ``model`` (or the plan's own model) when the
    classes recognise its prefill, else the nodes in turn. ``prior``: the traffic the maps were
    fitted to (its nodes from the model), which steers the copy savings and counts in the loads as
    ``prior_requests`` requests beside the window's (None: 32; only with a prior). ``transport``:
    whose copies to save ("flat", "hierarchical" or "both"; "both", which ``locus map replan
    --transport`` does not take, counts and reports their sum, as docs/engines.md describes).
    ``replica_rule``: the engine's choice among an expert's replicas, where the copies counted and
    saved go ("locality_first", "same_gpu_else_random" as SGLang, "random" as vLLM's EPLB;
    "locality_bounded" counts as "locality_first"). Returns the new plan and a report:
    ``moves`` (each slot whose weights change: layer (the plan's index), model_layer (its hidden
    layer, where the plan has layer ids), rank, slot, from, to; None for an empty slot),
    ``slots_moved``, ``bytes_moved`` (with ``expert_bytes``), and the window's inter-node copies
    per token and lowest reachable GPU max/mean (``balance_floor``) before and after
    (docs/engines.md). ``prefill_tokens``: how many of a request's prefill tokens the classes
    read; it marks no phases (``window.with_prefill_tokens(n)`` does, for a trace that records none).
    Ranges, as ``locus map replan`` takes them: ``budget`` from 0 to 1, ``prior_requests`` from 0
    to 1e9, ``prefill_tokens`` at least 1. The plan's topology is needed: a map saved without one
    is read with ``ExpertPlan.load(path, gpus_per_node=...)``."""
    if budget is not None:
        _finite(budget, "budget", 0.0, 1.0)
    if prior_requests is not None:
        _finite(prior_requests, "prior_requests", 0.0, 1e9)  # as --prior-requests
    _whole(prefill_tokens, "prefill_tokens", 1)
    nodes, gpus_per_node = plan._topology("replan")
    if prior_requests is not None and prior is None:
        # As `locus map replan`: an option that would change nothing is refused, not dropped.
        raise ConfigError("locus: configuration error: prior_requests applies with a prior (the traffic the plan "
                          "was fitted to)")
    if transport not in ("flat", "hierarchical", "both"):
        raise ConfigError(f"locus: configuration error: transport {transport!r} is not one of flat, hierarchical, "
                          "both")
    for name, t in (("window", window), ("prior", prior)):
        # The re-plan weighs decode tokens; phases are the caller's to mark, as for plan and simulate.
        if t is not None and t._phase_counts()[1] == 0:
            raise ConfigError(f"locus: configuration error: the {name} has no decode tokens to re-plan on (its phases "
                              f"are not recorded, or every token is prefill): mark them, e.g. "
                              f"{name}.with_prefill_tokens(32)")
    if homes is not None and prior is None and (model is not None or prefill_tokens != 32):
        # With homes every window request's node is known: the classes are read for a prior's only.
        raise ConfigError("locus: configuration error: model and prefill_tokens classify requests without homes (a "
                          "window's without homes, or the prior's); with homes and no prior nothing reads them")
    h = None if homes is None else _array(homes, np.int64, 1, "homes")
    m = model if model is not None else plan.model
    maps, report = _core._replan(
        plan._maps(), plan.experts, nodes, gpus_per_node, window, h, m, prior, budget,
        32.0 if prior_requests is None else prior_requests, transport, replan_slack, expert_bytes,
        prefill_tokens, _int_list(plan.layer_ids, "ExpertPlan.layer_ids") if plan.layer_ids is not None else [],
        replica_rule,
    )
    out = ExpertPlan(maps, plan.experts, plan.nodes, plan.gpus_per_node, plan.model, plan.layer_ids,
                     plan.hidden_layers)
    doc = json.loads(report)
    # A swap may move a hedge copy, or put a copy where a hedge was: unknown once a slot moved.
    out._hedge_copies = plan._hedge_copies if doc["slots_moved"] == 0 else None
    if plan.layer_ids is not None:  # the layer numbers of the engines' files, as map replan --json
        for move in doc["moves"]:
            move["model_layer"] = int(plan.layer_ids[move["layer"]])
    return out, doc


@_checked
def export_text(
    plan: ExpertPlan,
    to: str,
    first_moe_layer: Optional[int] = None,
    num_hidden_layers: int = 0,
    layer_ids: Optional[Sequence[int]] = None,
    load: Any = None,
    mtp_layers: int = 0,
    moe_layer_step: Optional[int] = None,
) -> str:
    """The plan in the file engine ``to`` takes (sglang, vllm, trtllm, eplb); empty slots are
    filled first (see ExpertPlan.filled). Planned layer i is hidden layer ``layer_ids[i]``, or
    ``first_moe_layer + i * moe_layer_step`` (as ``locus map export``: the step 1 unless given, the
    first layer the plan's own first one when only the step is given; Llama 4 Maverick: 1 and 2), or
    the plan's own layer ids (from its trace), or i; the model has
    ``num_hidden_layers`` layers, or the plan's count, or the last MoE layer + 1. ``mtp_layers``
    (as ``locus map export --mtp-layers``, at most 16): multi-token-prediction layers after the
    hidden layers (DeepSeek-V3/R1 with MTP: 1), which TensorRT-LLM balances too and refuses to
    start without; each gets the trivial placement (slot p holds expert p mod E) there; the other
    files have no row for them, so one set of arguments serves every engine. A plan's own layer
    ids at or past ``num_hidden_layers`` (TensorRT-LLM's statistics hold DeepSeek-V3's MTP layer 61)
    are its MTP layers: TensorRT-LLM gets their maps, the other files leave them out."""
    _whole(mtp_layers, "mtp_layers", 0, _LIMITS["mtp_layers"])
    if layer_ids is not None and (first_moe_layer is not None or moe_layer_step is not None):
        # Either numbers every layer; one of them was ignored.
        raise ConfigError("locus: configuration error: give layer_ids or first_moe_layer/moe_layer_step, not both")
    if to == "locus":  # the CLI's `map export --to locus`: a map, not an engine's file
        raise ConfigError("locus: configuration error: \"locus\" is no engine format here (sglang, vllm, trtllm or "
                          "eplb); the map as the engines serve it is plan.filled(load), saved with its save(path)")
    layers, top = plan.layers, _LIMITS["hidden_layers"]
    _whole(num_hidden_layers, "num_hidden_layers", 0, top)
    if layer_ids is not None:
        ids, ids_name = _int_list(layer_ids, "layer_ids"), "layer_ids"
    elif first_moe_layer is not None or moe_layer_step is not None:
        step = 1
        if moe_layer_step is not None:
            _whole(moe_layer_step, "moe_layer_step", 1, top)
            step = moe_layer_step
        if (layers - 1) * step > top - 1:
            raise ConfigError(f"locus: configuration error: moe_layer_step is {step}: the plan's {layers} layers "
                              f"would pass the {top} hidden layers the library takes")
        if first_moe_layer is None:
            first_moe_layer = plan.layer_ids[0] if plan.layer_ids is not None else 0
        # The library's words named no argument: "model layers: 5002 hidden layers (at most 4096)".
        _whole(first_moe_layer, "first_moe_layer", 0, top - 1 - (layers - 1) * step)
        ids = [first_moe_layer + i * step for i in range(layers)]
        ids_name = "first_moe_layer" if moe_layer_step is None else "moe_layer_step"
    elif plan.layer_ids is not None:
        ids, ids_name = list(plan.layer_ids), "ExpertPlan.layer_ids"
    else:
        ids, ids_name = list(range(layers)), None
    given = num_hidden_layers or plan.hidden_layers
    hidden_name = "num_hidden_layers" if num_hidden_layers else "ExpertPlan.hidden_layers"
    # Layers past num_hidden_layers are MTP layers, as many as the model has (as `locus map export`):
    # one the plan's own ids may hold (TensorRT-LLM's statistics do); more, or ones the arguments
    # number, need mtp_layers; else the count is wrong and real layers would leave the files.
    mtp = mtp_layers
    saved = ids_name == "ExpertPlan.layer_ids"
    if ids_name in ("first_moe_layer", "moe_layer_step") and given and given <= ids[-1] and not mtp_layers:
        raise ConfigError(f"locus: configuration error: first_moe_layer is {first_moe_layer}"
                          + (f" and moe_layer_step {moe_layer_step}" if moe_layer_step is not None else "")
                          + f": the plan's {layers} layers end at hidden layer {ids[-1]}, and {hidden_name} is {given}")
    # (Ids the arguments give, without mtp_layers: _check_model_layers names the first one past.)
    if num_hidden_layers and ids and max(ids) >= num_hidden_layers and (saved or mtp_layers):
        span = max(ids) - num_hidden_layers + 1
        if span > (max(mtp_layers, 1) if saved else mtp_layers):
            past = [v for v in ids if v >= num_hidden_layers]
            # As `locus map export`: for a file with no MTP rows the count comes first (mtp_layers would
            # only leave real layers out).
            top = _LIMITS["mtp_layers"]
            if span > top:
                fix = (f", {span} layers past it, more than a model's multi-token-prediction layers (at most {top}): "
                       "give the model's hidden-layer count")
            elif to == "trtllm":
                fix = (f": as multi-token-prediction layers they need mtp_layers={span}"
                       + (" (a plan's saved layers may hold one)" if saved else "")
                       + "; else give the model's hidden-layer count")
            else:
                fix = (": give the model's hidden-layer count; only if they are its multi-token-prediction layers, "
                       f"which the {to} file has no row for, does mtp_layers={span} leave them out")
            raise ConfigError(f"locus: configuration error: the plan's layers {past[0]}..{past[-1]} lie past "
                              f"num_hidden_layers {num_hidden_layers}{fix}")
        mtp = max(mtp_layers, span)
    _check_model_layers(ids if ids_name else None, layers, given, ids_name or "", hidden_name, mtp)
    # The largest id, not the last: ids out of order are then reported as such.
    hidden = given or (max(ids) + 1 if ids else 0)
    # As `locus map export` says on stderr: the model's MoE layers going on past the plan's would be
    # served with no plan, unless its last layers are dense (which nothing here can tell).
    # Only for a count the arguments give: a plan's own comes from a source that saw every hidden
    # layer (a routed-experts array, SGLang's per-layer counts), whose unplanned layers are dense.
    count_given = bool(num_hidden_layers) and (not saved or num_hidden_layers != plan.hidden_layers)
    unplanned = _core._unplanned_layer(ids, hidden, mtp) if ids and count_given else 0
    if unplanned:
        _warn(f"locus.export_text: the plan's MoE layers end at hidden layer {[v for v in ids if v < hidden][-1]}, "
              f"but their numbering goes on at layer {unplanned} of the model's {hidden}: unless the model's last "
              "layers are dense, the engine serves those with no plan (TensorRT-LLM fails at start-up); plan on a "
              "trace of this model, or give first_moe_layer, moe_layer_step and num_hidden_layers as the model has "
              "them")
    # The planned MTP layers a file without MTP rows leaves out: said, as `locus map export` says it.
    dropped = [v for v in ids if v >= hidden] if ids and to != "trtllm" else []
    if dropped:
        _warn(f"locus.export_text: the plan's last {len(dropped)} layer{'s' if len(dropped) > 1 else ''} (from layer "
              f"{dropped[0]}, past num_hidden_layers {hidden}): the model's multi-token-prediction layers, which the "
              f"{to} file has no row for; left out")
    full = plan.filled(load)
    return _core._export_text(full._maps(), plan.experts, to, ids, hidden, mtp)


@_checked
def export(plan: ExpertPlan, to: str, path: str, **kwargs: Any) -> None:
    """Writes ``export_text(plan, to, **kwargs)`` to ``path`` atomically (as every locus file: an
    existing file keeps its mode, a symbolic link its target). SGLang's file must be named
    ``*.json``: SGLang parses any other value of ``--init-expert-location`` as JSON text."""
    if to == "sglang" and isinstance(path, (str, bytes, os.PathLike)) and \
            not os.fsdecode(os.fspath(path)).endswith(".json"):
        raise ConfigError(f"locus: configuration error: {_path_text(path)}: SGLang reads --init-expert-location as a "
                          "file only when its name ends in .json (any other value is parsed as JSON text); name the "
                          "file X.json")
    _core._write_text(path, export_text(plan, to, **kwargs))


# Loaded with the package, as docs/engines.md writes it (locus.engines.load_sglang_logical_count);
# last, since it imports from this module. locus.vllm stays an explicit import: it imports vLLM.
from . import engines  # noqa: E402
