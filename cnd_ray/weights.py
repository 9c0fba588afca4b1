"""Reading tensors from torch files (checkpoints, judges, classifier weights) safely: always
`weights_only=True`, so a file holding code is refused before anything in it runs, and every way a
file can be wrong - missing, empty, truncated, foreign, hostile - is one UserError that names the
file and what is wrong (torch's own message suggests `weights_only=False`, which would run the code).
"""
from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

from cnd_ray import storage
from cnd_ray.errors import UserError


def load(source: str | Path | bytes, name: str = "", mmap: bool = False):
    """torch.load(source, weights_only=True) on CPU; `name` is how errors call the file (default:
    its path). `source` may be a path or the file's bytes (read from a URI)."""
    label = name or str(source)
    try:
        if isinstance(source, bytes):
            return torch.load(io.BytesIO(source), map_location="cpu", weights_only=True)
        # mmap needs torch's zip format; without it torch would only complain about mmap, so a
        # foreign or hostile non-zip file goes the plain way and is refused for what it is.
        mmap = mmap and zipfile.is_zipfile(source)
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{label}: does not exist") from None
    except pickle.UnpicklingError as e:
        # torch wraps the reason in advice to retry with weights_only=False: keep the reason only
        reason = [line for line in str(e).splitlines() if line.strip() and not line.startswith(
            ("Weights only load failed", "Check the documentation", "Please file an issue"))]
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise UserError(f"{label}: refused, it holds code or objects, not only tensors "
                            f"({found.group(1)}); nothing in it was run. Use a file cnd_ray wrote") from None
        raise UserError(f"{label}: refused, not a file of tensors ({(reason or ['?'])[0][:120]}); "
                        "nothing in it was run") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"{label}: damaged or truncated ({_first_line(e) or type(e).__name__}); "
                        "use an earlier checkpoint or rewrite the file") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:160]


def read(path: str, name: str):
    """load() of a file in a local folder or at a URI (judges, the fairness baselines); `name` is how
    errors call it. A file that cannot be read is one UserError."""
    fs, inner = storage.resolve(path)
    try:
        with fs.open_input_file(inner) as f:
            data = f.read()
    except (OSError, FileNotFoundError) as e:
        raise UserError(f"{name}: cannot read {path} ({e})") from None
    return load(data, name=f"{name} {path}")


def write(path: str, blob) -> None:
    """torch.save `blob` to a local folder or a URI, whole or not at all (trials may look for the
    file meanwhile)."""
    buf = io.BytesIO()
    torch.save(blob, buf)
    storage.write_bytes(path, buf.getvalue())
