"""What the benchmark drivers that run one program per split seed share (split_spread.py,
drift_unseen.py): their command line (the build's bench folder, the output folder, --seeds,
--name, and options after -- passed to every run) and writing NAME.json and NAME.md atomically."""
import argparse
import json
import os


def parse(argv, program, description, default_seeds, default_name, add_options=None):
    """(options, seeds, extra program options, path of `program`) from the command line `argv`;
    `add_options(parser)` adds the driver's own options. Exits with a usage error on a bad value."""
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
        parser.error("--seeds takes comma-separated integers, got %r" % opts.seeds)
    path = os.path.join(opts.bench_dir, program)
    if not os.access(path, os.X_OK):
        parser.error("%s holds no %s program (give the build's bench folder)" % (opts.bench_dir, program))
    opts.parser = parser
    return opts, seeds, extra, path


def write(out_dir, name, doc, md_lines):
    """Writes OUT_DIR/NAME.json and OUT_DIR/NAME.md, each through a temporary file and a rename."""
    os.makedirs(out_dir, exist_ok=True)
    for ext, text in (("json", json.dumps(doc, indent=1) + "\n"), ("md", "\n".join(md_lines) + "\n")):
        path = os.path.join(out_dir, "%s.%s" % (name, ext))
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
