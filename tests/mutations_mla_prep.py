"""The fused MLA cache step's mutation check (models/kernels/mla_prep.py, MLA.fused_cache_write): apply each mutation
to the code, run tests/test_mla_prep_kernel.py (the tests named beside it, for speed), restore the file.

Run from the repository root (PYTHONPATH so that ``import moeflow`` is this checkout; no GPU: the interpreter):
    python tests/mutations_mla_prep.py                  # every mutation
    python tests/mutations_mla_prep.py "slot off by one" # some of them, by name
Prints, per mutation, the test that caught it or SURVIVED (``-x``: the first failure). Not collected by pytest (no
test_ prefix): it rewrites source files while it runs, so never run it beside other work in the same checkout.
All 15 caught on 2026-12-07 (about 2 minutes on 2 cores).
"""

import pathlib
import subprocess
import sys

K, A = "models/kernels/mla_prep.py", "models/attention.py"
M = [  # (name, file, old, new, the tests to run: a pytest -k expression)
 ("key RoPE sign", K, "first = rounded(rounded(even * c_P, ty) - rounded(odd * s_P, ty), ty)",
  "first = rounded(rounded(even * c_P, ty) + rounded(odd * s_P, ty), ty)", "bit_equal"),
 ("the norm's product not rounded to x", K, "                latent_R = rounded(latent_R, x_ty)",
  "                latent_R = latent_R", "bit_equal"),
 ("slot off by one", K, "slot = tl.load(slots_ptr + t * slots_s).to(tl.int64)",
  "slot = tl.load(slots_ptr + t * slots_s).to(tl.int64) + 1", "bit_equal"),
 ("query head blocks shifted", K, "h_H = (part - 1) * BLOCK_H", "h_H = part * BLOCK_H", "bit_equal or many_query"),
 ("eps dropped", K, "tl.math.rsqrt(mean_sq + eps)", "tl.math.rsqrt(mean_sq)", "bit_equal or mixed"),
 ("slots outside the cache written", K, "mask=mask_R & in_cache)", "mask=mask_R)", "slots_outside"),
 ("cos not rounded to x for the key", K, "rounded(cos_P, x_ty),", "cos_P,", "bit_equal"),
 ("the mean divides (not fl32(1/R))", K, "tl.sum(s_R * s_R, axis=0) * inv_r", "tl.sum(s_R * s_R, axis=0) / R",
  "bit_equal or mixed or eager"),
 ("the last query block missing", K, "grid = (B * T, 1 + triton.cdiv(H, block_h))",
  "grid = (B * T, max(1, triton.cdiv(H, block_h)))", "many_query or bit_equal"),
 ("other warps than the fused RMSNorm's", K, "    return block_r, block_p, block_h, warps\n",
  "    return block_r, block_p, block_h, 2 * warps\n", "compiles"),
 ("the key not rounded to the cache's dtype", K, "tl.store(key_P, rounded(first_P, cache_ty).to(cache_ty)",
  "tl.store(key_P, first_P.to(cache_ty)", "bit_equal or mixed"),
 ("taken while torch.compile traces", A, "if (torch.compiler.is_compiling() or step is None", "if (step is None",
  "compile_traces"),
 ("taken with autograd", K, "needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in floats[:5])",
  "needs_grad = False", "autograd or applies"),
 ("the switch ignored", A, "or not self.fused_cache_write\n", "\n", "off_by_default or model_decode"),
 ("int32 slots accepted", K, "slots_T.dtype == torch.int64 and", "", "applies"),
]
only = sys.argv[1:]
for name, path, old, new, k in M:
    if only and name not in only:
        continue
    p = pathlib.Path(path)
    src = p.read_text()
    assert src.count(old) == 1, (name, old)
    p.write_text(src.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            "tests/test_mla_prep_kernel.py", "-k", k], capture_output=True, text=True)
        failed = [line.split(" - ")[0].replace("FAILED ", "") for line in r.stdout.splitlines()
                  if line.startswith("FAILED")]
        print(f"{name}: {'CAUGHT by ' + ', '.join(failed) if failed else 'SURVIVED'}", flush=True)
    finally:
        p.write_text(src)
