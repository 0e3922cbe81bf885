"""Tests for engine.captioning: every backend on a tiny random model, loading, offline errors, folders and the CLI."""
from __future__ import annotations

import argparse
import hashlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from test_images import write_bomb, write_exif_rotated, write_rgb16_png
from tokenizers.pre_tokenizers import ByteLevel

from engine import captioning
from engine.captioning import (
    CAPTIONER_CHOICES,
    Blip2Captioner,
    BlipCaptioner,
    Captioner,
    CaptionerUnavailableError,
    Florence2Captioner,
    VLMCaptioner,
    add_caption_subparser,
    caption_folder,
    captioner_defaults,
    captioner_from_model,
    load_captioner,
    resolve_device,
    resolve_dtype,
    run_caption_cli,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}


def byte_tokenizer(specials: list[str], **kwargs: Any) -> Any:
    """A byte-level BPE tokenizer with no merges: every byte is one token, so n new tokens decode to <= n chars."""
    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = transformers.GPT2Tokenizer(vocab=vocab, merges=[], **kwargs)
    tokenizer.add_tokens(specials, special_tokens=True)
    return tokenizer


def tiny_blip() -> tuple[Any, Any]:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *"abcdefghijklmnopqrstuvwxyz", "photo", "of"]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    config = transformers.BlipConfig(
        vision_config=VISION,
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "bos_token_id": tokenizer.bos_token_id, "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3},
        projection_dim=32,
    )
    processor = transformers.BlipProcessor(
        image_processor=transformers.BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    return transformers.BlipForConditionalGeneration(config).eval(), processor


def tiny_blip2() -> tuple[Any, Any]:
    tokenizer = byte_tokenizer(["</s>", "<pad>"], bos_token="</s>", eos_token="</s>", unk_token="</s>",
                               pad_token="<pad>")
    processor = transformers.Blip2Processor(
        image_processor=transformers.BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer,
        num_query_tokens=4)
    config = transformers.Blip2Config(
        vision_config=VISION,
        qformer_config={"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "encoder_hidden_size": 32, "max_position_embeddings": 64},
        text_config={"model_type": "opt", "vocab_size": len(tokenizer), "hidden_size": 32, "ffn_dim": 37,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "word_embed_proj_dim": 32,
                     "max_position_embeddings": 128, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return transformers.Blip2ForConditionalGeneration(config).eval(), processor


def tiny_florence2() -> tuple[Any, Any]:
    tokenizer = byte_tokenizer(["<s>", "</s>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>",
                               unk_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    image_processor = transformers.CLIPImageProcessorPil(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = 17  # 4x4 feature map + 1 temporal token
    processor = transformers.Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    config = transformers.Florence2Config(
        vision_config={"depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
                       "patch_prenorm": [False, True], "embed_dim": [16, 32], "num_heads": [2, 2],
                       "num_groups": [2, 2], "window_size": 4, "projection_dim": 32, "max_position_embeddings": 8,
                       "max_temporal_embeddings": 4},
        text_config={"model_type": "bart", "vocab_size": len(tokenizer), "d_model": 32, "encoder_layers": 1,
                     "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                     "encoder_ffn_dim": 37, "decoder_ffn_dim": 37, "max_position_embeddings": 128,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "decoder_start_token_id": tokenizer.eos_token_id},
        image_token_id=tokenizer.image_token_id,
    )
    return transformers.Florence2ForConditionalGeneration(config).eval(), processor


def tiny_llava(chat_template: str | None = CHAT_TEMPLATE) -> tuple[Any, Any]:
    tokenizer = byte_tokenizer(["<s>", "</s>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>",
                               unk_token="</s>", pad_token="<pad>")
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                         crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                            vision_feature_select_strategy="default", chat_template=chat_template,
                                            num_additional_image_tokens=1)
    config = transformers.LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **VISION},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 256, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return transformers.LlavaForConditionalGeneration(config).eval(), processor


BUILDERS = {"blip": tiny_blip, "blip2": tiny_blip2, "florence2": tiny_florence2, "vlm": tiny_llava}
CLASSES = {"blip": BlipCaptioner, "blip2": Blip2Captioner, "florence2": Florence2Captioner, "vlm": VLMCaptioner}


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, tuple[Any, Any]]:
    torch.manual_seed(0)
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def saved_models(tiny_models: dict[str, tuple[Any, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {}
    for name, (model, processor) in tiny_models.items():
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[name] = folder
    return folders


def sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (32, 32), (50, 64)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("backend", list(BUILDERS))
def test_backend_end_to_end_batched(backend: str, tiny_models: dict[str, tuple[Any, Any]]) -> None:
    model, processor = tiny_models[backend]
    calls: list[tuple[int, int]] = []
    captioner = captioner_from_model(model, processor, batch_size=2, max_new_tokens=5, num_beams=1, device="cpu")
    assert type(captioner) is CLASSES[backend]
    assert captioner.device == torch.device("cpu") and captioner.dtype == torch.float32
    captions = captioner.caption(sample_images(), progress=lambda done, total: calls.append((done, total)))
    assert len(captions) == 3 and all(isinstance(text, str) for text in captions)
    assert calls == [(0, 3), (2, 3), (3, 3)]
    # batching changes nothing: one image at a time gives the same greedy captions
    one_by_one = captioner_from_model(model, processor, batch_size=1, max_new_tokens=5, num_beams=1, device="cpu")
    assert one_by_one.caption(sample_images()) == captions
    if backend != "blip":  # byte-level tokenizers: the prompt was not echoed, only <= 5 new tokens were decoded
        assert all(len(text) <= 5 for text in captions), captions


def test_beam_search_and_empty_input(tiny_models: dict[str, tuple[Any, Any]]) -> None:
    model, processor = tiny_models["florence2"]
    captioner = captioner_from_model(model, processor, batch_size=4, max_new_tokens=4, num_beams=3)
    assert len(captioner.caption(sample_images())) == 3
    assert captioner.caption([]) == []
    with pytest.raises(TypeError, match=r"images\[1\] must be a PIL.Image.Image, got str"):
        captioner.caption([sample_images()[0], "cat.png"])  # type: ignore[list-item]


def test_blip_prefix_is_kept_and_blip2_question_is_not_echoed(tiny_models: dict[str, tuple[Any, Any]]) -> None:
    model, processor = tiny_models["blip"]
    blip = captioner_from_model(model, processor, prompt="a photo of", max_new_tokens=3, num_beams=1)
    assert all(text.startswith("a photo of") for text in blip.caption(sample_images()))
    model, processor = tiny_models["blip2"]
    blip2 = captioner_from_model(model, processor, prompt="Question: what is shown? Answer:", max_new_tokens=4)
    assert all("Question" not in text and len(text) <= 4 for text in blip2.caption(sample_images()))


def test_florence_tasks(tiny_models: dict[str, tuple[Any, Any]]) -> None:
    model, processor = tiny_models["florence2"]
    for task in captioning.FLORENCE_TASKS:
        assert len(captioner_from_model(model, processor, prompt=task, max_new_tokens=2).caption(
            sample_images()[:1])) == 1
    assert captioner_from_model(model, processor).prompt == "<DETAILED_CAPTION>"
    with pytest.raises(ValueError, match="Florence-2 prompt must be one of .* got '<OD>'"):
        captioner_from_model(model, processor, prompt="<OD>")


def test_vlm_prompt_uses_chat_template_or_falls_back() -> None:
    torch.manual_seed(0)
    model, processor = tiny_llava()
    captioner = captioner_from_model(model, processor, prompt="Caption it.", max_new_tokens=3)
    assert captioner.prompt_text() == "<|user|><image>Caption it.<|assistant|>"  # jinja trims the newline
    assert processor.tokenizer.padding_side == "left"
    model, processor = tiny_llava(chat_template=None)
    plain = captioner_from_model(model, processor, prompt="Caption it.", max_new_tokens=3)
    assert plain.prompt_text() == "<image>Caption it."
    assert len(plain.caption(sample_images())) == 3
    with pytest.raises(ValueError, match="needs a non-empty instruction prompt"):
        captioner_from_model(model, processor, prompt=" ")


def test_bfloat16_weights_and_inputs(tiny_models: dict[str, tuple[Any, Any]]) -> None:
    torch.manual_seed(0)
    model, processor = tiny_blip()
    captioner = captioner_from_model(model, processor, dtype="bf16", max_new_tokens=3, num_beams=1)
    assert captioner.dtype == torch.bfloat16
    assert next(captioner.model.parameters()).dtype == torch.bfloat16
    assert len(captioner.caption(sample_images())) == 3


def test_device_and_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(None, cuda) == torch.float16
    assert resolve_dtype("fp16", cpu) == torch.float16 and resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_dtype(None, torch.device("mps")) == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of .* got 'int8'"):
        resolve_dtype("int8", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device(None) in (cpu, torch.device("mps"))
    with pytest.raises(ValueError, match="device must be like .* got 'gpu-please'"):
        resolve_device("gpu-please")


@pytest.mark.parametrize("backend", list(BUILDERS))
def test_load_captioner_from_local_folder_picks_backend_by_config(backend: str, saved_models: dict[str, Path]) -> None:
    captioner = load_captioner(str(saved_models[backend]), device="cpu", batch_size=3, max_new_tokens=3)
    assert type(captioner) is CLASSES[backend]
    assert captioner.name == str(saved_models[backend]) and captioner.batch_size == 3
    assert len(captioner.caption(sample_images())) == 3


def test_offline_unknown_hub_id_names_it_and_suggests_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(CaptionerUnavailableError) as caught:
        load_captioner("fake-org/no-such-captioner-xyz")
    message = str(caught.value)
    assert "'fake-org/no-such-captioner-xyz'" in message and "offline" in message
    assert "bundled captioner" in message and "by hand" in message
    assert time.perf_counter() - start < 10


def test_load_captioner_validates_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model must be 'bundled', a hub id or a local folder, got ''"):
        load_captioner("")
    with pytest.raises(ValueError, match="model folder not found: './no/such/dir'"):
        load_captioner("./no/such/dir")
    with pytest.raises(ValueError, match=r"unknown captioner option\(s\) \['temperature'\]"):
        load_captioner("Salesforce/blip-image-captioning-base", temperature=0.7)
    with pytest.raises(ValueError, match=r"unknown option\(s\) for the bundled captioner: \['prompt'\]"):
        load_captioner("bundled", prompt="x")
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model type 'bert' is not an image-to-text model"):
        load_captioner(str(tmp_path))


def test_choices_and_defaults() -> None:
    assert CAPTIONER_CHOICES[0] == "bundled"
    assert "florence-community/Florence-2-base" in CAPTIONER_CHOICES
    assert captioner_defaults("florence-community/Florence-2-large") == {
        "backend": "florence2", "batch_size": 4, "max_new_tokens": 128, "num_beams": 3, "prompt": "<DETAILED_CAPTION>"}
    assert captioner_defaults("someone/new-vlm")["backend"] == "vlm"
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        Captioner(batch_size=0)


class PixelCaptioner(Captioner):
    """Deterministic test captioner: describes the size and the dominant channel of each image."""

    name = "pixels"

    def __init__(self, batch_size: int = 2) -> None:
        super().__init__(batch_size)
        self.seen = 0

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        self.seen += len(images)
        out = []
        for image in images:
            mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
            out.append(f"a {image.width}x{image.height} {('red', 'green', 'blue')[int(mean.argmax())]} picture")
        return out


def messy_folder(root: Path) -> Path:
    Image.new("RGB", (40, 30), (220, 10, 10)).save(root / "red.png")
    (root / "red_copy.png").write_bytes((root / "red.png").read_bytes())
    Image.new("RGB", (40, 30), (10, 220, 10)).save(root / "green.jpg", quality=95)
    (root / "green.txt").write_text("my own caption\n")
    Image.new("CMYK", (24, 24), (255, 255, 0, 0)).save(root / "cmyk.jpg", quality=95)
    write_rgb16_png(root / "deep.png")
    write_exif_rotated(root / "rotated.jpg")
    write_bomb(root / "bomb.png")
    (root / "empty.png").touch()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "corrupt.jpg").write_bytes(buffer.getvalue()[:400])
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")
    (root / "metadata.jsonl").write_text("")
    return root


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.suffix != ".txt"}


def test_caption_folder_handles_bad_input_and_loses_nothing(tmp_path: Path) -> None:
    root = messy_folder(tmp_path)
    before = digests(root)
    calls: list[tuple[int, int]] = []
    captioner = PixelCaptioner(batch_size=2)
    report = caption_folder(root, captioner, trigger="sks", progress=lambda d, t: calls.append((d, t)))

    assert sorted(report.written) == ["cmyk.jpg", "deep.png", "red.png", "red_copy.png", "rotated.jpg"]
    assert report.kept == ["green.jpg"]
    assert report.duplicates == {"red_copy.png": "red.png"}
    assert set(report.skipped) == {"bomb.png", "corrupt.jpg", "empty.png", "notes.pdf"}
    assert "too large: 12000x12000" in report.skipped["bomb.png"]
    assert "corrupt or truncated" in report.skipped["corrupt.jpg"]
    assert report.skipped["empty.png"] == "empty file (0 bytes)"
    assert report.skipped["notes.pdf"] == "not an image file (extension '.pdf')"
    assert captioner.seen == 4  # the duplicate was captioned once, the bomb and the broken files never
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)

    text = {p.stem: p.read_text() for p in root.glob("*.txt")}
    assert text["red"] == text["red_copy"] == "sks, a 40x30 red picture\n"
    assert text["green"] == "my own caption\n"
    assert text["cmyk"] == "sks, a 24x24 blue picture\n"  # C+M ink = blue, converted correctly
    assert text["deep"] == "sks, a 10x8 red picture\n"
    assert text["rotated"].startswith("sks, a 20x40 ")  # EXIF transpose applied before captioning
    assert not {"bomb", "corrupt", "empty", "notes"} & set(text)
    assert digests(root) == before  # no image or other file was changed, moved or deleted
    assert "5 captioned, 1 kept, 4 skipped, 1 duplicates" in report.summary()

    again = caption_folder(root, PixelCaptioner())
    assert again.written == [] and sorted(again.kept) == sorted(report.written + report.kept)
    assert {p.stem: p.read_text() for p in root.glob("*.txt")} == text  # nothing overwritten

    rewritten = caption_folder(root, PixelCaptioner(), overwrite=True)
    assert "green.jpg" in rewritten.written and (root / "green.txt").read_text() == "a 40x30 green picture\n"


def test_caption_folder_reports_empty_captions(tmp_path: Path) -> None:
    class Silent(Captioner):
        def _caption_batch(self, images: list[Image.Image]) -> list[str]:
            return ["  "] * len(images)

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    report = caption_folder(tmp_path, Silent())
    assert report.skipped == {"a.png": "the captioner returned an empty caption"}
    assert not (tmp_path / "a.txt").exists()
    with pytest.raises(ValueError, match="not a folder"):
        caption_folder(tmp_path / "a.png", Silent())


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="engine")
    add_caption_subparser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_captions_a_folder_with_a_local_model(tmp_path: Path, saved_models: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for index, image in enumerate(sample_images()):
        image.save(data / f"{index}.png")
    (data / "readme.md").write_text("x")
    args = _cli(["caption", str(data), "--model", str(saved_models["blip"]), "--trigger", "sks",
                 "--batch-size", "2", "--max-new-tokens", "3", "--device", "cpu"])
    assert args.func is run_caption_cli
    assert run_caption_cli(args) == 0
    out, err = capsys.readouterr()
    assert "3 captioned, 0 kept, 1 skipped" in out and "readme.md: not an image file" in out
    assert "captioning" in err  # the tqdm bar
    assert all((data / f"{index}.txt").read_text().startswith("sks") for index in range(3))


def test_cli_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert run_caption_cli(_cli(["caption", str(tmp_path / "missing")])) == 2
    assert "not a folder" in capsys.readouterr().err
    assert run_caption_cli(_cli(["caption", str(tmp_path), "--model", "fake-org/nothing-here"])) == 2
    assert "'fake-org/nothing-here'" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parents[1]
ORACLE_WEIGHTS = ROOT / "assets" / "oracle" / "oracle.safetensors"


class FakeOracle:
    """Stands in for the trained oracle: 'reads' a fixed scene per image, by image colour."""

    def __init__(self) -> None:
        from engine.miniworld.world import Obj, Scene

        self.scenes = {
            "red": Scene((Obj("circle", "red", "big", "left"),), "night"),
            "blue": Scene((Obj("star", "blue", "small", "top"), Obj("square", "white", "big", "center")), "sand"),
        }

    def _scene(self, image: Image.Image) -> Any:
        red, _, blue = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
        return self.scenes["red" if red > blue else "blue"]

    def read(self, images: list[Image.Image]) -> list[Any]:
        return [self._scene(image) for image in images]

    def readings(self, images: list[Image.Image]) -> list[Any]:
        return [argparse.Namespace(scene=self._scene(image), style="flat") for image in images]


def test_bundled_captioner_writes_the_world_grammar(tmp_path: Path) -> None:
    pytest.importorskip("engine.miniworld.world")
    red, blue = Image.new("RGB", (64, 64), (200, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 200))
    plain = load_captioner("bundled", oracle=FakeOracle(), batch_size=1)
    assert plain.caption([red, blue]) == [
        "a big red circle on the left, night background",
        "a small blue star at the top and a big white square in the center, sand background",
    ]
    styled = captioning.BundledCaptioner(FakeOracle(), style="auto")
    assert styled.caption([red]) == ["flat style, a big red circle on the left, night background"]
    with pytest.raises(ValueError, match="style must be None, 'auto' or one of .* got 'cubist'"):
        captioning.BundledCaptioner(FakeOracle(), style="cubist")
    red.save(tmp_path / "0.png")
    caption_folder(tmp_path, plain, trigger="sks")
    assert (tmp_path / "0.txt").read_text() == "sks, a big red circle on the left, night background\n"


@pytest.fixture(scope="module")
def bundled() -> Captioner:
    pytest.importorskip("engine.miniworld.oracle")
    if not ORACLE_WEIGHTS.is_file():
        pytest.skip(f"no bundled oracle weights at {ORACLE_WEIGHTS} yet")
    return load_captioner("bundled")


def _attribute_accuracy(truths: list[str], predictions: list[str]) -> float:
    from engine.miniworld.oracle import attribute_match
    from engine.miniworld.world import parse_caption

    pairs = zip(truths, predictions, strict=True)
    return float(np.mean([attribute_match(parse_caption(t), parse_caption(p)) for t, p in pairs]))


def test_bundled_captioner_reads_rendered_scenes(bundled: Captioner) -> None:
    from engine.miniworld import world

    scenes = world.sample_scenes(seed=1234, n=48)
    styles = [world.BASE_STYLES[i % len(world.BASE_STYLES)] for i in range(len(scenes))]
    predictions = bundled.caption([world.render(s, st) for s, st in zip(scenes, styles, strict=True)])
    assert _attribute_accuracy([s.caption() for s in scenes], predictions) >= 0.95


def test_bundled_captioner_reproduces_the_bundled_datasets(bundled: Captioner, tmp_path: Path) -> None:
    import shutil

    from engine.images import is_image_path

    datasets = sorted(p for p in (ROOT / "assets" / "datasets").glob("*") if p.is_dir())
    if not datasets:
        pytest.skip("no bundled datasets in assets/datasets yet")
    for folder in datasets:
        images = [p for p in sorted(folder.iterdir()) if is_image_path(p) and p.with_suffix(".txt").is_file()]
        assert images, f"{folder.name} has no captioned images"
        truths = [p.with_suffix(".txt").read_text().strip() for p in images]
        trigger = truths[0].split(",")[0]  # 'zkw style' or 'sks': the dataset's trigger comes first
        assert all(truth.startswith(trigger + ", ") for truth in truths)
        work = tmp_path / folder.name
        work.mkdir()
        for image in images:  # a caption-free copy, captioned the way a user would
            shutil.copy(image, work / image.name)
        start = time.perf_counter()
        report = caption_folder(work, bundled, trigger=trigger)
        seconds = time.perf_counter() - start
        assert sorted(report.written) == [p.name for p in images] and not report.skipped
        predictions = [(work / p.name).with_suffix(".txt").read_text().strip() for p in images]
        accuracy = _attribute_accuracy(truths, predictions)
        exact = float(np.mean([t == p for t, p in zip(truths, predictions, strict=True)]))
        print(f"{folder.name}: {len(images)} images in {seconds:.2f} s, attribute accuracy {accuracy:.3f}, "
              f"exact captions {exact:.2f}")
        assert accuracy >= 0.95, (folder.name, accuracy, list(zip(truths, predictions, strict=True)))
