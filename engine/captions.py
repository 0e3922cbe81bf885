"""Caption operations shared by the UI and the CLI: pure text edits, atomic sidecar files and metadata.jsonl."""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from engine.images import is_image_path

METADATA_FILE = "metadata.jsonl"
TAG_SEPARATOR = ", "

# ---------------------------------------------------------------- pure text operations


def normalize_caption(caption: str) -> str:
    """Collapse whitespace, tidy commas (no empty tags, no space before a comma) and strip the ends."""
    _check_text("caption", caption)
    text = re.sub(r"\s+", " ", caption)
    text = re.sub(r"\s*,\s*", ", ", text)
    text = re.sub(r"(?:,\s*){2,}", ", ", text)
    return text.strip().strip(",").strip()


def split_tags(caption: str) -> list[str]:
    """Split a caption on commas into stripped, non-empty tags."""
    _check_text("caption", caption)
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def join_tags(tags: Iterable[str]) -> str:
    """Join tags with ", ", dropping empty ones."""
    return TAG_SEPARATOR.join(tag.strip() for tag in tags if tag and tag.strip())


def add_trigger(caption: str, trigger: str) -> str:
    """Make the caption start with `trigger` (the AC-LoRA class-token convention), never duplicating it.

    A caption that already starts with the trigger as a whole word is only normalized; a trigger that
    appears as a separate tag elsewhere is moved to the front.
    """
    trigger = _check_word("trigger", trigger)
    text = normalize_caption(caption)
    if re.match(rf"{re.escape(trigger)}(?![\w-])", text, flags=re.IGNORECASE):
        return text
    tags = [tag for tag in split_tags(text) if tag.lower() != trigger.lower()]
    return join_tags([trigger, *tags])


def find_replace(
    caption: str, find: str, replace: str, *, regex: bool = False, whole_word: bool = False, ignore_case: bool = False
) -> str:
    """Replace every occurrence of `find` with `replace` (literal text unless `regex`), then normalize."""
    _check_text("caption", caption)
    _check_text("replace", replace)
    if not isinstance(find, str) or find == "":
        raise ValueError(f"find must be a non-empty string, got {find!r}")
    pattern = find if regex else re.escape(find)
    if whole_word:
        pattern = rf"(?<![\w-])(?:{pattern})(?![\w-])"
    try:
        compiled = re.compile(pattern, flags=re.IGNORECASE if ignore_case else 0)
    except re.error as error:
        raise ValueError(f"find is not a valid regular expression: {find!r} ({error})") from error
    if regex:
        try:
            return normalize_caption(compiled.sub(replace, caption))
        except (re.error, IndexError) as error:
            raise ValueError(f"replace is not a valid replacement for {find!r}: {replace!r} ({error})") from error
    return normalize_caption(compiled.sub(lambda _match: replace, caption))


def prepend_tags(caption: str, tags: str | Iterable[str]) -> str:
    """Put tags at the front (in order), skipping any already present (case-insensitive)."""
    new = _tag_list(tags)
    existing = split_tags(caption)
    present = {tag.lower() for tag in existing}
    return join_tags([tag for tag in _unique(new) if tag.lower() not in present] + existing)


def append_tags(caption: str, tags: str | Iterable[str]) -> str:
    """Put tags at the end (in order), skipping any already present (case-insensitive)."""
    new = _tag_list(tags)
    existing = split_tags(caption)
    present = {tag.lower() for tag in existing}
    return join_tags(existing + [tag for tag in _unique(new) if tag.lower() not in present])


def strip_word(caption: str, word: str) -> str:
    """Remove a style word and its connective phrase ("in the style of W", "in W style", "W style", "W").

    Matching is whole-word and case-insensitive; tags left empty are dropped, so the adapter learns the
    style from the pixels rather than from the word.
    """
    word = _check_word("word", word)
    _check_text("caption", caption)
    w = re.escape(word)
    phrases = [
        rf"in the style of (?:an? |the )?{w}",
        rf"in (?:an? |the )?{w}[ -]style",
        rf"(?:an? |the )?{w}[ -]style",
        rf"style of (?:an? |the )?{w}",
        w,
    ]
    text = caption
    for phrase in phrases:
        text = re.sub(rf"(?<![\w-]){phrase}(?![\w-])", " ", text, flags=re.IGNORECASE)
    return normalize_caption(re.sub(r"\s+([.;:!?])", r"\1", text))


def dedupe_tags(caption: str) -> str:
    """Drop repeated comma-separated tags (case-insensitive), keeping the first occurrence and the order."""
    return join_tags(_unique(split_tags(caption)))


