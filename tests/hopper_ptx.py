"""Compile the decode kernels for sm_90 (Hopper) without a GPU, through Triton's own ptxas, with
and without programmatic dependent launch, and print what the PTX does as one JSON line. Run by
tests/test_linear.py in a fresh process: under TRITON_INTERPRET=1 the kernels would be interpreter
objects, not compilable ones.

    python tests/hopper_ptx.py
"""

import json
import os
import re


def ptx_facts() -> dict:
    """{kernel_pdl=...: facts about its PTX} for the linear kernel and the LASAD step kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lasad_engine.ops import linear as L
    from lasad_engine.ops.lasad import step as S

    def build(fn, sig, cx):
        sig = {**sig, **{k: "constexpr" for k in cx}}
        names = list(sig)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
        k = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4))
        ptx = k.asm["ptx"]
        if fn is L.quant_mm_kernel:
            return {"prmt": ptx.count("prmt.b32"), "cvt_s8": ptx.count("cvt.rn.f32.s8") + ptx.count("cvt.rn.bf16.s8"),
                    "mma": ptx.count("mma.sync") + ptx.count("wgmma"), "wgmma": ptx.count("wgmma.mma_async"),
                    # wgmma with its first operand in registers: `{accumulators}, {a registers}, desc-b`
                    "wgmma_a_regs": len(re.findall(r"wgmma\.mma_async[^;]*\}\s*,\s*\{", ptx))}
        wait, launch = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
        first_load = ptx.find("ld.global")
        return {"wait": wait >= 0, "launch_dependents": launch >= 0,
                "loads_before_wait": 0 <= first_load < wait, "launch_before_wait": 0 <= launch < wait,
                "wide_loads_before_wait": ptx[:max(wait, 0)].count("ld.global.v4"),
                "vector_loads_before_wait": len(re.findall(r"ld\.global(\.\w+)*\.v[24]", ptx[:max(wait, 0)])),
                "barriers": len(re.findall(r"\bbar(rier)?\.sync", ptx)),
                "prmt": ptx.count("prmt.b32"), "cvt_s8": ptx.count(".s8")}

    out = {}
    p = "*bf16"
    for pdl in (True, False):
        t = L.linear_tiles(2, 2304, 768, has_norm=True)
        cx = dict(K=768, SEG=768, NSEG=1, SEG_P=1024, NSEG_P=1, NORM_N=768, SPLIT_K=1, SPLIT_P=1, BR=2,
                  BN=t.block_n, HAS_NORM=True, ROW_STATS=False, SWIGLU=False, NACC=1, HAS_RES=False,
                  MMA=False, DOT_F32=False, USE_PDL=pdl)
        sig = dict(x=p, w=p, ws="*fp32", nw=p, res=p, out=p, part="*fp32", cnt="*i32", R="i32", N_OUT="i32",
                   eps="fp32")
        out[f"linear_pdl={pdl}"] = build(L.fused_linear_kernel, sig, {**cx, "HAS_SCALE": False, "W_ASM": False})
        # int8 weights (lasad_engine/quant.py): the same kernel, the tile streamed as bytes and
        # converted by byte permutes, as the engine runs it on a GPU
        out[f"linear_int8_pdl={pdl}"] = build(L.fused_linear_kernel, {**sig, "w": "*i8"},
                                              {**cx, "HAS_SCALE": True, "W_ASM": True})
        cx = dict(K=64, V=64, BK=64, BV=16, HAS_OVERRIDE=True, FUSED_GATES=True, HAS_LB=True, USE_PDL=pdl,
                  HAS_SLOTS=True)
        sig = dict(q=p, k=p, v=p, g=p, lb="*fp32", s="*fp32", o=p, start="*i1", slots="*i64", start_stride="i32",
                   override="fp32", scale="fp32", H="i32", stride_qk="i32", stride_v="i32")
        out[f"step_pdl={pdl}"] = build(S.lasad_step_kernel, sig, cx)
    for pdl in (True, False):
        # int8 weights at 1-4 rows (gemv_kernel): K in chunks, the first chunk's words before the wait
        cx = dict(K=1280, KS=1280, BK=256, G=1280, SPLIT_K=1, SPLIT_P=1, BR=2, BN=16, HAS_NORM=True, SWIGLU=True,
                  NACC=2, HAS_RES=False, USE_PDL=pdl, W_ASM=True, FP8=False, KP=2048)
        sig = dict(x=p, w4="*i32", ws="*fp32", nw=p, res=p, out=p, part="*fp32", cnt="*i32", R="i32", N_OUT="i32",
                   eps="fp32")
        out[f"gemv_int8_pdl={pdl}"] = build(L.gemv_kernel, sig, cx)
    # many rows (quant_mm): int8 weights converted to bf16 by byte permutes for the tensor cores
    sig = dict(a=p, w="*i8", ws="*fp32", res=p, c=p, part="*fp32", cnt="*i32", M="i32", N="i32")
    cx = dict(K=1280, BM=128, BN=128, BK=64, GROUP_M=8, STAGES=3, DOT_F32=False, W_ASM=True, HAS_RES=True,
              SWAP=False, KS=1280, SPLIT_K=1, SPLIT_P=1)
    out["quant_mm_int8"] = build(L.quant_mm_kernel, sig, cx)
    # the swapped product (MmTiles.swap): the weights are wgmma's register operand; then K split in two
    out["quant_mm_int8_swap"] = build(L.quant_mm_kernel, sig, {**cx, "BN": 64, "SWAP": True})
    out["quant_mm_int8_swap_split"] = build(L.quant_mm_kernel, sig, {**cx, "BN": 64, "SWAP": True, "KS": 640,
                                                                      "SPLIT_K": 2, "SPLIT_P": 2})
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels do not compile")
    print(json.dumps(ptx_facts()))
