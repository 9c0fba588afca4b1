"""Every citation of the project's documents in code, tests, configs and docs resolves to a heading
in docs/ (METHOD, DATA, GUARANTEES, DESIGN): a reader can follow each one from a fresh clone. The
README stays a front page."""
import re
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
DOCS = TOP / "docs"
NAMES = ("METHOD", "DATA", "GUARANTEES", "DESIGN")
SCANNED = ("cnd_ray", "tests", "bench", "tune_spaces", "cluster", "docs")


def _headings(name: str) -> list[str]:
    return [line.lstrip("#").strip() for line in (DOCS / f"{name}.md").read_text().splitlines()
            if line.startswith("#")]


def _texts():
    for folder in SCANNED:
        for path in sorted((TOP / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".yaml", ".toml", ".sh") and "__pycache__" not in path.parts:
                yield path, path.read_text()
    yield TOP / "README.md", (TOP / "README.md").read_text()


def citations(text: str) -> list[tuple[str, str]]:
    """(document, the heading a citation needs: "" for the document alone) for each citation."""
    out = [(m[1], "") for m in re.finditer(r"\b(METHOD|DATA|GUARANTEES|DESIGN)\.md\b", text)]
    out += [("METHOD", f"{m[1]}.") for m in re.finditer(r"\bMETHOD\.md section (\d+)", text)]
    for m in re.finditer(r"\bGUARANTEES(?:\.md)? (\d+)(?:-(\d+))?", text):
        out += [("GUARANTEES", f"{n}.") for n in range(int(m[1]), int(m[2] or m[1]) + 1)]
    out += [("DESIGN", f"House rule {m[1]}:") for m in re.finditer(r"\b[Hh]ouse rules? (\d+)", text)]
    out += [(m[1], m[2]) for m in re.finditer(
        r"\b(METHOD|DATA|GUARANTEES|DESIGN)\.md(?:'s section|,? \(?)\s*\"([^\"]+)\"", text)]
    return out


def test_the_cited_documents_exist_with_their_headings():
    assert sorted(p.stem for p in DOCS.glob("*.md")) == sorted(NAMES + ("README", "USAGE"))
    headings = {name: _headings(name) for name in NAMES}
    found, missing = 0, []
    for path, text in _texts():
        for doc, heading in citations(text):
            found += 1
            if heading and not any(h.startswith(heading) for h in headings[doc]):
                missing.append(f"{path.relative_to(TOP)}: {doc}.md {heading!r}")
    assert missing == []
    assert found > 60  # the code cites them this often: a pattern that stopped matching would pass


def test_citation_patterns_catch_what_the_code_writes():
    got = citations('METHOD.md section 3; GUARANTEES 14-16; (house rule 8); DATA.md ("Evaluation sets")')
    assert ("METHOD", "3.") in got and ("GUARANTEES", "15.") in got
    assert ("DESIGN", "House rule 8:") in got and ("DATA", "Evaluation sets") in got


def test_the_readme_is_a_front_page_that_names_every_verb():
    """At most ~150 lines (the manual is docs/USAGE.md), with an example of every verb --help lists."""
    from cnd_ray import cli

    text = (TOP / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    verbs = cli.build_parser()._subparsers._group_actions[0].choices
    assert [v for v in verbs if f"`cnd-ray {v}" not in text] == []
