"""How to install an optional extra, as an installed user types it: the packages the extra names, with their ranges
(read from this package's metadata), e.g. `pip install 'gradio>=6.0,<7'` for the `ui` extra."""

from __future__ import annotations

import functools
import re


@functools.cache
def packages(extra: str) -> tuple[str, ...]:
    """The requirements the extra adds (its nested extras expanded), as pip takes them."""
    import importlib.metadata as md

    from contentv import DISTRIBUTION

    try:
        requires = md.requires(DISTRIBUTION) or []
    except md.PackageNotFoundError:
        return ()
    out: list[str] = []
    for req in requires:
        spec, _, marker = req.partition(";")
        if re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker):
            nested = re.fullmatch(re.escape(DISTRIBUTION) + r"\[([\w,]+)\]", spec.strip().replace(" ", ""))
            if nested:
                out += [p for e in nested.group(1).split(",") for p in packages(e)]
            else:
                out.append(spec.strip().replace(" ", ""))
    return tuple(dict.fromkeys(out))


def install_hint(extra: str) -> str:
    """`pip install '<packages>'` (the `<extra>` extra) for a message."""
    found = packages(extra)
    if not found:
        from contentv import DISTRIBUTION

        return f"pip install '{DISTRIBUTION}[{extra}]' (the {extra} extra)"
    return "pip install " + " ".join(f"'{p}'" for p in found) + f" (the {extra} extra)"
