"""Shared by the per-engine examples: the trace to plan on (a locus binary trace, an ESFT folder,
or, with no --trace, a small synthetic one built from NumPy arrays) and the output folder."""

import argparse
import os
import sys

import numpy as np

import locus


def whole(minimum):
    """An argparse type: a whole number >= minimum (argparse's int takes -1 and 1e30-sized values)."""

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} is below {minimum}")
        return v

    return parse


def arguments(description: str, layer_flags: bool = True) -> argparse.Namespace:
    """The examples' flags; `layer_flags` only where the engine's file numbers hidden layers."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--trace", help="locus binary trace or ESFT folder (default: a synthetic trace)")
    # Defaults in --help, as the driver and the benchmarks show theirs.
    p.add_argument("--out", default=".", help="folder for the files written (default: %(default)s)")
    p.add_argument("--nodes", type=whole(1), default=2, help="nodes (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=whole(1), default=4, help="GPUs (ranks) per node (default: %(default)s)")
    if layer_flags:
        p.add_argument("--first-moe-layer", type=whole(0), default=None,
                       help="hidden-layer index of the first MoE layer (default: the trace's own layer numbers, else 0)")
        p.add_argument("--moe-layer-step", type=whole(1), default=None,
                       help="hidden layers from one MoE layer to the next (Llama 4 Maverick: 2; default: the trace's "
                            "own layer numbers, else 1)")
        p.add_argument("--num-hidden-layers", type=whole(0), default=0,
                       help="the model's hidden layers (default 0: the last layer is MoE)")
        p.add_argument("--mtp-layers", type=whole(0), default=0,
                       help="multi-token-prediction layers after the hidden layers (DeepSeek-V3/R1 with MTP: 1; "
                            "TensorRT-LLM keys them; default: %(default)s)")
    a = p.parse_args()
    # A wrong input or output is a one-line message, not a traceback through the example: the
    # script's name, then the error's kind and message ("vllm.py: format error: ..."), as the
    # benchmarks and the driver say theirs; the library's own "locus: " would be a second name.
    default_hook = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, (locus.LocusError, OSError)):
            text = str(value).removeprefix("locus: ")
            print(f"{os.path.basename(sys.argv[0])}: {text}", file=sys.stderr)
        else:
            default_hook(kind, value, tb)

    sys.excepthook = hook
    os.makedirs(a.out, exist_ok=True)
    return a


def load_trace(path):
    """The trace, prefill marked on its first 32 tokens per request when it does not say."""
    if path is None:
        return synthetic()
    t = locus.import_esft(path) if os.path.isdir(path) else locus.read_trace(path)
    return t.with_prefill_tokens(32)


def synthetic(requests=64, length=48, layers=4, experts=32, k=4, seed=0):
    """Requests of four kinds, each routing mostly into its own block of experts."""
    rng = np.random.default_rng(seed)
    ids = np.empty((requests * length, layers, k), np.int32)
    for r in range(requests):
        block = np.arange(8) + 8 * (r % 4)
        for t in range(r * length, (r + 1) * length):
            for l in range(layers):
                pool = block if rng.random() < 0.75 else np.arange(experts)
                ids[t, l] = rng.choice(pool, size=k, replace=False)
    phases = np.tile(["prefill"] * 16 + ["decode"] * (length - 16), requests)
    return locus.trace_from_arrays(ids, experts, request_ids=np.repeat(np.arange(requests), length), phases=phases)
