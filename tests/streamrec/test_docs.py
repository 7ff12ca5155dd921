"""docs/architecture.md's module map names every module of both packages."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_map() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def _mapped_paths(block: str) -> set[str]:
    """Paths named in the map. A folder at column 0 (``streamrec/``) or column 2 (``model/``)
    is the prefix of the names indented below it; the names are the ``.py`` words before the
    description (which starts after two spaces)."""
    paths: set[str] = set()
    top = sub = ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        names = line.strip().split("  ")[0].split()
        if not names:
            continue
        if names[0].endswith("/") and indent in (0, 2):
            top, sub = (names[0], "") if indent == 0 else (top, names[0])
            continue
        prefix = top + (sub if indent > 2 else "")
        paths.update(prefix + n for n in names if n.endswith(".py"))
    return paths


def test_every_module_is_in_the_module_map() -> None:
    mapped = _mapped_paths(_module_map())
    modules = {
        str(p.relative_to(ROOT))
        for pkg in ("streamrec", "trainer")
        for p in (ROOT / pkg).rglob("*.py")
        if p.name not in ("__main__.py",)
        and not (p.name == "__init__.py" and p.stat().st_size < 400)
    }
    missing = sorted(modules - mapped)
    assert missing == [], f"modules missing from docs/architecture.md's module map: {missing}"
    stale = sorted(p for p in mapped if not (ROOT / p).exists())
    assert stale == [], f"the module map names modules that do not exist: {stale}"
