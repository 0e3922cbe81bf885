"""Compile every Triton kernel of engine/adapters/triton_ops.py for a GPU architecture, on any machine (no GPU
needed: Triton's wheel carries ptxas). Reports registers, spills and shared memory per kernel and exits 1 if one
fails to compile. A check to run after changing a kernel where no GPU is at hand; Triton's CPU
interpreter (TRITON_INTERPRET=1, the tests) checks what they compute, this checks that the GPU can build them.

python bench/compile_kernels.py --arch 90 [--out bench/results/kernels_sm90.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.adapters import triton_ops as T  # noqa: E402

STRIDES = ("sqb", "sqh", "sqn", "skb", "skh", "skt")
QK = [f"q{i}" for i in range(16)] + [f"k{i}" for i in range(16)]


def cases() -> list[tuple[str, object, dict, dict, int, dict]]:
    """(label, kernel, argument types, constexprs, warps, integer argument values) as the wrappers launch them at
    SD/SDXL sizes. Triton specialises an integer argument divisible by 16 (alignment facts for its loads): the
    values given here decide that as a launch would; integers without a value are taken as not divisible."""
    out = []
    for block in (1024, 4096):  # SDXL rows are 1024 and 4096 image positions long
        warps = T._block(block)[1]
        out.append((f"row_entropy_fwd N={block}", T._row_entropy_fwd,
                    {"z_ptr": "*bf16", "h_ptr": "*fp32", "lse_ptr": "*fp32", "n_cols": "i32", "scale": "fp32"},
                    {"BLOCK": block}, warps, {"n_cols": block}))
        out.append((f"row_entropy_bwd N={block}", T._row_entropy_bwd,
                    {"z_ptr": "*bf16", "lse_ptr": "*fp32", "h_ptr": "*fp32", "w_ptr": "*fp32", "n_cols": "i32",
                     "rows_per_w": "i32", "scale": "fp32"}, {"BLOCK": block}, warps,
                    {"n_cols": block, "rows_per_w": 20 * 77}))
    for d_ty in ("*i64", "*fp32"):  # D as host-path ints, or as LoRA2Set's batched plan (exact small floats)
        out.append((f"resize_slots D {d_ty[1:]}", T._resize_slots,
                    {"old_ptr": d_ty, "new_ptr": d_ty, "std_ptr": "*fp32", "seed_ptr": "*i64", "a_tab": "*i64",
                     "b_tab": "*i64", "sh_tab": "*i64", "sh_like": "*bf16", "am_tab": "*i64", "bm_tab": "*i64",
                     "n_layers": "i32", "n_am": "i32", "n_bm": "i32", "R": "i32", "K": "i32", "D": "i32"},
                    {"BLOCK_K": 1024, "BLOCK_D": 1024}, 4, {"R": 128, "K": 640, "D": 640}))
    for axis in (0, 1):
        out.append((f"adamw_slots axis={axis}", T._adamw_slots,
                    {**{n: "*i64" for n in ("p_tab", "g_tab", "m_tab", "v_tab", "step_tab", "mask_tab")},
                     "lr_ptr": "*fp32", "gs_ptr": "*fp32",
                     **{n: "fp32" for n in ("beta1", "beta2", "log_beta1", "log_beta2", "eps", "wd")},
                     "R": "i32", "Q": "i32", "numel": "i32"},
                    {"SLOT_AXIS": axis, "HAS_GS": True, "R_BLOCK": 128, "BLOCK": 1024}, 4,
                    {"R": 128, "Q": 640, "numel": 128 * 640}))
    for d, r, out_ty in ((640, 128, "*bf16"), (5120, 32, "*bf16"), (1280, 24, "*fp32")):  # LoRA² r64, r16, fp16
        blocks, meta = T._fold_meta(torch.Size((d, r)))
        warps = meta.pop("num_warps")
        out.append((f"fold_fwd D={d} R={r} {out_ty[1:]}", T._fold_fwd,
                    {"up_ptr": "*fp32", "up_tab": "*i64", "vec_ptr": "*fp32", "out_ptr": out_ty, "scale": "fp32",
                     "D": "i32", "R": "i32"}, {**meta, "LOW": out_ty != "*fp32"}, warps, {"D": d, "R": r}))
        for into, accum in ((True, True), (True, False), (False, True)):
            out.append((f"fold_bwd D={d} R={r} into={into}" + ", add" * (into and accum), T._fold_bwd,
                        {"g_ptr": out_ty, "up_ptr": "*fp32", "up_tab": "*i64", "vec_ptr": "*fp32", "gup_tab": "*i64",
                         "gup_ptr": "*fp32", "part_ptr": "*fp32", "scale": "fp32", "D": "i32", "R": "i32"},
                        {**meta, "UP": True, "INTO": into, "ACCUM": accum, "VEC": True}, warps, {"D": d, "R": r}))
    for label, b, heads, n, hd, width in (("SDXL 64x64", 1, 10, 4096, 64, 640 + 32),
                                           ("SDXL 32x32", 1, 20, 1024, 64, 1280 + 128),
                                           ("SD1.5 64x64", 4, 8, 4096, 40, 320 + 32),
                                           ("SD1.5 32x32", 4, 8, 1024, 80, 640 + 32),
                                           ("hd 128", 1, 4, 1024, 128, 512 + 8),
                                           ("odd strides", 1, 2, 1000, 64, 129)):  # VEC 1: 2-byte loads
        # q and k as a stacked projection (width = d + R') leaves them; 77 text tokens
        q, k = (torch.empty(b, s, width, dtype=torch.bfloat16)[..., :heads * hd].unflatten(-1, (heads, hd))
                .transpose(1, 2) for s in (n, 77))
        split, span, strides, meta = T._entropy_plan([q], [k])
        warps = meta.pop("num_warps")
        ints = dict(zip(("heads", "N", "T", "span") + STRIDES, (heads, n, 77, span) + strides, strict=True))
        for final in (True, False):
            out.append((f"attn_entropy_fwd {label} final={final}", T._attn_entropy_fwd,
                        {**{n: "*bf16" for n in QK}, "out0": "*fp32", "out1": "*fp32", "out2": "*fp32",
                         **{n: "i32" for n in ints}, "scale": "fp32"}, {**meta, "FINAL": final}, warps, ints))
        out.append((f"attn_entropy_bwd {label}", T._attn_entropy_bwd,
                    {**{n: "*bf16" for n in QK}, "lse_ptr": "*fp32", "h_ptr": "*fp32", "w_ptr": "*fp32",
                     "dq_ptr": "*bf16", "dk_ptr": "*fp32", **{n: "i32" for n in ints}, "scale": "fp32"}, meta, warps,
                    ints))
    return out


def compile_one(fn, types: dict, constexprs: dict, warps: int, arch: int, ints: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    # pointers are 16-byte aligned (fresh allocations, views at aligned offsets), integers as their values say
    aligned = [n for n in names if signature[n].startswith("*") or (n in ints and ints[n] % 16 == 0)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps})
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        run = subprocess.run([os.fspath(ptxas), "-v", f"--gpu-name={gpu}", os.fspath(ptx), "-o",
                              os.fspath(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    log = run.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    ptx_text = kernel.asm["ptx"]
    wide = len(re.findall(r"ld\.global[^ ]*\.v[248]\.", ptx_text)) + ptx_text.count("cp.async.cg")
    return {"ok": run.returncode == 0 and "cubin" in kernel.asm, "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spills.group(1)) if spills else None, "shared_bytes": kernel.metadata.shared,
            "wide_loads": wide, "scalar_b16_loads": len(re.findall(r"ld\.global[^ ]*\.b16 ", ptx_text)),
            "warps": warps, "notes": [ln.strip() for ln in log.splitlines() if "Performance" in ln]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 (A100), 89 (L4), 90 (H100)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if T.triton is None:
        print("Triton is not installed (the CPU build of torch has none): pip install triton", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 makes the kernels interpreted functions: unset it to compile them", file=sys.stderr)
        return 2
    rows, bad, spilled = [], 0, 0
    for label, fn, types, constexprs, warps, ints in cases():
        try:
            row = compile_one(fn, types, constexprs, warps, args.arch, ints)
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            row = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        row["kernel"] = label
        rows.append(row)
        bad += not row["ok"]
        spilled += bool(row.get("spill_bytes"))
        if row["ok"]:
            text = (f"regs {row['registers']:>3}  spills {row['spill_bytes']:>3} B  shared "
                    f"{row['shared_bytes']:>6} B  warps {warps}  16-byte loads {row['wide_loads']:>3}"
                    f"  2-byte loads {row['scalar_b16_loads']:>3}")
        else:
            text = row.get("error", "failed")
        notes = "; ".join(n.replace("ptxas info    : ", "")[:90] for n in row.get("notes", []))
        print(f"{label:42s} {text}" + (f"  ({notes})" if notes else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"arch": args.arch, "kernels": rows}, indent=1))
        tmp.replace(args.out)
    print(f"{len(rows) - bad}/{len(rows)} compiled for sm_{args.arch}; {spilled} of them spill registers "
          "(slower, not wrong)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
