"""Names that become paths: the identifier rule, and the one helper that builds a path from names.

Names of sites, hosts, VMs, disks, plans and run intents end up as file and directory names (a VM's
record `<state>/linux/vms/<vm>.json`, its replica `<root>/<vm>/replica/<disk>.img`, a run's journal
`<state>/runs/<intent>/`). They are therefore identifiers, the rule stated here once:

    IDENT_RE = [A-Za-z0-9][A-Za-z0-9._-]{0,62}, and no ".." anywhere

ASCII letters, digits, dot, underscore and hyphen; starting with a letter or digit (so never `.`,
`..`, a hidden file or an option-looking `-x`); at most 63 characters; no path separator, no `..`.
Validation refuses other names with file:line:column (model.common.Ident). `child()` checks again
whenever a path is built from names, so a name that bypassed validation (a driver called directly, a
flow parameter typed into the UI) still cannot leave its root: defence in depth.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigurationError

IDENT_MAX = 63
# Run intents are generated as `<plan>-<type>-<UTC stamp>-<hex>`, longer than a plan name: same
# characters, a longer limit.
INTENT_MAX = 128
IDENT_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
IDENT_RE = re.compile(IDENT_PATTERN)
_CHARS_RE = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]*$")
IDENT_RULE = ("letters, digits, '.', '_' and '-', starting with a letter or digit, at most "
              f"{IDENT_MAX} characters, no '..'")
# A component of a path built from names: one file name (a name plus our own prefixes and suffixes,
# e.g. `<disk>.img`, `<intent>`), never a separator or a dot segment.
_COMPONENT_MAX = 255


class UnsafeName(ConfigurationError):
    """A name that would not stay one path component inside its root."""


def is_ident(name: object, max_len: int = IDENT_MAX) -> bool:
    return isinstance(name, str) and len(name) <= max_len and _CHARS_RE.match(name) is not None


def check_ident(name: object, what: str = "name", max_len: int = IDENT_MAX) -> str:
    """`name` if it is an identifier, else UnsafeName saying which rule it breaks."""
    if not is_ident(name, max_len):
        rule = IDENT_RULE.replace(str(IDENT_MAX), str(max_len))
        raise UnsafeName(f"{what} {name!r} is not a valid identifier ({rule})", name=str(name), what=what)
    assert isinstance(name, str)
    return name


def _component_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return "is empty"
    if name in (".", ".."):
        return "is a dot segment"
    if "/" in name or "\\" in name or "\x00" in name:
        return "contains a path separator or NUL"
    if len(name.encode("utf-8", "surrogatepass")) > _COMPONENT_MAX:
        return f"is longer than {_COMPONENT_MAX} bytes"
    return None


def child(root: str | os.PathLike[str], *names: str, suffix: str = "") -> Path:
    """`root/names[0]/names[1]/...` (+ `suffix` on the last one, e.g. `.json`), each name one path
    component, the result inside `root`.

    Raises UnsafeName (naming the component and the root) for an empty name, `.` or `..`, a separator
    or NUL, or anything that would resolve outside `root` (a symlink inside the root is not followed:
    the check is on the path as built, which is what every caller writes to).
    """
    base = os.path.abspath(os.fspath(root))
    for name in names:
        problem = _component_problem(name)
        if problem:
            raise UnsafeName(f"name {name!r} {problem}: refusing to build a path from it under {base}",
                             name=str(name), root=base)
    if suffix:
        if not names or "/" in suffix or "\x00" in suffix:
            raise UnsafeName(f"bad suffix {suffix!r}", name=suffix, root=base)
        names = (*names[:-1], names[-1] + suffix)
    path = os.path.normpath(os.path.join(base, *names))
    if path != base and not path.startswith(base.rstrip(os.sep) + os.sep):
        raise UnsafeName(f"path {path} built from {names!r} leaves {base}", name="/".join(names), root=base)
    return Path(root, *names)
