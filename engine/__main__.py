"""Command line: python -m engine train|generate|prune|export|compare|caption (options built from the configs)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from engine import events as ev

EPILOG = "Run folders hold config.json, metrics.jsonl, ranks.jsonl, samples/, checkpoints/ and the final LoRA files."


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like {{\"key\": 1}}, got {text!r}")
    return value


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("", "none") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One --option per dataclass field, typed from the annotation, with the field's help, choices and default."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = dict(f.metadata)
        group_name = meta.get("group", "options")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = str(f.type).split("|")[0].strip()
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": meta.get("help", "")}
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind == "list":
            item = meta.get("item", str)
            kw.update(nargs="*", type=item, metavar=item.__name__.upper())
        elif kind == "dict":
            kw.update(type=_json_dict, metavar="JSON")
        else:
            base = {"int": int, "float": float, "str": str}[kind]
            kw["type"] = _optional(base) if "None" in str(f.type) else base
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            else:
                kw["metavar"] = kind.upper()
        if kind != "bool" and default not in (None, "", [], {}):
            kw["help"] += f" (default: {default})"
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def dataclass_from_args(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = ()):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip})


# --- progress -----------------------------------------------------------------------------------------------
class Progress:
    """tqdm bar over training steps; restarts, rank changes, samples and checkpoints printed above it."""

    def __init__(self, prefix: str = ""):
        self.bar, self.prefix = None, prefix

    def __call__(self, event: ev.Event) -> None:
        from tqdm import tqdm

        if isinstance(event, ev.Started):
            self.bar = tqdm(total=event.total_steps, initial=event.step, desc=f"{self.prefix}{event.method}",
                            unit="step", dynamic_ncols=True)
            tqdm.write(f"run folder: {event.run_dir}" + (" (resumed)" if event.resumed else "")
                       + f"; steps run {event.step_mode.replace('_', ' ')}")
        elif isinstance(event, ev.Notice):
            tqdm.write(f"step {event.step}: {event.message}")
        elif isinstance(event, ev.Step) and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(loss=f"{event.loss:.4f}", epoch=event.epoch)
        elif isinstance(event, ev.Restart):
            ks = sorted(event.ranks.values())
            tqdm.write(f"step {event.step}: AC-LoRA restart after epoch {event.epoch}, p={event.p:.3f}, "
                       f"kept ranks {ks[0]}..{ks[-1]} (median {ks[len(ks) // 2]})")
        elif isinstance(event, ev.RankChange):
            tqdm.write(f"step {event.step}: LoRA² changed the rank of {len(event.ranks)} layer(s)")
        elif isinstance(event, (ev.Sample, ev.Checkpoint, ev.Stopped)):
            tqdm.write(f"step {event.step}: {type(event).__name__.lower()} "
                       f"{getattr(event, 'path', '') or getattr(event, 'checkpoint', '') or ' '.join(event.paths)}")
        elif isinstance(event, (ev.Finished, ev.Failed)) and self.bar is not None:
            self.bar.close()


def _stop_on_sigint() -> threading.Event:
    """First Ctrl-C: stop after the current step and write a checkpoint; second: abort."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nstopping after this step (Ctrl-C again to abort)...", file=sys.stderr)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
    return stop


# --- commands -----------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from engine.train import TrainConfig, resume_run, train

    stop = _stop_on_sigint()
    if args.resume:
        result = resume_run(args.resume, Progress(), stop)
    else:
        result = train(dataclass_from_args(TrainConfig, args), Progress(), stop)
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.generate import generate_grid
    from engine.models import load_pipeline

    pipe = load_pipeline(args.base_model, args.device)
    adapters = {Path(a).stem if Path(a).is_file() else Path(a).name: a for a in args.adapter}
    result = generate_grid(pipe, adapters, args.prompt, args.seed, strength=args.strength, steps=args.steps,
                           guidance=args.guidance, size=args.size, out=args.out)
    print(json.dumps({"grid": result.path, "seconds": result.seconds}, indent=2))
    return 0


def _run_adapters(run_dir: str, device: str):
    from engine.models import load_pipeline
    from engine.runs import RunFolder
    from engine.train import load_run_adapters

    pipe = load_pipeline(RunFolder(run_dir).config()["base_model"], device)
    return load_run_adapters(run_dir, pipe.unet), pipe


def cmd_export(args: argparse.Namespace) -> int:
    """Export (and with --tau/--rank/--cap prune) a run folder's adapter, or prune a LoRA file."""
    from engine import export

    source = Path(args.source)
    if source.is_dir():
        adapters, pipe = _run_adapters(str(source), args.device)
        res = export.export_lora(adapters, args.out, args.format, unet_config=pipe.unet.config, tau=args.tau,
                                 rank=args.rank, cap=args.cap, criterion=args.criterion, value=args.value)
    else:
        lora = export.load_lora_file(source)
        if args.tau is None and args.rank is None and args.value is None and args.cap is None:
            raise ValueError("exporting a LoRA file needs --tau, --rank, --value or --cap (it is already a LoRA file)")
        res = export.prune_file(lora, args.out, args.format, tau=args.tau, rank=args.rank, cap=args.cap,
                                criterion=args.criterion, value=args.value)
    print(json.dumps({"path": res.path, "format": res.fmt, "kept_energy": res.kept_energy, "params": res.n_params,
                      "megabytes": round(res.bytes / 2**20, 3), "ranks": sorted(set(res.ranks.values()))}, indent=2))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    if args.tau is None and args.rank is None and args.value is None and args.cap is None:
        raise ValueError("prune needs --tau (energy kept), --rank, --value or --cap")
    return cmd_export(args)


