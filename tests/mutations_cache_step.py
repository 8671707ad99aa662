"""The fused cache step's mutation check (models/kernels/cache_step.py, MLA.fused_cache_step, RotaryEmbedding.table,
the one-token formula in prepare_attention, the MoE layer's zero losses): apply each mutation to the code, run the
tests named beside it, restore the file.

Run from the repository root (PYTHONPATH so that ``import moeflow`` is this checkout; no GPU: the interpreter):
    python tests/mutations_cache_step.py                   # every mutation
    python tests/mutations_cache_step.py "position + 1"    # some of them, by name
Prints, per mutation, the test that caught it or SURVIVED (``-x``: the first failure). Not collected by pytest (no
test_ prefix): it rewrites source files while it runs, so never run it beside other work in the same checkout.
All 18 caught on 2026-12-07 (about 4 minutes on 2 cores).
"""

import pathlib
import subprocess
import sys

K, A, L, T, M_ = ("models/kernels/cache_step.py", "models/attention.py", "models/layers.py", "models/transformer.py",
                  "models/moe.py")
KT, DL = "tests/test_cache_step_kernel.py", "tests/test_decode_launches.py"
M = [  # (name, file, old, new, test file, a pytest -k expression)
 ("position + 1", K, "tl.store(pos_ptr + b, n)", "tl.store(pos_ptr + b, n + 1)", KT, "formula"),
 ("count + 1 for padded rows too", K, "n + real.to(tl.int64))", "n + 1)", KT, "formula"),
 ("own slot not seen", K, "allowed_S = (s_S <= slot) & (key_S | self_S)", "allowed_S = (s_S <= slot) & key_S", KT,
  "formula"),
 ("not causal", K, "allowed_S = (s_S <= slot) & (key_S | self_S)", "allowed_S = key_S | self_S", KT, "formula"),
 ("key mask slot not written", K, "tl.store(km_row + slot * km_ss, real.to(tl.uint8), mask=(slot >= 0) & (slot < K))",
  "pass", KT, "formula"),
 ("table row off by one", K, "values_P = tl.load(table_ptr + row * P + p_P", "values_P = tl.load(table_ptr + "
  "(row + 1) * P + p_P", KT, "formula"),
 ("only the first mask block", K, "grid = (B, triton.cdiv(num_keys, block_s))", "grid = (B, 1)", KT, "formula"),
 ("float masks accepted", K, "real_B1.dtype in MASK_DTYPES", "True", KT, "applies or not_taken"),
 ("one-token position aliases the counts", A, "positions = (cache.num_real_B[:, None].clone() if T == 1",
  "positions = (cache.num_real_B[:, None] if T == 1", KT, "formula"),
 ("dynamic slots off by one", A, "slots_T, num_keys = _slot_ids(cache, dev)[start:start + T], start + T",
  "slots_T, num_keys = _slot_ids(cache, dev)[start + 1:start + T + 1], start + T", KT, "formula"),
 ("the switch ignored", A, "or not MLA.fused_cache_step or", "or", KT, "not_taken or formula"),
 ("taken while torch.compile traces", A, "if torch.compiler.is_compiling() or not MLA.fused_cache_step",
  "if not MLA.fused_cache_step", KT, "compile"),
 ("the kernel's cos/sin not used", T, "cos, sin = step.rope if step is not None and step.rope is not None else",
  "cos, sin = None if False else", DL, "bookkeeping"),
 ("the one-token formula's cumsum back", A, "positions = (cache.num_real_B[:, None].clone() if T == 1",
  "positions = (cache.num_real_B[:, None].clone() if T == 0", DL, "bookkeeping"),
 ("table from positions 1..n", L, "self.forward(torch.arange(n, device=device)[None])",
  "self.forward(torch.arange(1, n + 1, device=device)[None])", KT, "table or formula"),
 ("old tables dropped", L, "self._tables = [(k, t) for k, t in self._tables if k == key] + [(key, table_NP)]",
  "self._tables = [(key, table_NP)]", KT, "table"),
 ("stale table after new frequencies", L, "key = (device, self.inv_freq.data_ptr(), version)",
  "key = (device, self.inv_freq.data_ptr())", KT, "table"),
 ("MoE zero losses back at decode", M_, "if not with_losses:  # no zeros either",
  "if False:  # no zeros either", DL, "zero_losses"),
]
only = sys.argv[1:]
for name, path, old, new, tests, k in M:
    if only and name not in only:
        continue
    p = pathlib.Path(path)
    src = p.read_text()
    assert src.count(old) == 1, (name, old)
    p.write_text(src.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", tests, "-k", k],
                           capture_output=True, text=True)
        failed = [line.split(" - ")[0].replace("FAILED ", "") for line in r.stdout.splitlines()
                  if line.startswith("FAILED") or line.startswith("ERROR")]
        print(f"{name}: {'CAUGHT by ' + ', '.join(failed) if failed else 'SURVIVED'}", flush=True)
    finally:
        p.write_text(src)
