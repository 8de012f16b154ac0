"""mkdocs hook: the site's front page is README.md, so the two never drift apart.

docs/index.md is replaced by README.md when the site is built; the README's links into docs/
(`docs/teaching.md`, `docs/dashboard.png`) become the site's (`teaching.md`, `dashboard.png`), and
are then checked like every other page's (`mkdocs build --strict`). In a table row, GitHub needs a
`|` inside code escaped (`\\|`); Python-Markdown takes it as it is and would show the backslash.
"""

from __future__ import annotations

import re
from pathlib import Path


def readme_for_site(readme: str) -> str:
    readme = re.sub(r"\]\(docs/", "](", readme)
    return re.sub(r"^\|.*$", lambda row: row.group(0).replace("\\|", "|"), readme, flags=re.M)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    return readme_for_site((Path(config.config_file_path).parent / "README.md").read_text(encoding="utf-8"))