def _unique(tags: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for tag in tags:
        if tag.lower() not in seen:
            seen.add(tag.lower())
            out.append(tag)
    return out


def _tag_list(tags: str | Iterable[str]) -> list[str]:
    if isinstance(tags, str):
        return split_tags(tags)
    tags = list(tags)
    for tag in tags:
        _check_text("tag", tag)
    return [tag.strip() for tag in tags if tag.strip()]


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}: {value!r}")


def _check_word(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if "," in value or "\n" in value:
        raise ValueError(f"{name} must not contain commas or newlines, got {value!r}")
    return value.strip()


# ---------------------------------------------------------------- files


def sidecar_path(image_path: str | os.PathLike) -> Path:
    """The caption file that belongs to an image: same name, `.txt` extension."""
    return Path(image_path).with_suffix(".txt")


def read_caption(image_path: str | os.PathLike) -> str | None:
    """The image's sidecar caption (stripped), or None when it has none."""
    path = sidecar_path(image_path)
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text through a temporary file in the same folder and os.replace, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_caption(image_path: str | os.PathLike, caption: str, *, overwrite: bool = False) -> bool:
    """Write the image's `.txt` sidecar atomically; returns False (and leaves the file alone) if one exists."""
    _check_text("caption", caption)
    path = sidecar_path(image_path)
    if path.exists() and not overwrite:
        return False
    atomic_write_text(path, caption.strip() + "\n")
    return True


def read_folder_captions(folder: str | os.PathLike, *, recursive: bool = False) -> dict[str, str]:
    """Captions of every image in the folder that has a sidecar, keyed by path relative to the folder (POSIX)."""
    root = _folder(folder)
    files = root.rglob("*") if recursive else root.iterdir()
    captions = {}
    for path in sorted(files):
        if path.is_file() and is_image_path(path) and (text := read_caption(path)) is not None:
            captions[path.relative_to(root).as_posix()] = text
    return captions


def export_metadata(
    folder: str | os.PathLike, captions: Mapping[str, str] | None = None, *, overwrite: bool = False
) -> Path:
    """Write `metadata.jsonl` (HF imagefolder: one {"file_name", "text"} per line) from `captions` or the sidecars."""
    root = _folder(folder)
    target = root / METADATA_FILE
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    captions = read_folder_captions(root, recursive=True) if captions is None else captions
    lines = []
    for name, text in sorted(captions.items()):
        _check_text(f"caption of {name!r}", text)
        lines.append(json.dumps({"file_name": _relative_name(name), "text": text.strip()}, ensure_ascii=False))
    atomic_write_text(target, "".join(line + "\n" for line in lines))
    return target


def import_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Read a `metadata.jsonl` (or the one inside a folder) into {file_name: text}, naming the bad line on error."""
    path = Path(path)
    if path.is_dir():
        path = path / METADATA_FILE
    if not path.is_file():
        raise ValueError(f"metadata file not found: {str(path)!r}")
    captions: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path.name} line {number} is not valid JSON: {error.msg}") from error
        name = _string_field(row, "file_name")
        if name is None:
            raise ValueError(f"{path.name} line {number} has no string 'file_name': {line[:120]!r}")
        text = _string_field(row, "text")
        text = _string_field(row, "caption") if text is None else text
        if text is None:
            raise ValueError(f"{path.name} line {number} has no string 'text' for {name!r}")
        captions[_relative_name(name)] = text.strip()
    return captions


def metadata_to_sidecars(
    folder: str | os.PathLike, captions: Mapping[str, str], *, overwrite: bool = False
) -> tuple[list[str], list[str]]:
    """Write each caption to its image's sidecar; returns (written, kept). Images must exist inside the folder."""
    root = _folder(folder)
    written, kept = [], []
    for name, text in sorted(captions.items()):
        image = root / _relative_name(name)
        if not image.is_file():
            raise ValueError(f"metadata names an image that is not in {str(root)!r}: {name!r}")
        (written if save_caption(image, text, overwrite=overwrite) else kept).append(name)
    return written, kept


def _string_field(row: object, key: str) -> str | None:
    value = row.get(key) if isinstance(row, dict) else None
    return value if isinstance(value, str) else None


def _relative_name(name: str) -> str:
    posix = Path(name).as_posix()
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"file_name must be a path inside the dataset folder, got {name!r}")
    return posix


def _folder(folder: str | os.PathLike) -> Path:
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"not a folder: {str(folder)!r}")
    return root
