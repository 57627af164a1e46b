"""MkDocs hooks of the documentation site.

- Leave out of the navigation the pages that do not exist (yet). Several pages are written alongside
  the code they describe; until a page is committed its nav entry would make ``mkdocs build
  --strict`` fail with "not found". Each such entry is dropped, with a note in the build log, so the
  site builds; a page that exists but is not in the nav is still built (it is only left out of the
  menu), and its links are still checked.
- The home page is the README itself (its ``docs/`` links made relative to the site), so the front
  page of the repository and of the site never differ.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.ldmgraph")


def _present(entry: Any, docs_dir: Path) -> Any:
    """The nav entry without its missing pages (None when nothing of it is left)."""
    if isinstance(entry, str):
        if "://" in entry or (docs_dir / entry).is_file():
            return entry
        log.info("nav: %s is not written yet; left out", entry)
        return None
    if isinstance(entry, dict):
        kept = {title: _present(value, docs_dir) for title, value in entry.items()}
        kept = {title: value for title, value in kept.items() if value not in (None, [])}
        return kept or None
    if isinstance(entry, list):
        return [item for item in (_present(value, docs_dir) for value in entry) if item is not None]
    return entry


def on_page_read_source(page: Any, config: Any) -> str | None:
    """``index.md``: the README's text, its links into ``docs/`` made site-relative."""
    if page.file.src_uri != "index.md":
        return None
    readme = Path(config["config_file_path"]).parent / "README.md"
    return readme.read_text(encoding="utf-8").replace("](docs/", "](")


def on_config(config: Any) -> Any:
    """Filter the configured nav before MkDocs resolves it."""
    if config.get("nav"):
        config["nav"] = _present(config["nav"], Path(config["docs_dir"]))
    return config
