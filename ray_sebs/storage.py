"""Small files on local disk or shared storage (``s3://``, ``gs://``, ...), through pyarrow.

The run record, the sweep record and the comparison files live next to Ray's own results, which
may be on shared storage; plain ``open`` would only reach local disk. pyarrow is imported on use,
so modules that only plan or compare (no cluster) stay light.
"""

from __future__ import annotations

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
    import pyarrow.fs

    filesystem, where = _filesystem(path)
    if filesystem.get_file_info(where).type == pyarrow.fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(where) as stream:
        return json.loads(stream.read().decode())
