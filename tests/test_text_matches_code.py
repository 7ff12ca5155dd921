"""The text tells the truth about the code: the files and modules it cites exist, the README
lists every dead-letter reason, and every ``# type: ignore`` says why."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

from streamrec.serving.events import REASONS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "bench/README.md", *(str(p.relative_to(ROOT)) for p in ROOT.glob("docs/*.md"))]
CODE_DIRS = ("streamrec", "trainer", "bench", "tests")

#: a repository path: streamrec/engines/native/worker.py, bench/results/soak.md, tests/...
PATH = re.compile(r"(?<![\w/.-])((?:streamrec|trainer|bench|tests|docs|deploy)/[\w./*-]*[\w*/])")
#: a dotted module (and attribute) name: streamrec.kafka.tansu.true_end_offsets
DOTTED = re.compile(r"(?<![\w.])((?:streamrec|trainer)(?:\.[A-Za-z_]\w*)+)")
#: a file a usage example writes (and then reads back) is not a reference
OUTPUT = re.compile(r"--(?:out|report)[= ]\S+")
#: a result file or folder named in bench/README.md or bench/results/*.md
RESULT = re.compile(r"^(?:results/)?([\w.*-]+\.(?:md|jsonl|json)|[\w*-]+/)$")
INLINE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _markdown_code_spans(text: str) -> list[str]:
    """Inline code of a Markdown text, outside fenced and indented blocks (commands there
    name the files they would write)."""
    text = FENCE.sub("", text)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return INLINE.findall(text)


def _python_text(source: str) -> list[str]:
    """The comments and docstrings (triple-quoted strings) of a Python source."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        docstring = tok.type == tokenize.STRING and tok.string.lstrip("rbuRBU")[:3] in (
            '"""',
            "'''",
        )
        if tok.type == tokenize.COMMENT or docstring:
            out.append(tok.string)
    return out


def _module_reference_exists(ref: str) -> bool:
    """``a.b.c.name``: the longest prefix is a module of the repository and ``name`` (if any)
    is defined or imported at its top level."""
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        source = (
            base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        )
        if source.exists():
            if i == len(parts):
                return True
            name = re.escape(parts[i])
            pattern = (
                rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]"
                rf"|^\s*(?:from\s+\S+\s+)?import\s.*\b{name}\b"
            )
            return re.search(pattern, source.read_text(), re.M) is not None
    return False


def _references(where: str, text: str) -> list[str]:
    """The paths and modules cited in ``text`` that do not exist."""
    text = OUTPUT.sub("", text)
    stale = [m for m in PATH.findall(text) if not list(ROOT.glob(m.rstrip("/")))]
    stale += [m for m in DOTTED.findall(text) if not _module_reference_exists(m)]
    return [f"{where}: {m}" for m in stale]


def test_cited_files_and_modules_exist() -> None:
    stale = []
    for doc in DOCS:
        for span in _markdown_code_spans((ROOT / doc).read_text()):
            stale += _references(doc, span)
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            for text in _python_text(path.read_text()):
                stale += _references(where, text)
    assert stale == []


def test_result_files_cited_by_the_benchmark_texts_exist() -> None:
    bench = ROOT / "bench"
    results = bench / "results"
    stale = []
    for doc in [ROOT / "bench" / "README.md", *sorted(results.glob("*.md"))]:
        for span in _markdown_code_spans(doc.read_text()):
            m = RESULT.match(span.strip())
            if m is None:
                continue
            name = m[1].rstrip("/")
            found = [*results.glob(name), *results.glob("*/" + name), *bench.glob(span.strip())]
            if not found:
                stale.append(f"{doc.relative_to(ROOT)}: {span}")
    assert stale == []


def test_readme_lists_every_dead_letter_reason() -> None:
    text = (ROOT / "README.md").read_text()
    table = text.split("with one of\nthese reasons", 1)[1].split("\n\n", 2)[1]
    listed = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert sorted(listed) == sorted(REASONS)


def test_every_type_ignore_says_why() -> None:
    """A ``# type: ignore[code]`` carries its reason in the same comment, after it, or in a
    comment on the line above."""
    silent = []
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            source = path.read_text()
            lines = source.splitlines()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type != tokenize.COMMENT or "# type: ignore" not in tok.string:
                    continue
                after = tok.string.split("# type: ignore", 1)[1]
                reason_after = re.match(r"^\[[\w,-]+\]\s+#\s*\S", after) is not None
                row = tok.start[0] - 1
                reason_above = row > 0 and lines[row - 1].strip().startswith("#")
                if not (reason_after or reason_above):
                    silent.append(f"{path.relative_to(ROOT)}:{row + 1}")
    assert silent == []
