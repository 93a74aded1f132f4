"""What a lightning kernel costs an sm_90 GPU, found without one: registers, spills, shared memory.

Triton compiles for a target given by name (no device needed) and ships NVIDIA's ``ptxas``, whose ``-v``
report names each kernel's registers per thread and spilled bytes. With those and the shared memory, the
programs one SM can hold follow (65,536 registers and 228 KB per SM on an H100/H200), whether the loads
were software-pipelined (asynchronous or TMA copies in the TTGIR), whether the products run on wgmma and how
their warps are laid out (8 warps along 64 rows hold each product twice: why 8-warp output passes lose).

    python bench/sm90_offline.py                                   # the forward's two passes at bf16, H 32, D 128
    python bench/sm90_offline.py --kernel output --bv 128 --warps 8 --dtype bf16
    python bench/sm90_offline.py --kernel output --maxnreg 168
    python bench/sm90_offline.py --no-tma                          # block-pointer tiles (reverse passes, pre-sm_90)
    python bench/sm90_offline.py --kernel output --dtype fp32 --chunk 64 --bv 32 --stages 1 --weight-k

Launch parameters come from the library (``sala.ops.lightning_triton._common``), with the options given here
applied on top, as the SALA_LIGHTNING_* variables would at run time. Pointer arguments are declared 16-byte
aligned, as Triton specializes them at launch: without that the loads are not pipelined and the counts are
those of a kernel that never runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import env_override  # noqa: E402
from sala.ops import lightning_triton as lt  # noqa: E402
from sala.ops import lightning_triton_kernels as kn  # noqa: E402

REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = {"output": kn._segment_output_kernel, "delta": kn._segment_delta_kernel}
INFLLMV2_KERNELS = ("rest", "forced", "forced_per_block", "union", "dq", "dkdv", "dkdv_dq", "blockkey", "k2lse")
TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FP32_POINTERS = ("g_ptr", "state_ptr", "delta_ptr")
INDEX_POINTERS = ("seg_seq_ptr", "seg_tau0_ptr", "seq_bos_ptr", "seq_len_ptr")


def _lightning_arg_type(dtype: torch.dtype):
    """Triton type of a lightning kernel's runtime argument, by name."""
    def arg_type(name: str) -> str:
        if name in FP32_POINTERS:
            return "*fp32"
        if name in INDEX_POINTERS:
            return "*i64"
        if name.endswith("_ptr"):
            return "*" + TRITON_TYPE[dtype]
        return "fp32"  # scale
    return arg_type


def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from ``ptxas -v`` on sm_90a."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    return int(regs.group(1)), int(spill.group(1)) if spill else 0


