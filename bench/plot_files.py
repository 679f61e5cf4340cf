"""What the plot scripts (plot_drift.py, plot_comm_volume.py) share: one-line failures, reading a
benchmark's JSON and writing a PNG atomically (a reader never sees half a figure)."""
import json
import os
import sys
import tempfile


def fail(script, message):
    """Ends the run with `script: message` on one line of stderr."""
    sys.stderr.write("%s: %s\n" % (script, message))
    sys.exit(1)


def read_json(script, path):
    """The JSON document at `path`, or a one-line failure saying why it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        fail(script, "cannot read %s: %s" % (path, e.strerror or e))
    except (ValueError, UnicodeDecodeError) as e:
        fail(script, "%s is not valid JSON (%s)" % (path, e))


def save_png(script, fig, path, dpi):
    """Draws `fig` into `path` through a synced temporary beside it, renamed over it."""
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path) or ".", prefix="." + os.path.basename(path) + ".",
                                         suffix=".tmp", delete=False) as f:
            tmp = f.name
            fig.savefig(f, dpi=dpi, format="png")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        fail(script, "cannot write %s: %s" % (path, e.strerror or e))
    finally:
        if tmp and os.path.lexists(tmp):
            os.unlink(tmp)
