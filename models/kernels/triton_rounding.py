"""Rounding to a narrower float type, and tensor-core dots with a known precision, inside Triton kernels: the same
on a GPU and in Triton's CPU interpreter.

Why a helper: the kernels here promise PyTorch's rounding points bit for bit (round to nearest, ties to even,
where eager PyTorch rounds), and the CPU tests check that in Triton's interpreter. The GPU's ``cvt.rn`` does
that for a plain ``.to(tl.bfloat16)``; the interpreter truncates instead (numpy has no bfloat16), so bf16 is
rounded here by bit arithmetic, which for finite values is what ``cvt.rn`` does (a value past bf16's largest
rounds to inf, as on the GPU). fp16 goes through ``.to``: numpy's float16 cast rounds to nearest even, as the
GPU does.

Imported only where triton is (the kernel modules import it under their ``HAS_TRITON``), and under the helpers' own
names: inductor re-emits a ``triton_op``'s kernels with their helpers named as defined here
(tests/test_kernel_sources.py).
"""

import triton
import triton.language as tl


@triton.jit
def rounded(v, ty: tl.constexpr):
    """fp32 ``v`` rounded to ``ty`` (to nearest, ties to even), kept in fp32 (the value ``ty`` holds)."""
    if ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return v.to(ty).to(tl.float32)


@triton.jit
def fp32_dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in fp32. IEEE: fp32 operands with fp32 products (fp32 inputs, where the default would be tf32;
    and in Triton's interpreter, whose dot misreads bf16). bf16 products are exact in fp32 either way."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