def compile_resources(fn, constexprs: dict, options: dict, arg_type, int_args_aligned=()) -> dict:
    """Compile ``fn`` for sm_90 (``arg_type(name)``: the Triton type of each runtime argument; pointers
    16-byte aligned, as at launch; ``int_args_aligned``: integer arguments declared divisible by 16, as the
    launcher specializes strides) and report its resources."""
    sig = {name: "constexpr" if name in constexprs else arg_type(name) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n in int_args_aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    regs, spill = ptxas_report(compiled.asm["ptx"])
    ttgir = compiled.asm["ttgir"]
    shared = compiled.metadata.shared
    threads = 32 * options["num_warps"]
    per_sm = min(REGISTERS_PER_SM // (regs * threads), SHARED_PER_SM // shared if shared else 32)
    layouts = sorted(set(re.findall(r"nvidia_mma<\{versionMajor = (\d+), versionMinor = \d+, warpsPerCTA = "
                                    r"\[(\d+), (\d+)\], instrShape = \[(\d+), (\d+)", ttgir)))
    return {**options, "registers": regs, "spill_bytes": spill, "shared_bytes": shared, "programs_per_sm": per_sm,
            "wgmma": ttgir.count("ttng.warp_group_dot "), "mma_sync": len(re.findall(r"= tt\.dot ", ttgir)),
            "async_copies": ttgir.count("ttg.async_copy_global_to_local"),
            "atomics": len(re.findall(r"\b(?:atom|red)\.global\S*", compiled.asm["ptx"])),
            "tma_copies": ttgir.count("async_tma_copy_global_to_local"),
            # layout conversions (through shared memory, each with barriers) and CTA barriers in the PTX: an
            # epilogue's hidden cost (stage 1's block keys: 4 conversions of [8, 16] tensors per tile)
            "convert_layouts": ttgir.count("ttg.convert_layout"), "barriers": compiled.asm["ptx"].count("bar.sync"),
            # products' layouts: MMA version, warps along M x N, instruction tile (M x N); warps along M beyond
            # what the rows fill (8 on 64 rows) hold the same rows twice
            "mma_layouts": [f"v{v} warps {m}x{n} instr {im}x{i_n}" for v, m, n, im, i_n in layouts]}


def kernel_resources(kernel: str = "output", dtype: str = "bf16", H: int = 32, D: int = 128, seg: int = 8192,
                     precision: str = "tf32", chunk: int | None = None, bv: int | None = None,
                     warps: int | None = None, stages: int | None = None, maxnreg: int | None = None,
                     tma: bool | None = None, weight_k: bool | None = None) -> dict:
    """Compile one lightning kernel for sm_90 with the library's launch parameters (options override them)
    and report its resources and what an SM holds of it. ``tma``: the TMA tiles on / off (None: as the library
    launches the forward on an sm_90 GPU); ``weight_k``: the output pass's state update on decay-weighted k
    (``lightning_triton.weight_k_wanted``; None: as the library launches it)."""
    tdtype = DTYPES[dtype]
    env = {"SALA_LIGHTNING_DELTA_CHUNK" if kernel == "delta" else "SALA_LIGHTNING_CHUNK": chunk,
           "SALA_LIGHTNING_DELTA_STAGES" if kernel == "delta" else "SALA_LIGHTNING_STAGES": stages,
           "SALA_LIGHTNING_MAXNREG": maxnreg,
           "SALA_LIGHTNING_DELTA_BV" if kernel == "delta" else "SALA_LIGHTNING_BV": bv,
           "SALA_LIGHTNING_DELTA_WARPS" if kernel == "delta" else "SALA_LIGHTNING_WARPS": warps}
    interpret, lt._INTERPRET = lt._INTERPRET, False  # the GPU's launch options, whatever this process runs
    try:
        with env_override({k: str(v) for k, v in env.items() if v is not None}):
            common = lt._common(SimpleNamespace(seg=seg), H, D, D, tdtype, precision, False, pass_one=kernel == "delta")
            if tma is None:
                tma = lt.tma_wanted(common, pass_one=kernel == "delta")
    finally:
        lt._INTERPRET = interpret
    options = {k: common.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in common}
    constexprs = dict(common, DYN_LOOP=True, UPCAST=False)  # the GPU's settings, whatever this process runs
    if kernel == "output":
        constexprs["FACTORED_DECAY"] = True
        constexprs["WEIGHT_K"] = lt.weight_k_wanted(tdtype, precision) if weight_k is None else weight_k
    constexprs["USE_TMA"] = tma
    return {"kernel": kernel, "dtype": dtype, "C": common["C"], "BV": common["BV"],
            **compile_resources(KERNELS[kernel], constexprs, options, _lightning_arg_type(tdtype))}


def infllmv2_resources(kernel: str = "rest", G: int = 16, D: int = 128, BS: int = 64, union_lanes: int = 16,
                       warps: int | None = None, stages: int | None = None, dtype: str = "bf16") -> dict:
    """The same for InfLLM-V2's kernels at the launch parameters the library uses (``dtype`` inputs, bf16 by
    default; the release's group of 16 heads, d 128, 64-token blocks by default): stage 2's ``rest`` (one query
    row per program over its selected blocks), ``forced`` (init and local blocks of several rows;
    ``forced_per_block`` with the window block by block, each masked, instead of in unmasked tiles), ``union``
    (the rest pass over neighbouring rows' union), ``dq`` and ``dkdv`` (backward, dq from its own passes;
    ``dkdv_dq`` adding dq's share atomically, the default); stage 1's ``blockkey`` (scores, group sum, pooling)
    and ``k2lse``."""
    from sala.ops import infllmv2_triton_attn as at
    from sala.ops import infllmv2_triton_select as sel

    GP, BD = at._cfg(G, D)
    base = dict(G=G, D=D, BD=BD, BS=BS, PREC="tf32")
    if kernel == "rest":
        fn, ce, opts = at._fwd_kernel, dict(base, GP=GP, SPLIT=False, REST=True, SP2=128), dict(at.PER_ROW_CFG)
    elif kernel in ("forced", "forced_per_block"):  # per block: the window's blocks each masked (FORCED_WIN_BN=0)
        gp, rb = at._multi_row(G, 128)
        win = 0 if kernel == "forced_per_block" else at._forced_win_keys(DTYPES[dtype], BS)
        fn, ce, opts = at._fwd_forced_kernel, dict(base, GP=gp, RB=rb, WIN_BN=win), {"num_warps": 8, "num_stages": 2}
    elif kernel == "union":
        gp, rb = at._multi_row(G, union_lanes)
        fn, ce, opts = at._fwd_union_kernel, dict(base, GP=gp, RB=rb, SP2=128), dict(at.PER_ROW_CFG)
    elif kernel == "dq":
        fn, ce, opts = at._bwd_dq_kernel, dict(base, GP=GP, REST=True, SP2=128), dict(at.PER_ROW_CFG)
    elif kernel in ("dkdv", "dkdv_dq"):  # dkdv_dq: also dq's share of each block, added atomically (the default)
        gp, rb, warps_ = at.dkdv_launch(G, BD)
        fn, ce, opts = at._bwd_dkdv_kernel, dict(base, GP=gp, RB=rb, DQ_ATOMIC=kernel == "dkdv_dq"), \
            {"num_warps": warps_, "num_stages": 2}
    elif kernel in ("blockkey", "k2lse"):  # stage 1 at the tuned 8 query rows per program (128 dot rows)
        rows = 8
        gp = sel.group_pad(G, rows)
        common = dict(G=G, GP=gp, ROWS=rows, D=D, BD=BD, PREC="tf32")
        if kernel == "blockkey":
            fn, ce = sel._block_key_kernel, dict(common, NBT=sel.TILE_BLOCKS, POOL=BS // 16, STRIDE1=16,
                                                 OUT_T=tl.bfloat16, WRITE_SCORES=False, FAST=True, FLOAT_OUT=True)
        else:
            fn, ce = sel._k2_lse_kernel, dict(common, BN=64, STRIDE2=64)
        opts = {"num_warps": sel.stage1_warps(rows, gp), "num_stages": 3}  # the launch leaves Triton's 3 stages
    else:
        raise ValueError(f"unknown InfLLM-V2 kernel {kernel!r}")
    if warps:
        opts["num_warps"] = warps
    if stages:
        opts["num_stages"] = stages
    fp32 = {"LSE", "OP", "LP", "DELTA", "DQP", "DQA", "KEYS", "SCORES"}
    idx = {"IDX", "ROWS", "OFFS", "ORDER"}

    def arg_type(name):
        if name in fp32:
            return "*fp32"
        if name in idx:
            return "*i32"
        if name.isupper():
            return "*" + dtype
        return "fp32" if name in ("qk_scale2", "scale") else "i32"

    lengths = {**at.LENGTH_ARGS, "_block_key_kernel": sel.BLOCK_KEY_LENGTH_ARGS,
               "_k2_lse_kernel": sel.K2_LSE_LENGTH_ARGS}.get(fn.__name__, ())
    specialized = [n for n in fn.arg_names if n.startswith("s_") and n not in lengths]
    return {"kernel": f"infllmv2_{kernel}", "G": G, "D": D, "BS": BS,
            **{k: v for k, v in ce.items() if k in ("GP", "RB")},
            **compile_resources(fn, ce, opts, arg_type, int_args_aligned=specialized)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=[*KERNELS, "both", *(f"infllmv2_{k}" for k in INFLLMV2_KERNELS)],
                    default="both")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunk", type=int)
    ap.add_argument("--bv", type=int)
    ap.add_argument("--warps", type=int)
    ap.add_argument("--stages", type=int)
    ap.add_argument("--maxnreg", type=int)
    ap.add_argument("--tma", action=argparse.BooleanOptionalAction, default=None,
                    help="TMA tiles on / off (default: as the library launches the forward on an sm_90 GPU)")
    ap.add_argument("--weight-k", action=argparse.BooleanOptionalAction, default=None,
                    help="output pass: the state update on decay-weighted k, not v (default: as the library)")
    args = ap.parse_args()
    if args.kernel.startswith("infllmv2_"):
        print(json.dumps(infllmv2_resources(args.kernel.removeprefix("infllmv2_"), warps=args.warps,
                                            stages=args.stages, dtype=args.dtype)))
        return
    for name in (KERNELS if args.kernel == "both" else [args.kernel]):
        print(json.dumps(kernel_resources(name, args.dtype, args.heads, args.dim, chunk=args.chunk, bv=args.bv,
                                          warps=args.warps, stages=args.stages, maxnreg=args.maxnreg,
                                          tma=args.tma, weight_k=args.weight_k)))


if __name__ == "__main__":
    main()
