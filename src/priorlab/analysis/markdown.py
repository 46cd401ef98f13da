"""The markdown that report.md writes, as HTML, for the dashboard (no markdown package: nothing to install).

Exactly the subset the report uses: ATX headings (`## Validity`), pipe tables (a header row, a `|---|` rule, then
body rows), bullet lists nested by indentation, paragraphs, `**bold**`, `` `code` ``, `[text](target)` links
(images become links: the dashboard embeds the figures itself) and the report's
`<details><summary>…</summary>` … `</details>` wrappers. All other text, raw HTML included, is escaped.
"""

from __future__ import annotations

import html
import re

HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
RULE = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
ITEM = re.compile(r"^(\s*)[-*]\s+(.*)$")
DETAILS = re.compile(r"^<details><summary>(.*)</summary>$")
INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|!?\[([^\]]*)\]\(([^)\s]+)\)")


def inline(text: str) -> str:
    """One line's text as HTML: code spans, bold (which may hold code) and links; the rest escaped."""
    out, pos = [], 0
    for m in INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        code, bold, label, target = m.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{inline(bold)}</strong>")
        elif re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith(("http:", "https:")):
            out.append(html.escape(m.group(0)))  # a javascript: or data: target stays text
        else:
            out.append(f'<a href="{html.escape(target)}">{html.escape(label)}</a>')
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)]


def _table(rows: list[str]) -> str:
    head = "".join(f"<th>{inline(c)}</th>" for c in _cells(rows[0]))
    body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows[2:])
    return f"<div class='table-wrap'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _list(items: list[tuple[int, str]]) -> str:
    """Bullet items (indent, text) as nested <ul>: a deeper item opens a list inside the item before it."""
    out: list[str] = []
    stack: list[int] = []
    for indent, text in items:
        if not stack or indent > stack[-1]:
            out.append("<ul>")
            stack.append(indent)
        else:
            while len(stack) > 1 and indent < stack[-1]:
                out.append("</li></ul>")
                stack.pop()
            out.append("</li>")
        out.append(f"<li>{inline(text)}")
    out.append("</li></ul>" * len(stack))
    return "".join(out)


def _is_table(lines: list[str], i: int) -> bool:
    return lines[i].lstrip().startswith("|") and i + 1 < len(lines) and RULE.match(lines[i + 1]) is not None


def _starts_block(lines: list[str], i: int) -> bool:
    line = lines[i]
    details = line.strip().startswith(("<details", "</details"))
    return bool(HEADING.match(line) or ITEM.match(line) or details or _is_table(lines, i))


def to_html(text: str) -> str:
    """The markdown `text` (the subset above) as an HTML fragment."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := HEADING.match(line):
            level = len(m.group(1))
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
            i += 1
        elif m := DETAILS.match(line.strip()):
            out.append(f"<details><summary>{inline(m.group(1))}</summary>")
            i += 1
        elif line.strip() == "</details>":
            out.append("</details>")
            i += 1
        elif _is_table(lines, i):
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
        elif ITEM.match(line):
            items = []
            while i < len(lines) and (m := ITEM.match(lines[i])):
                items.append((len(m.group(1).expandtabs(4)), m.group(2)))
                i += 1
            out.append(_list(items))
        else:
            j = i + 1
            while j < len(lines) and lines[j].strip() and not _starts_block(lines, j):
                j += 1
            out.append(f"<p>{' '.join(inline(s.strip()) for s in lines[i:j])}</p>")
            i = j
    return "\n".join(out)


def sections(text: str, prefixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """The `## ` sections of `text` whose titles start with one of `prefixes`, in order: [(title, markdown)]."""
    found, title, body = [], None, []
    for line in [*text.splitlines(), "## "]:
        if line.startswith("## "):
            if title is not None and title.startswith(prefixes):
                found.append((title, "\n".join(body)))
            title, body = line[3:].strip(), [line]
        elif title is not None:
            body.append(line)
    return found
