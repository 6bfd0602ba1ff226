"""MkDocs hooks (``hooks:`` in mkdocs.yml): repository-relative links, and pages rendered from files outside docs/.

The Markdown files of the repository link each other by their paths in the repository
(docs/design.md links ``../benchmarks/README.md``), which is what GitHub renders.  In the site:

* a page holding the line ``<!-- include PATH -->`` (PATH relative to the repository root) gets the
  file PATH in its place; ``INCLUDED`` maps such files to the page that renders them;
* every relative link that resolves, from the file it was written in, to a file under docs/ or to a
  file of ``INCLUDED`` is rewritten to point at that page.  Other links are left as they are, so
  MkDocs still reports a broken one (the build is strict).

``Docstrings`` (a griffe extension, mkdocs.yml's mkdocstrings ``extensions``) adapts two habits of
bayeskern's docstrings to the Google style mkdocstrings parses: an argument list headed
``Args (docs/vocabulary.md):`` (or ``Arguments shared by every subclass (...):``, with unindented
entries) becomes an ``Args:`` section, and a ``*`` after a word (``theta*``) is escaped so that
Markdown does not read it as emphasis; reStructuredText's ``::`` before a literal block becomes ``:``.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

import griffe

INCLUDED = {"benchmarks/README.md": "guide/benchmarks.md"}
"""Files outside docs/ rendered as a page: repository path -> page (relative to docs/)."""

_INCLUDE = re.compile(r"^<!-- include (?P<path>\S+) -->$", re.MULTILINE)
_LINK = re.compile(r"(?P<head>\]\()(?P<target>[^)\s]+)(?P<tail>\))")  # inline Markdown links
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _rewrite_links(markdown: str, origin_dir: str, page_dir: str) -> str:
    """Rewrite the relative links of ``markdown``, written in the repository folder ``origin_dir``,
    for a page in the folder ``page_dir`` of the site."""

    def rewrite(match: re.Match[str]) -> str:
        path, hash_sign, anchor = match["target"].partition("#")
        if not path or path.startswith("/") or _SCHEME.match(path):
            return match[0]
        repo_path = posixpath.normpath(posixpath.join(origin_dir, path))
        if repo_path in INCLUDED:
            page = INCLUDED[repo_path]
        elif repo_path.startswith("docs/"):
            page = repo_path.removeprefix("docs/")
        else:
            return match[0]
        link = posixpath.relpath(page, page_dir or ".")
        return f"{match['head']}{link}{hash_sign}{anchor}{match['tail']}"

    return _LINK.sub(rewrite, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Rewrite the page's links, then put the included files in place (their links rewritten too)."""
    root = Path(config.config_file_path).parent
    page_dir = posixpath.dirname(page.file.src_uri)
    markdown = _rewrite_links(markdown, posixpath.join("docs", page_dir), page_dir)

    def include(match: re.Match[str]) -> str:
        path = match["path"]
        text = (root / path).read_text(encoding="utf-8")
        return _rewrite_links(text, posixpath.dirname(path), page_dir)

    return _INCLUDE.sub(include, markdown)


_ARGS_HEADER = re.compile(r"^(?:Args|Arguments)\b(?P<note>[^\n]*?)\s*\((?P<ref>[^()\n]*)\):$")
_CODE_SPAN = re.compile(r"(``.*?``|`[^`]*`)")
_STAR = re.compile(r"(?<=\w)\*(?!\*)")


def _escape_stars(text: str) -> str:
    """``word*`` -> ``word\\*`` outside code spans."""
    return "".join(part if part.startswith("`") else _STAR.sub(r"\\*", part) for part in _CODE_SPAN.split(text))


def normalise_docstring(text: str) -> str:
    """The docstring ``text`` (dedented) with its argument lists as Google ``Args:`` sections."""
    out: list[str] = []
    in_args = in_code = False
    shift = ""  # indentation added to the entries of an argument list written flush left
    previous_blank = True
    for line in text.splitlines():
        blank = not line.strip()
        header = _ARGS_HEADER.match(line)
        if header:
            note = f" {header['note'].strip()}" if header["note"].strip() else ""
            out += [f"Arguments{note}: see {header['ref'].strip()}.", "", "Args:"]
            in_args, in_code, shift, previous_blank = True, False, "", False
            continue
        if in_args and blank:
            if out[-1] == "Args:":  # a blank line between the header and the entries
                continue
            in_args = False
        elif in_args:
            if out[-1] == "Args:" and not line.startswith(" "):
                shift = "    "
            line = shift + line
        in_code = line.startswith("    ") and not in_args and (previous_blank or in_code)
        if not in_code and line.endswith("::"):  # reStructuredText's literal-block marker
            line = line[:-1]
        out.append(line if in_code or blank else _escape_stars(line))
        previous_blank = blank
    return "\n".join(out)


class Docstrings(griffe.Extension):
    """Rewrites every docstring with ``normalise_docstring`` before mkdocstrings parses it."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = normalise_docstring(obj.docstring.value)
