"""Documentation tables generated from the declarations (``python -m harness.docs`` rewrites them).

The knob table of docs/STUDIES.md and the method table of docs/METHODS.md sit between
``<!-- generated:NAME -->`` and ``<!-- end:NAME -->`` markers; a test fails when the committed text
differs from what the declarations give. Torch-free, like ``harness.spec``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import spec

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def knob_table() -> str:
    """Every knob: type, default, per-method defaults, the methods that read it, its meaning."""
    methods = spec.method_declarations()
    names = tuple(methods)
    lines = [
        "| knob | type | default | per-method default | read by | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for declared in spec.KNOBS.values():
        type_name = {int: "integer", float: "number", bool: "bool", str: "string"}[declared.base_type]
        if declared.optional:
            type_name += " or null"
        per_method = ", ".join(
            f"{name} {_value(m.knobs[declared.name])}"
            for name, m in methods.items()
            if declared.name in m.defaults() and m.knobs[declared.name] != declared.default
        )
        readers = spec.readers_of(declared.name)
        read_by = "every method" if readers == names else ", ".join(readers)
        meaning = declared.meaning
        if declared.check is not None and not declared.check.whole:
            meaning += f" ({declared.check.expected})"
        rules = [
            f"{name}: {rule.expected}" for name, m in methods.items() for rule in m.rules if rule.knob == declared.name
        ]
        if rules:
            meaning += "; " + "; ".join(rules)
        notes = []
        if not declared.identity:
            notes.append("not part of the configuration's identity")
        if declared.legacy is not spec.IN_IDENTITY:
            notes.append(f"added after the first release; `{_value(declared.legacy)}` behaves as before it existed")
        if notes:
            meaning += "; " + "; ".join(notes)
        lines.append(
            f"| `{declared.name}` | {type_name} | `{_value(declared.default)}` | {per_method or '-'} | {read_by} | {meaning} |"
        )
    return "\n".join(lines)


def method_facts_table() -> str:
    """Every method's declaration: paper, knobs with their defaults, trains, labels, colour."""
    lines = [
        "| method | paper | knobs (per-method default) | trains | labels | colour |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in spec.method_declarations().items():
        knobs = ", ".join(
            f"`{k}` {'(default)' if v is Ellipsis else _value(v)}" for k, v in m.knobs.items()
        )
        cite = f" ({m.cite})" if m.cite else ""
        role = " (baseline)" if m.baseline else ""
        lines.append(
            f"| `{name}`{role} | {m.paper}{cite} | {knobs or '—'} | {'yes' if m.trains else 'no'} | "
            f"{'yes' if m.uses_labels else 'no'} | `{m.colour}` |"
        )
    return "\n".join(lines)


GENERATED: dict[str, tuple[str, Callable[[], str]]] = {
    "knobs": ("STUDIES.md", knob_table),
    "methods": ("METHODS.md", method_facts_table),
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated:{name} -->\n)(.*?)(\n<!-- end:{name} -->)", re.S)


def generated_text(text: str, name: str) -> str | None:
    match = _pattern(name).search(text)
    return match.group(2) if match else None


def rewrite(docs: Path = DOCS) -> list[Path]:
    """Write every generated table into its document; returns the files that changed."""
    changed = []
    for name, (file_name, make) in GENERATED.items():
        path = docs / file_name
        text = path.read_text(encoding="utf-8")
        if generated_text(text, name) is None:
            raise LookupError(f"{path}: no <!-- generated:{name} --> ... <!-- end:{name} --> markers")
        table = make()
        new = _pattern(name).sub(lambda m, table=table: m.group(1) + table + m.group(3), text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":
    for path in rewrite():
        print(f"rewrote {path}")
    sys.exit(0)
