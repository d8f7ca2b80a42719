"""Everything ray-sebs writes or reads next to Ray's results, on local disk or shared storage
(``file://``, ``s3://``, ``gs://``, ...), through pyarrow.

The run record, the history, the curves, the lock, the sweep record and the comparison files live
next to Ray's own results, which may be on shared storage; plain ``open`` would only reach local
disk (and ``os.makedirs("file:///x")`` makes a local folder named ``file:``). This module is the
one way ray-sebs touches storage. pyarrow is imported on use, so modules that only plan or compare
(no cluster) stay light.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any


def _filesystem(path: str) -> tuple[Any, str]:
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name then a move (atomic where the filesystem
    allows), creating its directory."""
    filesystem, where = _filesystem(path)
    filesystem.create_dir(where.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(f"{where}.tmp") as stream:
        stream.write(data)
    filesystem.move(f"{where}.tmp", where)


def read_json(path: str) -> Any | None:
    """The JSON document at ``path``, or ``None`` when there is none."""
    if not exists(path):
        return None
    filesystem, where = _filesystem(path)
    with filesystem.open_input_stream(where) as stream:
        return json.loads(stream.read().decode())


def exists(path: str) -> bool:
    """Whether a file or directory is at ``path``."""
    import pyarrow.fs

    filesystem, where = _filesystem(path)
    return filesystem.get_file_info(where).type != pyarrow.fs.FileType.NotFound


def delete_file(path: str) -> None:
    """Remove the file at ``path``; nothing when it is already gone."""
    filesystem, where = _filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        filesystem.delete_file(where)


def local_path(path: str) -> str | None:
    """The local directory a plain path or a ``file://`` URI names (``file:///a%20b`` is
    ``/a b``); ``None`` for storage that is not local disk (``s3://``, ``gs://``, ...)."""
    import pyarrow.fs

    filesystem, where = _filesystem(path)
    return where if isinstance(filesystem, pyarrow.fs.LocalFileSystem) else None


def upload_dir(local_dir: str, path: str) -> None:
    """Copy the local directory ``local_dir`` (recursively) to ``path``."""
    import pyarrow.fs

    filesystem, where = _filesystem(path)
    filesystem.create_dir(where, recursive=True)
    pyarrow.fs.copy_files(local_dir, where, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=filesystem)
