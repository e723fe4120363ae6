"""Shrinkwrap: export any subset of any CVMFS repository, without FUSE.

``spec`` (rules and dialects), ``select`` (walking the selection in the catalogs), ``dryrun`` (counts
per rule and lint), ``export`` (the incremental, resumable directory export), ``trace`` (CVMFS tracer
files to specifications, and recording traces without a CVMFS client), ``pack`` (reproducible tar,
squashfs and OCI images of an export). ``api.shrinkwrap`` ties them together for ``rcds shrinkwrap``.
"""

from __future__ import annotations

from .api import ShrinkwrapResult, build_rules, open_repository, shrinkwrap
from .export import ExportStats, ShrinkwrapError, collect_garbage, export
from .spec import DIALECTS, Rule, Selector, SpecError, parse_spec, read_spec

__all__ = [
    "DIALECTS",
    "ExportStats",
    "Rule",
    "Selector",
    "ShrinkwrapError",
    "ShrinkwrapResult",
    "SpecError",
    "build_rules",
    "collect_garbage",
    "export",
    "open_repository",
    "parse_spec",
    "read_spec",
    "shrinkwrap",
]
