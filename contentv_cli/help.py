"""--help: the usage, the config groups and their options, and every field with its value and description."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from contentv import COMMAND
from contentv_cli.compose import (
    GROUPS,
    UsageError,
    _compose,
    compose_error,
    expand_jobs,
    group_options,
    hydra_context,
    literal_prompts,
)


def help_text(overrides: Sequence[str]) -> str:
    """--help: usage and examples (conf/config.yaml's hydra.help), the config groups and their options, and every
    field with the value this command line composes to and its one-line description (contentv.config)."""
    import textwrap

    from omegaconf import OmegaConf

    from contentv.config import field_docs

    (job,) = expand_jobs(literal_prompts([o for o in overrides if o != "-m"], False), False)
    with hydra_context():
        try:
            composed = _compose(job, hydra=True)
        except Exception as exc:  # noqa: BLE001 - composition errors are usage errors
            raise UsageError(compose_error(exc, job)) from exc
        groups = {g: group_options(g, job) for g in (*GROUPS, "hydra/launcher")}
    help_cfg = composed.hydra.help
    del composed.hydra
    values = OmegaConf.to_container(composed, resolve=True)
    chosen = {g: (values.get(g) or {}).get("name") for g in GROUPS}
    header = help_cfg.header.rstrip()
    if Path(sys.argv[0]).name == COMMAND:  # the installed command: its usage lines name it
        header = header.replace("python demo.py", COMMAND)
    lines = [header, "", "Config groups (GROUP=OPTION; * = this command line's choice):"]
    for group, options in groups.items():
        marked = ", ".join(f"{o}*" if o == chosen.get(group) else o for o in options)
        lines.append(f"  {group:<16}{marked}")
    lines += ["", "Fields (KEY=VALUE as this command line composes them; null = the default described):"]
    docs = field_docs()
    for key, doc in docs.items():
        node = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        shown = f"{key}={_show(node)}"
        wrapped = textwrap.wrap(doc, 118 - 44) or [""]
        lines.append(f"  {shown:<42}{wrapped[0]}" if len(shown) < 42 else f"  {shown}\n{'':44}{wrapped[0]}")
        lines += [f"{'':44}{more}" for more in wrapped[1:]]
    lines += ["", help_cfg.footer.rstrip(), "Hydra's own flags: --hydra-help; the composed config: --cfg job."]
    return "\n".join(lines)


def _show(value: object) -> str:
    """A field's value as the command line writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w./:-]+", value) else repr(value)
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
