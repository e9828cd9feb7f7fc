"""Where store files live: a local path or any pyarrow filesystem URI, read, listed
and written through one small layer, each file whole or not at all.

A URI may carry pyarrow's query options (`?endpoint_override=host:port&scheme=http` for
an S3-compatible server); `join` keeps them in every location derived from it, so a
location shipped to a Ray actor or to Tune reaches the same place. Credentials are never
part of it: each node finds its own through the provider's usual chain (for S3:
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, `~/.aws/`, the instance role;
`AWS_ENDPOINT_URL` is honoured too).

Each process builds one filesystem per scheme, host (for S3: bucket) and query, on first
use, and reuses it for every location that shares them: on S3, building one resolves
credentials and the bucket's region, which a store reading 10,000 shards must not repeat.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pyarrow as pa
from pyarrow import fs

__all__ = [
    "Location",
    "exists",
    "is_uri",
    "join",
    "list_files",
    "locate",
    "names_in",
    "read_bytes",
    "sizes_in",
    "split",
    "write_atomic",
]

# A local path (a `Path` when the store made it) or a pyarrow filesystem URI (a str).
Location = str | os.PathLike

_LOCAL = fs.LocalFileSystem()  # every local path's
# What pyarrow's URI parser (RFC 3986) accepts in a path: anything else is percent-encoded.
_URI_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")


def is_uri(location: Location) -> bool:
    """A URI names its filesystem (`s3://`, `file://`); anything else is a local path."""
    return "://" in str(location)


def locate(location: Location) -> tuple[fs.FileSystem, str]:
    """The filesystem holding `location` and the path on it (a URI's path decoded), the
    filesystem built once per process (see the module's docstring)."""
    if not is_uri(location):
        return _LOCAL, os.path.abspath(location)
    scheme, netloc, path, query, _ = urlsplit(str(location))
    if not _URI_PATH.fullmatch(path):
        raise _not_a_uri(location, f"its path {path!r} holds a character a URI may not")
    try:
        filesystem, root = _filesystem(scheme, netloc, query)
    except pa.ArrowInvalid as error:
        raise _not_a_uri(location, error) from None
    # what from_uri makes of the whole URI: the root's path, then the path decoded,
    # without a trailing slash
    decoded = unquote(path).rstrip("/")
    return filesystem, (root.rstrip("/") + decoded if decoded else root)


@functools.cache
def _filesystem(scheme: str, netloc: str, query: str) -> tuple[fs.FileSystem, str]:
    """The filesystem of the URIs with this scheme, host and query, and the path of their
    root (`scheme://netloc/`) on it: an S3 bucket's name, a local filesystem's `/`."""
    return fs.FileSystem.from_uri(urlunsplit((scheme, netloc, "/", query, "")))


def _not_a_uri(location: Location, why: object) -> ValueError:
    return ValueError(
        f"{location} is not a valid URI ({why}); percent-encode its path: a space is %20 "
        "and a % is %25"
    )


def join(location: Location, *parts: str) -> Path | str:
    """`location/part/...`: a `Path` for a local path; for a URI the parts go into its
    path, percent-encoded, before any `?query`, so the filesystem options travel along."""
    if not is_uri(location):
        return Path(location, *parts)
    scheme, netloc, path, query, fragment = urlsplit(str(location))
    path = "/".join([path.rstrip("/"), *(quote(part, safe="") for part in parts)])
    return urlunsplit((scheme, netloc, path, query, fragment))


def split(location: Location) -> tuple[Path | str, str]:
    """(parent, name) of a sweep folder's location: the inverse of `join`."""
    if not is_uri(location):
        path = Path(os.path.abspath(location))
        return path.parent, path.name
    scheme, netloc, path, query, fragment = urlsplit(str(location))
    parent, name = posixpath.split(path.rstrip("/"))
    return urlunsplit((scheme, netloc, parent, query, fragment)), unquote(name)


def exists(location: Location) -> bool:
    filesystem, path = locate(location)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def read_bytes(location: Location) -> bytes:
    filesystem, path = locate(location)
    with filesystem.open_input_stream(path) as source:
        return source.read()


def list_files(folder: Location, suffix: str) -> tuple[fs.FileSystem, list[str]]:
    """The filesystem of `folder` and the sorted paths on it of the files directly in
    `folder` whose names end with `suffix`; none when the folder does not exist."""
    filesystem, found = _listing(folder, suffix)
    return filesystem, sorted(info.path for info in found)


def names_in(folder: Location, suffix: str) -> set[str]:
    """Names of the files directly in `folder` ending with `suffix`, from one listing."""
    return {info.base_name for info in _listing(folder, suffix)[1]}


def sizes_in(folder: Location, suffix: str) -> dict[str, int]:
    """Name -> size in bytes of the files directly in `folder` ending with `suffix`, from
    one listing (an object store lists sizes with the names, at no extra request)."""
    return {info.base_name: info.size for info in _listing(folder, suffix)[1]}


def _listing(folder: Location, suffix: str) -> tuple[fs.FileSystem, list[fs.FileInfo]]:
    filesystem, path = locate(folder)
    found = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    return filesystem, [
        info for info in found if info.type == fs.FileType.File and info.base_name.endswith(suffix)
    ]


def write_atomic(location: Location, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file whole or not at all; `write(sink)` produces its bytes.

    Local filesystem: into a temporary file in the same folder, fsynced, then renamed
    over the target (`os.replace` is atomic on POSIX): a crash leaves the old file or
    the new one, never a mix.

    Object stores (S3, GCS, ...) have no rename, but an object only becomes visible when
    its upload completes. So the bytes are produced in memory first and uploaded in one
    go: an error while producing them uploads nothing, and a writer killed during the
    upload leaves the old object or none. Store files are small (shards, rows, state
    dicts), so holding one in memory is cheap.
    """
    filesystem, path = locate(location)
    if isinstance(filesystem, fs.LocalFileSystem):
        _replace_local(Path(path), write)
        return
    buffer = io.BytesIO()
    write(buffer)
    with filesystem.open_output_stream(path) as sink:
        sink.write(buffer.getbuffer())


def _replace_local(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as sink:
            write(sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
