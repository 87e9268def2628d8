"""The README's examples as data, so a test can run them as written: the
``$ `` commands of a section's code blocks, each with the output lines shown
under it, and whether real output has every line shown.

What is shown is a trimmed real run: ``…`` stands for anything within a
line, so the README writes it where a figure varies by nature (``in …s``).
Fault ids (``f3``, which depend on what ran before) are matched loosely.
Every other character must be as shown, and the shown lines must appear in
the real output in their order; other lines may come between them (a ``…``
line only says so to the reader).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
ELLIPSIS = "…"
_LOOSE = [(re.compile(r"\bf\d+\b"), r"f\\d+")]                    # fault ids


@dataclass
class Example:
    command: str                       # as printed, after "$ "
    shown: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        """The command's words, its ``# comment`` left out."""
        return shlex.split(self.command, comments=True)


def section(title: str, text: str | None = None) -> str:
    """The text of the README's ``## title`` section (up to the next ``## ``)."""
    text = README.read_text() if text is None else text
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise AssertionError(f"the README has no section {title!r}")
    return match.group(1)


def examples(text: str) -> list[Example]:
    """Every ``$ `` command in ``text``'s fenced code blocks, with the lines
    shown under it (up to the next command or the end of its block)."""
    found: list[Example] = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S):
        current = None
        for line in block.splitlines():
            if line.startswith("$ "):
                current = Example(line[2:])
                found.append(current)
            elif current is not None and line.strip():
                current.shown.append(line)
    return found


def _pattern(line: str) -> re.Pattern:
    escaped = re.escape(line.strip())
    for loose, replacement in _LOOSE:
        escaped = loose.sub(replacement, escaped)
    return re.compile(escaped.replace(ELLIPSIS, ".*"))


def missing(shown: list[str], output: str) -> list[str]:
    """The shown lines the real output lacks (in order; ``…`` lines skipped)."""
    lines = [line.strip() for line in output.splitlines()]
    at, lacking = 0, []
    for want in shown:
        if want.strip() == ELLIPSIS:
            continue
        pattern = _pattern(want)
        hit = next((i for i in range(at, len(lines)) if pattern.fullmatch(lines[i])), None)
        if hit is None:
            lacking.append(want)
        else:
            at = hit + 1
    return lacking
