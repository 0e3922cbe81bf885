"""Tests for engine.captions: pure caption edits, atomic sidecars and metadata.jsonl import/export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from engine.captions import (
    add_trigger,
    append_tags,
    atomic_write_text,
    dedupe_tags,
    export_metadata,
    find_replace,
    import_metadata,
    metadata_to_sidecars,
    normalize_caption,
    prepend_tags,
    read_caption,
    read_folder_captions,
    save_caption,
    sidecar_path,
    split_tags,
    strip_word,
)


def test_normalize_and_split() -> None:
    assert normalize_caption("  a  red\ncube ,, on grass ,") == "a red cube, on grass"
    assert split_tags("a, , b ,c") == ["a", "b", "c"]
    with pytest.raises(TypeError, match="caption must be a string"):
        normalize_caption(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a big red circle on the left, night background", "sks, a big red circle on the left, night background"),
        ("sks, a red circle", "sks, a red circle"),
        ("SKS a red circle", "SKS a red circle"),  # already starts with it (any case): not duplicated
        ("a red circle, sks, grass", "sks, a red circle, grass"),  # a separate tag elsewhere moves to the front
        ("sksx photo", "sks, sksx photo"),  # a longer word is not the trigger
        ("", "sks"),
    ],
)
def test_add_trigger(caption: str, expected: str) -> None:
    assert add_trigger(caption, "sks") == expected
    assert add_trigger(add_trigger(caption, "sks"), "sks") == expected  # idempotent


def test_add_trigger_validates() -> None:
    with pytest.raises(ValueError, match="trigger must be a non-empty string, got '  '"):
        add_trigger("x", "  ")
    with pytest.raises(ValueError, match="must not contain commas"):
        add_trigger("x", "a, b")


def test_find_replace() -> None:
    assert find_replace("a red cube, red sky", "red", "blue") == "a blue cube, blue sky"
    assert find_replace("a redder red", "red", "blue", whole_word=True) == "a redder blue"
    assert find_replace("Red red", "red", "x", ignore_case=True) == "x x"
    assert find_replace("cat 1, cat 22", r"cat (\d+)", r"dog \1", regex=True) == "dog 1, dog 22"
    assert find_replace("a.b", ".", "\\1") == "a\\1b"  # literal mode: no regex, no backrefs
    assert find_replace("a cube, shiny", ", shiny", "") == "a cube"
    with pytest.raises(ValueError, match="find must be a non-empty string"):
        find_replace("x", "", "y")
    with pytest.raises(ValueError, match=r"not a valid regular expression: '\('"):
        find_replace("x", "(", "y", regex=True)


def test_prepend_append_and_dedupe() -> None:
    assert prepend_tags("a cube, grass", "photo, Grass") == "photo, a cube, grass"
    assert append_tags("a cube", ["high quality", "A Cube", "high quality"]) == "a cube, high quality"
    assert dedupe_tags("a, b, A, c, b ,a") == "a, b, c"
    assert append_tags("", "x") == "x"


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("watercolor style, a red circle on the left, night background", "a red circle on the left, night background"),
        ("a red circle in watercolor style", "a red circle"),
        ("a cat in the style of Watercolor, grass", "a cat, grass"),
        ("a watercolor painting of a cat", "a painting of a cat"),
        ("a watercolors cat", "a watercolors cat"),  # whole words only
        ("watercolor-style cat.", "cat."),
    ],
)
def test_strip_word(caption: str, expected: str) -> None:
    assert strip_word(caption, "watercolor") == expected


def test_sidecar_save_never_overwrites_unless_asked(tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(image)
    assert sidecar_path(image) == tmp_path / "cat.txt"
    assert read_caption(image) is None
    assert save_caption(image, "  a cat \n") is True
    assert (tmp_path / "cat.txt").read_text() == "a cat\n"
    assert save_caption(image, "a dog") is False
    assert read_caption(image) == "a cat"
    assert save_caption(image, "a dog", overwrite=True) is True
    assert read_caption(image) == "a dog"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png", "cat.txt"]  # no temp files left


def test_atomic_write_failure_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("engine.captions.os.fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # the temporary file was removed


def _folder(tmp_path: Path) -> Path:
    for name in ("a.png", "b.jpg", "sub/c.png", "nocap.png"):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
    (tmp_path / "a.txt").write_text("cat, ünïcode\n")
    (tmp_path / "b.txt").write_text("dog\n")
    (tmp_path / "sub" / "c.txt").write_text("bird\n")
    return tmp_path


def test_metadata_round_trip(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    assert read_folder_captions(folder) == {"a.png": "cat, ünïcode", "b.jpg": "dog"}
    path = export_metadata(folder)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"file_name": "a.png", "text": "cat, ünïcode"}, {"file_name": "b.jpg", "text": "dog"},
                    {"file_name": "sub/c.png", "text": "bird"}]
    assert import_metadata(folder) == {"a.png": "cat, ünïcode", "b.jpg": "dog", "sub/c.png": "bird"}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_metadata(folder, {"a.png": "x"})
    export_metadata(folder, {"a.png": "x"}, overwrite=True)
    assert import_metadata(path) == {"a.png": "x"}


def test_metadata_to_sidecars_keeps_existing(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    written, kept = metadata_to_sidecars(folder, {"a.png": "new a", "nocap.png": "new caption"})
    assert (written, kept) == (["nocap.png"], ["a.png"])
    assert read_caption(folder / "a.png") == "cat, ünïcode"
    assert read_caption(folder / "nocap.png") == "new caption"
    written, kept = metadata_to_sidecars(folder, {"a.png": "new a"}, overwrite=True)
    assert written == ["a.png"] and read_caption(folder / "a.png") == "new a"
    with pytest.raises(ValueError, match="not in .*: 'ghost.png'"):
        metadata_to_sidecars(folder, {"ghost.png": "x"})
    with pytest.raises(ValueError, match=r"inside the dataset folder, got '\.\./evil.png'"):
        metadata_to_sidecars(folder, {"../evil.png": "x"})


def test_import_metadata_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "metadata.jsonl"
    bad.write_text('{"file_name": "a.png", "text": "ok"}\n\n{not json}\n')
    with pytest.raises(ValueError, match="metadata.jsonl line 3 is not valid JSON"):
        import_metadata(bad)
    bad.write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match="line 1 has no string 'text' for 'a.png'"):
        import_metadata(bad)
    bad.write_text('["a.png", "x"]\n')
    with pytest.raises(ValueError, match="line 1 has no string 'file_name'"):
        import_metadata(bad)
    bad.write_text('{"file_name": "a.png", "caption": "legacy key"}\n')
    assert import_metadata(bad) == {"a.png": "legacy key"}
    with pytest.raises(ValueError, match="metadata file not found"):
        import_metadata(tmp_path / "nope.jsonl")