def cmd_compare(args: argparse.Namespace) -> int:
    from engine.compare import CompareConfig, compare

    cfg = dataclass_from_args(CompareConfig, args)
    report = compare(cfg, emit=Progress(), stop=_stop_on_sigint())
    print(json.dumps({"report": report.folder, "rows": report.rows}, indent=2, default=str))
    return 0


def _method_help() -> str:
    """The --method-settings keys of every method, from the adapter config dataclasses."""
    from engine.adapters import get_method, method_names

    lines = ["method settings (JSON keys of --method-settings):"]
    for name in method_names():
        m = get_method(name)
        lines.append(f"  {name} ({m.display}):")
        for key, info in m.config_cls.field_help().items():
            if key not in ("rank", "seed"):
                lines.append(f"    {key} = {info['default']!r}: {info.get('help', '')}")
    return "\n".join(lines) + "\n\n" + EPILOG


# --- parser -------------------------------------------------------------------------------------------------
def _prune_options(p: argparse.ArgumentParser, need_out: bool = True) -> None:
    p.add_argument("source", help="a run folder, or a LoRA .safetensors file (kohya or diffusers)")
    p.add_argument("--out", required=need_out, help="file to write (.safetensors)")
    p.add_argument("--format", choices=("kohya", "diffusers"), default="kohya",
                   help="kohya = A1111/ComfyUI/kohya keys; diffusers = pipe.load_lora_weights/PEFT keys "
                        "(default: kohya)")
    p.add_argument("--tau", type=float, help="fraction of each layer's energy to keep (e.g. 0.9)")
    p.add_argument("--rank", type=int, help="one fixed rank for every layer")
    p.add_argument("--cap", type=int, help="upper bound on every layer's rank")
    p.add_argument("--criterion", default="energy", choices=("energy", "sv_ratio", "sv_cumulative", "sv_fro"),
                   help="pruning rule; the sv_* rules follow kohya's resize_lora and use --value (default: energy)")
    p.add_argument("--value", type=float, help="threshold of the sv_* criteria")
    p.add_argument("--device", default="cpu", help="device for loading a run's base model (default: cpu)")


def build_parser(train_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    from engine.compare import CompareConfig
    from engine.train import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m engine", description="Adaptive-rank LoRA studio: train, "
                                     "compare, prune and export LoRA, AC-LoRA, TriLoRA and LoRA² adapters.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    t = sub.add_parser("train", help="train one adapter into a run folder", epilog=_method_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train one adapter. Ctrl-C stops after the current step with a checkpoint; "
                       "--resume RUN_DIR continues it.")
    t.add_argument("--config", metavar="JSON_FILE", help="take defaults from a config.json (options still override)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or killed run (other options ignored)")
    add_dataclass_options(t, TrainConfig)
    if train_defaults:
        t.set_defaults(**train_defaults)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", formatter_class=fmt, help="prompt x seed grid: base model and each adapter",
                       description="Generate the same prompts and seeds with the base model and every adapter "
                       "(merged weights) and write a grid PNG.")
    g.add_argument("--base-model", default="bundled", help="base model (bundled, hub id, folder, .safetensors)")
    g.add_argument("--adapter", action="append", default=[], help="LoRA file or run folder (repeatable)")
    g.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    g.add_argument("--seed", type=int, nargs="+", default=[0], help="seeds")
    g.add_argument("--strength", type=float, default=1.0, help="adapter strength (multiplies the update)")
    g.add_argument("--steps", type=int, default=25, help="denoising steps")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    g.add_argument("--device", default="cpu", help="torch device")
    g.add_argument("--out", default="grid.png", help="grid PNG to write")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("prune", formatter_class=fmt, help="shrink an adapter by energy kept (tau) or rank",
                       description="Per-layer rank pruning of a run's adapter or of any LoRA file.")
    _prune_options(p)
    p.set_defaults(func=cmd_prune)
    e = sub.add_parser("export", formatter_class=fmt, help="write a run's adapter as a kohya or diffusers file",
                       description="Export a run folder's adapter as a standard LoRA file (optionally pruned).")
    _prune_options(e)
    e.set_defaults(func=cmd_export)

    c = sub.add_parser("compare", help="train several methods/ranks on one dataset and write a report",
                       description="Train every method (and a LoRA rank sweep) with one seed and budget, generate "
                       "the same grid for each, score them and write a report folder.", epilog=EPILOG)
    add_dataclass_options(c, CompareConfig)
    c.set_defaults(func=cmd_compare)

    try:
        from engine import captioning
    except ImportError:
        captioning = None
    if captioning is not None and hasattr(captioning, "add_caption_subparser"):
        cap = captioning.add_caption_subparser(sub)
        if cap.get_default("func") is None:
            cap.set_defaults(func=captioning.run_caption_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = None
    if argv[:1] == ["train"]:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        known, _ = pre.parse_known_args(argv[1:])
        if known.config:
            defaults = json.loads(Path(known.config).read_text())
            defaults.pop("output_dir", None)
    args = build_parser(defaults).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
