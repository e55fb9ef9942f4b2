"""The README and docs/ link to files and headings that exist: every relative link's file, and every #anchor
among the headings of the page it names (GitHub's anchors: lower case, punctuation dropped, spaces as -)."""

import re
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' line in a code block is no heading
    seen: dict[str, int] = {}
    found = set()
    for title in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_the_anchor_rule_on_headings_like_ours(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Performance\n## Against diffusers' example script\n### `[log]`: metrics\n"
                    "```bash\n# not a heading\n```\n## Against diffusers' example script\n")
    assert anchors(page) == {"performance", "against-diffusers-example-script", "log-metrics",
                             "against-diffusers-example-script-1"}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading)")
    return broken


def test_a_missing_file_or_heading_is_found(tmp_path):
    (tmp_path / "other.md").write_text("## Several GPUs\n")
    page = tmp_path / "p.md"
    page.write_text("# Top\n[a](other.md#several-gpus) [b](other.md#fp8) [c](gone.md) [d](#top) [e](#nope) "
                    "[f](https://example.com/x#y)\n")
    assert broken_links(page) == ["other.md#fp8 (no heading)", "gone.md (no file)", "#nope (no heading)"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert not broken_links(page), f"{page.name}: {broken_links(page)}"
