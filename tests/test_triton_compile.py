"""Every Triton kernel compiles to a Hopper (sm_90) cubin, without a GPU.

The interpreter (how the other tests run the kernels on CPU) is lenient where the compiler is not
(non-constexpr globals, integer widths, dtype promotion), so each kernel is compiled ahead of time
for every dtype and constexpr variant it is launched with.  This runs in a subprocess: with
TRITON_INTERPRET=1 set, @triton.jit returns interpreted functions that cannot be compiled.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# Each case yields (kernel, signature, constexprs) for every launch variant.
CASES = textwrap.dedent(
    """
    import itertools
    import triton.language as tl
    from bayeskern.kernels import draw, fisher, noise, sgld

    def noise_variants():
        for dtype, op, has_b in itertools.product(("fp32", "fp16", "bf16"), range(5), (False, True)):
            ptr = "*" + dtype
            signature = {
                "a_ptr": ptr, "b_ptr": ptr, "out_ptr": ptr, "n": "i64", "seed": "i64", "offset": "i64",
                "stream_lo": "i32", "stream_hi": "i32", "q_first": "i64", "p": "fp32", "scale": "fp32",
                "OP": "constexpr", "HAS_B": "constexpr", "QBLOCK": "constexpr",
            }
            yield noise.fused_noise_kernel, signature, {"OP": op, "HAS_B": has_b, "QBLOCK": 256}

    def sgld_variants():
        flag_sets = itertools.product((False, True), repeat=3)
        for dtype, flags in itertools.product((tl.float32, tl.float16, tl.bfloat16), flag_sets):
            signature = {
                "records_ptr": "*i64", "count": "i32", "seed": "i64", "stream_lo": "i32", "stream_hi": "i32",
                **{name: "fp32" for name in ("lr", "prior_precision", "noise_scale", "alpha", "eps")},
                **{name: "constexpr" for name in ("DTYPE", "HAS_MEAN", "PRECONDITION", "NOISE", "QBLOCK", "SEARCH_STEPS")},
            }
            constexprs = dict(zip(("HAS_MEAN", "PRECONDITION", "NOISE"), flags), DTYPE=dtype, QBLOCK=256, SEARCH_STEPS=6)
            yield sgld.sgld_kernel, signature, constexprs

    def draw_variants():
        kinds = [(0, False), (1, False), (1, True)]  # (KIND, FILL_PRIOR): Gaussian, dropout scaled / filled
        for dtype, (kind, fill), backward in itertools.product((tl.float32, tl.float16, tl.bfloat16), kinds, (False, True)):
            signature = {
                "records_ptr": "*i64", "inv_var_ptr": "*fp32", "partial_ptr": "*fp32", "grad_term_ptr": "*fp32",
                "count": "i32", "seed": "i64", "stream_lo": "i32", "stream_hi": "i32", "p": "fp32", "scale": "fp32",
                **{name: "constexpr" for name in ("DTYPE", "KIND", "BACKWARD", "FILL_PRIOR", "QBLOCK", "SEARCH_STEPS")},
            }
            constexprs = dict(DTYPE=dtype, KIND=kind, BACKWARD=backward, FILL_PRIOR=fill, QBLOCK=256, SEARCH_STEPS=6)
            yield draw.draw_kernel, signature, constexprs

    def fisher_variants():
        for dtype, dot_f32, precision in itertools.product(("fp32", "bf16", "fp16"), (True, False), ("ieee", "tf32")):
            if dtype == "fp32" and not dot_f32:
                continue
            signature = {
                "part_ptr": "*fp32", "g_ptr": "*" + dtype, "a_ptr": "*" + dtype,
                **{k: "i32" for k in ("B", "T", "O", "I", "examples_per_split", "sg_b", "sg_t", "sg_o", "sa_b", "sa_t", "sa_i")},
                **{k: "constexpr" for k in ("BLOCK_O", "BLOCK_I", "BLOCK_T", "DOT_F32", "PRECISION")},
            }
            constexprs = {"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_T": 32, "DOT_F32": dot_f32, "PRECISION": precision}
            yield fisher.sq_grad_tile_kernel, signature, constexprs

    CASES = {"noise": noise_variants, "sgld": sgld_variants, "draw": draw_variants, "fisher": fisher_variants}
    """
)

COMPILE = CASES + textwrap.dedent(
    """
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = 0
    for kernel, signature, constexprs in CASES[sys.argv[1]]():
        binary = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
        assert "cubin" in binary.asm
        compiled += 1
    print("compiled", compiled)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("case, variants", [("noise", 30), ("sgld", 24), ("draw", 18), ("fisher", 10)])
def test_kernels_compile_for_sm90(case, variants):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", COMPILE, case], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"compiled {variants}" in result.stdout
