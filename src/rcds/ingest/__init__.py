"""Turning user uploads into trees for the repository writer.

``rcds.ingest.tarstream`` reads a tarball (plain, gzip, bzip2, xz or zstd) as a stream and yields
``rcds.cvmfs.tree.TreeEntry`` objects, refusing anything unsafe or broken with ``IngestError``.
"""

from .tarstream import DEFAULT_LIMITS, GiB, IngestError, IngestLimits, MiB, detect_compression, tar_entries

__all__ = ["DEFAULT_LIMITS", "GiB", "IngestError", "IngestLimits", "MiB", "detect_compression", "tar_entries"]
