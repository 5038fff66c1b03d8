"""What both packages share about files and arguments: a file written whole or not at all (`atomic_write`), one
argument-check style (`check`), and ids from users' CSVs as safe file names (`safe_name`) and as a person reads them
(`id_key`).

Every slide id, however hostile, maps to one safe, unique and stable relative path: ids like `../x`, `/abs/path`,
`a\\b`, 300 characters or odd unicode must never write outside the folder they are joined to, nor two ids share a
file. `sub/dir` ids keep their subfolders, since cohorts are often nested like that (TCGA project/case). Characters
outside a small safe set are percent-encoded (so `%` itself is too): the mapping is reversible, hence unique. A part
too long for a file system keeps a readable prefix and a hash of the whole id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import typing
import unicodedata
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

__all__ = ["atomic_path", "atomic_write", "check", "check_choice", "check_choices", "id_key", "safe_name"]

_SAFE = "-_.~+=,@()[]"  # besides ASCII letters and digits
_MAX_PART = 200  # bytes of one path part; file systems allow 255, and writers add prefixes and suffixes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` to write to (hidden, `.<name>.tmp-<pid>-<random>`: unique across processes
    and threads), moved over `path` when the block ends and removed when it raises. Parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """`data` (text as UTF-8) as the whole content of `path`."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def check(field: str, ok: bool, expected: str, value: object) -> None:
    """Raise `ValueError` naming `field`, what it should be and what it was, unless `ok`."""
    if not ok:
        raise ValueError(f"{field}: expected {expected}, got {value!r}")


def check_choice(field: str, value: object, choices: object) -> None:
    """`check` that `value` is one of `choices`: a `Literal[...]` type or a sequence of values. LightningCLI validates
    a `Literal` setting itself; this covers direct construction."""
    allowed = typing.get_args(choices) if typing.get_origin(choices) is typing.Literal else tuple(choices)
    names = [repr(c) for c in allowed]
    check(field, value in allowed, f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0], value)


def check_choices(settings: object) -> None:
    """`check_choice` of each field of the dataclass `settings` typed `Literal[...]`: the choices are written once, in
    the type (which LightningCLI also validates and `--help` lists), and checked for Python callers too."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        if typing.get_origin(hints[field.name]) is typing.Literal:
            check_choice(field.name, getattr(settings, field.name), hints[field.name])


def safe_name(slide_id: str) -> str:
    """A relative path for `slide_id` (`/`-separated parts, each a plain file name, never `.` or `..`)."""
    parts = slide_id.split("/")
    if any(part in ("", ".", "..") for part in parts):  # `/abs`, `a//b`, `../x`: one flat, encoded name
        parts = [slide_id]
    return "/".join(_part(part, slide_id) for part in parts)


def _part(part: str, slide_id: str) -> str:
    encoded = quote(part, safe=_SAFE)
    if encoded in (".", ".."):
        encoded = encoded.replace(".", "%2E")
    if encoded.startswith("."):  # no hidden files: temporaries are `.<name>.tmp-<pid>`
        encoded = "%2E" + encoded[1:]
    if len(encoded) > _MAX_PART:
        digest = hashlib.blake2b(slide_id.encode(), digest_size=8).hexdigest()
        cut = encoded[: _MAX_PART - 17]
        if "%" in cut[-2:]:  # never half an escape
            cut = cut[: cut.rindex("%")]
        encoded = f"{cut}~{digest}"
    return encoded


def id_key(text: str) -> str:
    """What a person sees of an id or a name: Unicode-normalised (NFKC: a no-break space is a space), case-folded,
    invisible format characters (zero-width spaces, joiners, byte-order marks) removed, runs of spaces as one. Two ids
    with one key are one id written two ways (`PATIENT_002`, `patient_002`)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(c for c in text if unicodedata.category(c) != "Cf").split())
