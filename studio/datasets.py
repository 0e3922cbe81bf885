"""Working copies of datasets in the data folder: import (bundled, uploads, zips, folders), caption table, edits."""
from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

from engine import captions as caps
from engine.images import IMAGE_EXTENSIONS

MAX_ZIP_BYTES = 2 * 2**30
MAX_ZIP_FILES = 20_000
KEEP_SUFFIXES = IMAGE_EXTENSIONS | {".txt", ".jsonl"}


def safe_name(name: str, fallback: str = "dataset") -> str:
    """A folder name made of letters, digits, '-', '_' and '.' (never '..' or empty)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", (name or "").strip()).strip(".-")
    return clean or fallback


def inside(root: Path, path: str | Path) -> Path:
    """`path` resolved, refused unless it lies under `root` (the studio only touches its own data folder)."""
    p = Path(path).resolve()
    if p != root.resolve() and root.resolve() not in p.parents:
        raise ValueError(f"{Path(path).name!r} is outside the studio's data folder")
    return p


def copy_folder(src: Path, dst: Path) -> Path:
    """Copy the images, captions and metadata.jsonl of `src` (top level) into `dst`."""
    if not src.is_dir():
        raise ValueError(f"not a folder: {str(src)!r}")
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix.lower() in KEEP_SUFFIXES and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
            n += 1
    if n == 0:
        raise ValueError(f"{src.name!r} holds no images or captions")
    return dst


def extract_zip(archive: Path, dst: Path) -> int:
    """Extract images/captions from a zip by base name only (no paths, so nothing escapes `dst`); size-limited."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise ValueError(f"{archive.name}: not a readable zip file") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_FILES or sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise ValueError(f"{archive.name}: too large (at most {MAX_ZIP_FILES} files and 2 GB unpacked)")
        n = 0
        for m in members:
            name = Path(m.filename).name
            if name.startswith(".") or Path(name).suffix.lower() not in KEEP_SUFFIXES or "__MACOSX" in m.filename:
                continue
            with zf.open(m) as fin, open(dst / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            n += 1
    return n


def import_uploads(paths: list[str], dst: Path) -> Path:
    """Copy uploaded images/captions (and the contents of uploaded zips) into the dataset folder `dst`."""
    if not paths:
        raise ValueError("no files uploaded: drop images (with .txt captions) or a .zip")
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in map(Path, paths):
        if path.suffix.lower() == ".zip":
            n += extract_zip(path, dst)
        elif path.suffix.lower() in KEEP_SUFFIXES:
            shutil.copy2(path, dst / safe_name(path.name, "file"))
            n += 1
    if n == 0:
        raise ValueError("none of the uploaded files is an image, a caption .txt or a zip of them")
    return dst


def caption_rows(folder: Path) -> list[list[str]]:
    """[[file name, caption]] for every image file of the folder, sorted by name."""
    rows = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            rows.append([p.name, caps.read_caption(p) or ""])
    return rows


def bulk_edit(rows: list[list[str]], op: str, a: str = "", b: str = "") -> list[list[str]]:
    """Apply one edit to every caption (not saved yet): trigger, prefix, suffix, find/replace, strip, dedupe."""
    ops = {
        "trigger": lambda c: caps.add_trigger(c, a),
        "prefix": lambda c: caps.prepend_tags(c, a),
        "suffix": lambda c: caps.append_tags(c, a),
        "replace": lambda c: caps.find_replace(c, a, b),
        "strip": lambda c: caps.strip_word(c, a),
        "dedupe": caps.dedupe_tags,
    }
    if op not in ops:
        raise ValueError(f"unknown caption edit {op!r}; choose one of {', '.join(ops)}")
    if op in ("trigger", "prefix", "suffix", "replace", "strip") and not a.strip():
        raise ValueError(f"the {op} edit needs a word or text in the first box")
    return [[name, ops[op](str(caption or ""))] for name, caption in rows]


def save_captions(folder: Path, rows: list[list[str]]) -> int:
    """Write each caption as the image's .txt sidecar (an empty caption removes the sidecar); returns files written."""
    n = 0
    for name, caption in rows:
        image = inside(folder, folder / str(name))
        if not image.is_file():
            raise ValueError(f"{name}: no such image in {folder.name}")
        text = caps.normalize_caption(str(caption or ""))
        if text:
            caps.save_caption(image, text, overwrite=True)
            n += 1
        else:
            caps.sidecar_path(image).unlink(missing_ok=True)
    return n
