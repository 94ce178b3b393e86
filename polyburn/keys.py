"""Destination keys derived from item paths and labels that can never escape their prefix.

Item paths come from untrusted JSON (``filename``) or file names. Each path segment is kept
readable but made safe: ``..`` and ``.`` cannot traverse, backslashes are separators, control
characters and ``%`` are percent-encoded, over-long segments are shortened with a hash suffix, and
a leading slash is dropped. The result is a relative POSIX path of one or more segments.
"""

from __future__ import annotations

import hashlib
import re

from polyburn.errors import ItemError

MAX_SEGMENT_BYTES = 200
_UNSAFE = re.compile(r"[\x00-\x1f\x7f%\ud800-\udfff]")  # controls, %, lone surrogates


def safe_segment(segment: str) -> str:
    """One path segment (a label name, a file name) made safe for a key or a file name."""
    if segment in ("", "."):
        return "%2E" if segment == "." else "%00"
    if segment == "..":
        return "%2E%2E"
    text = _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", segment)
    text = text.replace("/", "%2F").replace("\\", "%5C")
    if len(text.encode("utf-8")) > MAX_SEGMENT_BYTES:
        digest = hashlib.sha256(segment.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        head = text.encode("utf-8")[: MAX_SEGMENT_BYTES - 17].decode("utf-8", "ignore")
        text = f"{head}~{digest}"
    return text


def safe_relpath(path: str) -> str:
    """A relative POSIX path from an untrusted item path; raises ItemError if nothing is left."""
    segments = [s for s in re.split(r"[/\\]", path) if s not in ("", ".")]
    if not segments:
        raise ItemError(path or "<empty>", "item path has no file name", "filename")
    return "/".join(safe_segment(s) for s in segments)


def item_path_from_filename(filename: str) -> str:
    """``/dir/img_001.jpg`` → ``dir/img_001`` (the extension of the last segment dropped)."""
    stem = filename.replace("\\", "/").strip("/")
    head, _, last = stem.rpartition("/")
    if "." in last.lstrip("."):
        last = last[: last.rfind(".")]
    return f"{head}/{last}" if head else last
