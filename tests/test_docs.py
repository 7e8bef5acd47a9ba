"""The documentation: every relative link of README.md, docs/*.md and benchmarks/RESULTS.md
resolves (file and ``#anchor``), the README is a front page, and docs/cli.md's flag table is
the one the CLI generates from ``FinetuneConfig``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchdora.cli import _parser, settings_table

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/RESULTS.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The ``#anchors`` GitHub makes of a page's headings: lower case, punctuation but ``-``
    and ``_`` dropped, spaces as ``-``, a repeated one numbered ``-1``, ``-2``…"""
    seen: dict[str, int] = {}
    found = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = re.match(r"#{1,6} (.+)", line)
        if in_code or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"(?s)```.*?```", "", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_the_anchor_rule_is_githubs():
    page = ROOT / "benchmarks/RESULTS.md"
    assert "a-whole-models-training-step-benchmarksmodel_steppy" in anchors(page)
    assert "one-adapted-linear-one-training-step-benchmarkslayer_steppy" in anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no {file.relative_to(ROOT)}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target}: no #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, broken


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) < 15_000
    assert text.splitlines()[2:5] == [
        "```bash",
        "scripts/setup && .venv/bin/torchdora finetune   # install, then run the main job "
        "(2–3 min on 2 cores)",
        "scripts/setup && scripts/test                   # install, then lint and run the tests",
    ]
    for page in ("guide", "cli", "api", "peft", "distributed", "qdora", "design", "RESULTS"):
        assert f"](docs/{page}.md)" in text, page


def test_the_cli_reference_has_the_generated_flag_table():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- flags:start -->\n(.*)\n<!-- flags:end -->", text, re.S)
    assert table, "docs/cli.md lost its flag-table markers"
    assert table.group(1) == settings_table(), "run scripts/cli-reference to regenerate it"
    finetune = _parser()._subparsers._group_actions[0].choices["finetune"]
    flags = {flag for action in finetune._actions for flag in action.option_strings}
    documented = set(re.findall(r"^\| `(--[\w-]+)", table.group(1), re.M))
    assert documented == flags - {"-h", "--help"}
