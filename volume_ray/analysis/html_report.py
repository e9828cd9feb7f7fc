"""`report/index.html`: the report as one self-contained page, for a browser.

The summary's Markdown becomes HTML (its tables included), its figures are embedded as
data URIs so the page needs no other file, and the sweep's spec and links to its
Parquet tables close it. A script counts the images that loaded into the page's
`data-images-loaded`, which the test reads back from a headless browser.
"""

from __future__ import annotations

import base64
import html

import markdown

__all__ = ["html_report"]

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 1em 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""
COUNT_IMAGES = """
window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.images = images.length;
});
"""


def html_report(summary: str, figures: dict[str, bytes], spec_yaml: str, tables: list[str]) -> str:
    """The page: `summary` (Markdown whose figures are named by file), the PNG bytes of
    each figure by file name, the spec's YAML, and the table files to link to (relative
    to the sweep folder, one level up)."""
    body = markdown.markdown(summary, extensions=["tables"])
    for name, png in figures.items():
        data = base64.b64encode(png).decode()
        body = body.replace(f'src="{name}"', f'src="data:image/png;base64,{data}"')
    links = "".join(f'<li><a href="../{html.escape(t)}">{html.escape(t)}</a></li>' for t in tables)
    title = html.escape(summary.splitlines()[0].lstrip("# ").strip())
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{STYLE}</style><script>{COUNT_IMAGES}</script></head>"
        f"<body>{body}<h2>Tables</h2><ul>{links}</ul>"
        f"<h2>Spec</h2><pre>{html.escape(spec_yaml)}</pre></body></html>\n"
    )
