"""Dataset scanning and validation by file name, captions (txt / metadata.jsonl / trigger), buckets and caches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_image_folder, tiny_pipeline
from PIL import Image

from engine.data import DatasetError, build_cache, make_buckets, nearest_bucket, require_usable, scan_dataset


def test_txt_captions_and_trigger(tmp_path):
    folder = make_image_folder(tmp_path / "ds", n=3)
    (folder / "img02.txt").unlink()
    report = scan_dataset(folder, trigger="zqx")
    assert len(report.examples) == 3 and report.captions_from == "txt"
    assert all(e.caption.startswith("zqx") for e in report.examples)
    assert report.examples[2].caption == "zqx" and "img02.png" in report.notes


def test_metadata_jsonl_captions(tmp_path):
    folder = make_image_folder(tmp_path / "ds", n=2, metadata=True)
    report = scan_dataset(folder)
    assert report.captions_from == "metadata.jsonl" and all(e.caption for e in report.examples)


def test_problem_files_are_reported_by_name_and_odd_modes_are_handled(tmp_path):
    folder = make_image_folder(tmp_path / "ds", n=1)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.doc").write_text("hello")
    Image.new("RGB", (4, 4)).save(folder / "tiny.png")
    Image.new("CMYK", (40, 20), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.new("RGBA", (20, 40), (255, 0, 0, 128)).save(folder / "alpha.png")
    Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16)).save(folder / "deep.png")
    rotated = Image.new("RGB", (60, 30), "blue")
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(folder / "exif.jpg", exif=exif)
    report = scan_dataset(folder, min_side=8)
    assert set(report.problems) == {"broken.png", "notes.doc", "tiny.png"}
    assert "too small" in report.problems["tiny.png"]
    sizes = {e.path.name: (e.width, e.height) for e in report.examples}
    assert sizes["exif.jpg"] == (30, 60)  # EXIF orientation applied
    assert {"cmyk.jpg", "alpha.png", "deep.png", "img00.png"} <= set(sizes)
    assert "broken.png" in report.summary()


def test_zero_usable_images_refuses_with_reasons(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"no usable images.*a\.png"):
        require_usable(scan_dataset(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images"):
        require_usable(scan_dataset(empty))
    with pytest.raises(DatasetError, match="not found"):
        scan_dataset(tmp_path / "missing")


def test_buckets():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2
    wide = nearest_bucket(1600, 900, buckets)
    assert wide[0] > wide[1]
    assert nearest_bucket(300, 300, buckets) == (512, 512)
    with pytest.raises(ValueError, match="resolution"):
        make_buckets(500, 64)


def test_cache_and_epoch_order(tmp_path):
    folder = make_image_folder(tmp_path / "ds", n=5, sizes=[(32, 32), (48, 24)])
    pipe = tiny_pipeline()
    examples = scan_dataset(folder).examples
    data = build_cache(pipe, examples, 32, 4, buckets=True, flip=True)
    assert len(data) == 5 and data.latents[0].shape == (4, 16, 16)
    assert data.latents[1].shape[1] < data.latents[1].shape[2]  # wide image, wide bucket
    assert not torch.equal(data.latents[0], data.flipped[0])
    a = data.epoch_batches(0, 2, seed=1, repeats=2)
    assert a == data.epoch_batches(0, 2, seed=1, repeats=2) and a != data.epoch_batches(1, 2, seed=1, repeats=2)
    assert sorted(i for b in a for i, _ in b) == sorted(list(range(5)) * 2)
    assert all(len({data.buckets[i] for i, _ in b}) == 1 for b in a)
    assert len(a) == data.batches_per_epoch(2, 2)
    batch = data.collate(a[0], torch.device("cpu"))
    assert batch["latents"].shape[0] == len(a[0]) and batch["text"].shape[0] == len(a[0])
