"""Every Triton kernel compiles to a Hopper (sm_90) cubin, without a GPU.

The interpreter (how the other tests run the kernels on CPU) is lenient where the compiler is not
(non-constexpr globals, integer widths, dtype promotion), so this compiles each kernel ahead of
time for every dtype it is launched with.  It runs in a subprocess: with TRITON_INTERPRET=1 set,
@triton.jit returns interpreted functions that cannot be compiled.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

COMPILE_ALL = textwrap.dedent(
    """
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bayeskern.kernels import noise

    target = GPUTarget("cuda", 90, 32)
    compiled = 0
    for dtype, op, has_b in itertools.product(("fp32", "fp16", "bf16"), range(5), (False, True)):
        ptr = "*" + dtype
        signature = {
            "a_ptr": ptr, "b_ptr": ptr, "out_ptr": ptr, "n": "i64", "seed": "i64", "offset": "i64",
            "stream_lo": "i32", "stream_hi": "i32", "q_first": "i64", "p": "fp32", "scale": "fp32",
            "OP": "constexpr", "HAS_B": "constexpr", "QBLOCK": "constexpr",
        }
        source = ASTSource(noise.fused_noise_kernel, signature, constexprs={"OP": op, "HAS_B": has_b, "QBLOCK": 256})
        assert "cubin" in triton.compile(source, target=target).asm
        compiled += 1
    print("compiled", compiled)
    """
)


@pytest.mark.slow
def test_noise_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", COMPILE_ALL], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 30" in result.stdout
