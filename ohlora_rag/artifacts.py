"""Artifacts on disk: staged folders published atomically, fsync'd JSON, UTC timestamps, checksums, typed manifests.

Every output (an index build, a model folder) is written completely into a staging folder beside its place, its
files and folder flushed to disk, and only then published by renames under a lock file (`locks.publish_lock`), so a
failed or killed writer leaves the previous output in place. Small files that are replaced in place (a manifest, the
index's `CURRENT` pointer) go through a temporary sibling and `os.replace`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .locks import abandoned, publish_lock

#: `created` in every manifest: UTC, to the second.
TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"
#: The same instant inside folder names (no colons).
COMPACT_TIMESTAMP = "%Y%m%dT%H%M%S"

MODEL_MANIFEST = "ohlora_model.json"
MODEL_FORMAT_VERSION = 1


def utc_timestamp(fmt: str = TIMESTAMP) -> str:
    """The current UTC time as `fmt` (default `TIMESTAMP`, e.g. 2025-01-31T12:00:00Z).

    Read from `time.time()`: a bare `time.gmtime()` reads the C library's coarse clock, which trails it by a few ms
    at a second's turn (a stamp could name the second before a `time.time()` read just before it)."""
    return time.strftime(fmt, time.gmtime(time.time()))


# --- bytes on disk -----------------------------------------------------------------------------------------------


def fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (the renames inside it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems cannot sync a folder; its files are synced all the same
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file below `folder` (links are not followed), then every folder, deepest first."""
    if not folder.is_dir():
        return
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                fsync(path)
        fsync(Path(root))


def write_text(path: Path, text: str) -> None:
    """Replace `path` atomically: the text goes into `.<name>.tmp-<pid>` beside it, is fsync'd, then renamed over
    `path` and the folder fsync'd. Raises OSError (the temporary file removed) when any step fails."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync(tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """`write_text` of `data` as indented UTF-8 JSON with a final newline: the one format of every manifest."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; raises OSError, ValueError, or TypeError when it holds another JSON value."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TypeError(f"a JSON {type(data).__name__}, not an object")
    return data


def hash_into(digest: Any, path: Path) -> None:
    """Feed a file's bytes into a hashlib digest, 16 MiB at a time."""
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    hash_into(digest, path)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """A file's checksum record in a manifest: {"size": bytes, "sha256": hex}."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


# --- staged publishing -------------------------------------------------------------------------------------------


@contextmanager
def staged_publish(staging: Path, lock_file: Path, what: str, publish: Callable[[Path], None]) -> Iterator[Path]:
    """Yield `staging` (removed first if a writer of the same name left it) to write an output into; when the block
    completes, fsync everything in it, then call `publish(staging)` holding `lock_file` and fsync the folder the
    renames happened in.

    On any failure (in the block, the flush or `publish`) the staging folder is removed and whatever was published
    before stays as it was. The block creates the staging folder itself (writers such as `save_pretrained` do).

    Args:
        staging: a fresh folder beside the output, named after the writing process (see `locks.abandoned`).
        lock_file: the lock beside the output; concurrent writers of the same output take turns on it.
        what: the guarded output, for the lock's timeout message (e.g. "the index at /home/index").
        publish: moves the staged folder into place (renames only: it runs under the lock).
    """
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        fsync_tree(staging)
        with publish_lock(lock_file, what):
            publish(staging)
        fsync(staging.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_folder(out: Path, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A fresh sibling folder to write a model into; it replaces `out` only when the block completes.

    A failed or killed write leaves the previous `out` (or none) in place, never a mix of old and new files. The
    swap holds the lock file `.<name>.lock` beside `out`, so two commands writing the same folder take turns; it
    also removes staging folders of writers that are gone.

    Args:
        out: the folder to (re)place.
        keep_existing: evaluated under the lock; when it returns True for `out`, the new folder is dropped and
            `out` stays as it is (another command finished the same work first).
    """

    def swap(staging: Path) -> None:
        if keep_existing is not None and keep_existing(out):
            return
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
        leftover = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-\d+")
        for child in out.parent.iterdir():
            if leftover.fullmatch(child.name) and child.is_dir() and not child.is_symlink() and abandoned(child):
                shutil.rmtree(child, ignore_errors=True)

    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    with staged_publish(staging, out.parent / f".{out.name}.lock", f"the model folder {out}", swap) as folder:
        yield folder


def prune_copies(current: Path, pattern: str, keep: int) -> None:
    """Remove the folders beside `current` that match `pattern`, but for `current` and the `keep` - 1 most recently
    written others: derived copies (merges, exports) of models no longer in use. Best effort."""
    others = [p for p in current.parent.glob(pattern) if p.is_dir() and p != current]
    for old in sorted(others, key=_modified, reverse=True)[max(keep - 1, 0) :]:
        shutil.rmtree(old, ignore_errors=True)


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def complete_copy(folder: Path, manifest: str, expected: Mapping[str, Any], files: set[str]) -> dict[str, Any] | None:
    """The manifest of a derived copy when it is complete: its fields include `expected` and it records the sizes
    ("sizes": {name: bytes}) of exactly `files`, which the files on disk have; None otherwise (missing, partial,
    made from something else)."""
    try:
        record = read_json_object(folder / manifest)
        sizes = record["sizes"]
        if any(record.get(k) != v for k, v in expected.items()) or not isinstance(sizes, dict) or set(sizes) != files:
            return None
        if all((folder / name).stat().st_size == size for name, size in sizes.items()):
            return record
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return None


# --- manifests ---------------------------------------------------------------------------------------------------


def check_types(record: object, types: Mapping[str, tuple[type, ...]]) -> None:
    """Raise TypeError naming the first attribute of `record` whose value is none of its allowed types (a bool
    passes only where bool is listed, not as an int)."""
    for name, kinds in types.items():
        value = getattr(record, name)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise TypeError(f"field {name!r} is {type(value).__name__}")


_OPTIONAL_STR = (str, type(None))


@dataclass
class ModelManifest:
    """`ohlora_model.json` beside a model folder's weights: its format version, when and from what it was made, and
    its fingerprint; every other field (data, seed, threshold, metrics, config…) kept in `extra` as written.

    All fields are optional: the package's own `tutor/` manifests have no `format_version` or `created`. Fields
    absent on disk stay absent when the manifest is written back, and a typed field written as null is kept as null.
    """

    format_version: int | None = None
    created: str | None = None
    kind: str | None = None
    """"encoder", "llm" (converted built-ins) or "llm-adapter"."""
    reference: str | None = None
    """How the model is named: a built-in alias or the output folder."""
    made_by: str | None = None
    source: str | None = None
    """The packaged file a built-in was converted from."""
    base: str | None = None
    """The model a trained one started from."""
    base_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None
    """sha256 over the weight and tokenizer files (`models.fingerprint`), cached here."""
    fingerprint_stats: list[Any] | None = None
    """The files' names, sizes and modification times the cached fingerprint was computed from."""

    @classmethod
    def new(cls, **values: Any) -> ModelManifest:
        """A manifest written now, in this version's format."""
        return cls.from_dict({"format_version": MODEL_FORMAT_VERSION, "created": utc_timestamp(), **values})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelManifest:
        """Type-check the typed fields (TypeError names the first wrong one); other keys go into `extra`."""
        typed = {k: v for k, v in data.items() if k in _MODEL_TYPES and v is not None}
        manifest = cls(**typed, extra={k: v for k, v in data.items() if k not in typed})
        check_types(manifest, _MODEL_TYPES)
        return manifest

    def to_dict(self) -> dict[str, Any]:
        """The JSON object on disk: typed fields that are set, in declaration order, with `extra` in its place."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                out.update((k, v) for k, v in self.extra.items() if k not in _MODEL_TYPES or getattr(self, k) is None)
            elif (value := getattr(self, f.name)) is not None:
                out[f.name] = value
        return out

    def updated(self, **values: Any) -> ModelManifest:
        """A copy with some fields set (typed or not)."""
        return self.from_dict({**self.to_dict(), **values})

    def get(self, key: str, default: Any = None) -> Any:
        """A field by its name on disk, typed or not."""
        return self.to_dict().get(key, default)

    @classmethod
    def read(cls, folder: Path) -> ModelManifest | None:
        """The manifest in `folder`; None when there is none or it is not a readable, well-typed JSON object."""
        path = folder / MODEL_MANIFEST
        if not path.exists():
            return None
        try:
            return cls.from_dict(read_json_object(path))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, folder: Path) -> None:
        """Replace the folder's manifest atomically (fsync'd); raises OSError on failure."""
        write_json(folder / MODEL_MANIFEST, self.to_dict())


_MODEL_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int, type(None)),
    "created": _OPTIONAL_STR,
    "kind": _OPTIONAL_STR,
    "reference": _OPTIONAL_STR,
    "made_by": _OPTIONAL_STR,
    "source": _OPTIONAL_STR,
    "base": _OPTIONAL_STR,
    "base_fingerprint": _OPTIONAL_STR,
    "fingerprint": _OPTIONAL_STR,
    "fingerprint_stats": (list, type(None)),
}
