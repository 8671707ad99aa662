"""Issue 9's mutation check: apply each mutation to the code, run the tests, restore the file.

Run from the repository root (PYTHONPATH so that ``import moeflow`` is this checkout):
    python tests/mutations_issue9.py            # the default test files below
Prints, per mutation, the tests that caught it or SURVIVED. Not collected by pytest (no test_ prefix):
it rewrites source files while it runs, so never run it beside other work in the same checkout.
"""

import pathlib
import subprocess
import sys

DEFAULT_TESTS = ["tests/test_train_token_weighting.py", "tests/test_train_loop.py", "tests/test_train_clipping.py",
                 "tests/test_model_balancing.py", "tests/test_train_mtp_boundaries.py", "tests/test_model_mtp_layout.py",
                 "tests/test_model_transformer.py"]
M = [
 ("accumulation scaling removed (token share -> 1)", "models/train/loop.py",
  'share = (counts / global_counts.clamp_min(1)).to(terms["lm_loss"].dtype) * self.world_size',
  'share = torch.ones_like(counts).to(terms["lm_loss"].dtype)'),
 ("balance-loss /k removed", "models/train/loop.py",
  'return loss + terms["balance_loss"] / self.cfg.grad_accum_steps', 'return loss + terms["balance_loss"]'),
 ("gradient clipping disabled", "models/train/loop.py",
  'max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")', 'max_norm = float("inf")'),
 ("seq-aux f_i scaled by K", "models/balancing.py", 'f_BE = counts_BE * (E / K) / num_valid_B1', 'f_BE = counts_BE * E / num_valid_B1'),
 ("seq-aux mask dropped (counts and P over every position)", "models/balancing.py",
  'slot_w_BN = w_BT[:, :, None].expand(B, T, K).reshape(B, T * K)', 'slot_w_BN = torch.ones_like(w_BT[:, :, None].expand(B, T, K).reshape(B, T * K))'),
 ("seq-aux P_i unmasked", "models/balancing.py",
  'p_sum_BE = (p_BTE * w_BT[:, :, None]).sum(dim=1)', 'p_sum_BE = p_BTE.sum(dim=1)'),
 ("seq-aux T instead of T_valid", "models/balancing.py",
  'num_valid_B1 = w_BT.sum(dim=1, keepdim=True).clamp_min(1)', 'num_valid_B1 = T'),
 ("seq-aux empty row NaN (no clamp_min)", "models/balancing.py",
  'num_valid_B1 = w_BT.sum(dim=1, keepdim=True).clamp_min(1)', 'num_valid_B1 = w_BT.sum(dim=1, keepdim=True)'),
 ("entropy/z masked mean over every token", "models/balancing.py",
  'return (x_T * w_T).sum() / w_T.sum().clamp_min(1)', 'return (x_T * w_T).sum() / x_T.numel()'),
 ("lb loss mask dropped in f_i", "models/balancing.py",
  'f_E = tokens_per_expert(topk_idx_TK, E, valid_T) / (num_valid * K)', 'f_E = tokens_per_expert(topk_idx_TK, E) / (num_valid * K)'),
 ("MoE entropy ignores the mask", "models/moe.py",
  'balancing.router_entropy(r.scores_TE, valid_BT)', 'balancing.router_entropy(r.scores_TE)'),
 ("MoE seq-aux ignores the mask", "models/moe.py",
  'idx_BTK, cfg.seq_aux_alpha, valid_BT)', 'idx_BTK, cfg.seq_aux_alpha)'),
 ("MTP block gets no mask", "models/mtp.py",
  'self.block(x_BTD, cos, sin, mask_B1TS, valid_BT=valid_BT)', 'self.block(x_BTD, cos, sin, mask_B1TS)'),
 ("checkpointed block drops the mask", "models/transformer.py",
  'mask_B1TS, forced_idx_BTK, valid_BT, use_reentrant=False', 'mask_B1TS, forced_idx_BTK, None, use_reentrant=False'),
 ("BOS masking dropped with MTP (trainer)", "models/train/loop.py",
  'extra["mtp_boundary_BT"] = targets_BT == self.boundary_id', 'pass'),
 ("BOS masking dropped with MTP (model)", "models/transformer.py",
  'chain_BT = targets if mtp_boundary_BT is None else targets.masked_fill(mtp_boundary_BT, IGNORE_INDEX)', 'chain_BT = targets'),
 ("MTP concat order swapped", "models/mtp.py",
  'torch.cat([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], dim=-1)', 'torch.cat([self.hnorm(h_prev_BTD), self.enorm(emb_next_BTD)], dim=-1)'),
 ("MTP enorm/hnorm swapped", "models/mtp.py",
  'torch.cat([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], dim=-1)', 'torch.cat([self.hnorm(emb_next_BTD), self.enorm(h_prev_BTD)], dim=-1)'),
]
tests = sys.argv[1:] or DEFAULT_TESTS
for name, path, old, new in M:
    p = pathlib.Path(path); src = p.read_text()
    assert src.count(old) == 1, (name, old)
    p.write_text(src.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], capture_output=True, text=True)
        failed = [l.split(" - ")[0].replace("FAILED ", "") for l in r.stdout.splitlines() if l.startswith("FAILED")]
        print(f"{name}: {'CAUGHT by ' + ', '.join(failed) if failed else 'SURVIVED'}", flush=True)
    finally:
        p.write_text(src)
