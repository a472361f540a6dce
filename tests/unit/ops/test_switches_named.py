"""The switches the command line's help names are the ones the package reads, with the values it accepts."""

import re
from pathlib import Path

import longspec_lab
from longspec_lab import cli

PACKAGE = Path(longspec_lab.__file__).parent


def _sources() -> str:
    roots = [PACKAGE, PACKAGE.parent / "kernels"]
    return "\n".join(p.read_text() for root in roots if root.is_dir() for p in sorted(root.rglob("*.py")))


def test_every_switch_in_the_help_is_read_by_the_package():
    named = dict(re.findall(r"(LONGSPEC_[A-Z_]+) \(([^)]*)\)", cli.__doc__))
    assert len(named) >= 6, named
    src = _sources()
    for name, values in named.items():
        m = re.search(rf'os\.environ\.get\("{name}", "([^"]*)"\)', src)
        assert m, f"the help names {name}, which no module reads"
        default = m.group(1)
        assert values.split("/")[0] == default, f"{name}: the help lists {values!r} first, the default is {default!r}"
