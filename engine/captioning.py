"""Image captioners (bundled mini-world reader, BLIP, BLIP-2, Florence-2, chat VLMs), folder captioning and a CLI."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.captions import add_trigger, normalize_caption, save_caption, sidecar_path
from engine.images import DEFAULT_MAX_SIDE, ImageRejected, load_image, scan_folder, to_rgb

Progress = Callable[[int, int], None]
BUNDLED = "bundled"
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
DEFAULT_VLM_PROMPT = (
    "Write one caption for this image as a training caption for a text-to-image model: "
    "the main subject, its colours, the setting and the art style, in one sentence."
)
# Per-backend defaults; a known model id may override them below.
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {
    BUNDLED: {"batch_size": 64},
    "blip": {"batch_size": 8, "max_new_tokens": 40, "num_beams": 3, "prompt": None},
    "blip2": {"batch_size": 4, "max_new_tokens": 40, "num_beams": 3, "prompt": None},
    "florence2": {"batch_size": 8, "max_new_tokens": 128, "num_beams": 3, "prompt": "<DETAILED_CAPTION>"},
    "vlm": {"batch_size": 4, "max_new_tokens": 96, "num_beams": 1, "prompt": DEFAULT_VLM_PROMPT},
}
# Hub ids offered in the UI: (backend, overrides of the backend defaults). "bundled" first: it works offline.
KNOWN_CAPTIONERS: dict[str, tuple[str, dict[str, Any]]] = {
    BUNDLED: (BUNDLED, {}),
    "florence-community/Florence-2-base": ("florence2", {}),
    "florence-community/Florence-2-large": ("florence2", {"batch_size": 4}),
    "Salesforce/blip-image-captioning-base": ("blip", {}),
    "Salesforce/blip-image-captioning-large": ("blip", {}),
    "Salesforce/blip2-opt-2.7b": ("blip2", {}),
    "HuggingFaceTB/SmolVLM-256M-Instruct": ("vlm", {"batch_size": 8}),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("vlm", {"batch_size": 2}),
}
CAPTIONER_CHOICES: list[str] = list(KNOWN_CAPTIONERS)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CaptionerUnavailableError(RuntimeError):
    """A captioner model that cannot be loaded (offline and not cached, unknown id, or broken files)."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to caption on: the given one, else CUDA, else Apple MPS, else CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from error


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weight dtype: as given, else bf16 (fp16 without bf16 support) on CUDA, fp16 on MPS, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Captioner:
    """Turns images into captions in batches; subclasses implement `_caption_batch`."""

    name = "captioner"

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = _positive_int("batch_size", batch_size)

    def caption(self, images: Sequence[Image.Image], progress: Progress | None = None) -> list[str]:
        """One caption per image, in order; `progress(done, total)` is called after every batch."""
        images = list(images)
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{index}] must be a PIL.Image.Image, got {type(image).__name__}")
        captions: list[str] = []
        if progress is not None:
            progress(0, len(images))
        for start in range(0, len(images), self.batch_size):
            batch = [to_rgb(image) for image in images[start : start + self.batch_size]]
            texts = self._caption_batch(batch)
            if len(texts) != len(batch):
                raise RuntimeError(f"{self.name} returned {len(texts)} captions for {len(batch)} images")
            captions.extend(" ".join(text.split()) for text in texts)
            if progress is not None:
                progress(len(captions), len(images))
        return captions

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, batch_size={self.batch_size})"


class BundledCaptioner(Captioner):
    """Reads mini-world scenes with the bundled oracle and writes captions in the world's grammar (offline, exact).

    `style`: None leaves the style out of the caption (the adapter learns it from the pixels), "auto" writes
    the style the oracle reads ("flat style, ..."), a style name writes that style for every image.
    """

    name = BUNDLED

    def __init__(self, oracle: Any = None, *, style: str | None = None, batch_size: int = 64) -> None:
        super().__init__(batch_size)
        from engine.miniworld import world

        if style is not None and style != "auto" and style not in world.STYLES:
            raise ValueError(f"style must be None, 'auto' or one of {world.STYLES}, got {style!r}")
        if oracle is None:
            try:
                from engine.miniworld.oracle import Oracle

                oracle = Oracle.load()
            except (ImportError, OSError) as error:
                raise CaptionerUnavailableError(
                    f"the bundled captioner needs the mini-world oracle, which could not be loaded ({error}); "
                    "write captions by hand (a .txt file next to each image) or pick a hub captioner"
                ) from error
        self.oracle = oracle
        self.style = style

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        if self.style == "auto":
            return [reading.scene.caption(style=reading.style) for reading in self.oracle.readings(images)]
        return [scene.caption(style=self.style) for scene in self.oracle.read(images)]


