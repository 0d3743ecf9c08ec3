"""mkdocs hook: links from the manual to repository files outside docs/ (``../src/...``,
``../benchmarks/RESULTS.md``).

They are relative links, so they work where the Markdown is read (GitHub, an editor). mkdocs knows
only docs/, so this hook checks that each target is a file of the repository (a link to a file
that moved is a warning, which fails ``mkdocs build --strict``), copies it into the site under
``_repo/`` and points the link there, as inline HTML that mkdocs leaves alone.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repo_links")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
LINK = re.compile(r"\[([^\]\n]+)\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")
_copied: set[Path] = set()


def on_page_markdown(markdown, page, config, files):
    page_dir = Path(page.file.abs_src_path).parent

    def repoint(match: re.Match) -> str:
        text, path, anchor = match.group(1), match.group(2), match.group(3) or ""
        target = (page_dir / path).resolve()
        if target.is_relative_to(DOCS):
            return match.group(0)  # a page of the manual: mkdocs checks it
        if not target.is_relative_to(REPO) or not target.is_file():
            log.warning(
                "Doc file '%s' links '%s', which is not a file of the repository",
                page.file.src_uri,
                path,
            )
            return match.group(0)
        rel = target.relative_to(REPO)
        _copied.add(rel)
        up = "../" * page.url.count("/")  # page URLs are directories: getting-started/
        return f'<a href="{up}_repo/{rel.as_posix()}{anchor}">{text}</a>'

    return LINK.sub(repoint, markdown)


def on_post_build(config):
    for rel in sorted(_copied):
        dest = Path(config["site_dir"]) / "_repo" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, dest)
