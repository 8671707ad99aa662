"""DeepSeekMoE: routing rules, expert dispatch paths against a naive per-token loop, stats."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeflow.models import ModelConfig
from moeflow.models import moe as moe_mod
from moeflow.models.moe import (DeepSeekMoE, RoutedExperts, Router, balanced_assignment, select_experts,
                                 stable_expert_order, topk_by_rank)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _naive_experts(x_TD, idx_TK, w_TK, gate_up_E2FD, down_EDF):
    F_ = down_EDF.shape[-1]
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(idx_TK.shape[1]):
            e = int(idx_TK[t, j])
            h = gate_up_E2FD[e] @ x_TD[t]
            a = torch.nn.functional.silu(h[:F_]) * h[F_:]
            out[t] += w_TK[t, j] * (down_EDF[e] @ a)
    return out


def _experts(E=6, D=8, F_=8, dtype=torch.float64):
    cfg = ModelConfig.preset("tiny").replace(hidden_size=D, num_routed_experts=E, moe_intermediate_size=F_,
                                             num_experts_per_tok=2)
    ex = RoutedExperts(cfg).to(dtype)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.5)
    torch.nn.init.normal_(ex.down_proj, std=0.5)
    return ex


@pytest.mark.parametrize("grouped,align", [(False, 16), (True, 16), (True, 1)])
def test_expert_paths_match_naive_loop(grouped, align, monkeypatch):
    torch.manual_seed(0)
    # The CPU grouped_mm supports fp32 (not fp64); the loop is checked in fp64.
    dtype = torch.float32 if grouped else torch.float64
    ex = _experts(dtype=dtype)
    monkeypatch.setattr(RoutedExperts, "use_grouped_mm", grouped)
    monkeypatch.setattr(RoutedExperts, "group_align", align)
    T, K = 11, 2
    x = torch.randn(T, 8, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, 4, (T, K))  # experts 4 and 5 stay empty
    idx[:, 1] = (idx[:, 0] + 1) % 4
    w = torch.rand(T, K, dtype=dtype)
    got = ex(x, idx, w)
    want = _naive_experts(x, idx, w, ex.gate_up_proj, ex.down_proj)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    g_got = torch.autograd.grad(got.sum(), [x, ex.gate_up_proj, ex.down_proj])
    g_want = torch.autograd.grad(want.sum(), [x, ex.gate_up_proj, ex.down_proj])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)
    assert g_got[1][4:].abs().sum() == 0  # empty experts get zero gradient


def test_group_limited_routing_masks_dropped_groups_with_neg_inf():
    # 2 groups of 3; group 0 scores (top-2 sum) highest for token 0, group 1 for token 1.
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.2, 0.1],
                           [0.1, 0.2, 0.1, 0.6, 0.5, 0.4]])
    # A large negative bias on group 1's experts: with a 0.0 mask (the old HF bug) the dropped group
    # would still beat them; with -inf the chosen experts stay inside the kept group.
    bias = torch.tensor([-2.0, -2.0, -2.0, 0.0, 0.0, 0.0])
    idx = select_experts(scores, bias, k=2, n_group=2, topk_group=1)
    assert sorted(idx[0].tolist()) == [3, 4]  # biased group score: group 1 wins for token 0
    assert sorted(idx[1].tolist()) == [3, 4]
    idx_nobias = select_experts(scores, None, k=2, n_group=2, topk_group=1)
    assert sorted(idx_nobias[0].tolist()) == [0, 1]
    neg = -torch.ones(2, 6)  # all-negative scores: masked experts must still never be chosen
    neg[:, 0] = -0.5
    idx_neg = select_experts(neg, None, k=3, n_group=2, topk_group=1)
    assert all(i < 3 for i in idx_neg.flatten().tolist())


def test_bias_only_selects_and_weights_come_from_unbiased_scores():
    cfg = ModelConfig.preset("tiny").replace(hidden_size=4, num_routed_experts=4, num_experts_per_tok=2,
                                             route_scale=2.5)
    r = Router(cfg).double()
    torch.nn.init.normal_(r.weight)
    x = torch.randn(5, 4, dtype=torch.float64)
    r.e_score_correction_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
    out = r(x)
    assert sorted(set(out.topk_idx_TK.flatten().tolist())) == [0, 1]
    s = torch.sigmoid(x @ r.weight.t())[:, :2]
    want = s / s.sum(-1, keepdim=True) * 2.5
    got = torch.stack([out.topk_weight_TK[t][out.topk_idx_TK[t].argsort()] for t in range(5)])
    torch.testing.assert_close(got, want)
    assert r.e_score_correction_bias.requires_grad is False
    assert "e_score_correction_bias" in dict(r.named_buffers())


def test_bias_stays_fp32_under_dtype_cast():
    r = Router(ModelConfig.preset("tiny"))
    r.e_score_correction_bias.fill_(1e-4 + 1.0)
    r.to(torch.bfloat16)
    assert r.e_score_correction_bias.dtype == torch.float32
    assert r.e_score_correction_bias[0].item() == pytest.approx(1.0001, abs=1e-7)
    assert r.weight.dtype == torch.bfloat16


def test_forced_balanced_routing_is_round_robin():
    idx = balanced_assignment(5, 3, 4, "cpu")
    assert idx.tolist() == [[0, 1, 2], [3, 0, 1], [2, 3, 0], [1, 2, 3], [0, 1, 2]]
    cfg = ModelConfig.preset("tiny").replace(force_balanced_routing=True)
    moe = DeepSeekMoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(moe.experts.down_proj, std=0.02)
    _, stats = moe(torch.randn(2, 8, cfg.hidden_size))
    assert stats.tokens_per_expert_E.tolist() == [4.0] * 8
    assert stats.maxvio.item() == 0.0


def test_softmax_scores_and_stats():
    cfg = ModelConfig.preset("tiny").replace(score_func="softmax", z_loss_weight=1e-3, lb_loss_weight=1e-2)
    moe = DeepSeekMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    y, st = moe(torch.randn(3, 5, cfg.hidden_size))
    assert y.shape == (3, 5, cfg.hidden_size)
    assert st.tokens_per_expert_E.sum().item() == 3 * 5 * cfg.num_experts_per_tok
    assert 0 < st.router_entropy.item() <= torch.log(torch.tensor(8.0)).item() + 1e-6
    assert st.z_loss.item() > 0 and st.lb_loss.item() > 0 and st.seq_aux_loss.item() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_bf16_on_cuda_matches_fp32_loop(monkeypatch):
    torch.manual_seed(0)
    ex = _experts(E=8, D=64, F_=32, dtype=torch.float32).cuda()
    x = torch.randn(301, 64, device="cuda")
    idx = torch.randint(0, 6, (301, 2), device="cuda")  # experts 6, 7 empty
    w = torch.rand(301, 2, device="cuda")
    monkeypatch.setattr(RoutedExperts, "use_grouped_mm", False)
    want = ex(x, idx, w)
    monkeypatch.setattr(RoutedExperts, "use_grouped_mm", None)  # auto: CUDA + bf16 -> grouped
    got = ex.to(torch.bfloat16)(x.bfloat16(), idx, w).float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_weights_under_autocast_take_the_grouped_path(monkeypatch):
    """Mixed precision (fp32 master weights + bf16 autocast) must not fall back to the loop."""
    torch.manual_seed(0)
    ex = _experts(E=8, D=64, F_=32, dtype=torch.float32).cuda()
    x = torch.randn(301, 64, device="cuda", requires_grad=True)
    idx = torch.randint(0, 8, (301, 2), device="cuda")
    w = torch.rand(301, 2, device="cuda")
    monkeypatch.setattr(RoutedExperts, "use_grouped_mm", False)
    want = ex(x, idx, w)
    monkeypatch.setattr(RoutedExperts, "use_grouped_mm", None)
    calls = []
    monkeypatch.setattr(RoutedExperts, "_looped", lambda *a: calls.append("loop"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = ex(x, idx, w)
    assert not calls  # the grouped path ran (the gate-weighted sum promotes to fp32 under autocast)
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2
    got.float().sum().backward()
    assert ex.gate_up_proj.grad is not None and ex.gate_up_proj.grad.dtype == torch.float32


class _op_names(TorchDispatchMode):
    """Records the name of every ATen op run inside it (``.names``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _compiled_ops(fn, *args):
    """fn compiled by torch.compile (a backend that records the traced graph): (output, the graph's op names)."""
    names = []

    def record(gm, example_inputs):
        names.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=record, fullgraph=True)(*args), " ".join(names)