class TransformersCaptioner(Captioner):
    """Shared device, dtype and generation handling for the transformers backends."""

    backend = ""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 40,
        num_beams: int = 3,
        prompt: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.num_beams = _positive_int("num_beams", num_beams)
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string or None, got {prompt!r}")
        self.prompt = prompt
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.name = name or getattr(model.config, "_name_or_path", "") or self.backend

    @torch.inference_mode()
    def _generate(self, inputs: Any) -> torch.Tensor:
        batch = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            batch[key] = value
        return self.model.generate(
            **batch, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
        )

    def _decode(self, output: torch.Tensor, input_ids: torch.Tensor | None = None) -> list[str]:
        """Decode generated ids, dropping the echoed prompt of decoder-only language models."""
        if input_ids is not None:
            length = input_ids.shape[1]
            if output.shape[1] >= length and torch.equal(output[:, :length].cpu(), input_ids.cpu()):
                output = output[:, length:]
        return [text.strip() for text in self.processor.batch_decode(output, skip_special_tokens=True)]


class BlipCaptioner(TransformersCaptioner):
    """BLIP (`BlipForConditionalGeneration`); `prompt` is an optional caption prefix, kept in the caption."""

    backend = "blip"

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        text = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=images, return_tensors="pt", **text)
        return self._decode(self._generate(inputs))


class Blip2Captioner(TransformersCaptioner):
    """BLIP-2 (`Blip2ForConditionalGeneration`); `prompt` (e.g. 'Question: ... Answer:') is not echoed."""

    backend = "blip2"

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, text=[self.prompt or ""] * len(images), padding=True,
                                return_tensors="pt")
        return self._decode(self._generate(inputs), inputs["input_ids"])


class Florence2Captioner(TransformersCaptioner):
    """Florence-2 (`Florence2ForConditionalGeneration`); `prompt` is the task token, one of FLORENCE_TASKS."""

    backend = "florence2"

    def __init__(self, model: Any, processor: Any, **options: Any) -> None:
        options.setdefault("prompt", BACKEND_DEFAULTS["florence2"]["prompt"])
        if options["prompt"] not in FLORENCE_TASKS:
            raise ValueError(f"Florence-2 prompt must be one of {FLORENCE_TASKS}, got {options['prompt']!r}")
        super().__init__(model, processor, **options)

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(text=[self.prompt] * len(images), images=images, return_tensors="pt")
        return self._decode(self._generate(inputs))


class VLMCaptioner(TransformersCaptioner):
    """Any `AutoModelForImageTextToText` chat model (SmolVLM, Qwen-VL, LLaVA, ...) asked `prompt` about each image."""

    backend = "vlm"

    def __init__(self, model: Any, processor: Any, **options: Any) -> None:
        options.setdefault("prompt", DEFAULT_VLM_PROMPT)
        if not options["prompt"] or not str(options["prompt"]).strip():
            raise ValueError(f"a VLM captioner needs a non-empty instruction prompt, got {options['prompt']!r}")
        super().__init__(model, processor, **options)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # batched generation of decoder-only models continues from the right

    def prompt_text(self) -> str:
        """The full model input text: the processor's chat template when it has one, else image token + prompt."""
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": self.prompt}]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"{getattr(self.processor, 'image_token', '<image>')}{self.prompt}"

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        text = self.prompt_text()
        inputs = self.processor(text=[text] * len(images), images=[[image] for image in images], padding=True,
                                return_tensors="pt")
        return self._decode(self._generate(inputs), inputs["input_ids"])


BACKENDS: dict[str, type[TransformersCaptioner]] = {
    "blip": BlipCaptioner, "blip2": Blip2Captioner, "florence2": Florence2Captioner, "vlm": VLMCaptioner,
}


def backend_for_model_type(model_type: str) -> str:
    """The backend for a transformers `config.model_type`; raises ValueError for models that cannot caption."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    special = {"blip": "blip", "blip-2": "blip2", "florence2": "florence2"}
    if model_type in special:
        return special[model_type]
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "vlm"
    raise ValueError(f"model type {model_type!r} is not an image-to-text model this studio can caption with")


def captioner_defaults(model_id: str) -> dict[str, Any]:
    """Default options (batch_size, max_new_tokens, num_beams, prompt) of a known model id, for the UI's form."""
    backend, overrides = KNOWN_CAPTIONERS.get(model_id, ("vlm", {}))
    return {**BACKEND_DEFAULTS[backend], **overrides, "backend": backend}


