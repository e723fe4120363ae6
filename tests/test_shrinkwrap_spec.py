"""Shrinkwrap specifications: every rule kind in both dialects, and the user complaints behind them.

The decisions are checked on a fixed set of repository paths (the oracle is written out by hand per
case); the same cases are exported from a real repository in ``test_shrinkwrap_export.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rcds.shrinkwrap.spec import Kind, Selector, SpecError, parse_spec

PATHS = [
    "/a",
    "/a/x.txt",
    "/a/b",
    "/a/b/d.txt",
    "/a/b/c",
    "/a/b/c/f1",
    "/a/b/c/f2",
    "/a/b/c/deep",
    "/a/b/c/deep/e.txt",
    "/z",
    "/z/y.txt",
]


def selected(spec: str, dialect: str) -> set[str]:
    sel = Selector(parse_spec(spec), dialect)
    return {p for p in PATHS if sel.decide(p)[0]}


BOTH = ["2.12", "2.14"]
UNDER_B = {"/a/b", "/a/b/d.txt", "/a/b/c", "/a/b/c/f1", "/a/b/c/f2", "/a/b/c/deep", "/a/b/c/deep/e.txt"}


@pytest.mark.parametrize("dialect", BOTH)
@pytest.mark.parametrize("spec", ["/a/b*", "/a/b/*", "  /a/b*  \n", "# comment\n\n/a/b*\n"])
def test_recursive_rule_takes_the_subtree_and_passes_through_parents(spec: str, dialect: str) -> None:
    assert selected(spec, dialect) == {"/a"} | UNDER_B


@pytest.mark.parametrize("dialect", BOTH)
def test_flat_rule_takes_direct_children_only(dialect: str) -> None:
    assert selected("^/a/b/*", dialect) == {"/a", "/a/b", "/a/b/d.txt", "/a/b/c"}


@pytest.mark.parametrize("dialect", BOTH)
@pytest.mark.parametrize("spec", ["/a/b", "^/a/b"])
def test_exact_rule_takes_the_entry_alone(spec: str, dialect: str) -> None:
    assert selected(spec, dialect) == {"/a", "/a/b"}


@pytest.mark.parametrize("dialect", BOTH)
@pytest.mark.parametrize("exclusion", ["!/a/b/c", "!/a/b/c*", "!/a/b/c/*"])
def test_exclusion_removes_the_entry_and_everything_below(exclusion: str, dialect: str) -> None:
    assert selected(f"/a*\n{exclusion}\n", dialect) == {"/a", "/a/x.txt", "/a/b", "/a/b/d.txt"}


@pytest.mark.parametrize("dialect", BOTH)
def test_root_rules(dialect: str) -> None:
    assert selected("/*", dialect) == set(PATHS)
    assert selected("^/*", dialect) == {"/a", "/z"}
    assert selected("/", dialect) == set()


def test_212_exclusions_are_final_214_re_includes() -> None:
    spec = "/a*\n!/a/b*\n/a/b/c*\n"
    assert selected(spec, "2.12") == {"/a", "/a/x.txt"}
    # 2.14: the later rule wins under c; b itself becomes a pass-through directory (its d.txt stays out).
    assert selected(spec, "2.14") == {
        "/a",
        "/a/x.txt",
        "/a/b",
        "/a/b/c",
        "/a/b/c/f1",
        "/a/b/c/f2",
        "/a/b/c/deep",
        "/a/b/c/deep/e.txt",
    }
    sel = Selector(parse_spec(spec), "2.14")
    assert sel.decide("/a/b") == (True, None)  # pass-through: no rule includes it
    assert sel.decide("/a/b/d.txt")[1] == sel.rules[1]


def test_cvmfs_issue_4328_exclude_all_re_include_one() -> None:
    spec = "/a*\n!/a/b/c/*\n/a/b/c/deep*\n"
    assert "/a/b/c/deep/e.txt" not in selected(spec, "2.12")
    got = selected(spec, "2.14")
    assert {"/a/b/c", "/a/b/c/deep", "/a/b/c/deep/e.txt"} <= got
    assert "/a/b/c/f1" not in got and "/a/b/c/f2" not in got


def test_214_a_later_exclusion_beats_an_earlier_include() -> None:
    spec = "/a/b/c*\n!/a/b*\n"
    assert selected(spec, "2.14") == set()
    assert selected(spec, "2.12") == set()


@pytest.mark.parametrize("dialect", BOTH)
def test_the_last_rule_on_the_same_path_wins(dialect: str) -> None:
    assert selected("!/a*\n/a*\n", dialect) == {"/a", "/a/x.txt"} | UNDER_B
    assert selected("/a*\n!/a*\n", dialect) == set()


@pytest.mark.parametrize("dialect", BOTH)
def test_cvmfs_issue_3500_one_file_exclusion_keeps_the_tree(dialect: str) -> None:
    """In 2.12 an exclusion line before include lines passing through the same directories made the
    whole tree vanish; here it removes the one file it names (and it was not selected anyway)."""
    spec = "!/a/b/c/f1\n/a/b/d.txt\n/a/x.txt\n/a/b/c/f2\n"
    assert selected(spec, dialect) == {"/a", "/a/x.txt", "/a/b", "/a/b/d.txt", "/a/b/c", "/a/b/c/f2"}


@pytest.mark.parametrize("dialect", BOTH)
def test_cvmfs_issue_3497_spec_that_looped_terminates(dialect: str) -> None:
    spec = "!/z/y.txt\n/a/x.txt\n/a/b\n"
    assert selected(spec, dialect) == {"/a", "/a/x.txt", "/a/b"}


@pytest.mark.parametrize("dialect", BOTH)
def test_exclusion_alone_creates_no_directories(dialect: str) -> None:
    assert selected("/z*\n!/a/b/c\n", dialect) == {"/z", "/z/y.txt"}


@pytest.mark.parametrize("dialect", BOTH)
def test_star_is_not_a_glob(dialect: str) -> None:
    # "/a/b*" means /a/b and below, never /a/bc
    sel = Selector(parse_spec("/a/b*"), dialect)
    assert not sel.decide("/a/bc")[0]
    assert sel.decide("/a/b/anything/below")[0]


def test_parse_kinds_and_errors() -> None:
    rules = parse_spec("/x\n/x*\n^/x/*\n^/x\n!/x\n!/x*\n# c\n\n   \n/*\n")
    assert [r.kind for r in rules] == [
        Kind.EXACT,
        Kind.RECURSIVE,
        Kind.FLAT,
        Kind.EXACT,
        Kind.EXCLUDE,
        Kind.EXCLUDE,
        Kind.RECURSIVE,
    ]
    assert [r.path for r in rules] == ["/x"] * 6 + [""]
    assert rules[0].origin == "spec:1" and rules[-1].origin == "spec:10"
    for bad in ["x/y", "*/a", "/a*/b", "!x", "^", "/a/../b"]:
        with pytest.raises(SpecError):
            parse_spec(bad)
    with pytest.raises(SpecError):
        Selector(rules, "2.13")


def test_child_candidates_limit_the_walk() -> None:
    sel = Selector(parse_spec("/a/b/d.txt\n/a/x.txt\n"), "2.14")
    assert sel.child_candidates("") == {"a"}
    assert sel.child_candidates("/a") == {"b", "x.txt"}
    assert Selector(parse_spec("/a*"), "2.12").child_candidates("/a/b") is None  # every child
    assert Selector(parse_spec("^/a/*"), "2.12").child_candidates("/a") is None
    assert Selector(parse_spec("^/a/*"), "2.12").child_candidates("/a/b") == set()


CHILDREN: dict[str, list[str]] = {}
for _p in PATHS:
    CHILDREN.setdefault(_p.rsplit("/", 1)[0], []).append(_p)
RULE_PATHS = [*PATHS, "/a/b/c/other", "/q"]
RULE_FORMS = ["{}", "{}*", "^{}/*", "!{}"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(RULE_FORMS), st.sampled_from(RULE_PATHS)), min_size=1, max_size=6),
    st.sampled_from(BOTH),
)
def test_where_no_rule_names_a_child_every_child_is_decided_alike(
    rules: list[tuple[str, str]], dialect: str
) -> None:
    """What lets a walk decide once per directory: whenever ``same_for_every_child`` says so, every child
    (and a name no rule mentions) gets the decision of the first."""
    sel = Selector(parse_spec("\n".join(form.format(path) for form, path in rules)), dialect)
    for parent, children in CHILDREN.items():
        if sel.same_for_every_child(parent):
            decisions = {sel.decide(c) for c in [*children, f"{parent}/unnamed"]}
            assert len(decisions) == 1, (parent, decisions)
