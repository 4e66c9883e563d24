"""The README and docs/ pages link to each other by file and #anchor; check every link resolves.

The README was split into a front page and docs/*.md pages by topic, and sections will keep
moving: a renamed heading or a moved section silently breaks links such as
``docs/incremental.md#backfills``. Anchors are computed as GitHub computes them, so a link that
passes here also works on GitHub.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ingest.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) or [text](target "title"); text may hold inline code with brackets inside.
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK_TEXT = re.compile(r"\[([^\]]*)\]\([^)]*\)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with their 1-based numbers: code is not Markdown."""
    lines: list[tuple[int, str]] = []
    in_fence = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text in lower case, punctuation dropped, spaces to -."""
    text = INLINE_LINK_TEXT.sub(r"\1", heading).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in prose_lines(path.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link in prose that is not to another site.

    Link text may wrap onto the next line, so links are found in the whole prose text (code
    blocks blanked, line numbers kept); brackets inside inline code are not link syntax.
    """
    numbered = dict(prose_lines(path.read_text()))
    last = max(numbered, default=0)
    prose = "\n".join(numbered.get(number, "") for number in range(1, last + 1))
    prose = INLINE_CODE.sub(lambda span: "`" + "x" * (len(span.group()) - 2) + "`", prose)
    links: list[tuple[int, str]] = []
    for match in LINK.finditer(prose):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        links.append((prose.count("\n", 0, match.start()) + 1, target))
    return links


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per link whose file or heading anchor does not exist."""
    problems: list[str] = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{where}: anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ('Loading in PostgreSQL: `load = "server"`', "loading-in-postgresql-load--server"),
        ("Parent → child endpoints", "parent--child-endpoints"),
        ("Using more cores: `writer_processes`", "using-more-cores-writer_processes"),
        ("Credentials stay on the source's origin", "credentials-stay-on-the-sources-origin"),
    ],
)
def test_github_slug_matches_githubs_rules(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_checker_finds_a_broken_anchor(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Real one\n\n[ok](#real-one) [bad](#gone) `[a](b)` [two\nlines](missing.md)\n"
        "```\n[in code](#nowhere)\n```\n"
    )
    assert relative_links(page) == [(5, "#real-one"), (5, "#gone"), (5, "missing.md")]
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2
    assert "#gone" in problems[0] and "no such file" in problems[1]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_pages_link_to_each_other() -> None:
    readme_links = {target.partition("#")[0] for _, target in relative_links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme_links, f"README does not link to docs/{page.name}"
        back = {target.partition("#")[0] for _, target in relative_links(page)}
        assert "../README.md" in back, f"docs/{page.name} does not link back to the README"


def test_readme_first_config_is_valid() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A first config") :]
    start = section.index("```toml\n") + len("```toml\n")
    example = section[start : section.index("```\n", start)]
    loaded = parse_config(example, Path("README.md"), {"SHOP_TOKEN": "t0ken-value"})
    [endpoint] = loaded.source.endpoints
    assert endpoint.table.primary_key == ("id",)
