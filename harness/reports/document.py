"""A small document model rendered twice, to Markdown and to HTML, so both carry the same text
and the same numbers."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

_CODE_SPAN = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Cell:
    text: str
    bold: bool = False
    href: str | None = None


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.text.lower()).strip("-")


@dataclass(frozen=True)
class Paragraph:
    text: str  # `code spans` are the only markup


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    numeric: tuple[bool, ...] = ()  # right-aligned columns
    caption: str = ""
    reference_from: int | None = None  # rows from this index on are reference rows (baselines)


@dataclass(frozen=True)
class Image:
    path: str  # relative to the report's folder
    alt: str
    caption: str = ""


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


Block = Heading | Paragraph | Bullets | Table | Image | Code


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    @property
    def images(self) -> list[str]:
        return [b.path for b in self.blocks if isinstance(b, Image)]


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_cell(cell: Cell) -> str:
    text = cell.text.replace("|", "\\|").replace("\n", " ")
    if cell.href:
        text = f"[{text}]({cell.href})"
    if cell.bold and text:
        text = f"**{text}**"
    return text


def _md_table(table: Table) -> list[str]:
    numeric = table.numeric or tuple(False for _ in table.columns)
    lines = [
        "| " + " | ".join(c.replace("|", "\\|") for c in table.columns) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    for index, row in enumerate(table.rows):
        cells = [_md_cell(c) for c in row]
        if table.reference_from is not None and index >= table.reference_from and cells and cells[0]:
            cells[0] = f"*{cells[0]}*"
        lines.append("| " + " | ".join(cells) + " |")
    if table.caption:
        lines += ["", f"*{table.caption}*"]
    return lines


def to_markdown(document: Document) -> str:
    lines: list[str] = [f"# {document.title}", ""]
    for block in document.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines += [*_md_table(block), ""]
        elif isinstance(block, Image):
            lines += [f"![{block.alt}]({block.path})", ""]
            if block.caption:
                lines += [f"*{block.caption}*", ""]
        elif isinstance(block, Code):
            fence = "````" if "```" in block.text else "```"
            lines += [f"{fence}{block.language}", block.text.rstrip("\n"), fence, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .15em; margin-top: 2em; }
.table-wrap { overflow-x: auto; max-width: 100%; margin: .6em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: .25em .55em; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.reference td { background: #fafafa; font-style: italic; }
tr.first-reference td { border-top: 2px solid #bbb; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; }
figcaption, p.caption { color: #555; font-size: 0.9em; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 0.85em; }
code { background: #f2f2f2; padding: 0 .2em; }
pre code { background: none; padding: 0; }
nav ul { columns: 2; }
@media (max-width: 640px) { body { margin: 1em auto; } nav ul { columns: 1; } }
""".strip()


def _html_inline(text: str) -> str:
    parts = _CODE_SPAN.split(text)
    out = []
    for index, part in enumerate(parts):
        out.append(f"<code>{html.escape(part)}</code>" if index % 2 else html.escape(part))
    return "".join(out)


def _html_cell(cell: Cell, numeric: bool) -> str:
    text = html.escape(cell.text)
    if cell.href:
        text = f'<a href="{html.escape(cell.href)}">{text}</a>'
    if cell.bold and text:
        text = f"<strong>{text}</strong>"
    klass = ' class="num"' if numeric else ""
    return f"<td{klass}>{text}</td>"


def _html_table(table: Table) -> list[str]:
    numeric = table.numeric or tuple(False for _ in table.columns)
    # The wrapper scrolls sideways on a narrow screen; the page itself never does.
    lines = [
        '<div class="table-wrap">',
        "<table>",
        "<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in table.columns) + "</tr></thead>",
        "<tbody>",
    ]
    for index, row in enumerate(table.rows):
        klass = ""
        if table.reference_from is not None and index >= table.reference_from:
            klass = (
                ' class="reference first-reference"'
                if index == table.reference_from
                else ' class="reference"'
            )
        cells = "".join(_html_cell(c, n) for c, n in zip(row, numeric))
        lines.append(f"<tr{klass}>{cells}</tr>")
    lines.append("</tbody></table>")
    lines.append("</div>")
    if table.caption:
        lines.append(f'<p class="caption"><em>{_html_inline(table.caption)}</em></p>')
    return lines


def to_html(document: Document) -> str:
    headings = [b for b in document.blocks if isinstance(b, Heading) and b.level == 2]
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(document.title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(document.title)}</h1>",
    ]
    if len(headings) > 2:
        lines.append("<nav><ul>")
        lines += [f'<li><a href="#{h.anchor}">{html.escape(h.text)}</a></li>' for h in headings]
        lines.append("</ul></nav>")
    for block in document.blocks:
        if isinstance(block, Heading):
            lines.append(f'<h{block.level} id="{block.anchor}">{html.escape(block.text)}</h{block.level}>')
        elif isinstance(block, Paragraph):
            lines.append(f"<p>{_html_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            lines += ["<ul>", *(f"<li>{_html_inline(item)}</li>" for item in block.items), "</ul>"]
        elif isinstance(block, Table):
            lines += _html_table(block)
        elif isinstance(block, Image):
            lines.append("<figure>")
            lines.append(f'<img src="{html.escape(block.path)}" alt="{html.escape(block.alt)}">')
            if block.caption:
                lines.append(f"<figcaption>{_html_inline(block.caption)}</figcaption>")
            lines.append("</figure>")
        elif isinstance(block, Code):
            klass = f' class="language-{html.escape(block.language)}"' if block.language else ""
            lines.append(f"<pre><code{klass}>{html.escape(block.text.rstrip(chr(10)))}</code></pre>")
    lines += ["</body>", "</html>"]
    return "\n".join(lines) + "\n"
