"""The command line (`python demo.py ...`, the `contentv` command): one module per concern.

- `compose`: overrides -> jobs (the one expansion) -> typed configs; the presets of each group (Hydra).
- `help`: `--help`.
- `preflight`: every job composed, checked and resolved once, before Hydra writes anything.
- `job`: the function Hydra runs per job (it trusts the resolved run).
- `sweep`: the sweeper (the same job expansion) and the sweep summary callback.

This package is the entry layer, beside the library: it may import Hydra and `backends`; `contentv` never does. Python
users who want the command line's presets: `from contentv_cli import load_config, load_presets`.
"""

from __future__ import annotations

import os
import sys

from contentv_cli.compose import (
    UsageError,
    expand_jobs,
    group_options,
    hydra_context,
    literal_prompts,
    load_config,
    load_presets,
)

__all__ = ["UsageError", "expand_jobs", "group_options", "hydra_context", "literal_prompts", "load_config"]
__all__ += ["load_presets", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 failed, 2 bad input, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C at any moment, imports included: one line, no traceback
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["compare"]:  # two sweep folders side by side; before the imports below (no torch needed)
        from contentv.sweep import compare

        return compare.main(argv[1:], prog="python demo.py compare")
    # transformers' import-time notices (e.g. optional torchvision) aren't the user's concern; overridable. Set
    # before anything imports transformers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from contentv import _diffusers

    _diffusers.defer_quantization_libraries()  # imported only when a quantization is selected
    if argv[:1] == ["replay"]:  # a video again from its sidecar
        from contentv_cli import replay

        return replay.main(argv[1:])
    import hydra

    from backends import distributed
    from contentv.errors import ConfigError
    from contentv_cli import job
    from contentv_cli.compose import config_dir, quote_text, register_configs
    from contentv_cli.help import help_text
    from contentv_cli.preflight import check_hydra_modes, preflight, reserve_run_dir
    from contentv_cli.sweep import install_sweeper

    multirun = any(a in ("-m", "--multirun") for a in argv)
    typed = list(argv)  # as the user typed it (the sidecar records it)
    argv = literal_prompts(argv, multirun)
    distributed.export_slurm_env()
    register_configs()
    try:
        check_hydra_modes(argv)
        if any(a in ("--help", "-h") for a in argv):
            print(help_text([a for a in argv if a not in ("--help", "-h")]))
            return 0
        prepared = preflight(argv)
        if prepared is not None and prepared.dry:
            return 0
        if prepared is not None and prepared.run_dir:  # this run's own folder, even if others start this second
            prepared.run_dir = reserve_run_dir(prepared.run_dir)
            argv = [*argv, f"hydra.run.dir={quote_text(prepared.run_dir)}"]
    except (UsageError, ConfigError) as exc:
        if "debug=true" in argv:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job.adopt(prepared, typed)
    install_sweeper()
    sys.argv = [sys.argv[0], *argv]
    try:
        if prepared is not None and prepared.composed is not None:
            job.run_single(prepared)  # composed once, above
        else:  # a sweep, or Hydra's own flags
            hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(job.task)()
    finally:
        distributed.destroy()
    return 0