def captioner_from_model(model: Any, processor: Any, **options: Any) -> TransformersCaptioner:
    """Wrap an already loaded transformers model and processor in the backend its config asks for."""
    backend = backend_for_model_type(model.config.model_type)
    return BACKENDS[backend](model, processor, **{**BACKEND_DEFAULTS[backend], **options})


def load_captioner(model_id_or_path: str, device: str | torch.device | None = None, **options: Any) -> Captioner:
    """Load a captioner: "bundled", a hub id (from the local cache when offline) or a local model folder.

    Options: batch_size, max_new_tokens, num_beams, prompt (caption prefix for BLIP, instruction for BLIP-2
    and VLMs, task token for Florence-2), dtype, trust_remote_code; for "bundled": batch_size, style.
    """
    if not isinstance(model_id_or_path, str) or not model_id_or_path.strip():
        raise ValueError(f"model must be 'bundled', a hub id or a local folder, got {model_id_or_path!r}")
    model_id = model_id_or_path.strip()
    if model_id == BUNDLED:
        unknown = set(options) - {"batch_size", "style", "oracle"}
        if unknown:
            raise ValueError(f"unknown option(s) for the bundled captioner: {sorted(unknown)}")
        return BundledCaptioner(**options)
    allowed = {"batch_size", "max_new_tokens", "num_beams", "prompt", "dtype", "trust_remote_code"}
    if unknown := set(options) - allowed:
        raise ValueError(f"unknown captioner option(s) {sorted(unknown)}; expected some of {sorted(allowed)}")
    looks_local = model_id.startswith((".", "/", "~")) or os.sep in model_id.rstrip(os.sep).replace("/", "", 1)
    if looks_local and not Path(model_id).expanduser().is_dir():
        raise ValueError(f"model folder not found: {model_id!r}")
    trust = bool(options.pop("trust_remote_code", False))
    dev = resolve_device(device)
    dtype = resolve_dtype(options.pop("dtype", None), dev)
    from transformers import AutoConfig, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust)
        backend = backend_for_model_type(config.model_type)
        cls = _model_class(backend)
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust)
        model = cls.from_pretrained(model_id, dtype=dtype, trust_remote_code=trust)
    except (OSError, ImportError) as error:
        raise CaptionerUnavailableError(_unavailable_message(model_id, error)) from error
    known_backend, overrides = KNOWN_CAPTIONERS.get(model_id, (backend, {}))
    settings = {**BACKEND_DEFAULTS[backend], **(overrides if known_backend == backend else {}), **options}
    return BACKENDS[backend](model, processor, device=dev, dtype=dtype, name=model_id, **settings)


def _model_class(backend: str) -> Any:
    import transformers

    names = {"blip": "BlipForConditionalGeneration", "blip2": "Blip2ForConditionalGeneration",
             "florence2": "Florence2ForConditionalGeneration", "vlm": "AutoModelForImageTextToText"}
    return getattr(transformers, names[backend])


def _unavailable_message(model_id: str, error: BaseException) -> str:
    from huggingface_hub import constants

    detail = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    if isinstance(error, ImportError):
        where = f"needs a Python package that is not installed ({detail}); install it"
    elif constants.is_offline_mode():
        where = f"is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE) ({detail})"
    else:
        where = f"could not be loaded from the hub or the local cache ({detail})"
    return (f"captioner model {model_id!r} {where}. Use the bundled captioner (--model bundled), download the "
            "model while online, or write captions by hand (a .txt file next to each image).")


@dataclass
class CaptionReport:
    """What `caption_folder` did, file names relative to the folder."""

    folder: Path
    written: list[str] = field(default_factory=list)  # new sidecars
    kept: list[str] = field(default_factory=list)  # images whose existing caption was left alone
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason
    duplicates: dict[str, str] = field(default_factory=dict)  # duplicate -> first file with the same bytes
    seconds: float = 0.0

    def summary(self) -> str:
        head = (f"{len(self.written)} captioned, {len(self.kept)} kept, {len(self.skipped)} skipped, "
                f"{len(self.duplicates)} duplicates in {self.seconds:.1f} s ({self.folder})")
        lines = [head]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        lines += [f"  duplicate {name} = {original}" for name, original in self.duplicates.items()]
        return "\n".join(lines)


