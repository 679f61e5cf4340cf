"""Same-run comparison of the GPU benchmarks against a baseline build: for every timing in the
JSON files `scripts/gpu-check` wrote (fields ending in _us or _ms), the baseline's value over the
current one (above 1: the current build is faster), for each repeat the run made.

    /usr/bin/python3 bench/compare_gpu.py OUT_DIR [--markdown FILE]

OUT_DIR holds NAME.json (current) and NAME.baseline.json (the baseline), and when gpu-check ran
them twice NAME.2.json and NAME.baseline.2.json; a benchmark without a baseline file is skipped.
Rows of a benchmark's "rows" list (or of any list of objects) are matched by their text fields and
token counts, so a row present in only one build is reported as such, not paired with another.
"""
import argparse
import json
import os
import sys
import tempfile


def timings(doc, prefix=""):
    """Flattens a benchmark document into {path: value} for its timing fields."""
    out = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            path = prefix + "." + k if prefix else k
            # Timings only: a floor (bytes over bandwidth) is computed, not measured.
            timing = (k.endswith("_us") or k.endswith("_ms")) and "floor" not in k
            if isinstance(v, (int, float)) and not isinstance(v, bool) and timing:
                out[path] = float(v)
            elif isinstance(v, (dict, list)):
                out.update(timings(v, path))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            if isinstance(v, dict):
                # A row is named by its text fields and token count, which both builds print alike.
                name = ", ".join(str(v[k]) for k in sorted(v) if isinstance(v[k], str) or k in ("tokens", "kernel"))
                out.update(timings(v, "%s[%s]" % (prefix, name or i)))
    return out


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        sys.exit("compare_gpu: %s is not valid JSON (%s)" % (path, e))
    except OSError as e:  # a folder of that name, no permission
        sys.exit("compare_gpu: cannot read %s: %s" % (path, e.strerror or e))


def main():
    parser = argparse.ArgumentParser(
        description="Baseline / current time of every GPU benchmark timing in a gpu-check output folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", help="the folder scripts/gpu-check wrote its JSON files to")
    parser.add_argument("--markdown", default="", help="also write the table to this Markdown file (none when empty)")
    opts = parser.parse_args()
    if not os.path.isdir(opts.out_dir):
        parser.error("%s is not a folder" % opts.out_dir)
    if opts.markdown:
        folder = os.path.dirname(opts.markdown) or "."
        if os.path.isdir(opts.markdown):
            parser.error("--markdown %s is a folder, not a file" % opts.markdown)
        if not os.path.isdir(folder):
            parser.error("--markdown %s: the folder %s does not exist" % (opts.markdown, folder))
    names = sorted(f[: -len(".baseline.json")] for f in os.listdir(opts.out_dir) if f.endswith(".baseline.json"))
    if not names:
        sys.exit("compare_gpu: no NAME.baseline.json in %s (run scripts/gpu-check --prepare --baseline REV first)"
                 % opts.out_dir)
    lines = ["| benchmark | timing | baseline | current | baseline / current |", "|---|---|---:|---:|---:|"]
    for name in names:
        for rep in ("", ".2"):
            cur = load(os.path.join(opts.out_dir, name + rep + ".json"))
            base = load(os.path.join(opts.out_dir, name + ".baseline" + rep + ".json"))
            if cur is None or base is None:
                continue
            tc, tb = timings(cur), timings(base)
            label = name + (" (repeat)" if rep else "")
            for path in sorted(set(tc) | set(tb)):
                if path not in tc or path not in tb:
                    lines.append("| %s | %s | %s | %s | only in the %s build |" % (
                        label, path, tb.get(path, ""), tc.get(path, ""), "current" if path in tc else "baseline"))
                    continue
                ratio = tb[path] / tc[path] if tc[path] > 0 else float("inf")
                lines.append("| %s | %s | %.4g | %.4g | %.3f |" % (label, path, tb[path], tc[path], ratio))
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if opts.markdown:
        tmp = None
        try:
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(opts.markdown) or ".",
                                             prefix="." + os.path.basename(opts.markdown) + ".", suffix=".tmp",
                                             delete=False) as f:
                tmp = f.name
                f.write("# GPU benchmarks against a baseline build (same run)\n\n" + text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, opts.markdown)
        except OSError as e:
            sys.exit("compare_gpu: cannot write %s: %s" % (opts.markdown, e.strerror or e))
        finally:
            if tmp and os.path.lexists(tmp):
                os.unlink(tmp)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.stderr.write("\ncompare_gpu: interrupted\n")
        sys.exit(130)