@pytest.mark.parametrize("num_slots,num_experts", [(1, 64), (6, 64), (7, 3), (192, 64), (2048, 64), (5000, 8)])
@pytest.mark.parametrize("force_rank", [False, True])
def test_stable_expert_order_is_the_stable_argsort_and_its_inverse(num_slots, num_experts, force_rank):
    """The comparison rank and the sort must both be exactly the stable argsort."""
    g = torch.Generator().manual_seed(num_slots)
    flat_N = torch.randint(0, num_experts, (num_slots,), generator=g)
    order_N, inv_order_N = stable_expert_order(flat_N, force_rank=force_rank)
    assert torch.equal(order_N, torch.argsort(flat_N, stable=True))
    assert torch.equal(inv_order_N[order_N], torch.arange(num_slots))
    assert torch.equal(flat_N[order_N], flat_N.sort().values)


def test_compiled_decode_sized_routing_neither_sorts_nor_topks_and_eager_does():
    """Inside torch.compile the counting forms replace sort and topk at decode sizes (fused: a radix sort
    was 12 % of a batch-32 decode step); eagerly (~8 kernels against 2) and at training sizes they do not."""
    small = torch.randint(0, 64, (192,))
    (order_N, _), ops = _compiled_ops(stable_expert_order, small)
    assert "sort" not in ops and torch.equal(order_N, torch.argsort(small, stable=True))
    big = torch.randint(0, 64, (moe_mod.RANK_ORDER_MAX_SLOTS + 1,))
    (order_N, _), ops = _compiled_ops(stable_expert_order, big)
    assert "argsort" in ops and torch.equal(order_N, torch.argsort(big, stable=True))

    scores = torch.rand(300, 64)  # 300 · 64² comparisons > RANK_TOPK_MAX_PAIRS: torch.topk
    for rows, uses_topk in [(4, False), (300, True)]:
        idx_TK, ops = _compiled_ops(lambda s: select_experts(s, None, 6, 1, 1), scores[:rows])
        assert ("topk" in ops) == uses_topk
        assert torch.equal(idx_TK, scores[:rows].topk(6, dim=-1).indices)
    with _op_names() as eager:
        select_experts(scores[:4], None, 6, 1, 1)
        stable_expert_order(small)
    assert "topk" in " ".join(eager.names) and "sort" in " ".join(eager.names)


@pytest.mark.parametrize("T,E,k", [(1, 64, 6), (32, 64, 6), (5, 8, 8), (3, 4, 1)])
def test_topk_by_rank_equals_torch_topk(T, E, k):
    g = torch.Generator().manual_seed(T * E + k)
    choice_TE = torch.randn(T, E, generator=g)
    choice_TE[0, : E // 2] = float("-inf")  # dropped groups are -inf: they rank last, lower id first
    want = choice_TE.topk(k, dim=-1)
    got = topk_by_rank(choice_TE, k)
    assert torch.equal(choice_TE.gather(1, got), want.values)
    finite = want.values.isfinite().all(dim=-1)
    assert torch.equal(got[finite], want.indices[finite])


def test_topk_by_rank_breaks_ties_by_lower_id():
    tied = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    assert topk_by_rank(tied, 4).tolist() == [[1, 3, 0, 2]]
