"""The documentation stays navigable: a short README, links that resolve, the two commands, project-only wording."""

import re
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
README_MAX_BYTES = 15_000

# Inline links and images: [text](target) / ![alt](target), with an optional "title".
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_ISSUE = re.compile(r"\bissue\s*#?\d", re.IGNORECASE)


def user_docs() -> list[Path]:
    docs = [README, REPO_ROOT / "examples" / "README.md", REPO_ROOT / "benchmarks" / "README.md"]
    docs += sorted((REPO_ROOT / "docs").glob("*.md"))
    return docs


def _without_code(text: str) -> str:
    """The text outside fenced code blocks (a fence closes on the same character, at least as long) and code spans."""
    kept, fence = [], None
    for line in text.splitlines():
        if fence is None:
            match = _FENCE.match(line)
            if match:
                fence = match.group(1)
            else:
                kept.append(re.sub(r"`[^`]*`", "", line))
        elif _closes(line, fence):
            fence = None
    return "\n".join(kept)


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def relative_links(path: Path) -> list[str]:
    links = []
    for target in _LINK.findall(_without_code(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, ... and anchors within the page
        links.append(target)
    return links


def test_user_docs_exist():
    for doc in user_docs():
        assert doc.is_file(), f"missing {doc.relative_to(REPO_ROOT)}"
    assert list((REPO_ROOT / "docs").glob("*.md")), "docs/ holds no markdown"


def test_readme_is_a_front_door():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes; keep it under {README_MAX_BYTES} (move detail to docs/)"
    )


def test_readme_keeps_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "accelerate launch examples/distill_mnist.py" in text
    assert "make test" in text
    assert "make demo" in text


@pytest.mark.parametrize("doc", user_docs(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (doc.parent / file_part).resolve()
        if not resolved.is_file():
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO_ROOT)}: links to missing files: {broken}"


def test_links_are_found():
    # Guards the link pattern itself: the README links to the docs.
    assert "docs/losses.md" in relative_links(README)


@pytest.mark.parametrize("doc", user_docs(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_user_docs_speak_of_the_project_only(doc):
    hits = [line.strip() for line in doc.read_text(encoding="utf-8").splitlines() if _ISSUE.search(line)]
    assert not hits, f"{doc.relative_to(REPO_ROOT)} refers to tracker issues: {hits}"
