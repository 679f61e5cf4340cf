"""What the benchmark drivers that run one program per split seed share (split_spread.py,
drift_unseen.py): their command line (the build's bench folder, the output folder, --seeds,
--name, and options after -- passed to every run), running the program, Ctrl-C, and writing
NAME.json and NAME.md atomically (both or neither)."""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile


def fail(script, message, status=1):
    """Ends the run with `script: message` on one line of stderr."""
    sys.stderr.write("%s: %s\n" % (script, message))
    sys.exit(status)


def usage_error(parser, message):
    fail(parser.prog, "error: " + message, 2)


def nearest_existing(path):
    """The folder `path` is or would be made in: `path` itself or its nearest existing parent."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_output(parser, out_dir, name):
    """Refuses, before any run, an output folder that is not one (or cannot be made or written in)
    and a --name that is no plain file name, or whose NAME.json or NAME.md is a folder."""
    if not name:
        usage_error(parser, "--name is empty (the files would be the hidden .json and .md)")
    if "/" in name or "\0" in name or name.startswith("."):
        usage_error(parser, "--name %r is not a plain file name (no '/', not starting with '.')" % name)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        usage_error(parser, "%s exists and is not a folder" % out_dir)
    base = nearest_existing(out_dir)
    if not os.path.isdir(base):
        usage_error(parser, "%s cannot be made: %s is not a folder" % (out_dir, base))
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".%s." % name, suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        usage_error(parser, "cannot write in %s: %s" % (out_dir if base == os.path.abspath(out_dir) else base,
                                                        e.strerror or e))
    for ext in ("json", "md"):
        path = os.path.join(out_dir, "%s.%s" % (name, ext))
        if os.path.isdir(path):
            usage_error(parser, "%s is a folder, not a file this run can replace" % path)


def parse(argv, program, description, default_seeds, default_name, add_options=None):
    """(options, seeds, extra program options, path of `program`) from the command line `argv`;
    `add_options(parser)` adds the driver's own options. Exits with a usage error on a bad value,
    an output folder it cannot write in or a bad --name, before anything runs. `options.command`
    is the command line, shell-quoted."""
    command = shlex.join([sys.executable or "python3", sys.argv[0]] + list(argv))
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=description + "; options after -- go to every %s run." % program,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("bench_dir", help="the build's bench folder (holds %s)" % program)
    parser.add_argument("out_dir", help="where NAME.json and NAME.md are written")
    parser.add_argument("--seeds", default=default_seeds, help="comma-separated split seeds")
    parser.add_argument("--name", default=default_name, help="base name of the output files")
    if add_options:
        add_options(parser)
    opts = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in opts.seeds.split(",")]
    except ValueError:
        usage_error(parser, "--seeds takes comma-separated integers, got %r" % opts.seeds)
    for s in seeds:
        if not 0 <= s < 2 ** 64:
            usage_error(parser, "--seeds: %d is not a split seed (0 to 2^64 - 1)" % s)
        if seeds.count(s) > 1:
            usage_error(parser, "--seeds: seed %d is given twice" % s)
    path = os.path.join(opts.bench_dir, program)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        usage_error(parser, "%s holds no %s program (give the build's bench folder)" % (opts.bench_dir, program))
    check_output(parser, opts.out_dir, opts.name)
    opts.parser = parser
    opts.command = command
    return opts, seeds, extra, path


def run(script, cmd, what):
    """Runs the benchmark `cmd` (its stdout dropped, its progress and messages shown on stderr); on
    failure, after the program's own message, ends the run with one line naming `what` (the program
    and the options that vary)."""
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if done.returncode == -signal.SIGINT:
        raise KeyboardInterrupt  # Ctrl-C reached the program first
    if done.returncode != 0:
        how = "exit %d" % done.returncode if done.returncode > 0 else "killed by signal %d" % -done.returncode
        fail(script, "%s failed (%s); nothing written" % (what, how))


def main(script, body):
    """Runs `body()`; Ctrl-C ends the run with status 130 and one line (temporaries are removed
    on the way out)."""
    try:
        body()
    except KeyboardInterrupt:
        sys.stderr.write("\n%s: interrupted; nothing written\n" % script)
        sys.exit(130)


def write(script, out_dir, name, doc, md_lines):
    """Writes OUT_DIR/NAME.json and OUT_DIR/NAME.md, both or neither: each is written and synced to
    a temporary beside it, then both are renamed (the first put back if the second fails)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(script, "cannot make %s: %s" % (out_dir, e.strerror or e))
    texts = (("json", json.dumps(doc, indent=1) + "\n"), ("md", "\n".join(md_lines) + "\n"))
    umask = os.umask(0)
    os.umask(umask)
    temps = []  # (temporary, final path)
    path = os.path.join(out_dir, name)
    backup = None  # the NAME.json replaced, kept until NAME.md is in place
    done = []
    try:
        for ext, text in texts:
            # A symbolic link is written through (the file it names is replaced), as the C++ writers do.
            path = os.path.realpath(os.path.join(out_dir, "%s.%s" % (name, ext)))
            if os.path.isdir(path):
                raise IsADirectoryError(21, "Is a directory", path)
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), prefix=".%s.%s." % (name, ext),
                                             suffix=".tmp", delete=False) as f:
                temps.append((f.name, path))
                os.fchmod(f.fileno(), 0o666 & ~umask)  # as open() would make it
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        path = first = temps[0][1]
        if os.path.isfile(first):
            backup = os.path.join(os.path.dirname(first), ".%s.json.%d.old" % (name, os.getpid()))
            os.link(first, backup)
        for tmp, path in temps:
            os.replace(tmp, path)
            done.append(path)
    except BaseException as e:
        for tmp, _ in temps:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        if done and len(done) < len(temps):
            if backup:
                os.replace(backup, done[0])
                backup = None
            else:
                os.unlink(done[0])
        if backup:
            os.unlink(backup)
        if isinstance(e, OSError):
            fail(script, "cannot write %s: %s; nothing written" % (path, e.strerror or e))
        raise
    if backup:
        os.unlink(backup)
    try:
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


if __name__ == "__main__":
    fail("seed_sweep.py", "a module imported by split_spread.py and drift_unseen.py; run one of those", 2)
