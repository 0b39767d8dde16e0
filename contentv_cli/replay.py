"""`python demo.py replay <sidecar.json> [--output DIR]` (and `contentv replay ...`): make a video again from its sidecar
alone, on the backend it names, saying what differs from the recorded run (library versions, the checkpoint)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def replay(sidecar: str | Path, output_dir: str | None = None) -> tuple[Any, list[str]]:
    """From Python: (RunResult, what differs). The backend is the one the sidecar records."""
    import backends
    from contentv import replay as library
    from contentv.runtime import Runtime

    cfg = library.config_of(library.read_sidecar(sidecar), output_dir)
    runtime = Runtime(backends.build_backend(cfg.backend), progress=sys.stderr.isatty())
    return library.replay(sidecar, runtime, output_dir)


def main(argv: list[str], prog: str = "python demo.py replay") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("sidecar", help="a video's sidecar (<video>.json)")
    parser.add_argument("--output", default="outputs/replay", help="folder for the new video (default: %(default)s)")
    args = parser.parse_args(argv)
    from contentv.errors import ConfigError, first_line

    try:
        result, changed = replay(args.sidecar, str(Path(args.output).absolute()))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line, as for a run
        print(f"error: {first_line(exc, with_type=True)}", file=sys.stderr)
        return 1
    for line in changed:
        print(f"differs: {line}", file=sys.stderr)
    print(f"same versions and checkpoint as recorded: {'no' if changed else 'yes'}")
    print(f"video:   {result.video}")
    return 0
