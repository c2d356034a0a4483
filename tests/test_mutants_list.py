"""The security-mutant list (tests/mutants.py) is well-formed and matches the code.

Fast: no mutant is run here (that is `make mutants`); a code move that leaves a
mutant's snippet behind is noticed by `make test` too.
"""

from __future__ import annotations

import mutants


def test_every_mutant_is_well_formed_and_its_snippet_occurs_exactly_once():
    assert mutants.problems() == []
    assert len(mutants.MUTANTS) >= 30


def test_the_check_notices_a_moved_snippet(tmp_path):
    # a tree where one snippet is gone and another occurs twice
    for m in mutants.MUTANTS:
        dst = tmp_path / m["file"]
        if not dst.exists():
            dst.write_text((mutants.ROOT / m["file"]).read_text())
    first, second = mutants.MUTANTS[0], mutants.MUTANTS[1]
    (tmp_path / first["file"]).write_text((tmp_path / first["file"]).read_text()
                                          .replace(first["original"], "moved"))
    text = (tmp_path / second["file"]).read_text()
    (tmp_path / second["file"]).write_text(text + "\n" + second["original"])
    (tmp_path / "tests").mkdir()
    for m in mutants.MUTANTS:
        for test in m["tests"]:
            src = mutants.ROOT / test.partition("::")[0]
            (tmp_path / test.partition("::")[0]).write_text(src.read_text())
    found = mutants.problems(tmp_path)
    assert any(p.startswith(f"{first['id']}: original snippet occurs 0 times") for p in found)
    assert any(p.startswith(f"{second['id']}: original snippet occurs 2 times") for p in found)


def test_the_check_notices_a_mutant_that_does_not_compile(monkeypatch):
    broken = dict(mutants.MUTANTS[0], replacement="if (:")
    monkeypatch.setattr(mutants, "MUTANTS", [broken])
    assert mutants.problems() == [f"{broken['id']}: the mutated {broken['file']} does not "
                                  f"compile: invalid syntax"]