def caption_folder(
    folder: str | os.PathLike,
    captioner: Captioner,
    trigger: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    *,
    recursive: bool = False,
    max_side: int = DEFAULT_MAX_SIDE,
) -> CaptionReport:
    """Caption every usable image of a folder into `.txt` sidecars, never touching existing ones unless `overwrite`.

    Unusable files are skipped with a reason; exact duplicates are captioned once and every copy without a
    caption gets that caption. Images over the pixel limit are skipped; large ones are downscaled in memory.
    """
    start = time.perf_counter()
    scan = scan_folder(folder, recursive=recursive)
    root = scan.folder

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    report = CaptionReport(folder=root, skipped={rel(p): why for p, why in scan.skipped.items()},
                           duplicates={rel(d): rel(o) for d, o in scan.duplicates.items()})
    groups: dict[Path, list[Path]] = {path: [path] for path in scan.images}
    for duplicate, original in scan.duplicates.items():
        groups[original].append(duplicate)
    todo: list[list[Path]] = []
    for members in groups.values():
        need = [path for path in members if overwrite or not sidecar_path(path).exists()]
        report.kept += [rel(path) for path in members if path not in need]
        if need:
            todo.append(need)
    total, done = len(todo), 0
    if progress is not None:
        progress(0, total)
    chunk = max(captioner.batch_size, 1)
    for offset in range(0, total, chunk):
        loaded: list[tuple[list[Path], Image.Image]] = []
        for need in todo[offset : offset + chunk]:
            try:
                loaded.append((need, load_image(need[0], max_side=max_side)))
            except ImageRejected as rejected:
                report.skipped.update({rel(path): rejected.reason for path in need})
        captions = captioner.caption([image for _, image in loaded]) if loaded else []
        for (need, _), text in zip(loaded, captions, strict=True):
            text = normalize_caption(text)
            if not text:
                report.skipped.update({rel(path): "the captioner returned an empty caption" for path in need})
                continue
            text = add_trigger(text, trigger) if trigger else text
            for path in need:
                (report.written if save_caption(path, text, overwrite=overwrite) else report.kept).append(rel(path))
        done += len(todo[offset : offset + chunk])
        if progress is not None:
            progress(done, total)
    report.seconds = time.perf_counter() - start
    return report


def add_caption_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `caption DIR --model ... --trigger ... [--overwrite] [--batch-size N]` on an argparse subparsers."""
    parser = subparsers.add_parser("caption", help="write .txt captions for the images of a folder",
                                   description="Caption every image of DIR into .txt sidecars (existing kept).")
    parser.add_argument("folder", metavar="DIR", help="folder of images")
    parser.add_argument("--model", default=BUNDLED,
                        help=f"'bundled', a local model folder or a hub id, e.g. {', '.join(CAPTIONER_CHOICES[1:4])}")
    parser.add_argument("--trigger", default=None, help="token every caption starts with (e.g. the class token)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing .txt captions")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    parser.add_argument("--prompt", default=None,
                        help="VLM instruction, BLIP caption prefix, BLIP-2 question, or Florence-2 task token")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="caption length limit in tokens")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: by device)")
    parser.add_argument("--style", default=None, help="bundled only: 'auto' writes the style the oracle reads")
    parser.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    parser.set_defaults(func=run_caption_cli)
    return parser


def run_caption_cli(args: argparse.Namespace) -> int:
    """Run the `caption` command with a tqdm progress bar; returns the process exit code (2 on bad input)."""
    from tqdm.auto import tqdm

    names = ("batch_size", "prompt", "max_new_tokens", "dtype") if args.model != BUNDLED else ("batch_size", "style")
    options = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    try:
        if not Path(args.folder).is_dir():
            raise ValueError(f"not a folder: {args.folder!r}")
        captioner = load_captioner(args.model, device=getattr(args, "device", None), **options)
        bars: list[Any] = []

        def progress(done: int, total: int) -> None:
            if not bars:
                bars.append(tqdm(total=total, unit="img", desc="captioning", file=sys.stderr))
            bars[0].update(done - bars[0].n)

        try:
            report = caption_folder(args.folder, captioner, trigger=args.trigger, overwrite=args.overwrite,
                                    progress=progress, recursive=getattr(args, "recursive", False))
        finally:
            for bar in bars:
                bar.close()
    except (ValueError, CaptionerUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
