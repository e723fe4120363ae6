"""rcds: Rapid Code Distribution Service.

Layers, top-down:

* ``rcds.cvmfs``   the CernVM-FS format core: objects, catalogs, manifest, stores, reader, writer, checker.
                   It knows nothing of HTTP servers, users or queues.
* ``rcds.ingest``  turns a directory or a tar stream into tree entries for the writer.
* ``rcds.web``     thin aiohttp faces: serving repositories over HTTP.
* ``rcds.cli``     the ``rcds`` command line.
"""

__version__ = "0.1.0"
