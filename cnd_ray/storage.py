"""Files in a local folder or at a URI (s3://, gs://, file://: any pyarrow filesystem), one API.

Run and search folders live wherever `train.storage` points; on a cluster that is a bucket. What
cnd_ray itself writes there beside Ray's own files (the tracking spool, a run's stop signal) goes through these
few functions, so one code path serves a laptop's folder and a bucket, and a `file://` URI tests
the bucket's path on this machine.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import uuid


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str):
    """(pyarrow filesystem, the path inside it)."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), os.path.abspath(path)


def absolute(path: str) -> str:
    """A URI as it is; a local path absolute, `~` expanded (Ray's workers run in other folders)."""
    return str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """`base`/`parts`: '/'-joined for a URI (whatever this machine's separator), os.path otherwise."""
    return posixpath.join(str(base).rstrip("/"), *parts) if is_uri(base) else os.path.join(base, *parts)


def is_file(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def read_text(path: str) -> str:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def download(path: str, local: str) -> None:
    """Copy the file at `path` to the local file `local` (its folder is made)."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _whole(path: str, write) -> None:
    """`write(stream)` into `path`, whole or not at all where the store allows: written beside under
    a name of its own (two writers never share one) and renamed on a filesystem (an object store's
    put is whole by itself), so that a reader never sees half a file."""
    fs, inner = resolve(path)
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    part = f"{inner}.part-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(part) as dst:
        write(dst)
    fs.move(part, inner)


def upload(local: str, path: str) -> None:
    """Copy the local file `local` to `path`, whole or not at all (`_whole`)."""
    with open(local, "rb") as src:
        _whole(path, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))


def write_bytes(path: str, data: bytes) -> None:
    """`data` into the file at `path`, whole or not at all (`_whole`)."""
    _whole(path, lambda dst: dst.write(data))


def remove_file(path: str) -> None:
    fs, inner = resolve(path)
    fs.delete_file(inner)


def remove_dir(path: str) -> None:
    """Delete the folder `path` and what it holds; nothing there is fine."""
    import pyarrow.fs as pafs

    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)


def subfolders(path: str) -> list[str]:
    """Names of the folders directly in `path` (none when it does not exist), sorted."""
    import pyarrow.fs as pafs

    fs, inner = resolve(path)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(inner))
                  if i.type == pafs.FileType.Directory)
