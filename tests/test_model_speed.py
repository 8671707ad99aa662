"""Speed paths against their reference paths: activation checkpointing, FP8 linear, the CUDA-graphed step.

CPU tests run everywhere (``torch._scaled_mm`` has a CPU kernel); ``@pytest.mark.gpu`` ones need CUDA
(run on the lent GPU: ``pytest -m gpu tests/test_model_speed.py``).
"""

import pytest
import torch
import torch.nn.functional as F

from moeflow.models import ModelConfig, MoETransformer
from moeflow.models import fp8
from moeflow.models.kernels.graph_step import GraphedStep, static_copy, sync_free_embedding
from moeflow.models.transformer import set_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=101, **kw))


def _loss_and_grads(m, ids):
    out = m(ids, targets=ids)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters()}


# ------------------------------------------------------------------ activation checkpointing

@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_same_function_and_recomputes(policy):
    ids = torch.randint(0, 101, (2, 12))
    ref_out, ref_grads = _loss_and_grads(_model(mtp_depth=1), ids)
    m = set_activation_checkpointing(_model(mtp_depth=1), policy)
    calls = []
    m.model.layers[1].mlp.gate.register_forward_hook(lambda *a: calls.append(1))
    out, grads = _loss_and_grads(m, ids)
    assert len(calls) == 2  # the router ran again in backward: the block was recomputed
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=0, atol=0)
    for k in ("tokens_per_expert", "maxvio", "router_entropy", "seq_aux_loss", "lm_loss", "mtp_loss"):
        torch.testing.assert_close(out.aux[k], ref_out.aux[k], rtol=0, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def _mm_calls_in_backward(policy):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
            return func(*args, **(kwargs or {}))

    m = _model()
    if policy != "none":
        set_activation_checkpointing(m, policy)
    ids = torch.randint(0, 101, (2, 12))
    loss = m(ids, targets=ids).loss
    with Count():
        loss.backward()
    return Count.n


def test_selective_checkpointing_recomputes_no_matmul_and_full_does():
    none, selective, full = (_mm_calls_in_backward(p) for p in ("none", "selective", "full"))
    assert selective == none  # the products were saved: backward runs only the gradient matmuls
    assert full > none        # full recomputes the forward's products too


def test_checkpointed_block_traces_as_one_graph():
    """Regression: dataclasses.fields() in the checkpointed block made dynamo fall back to eager."""
    from torch._dynamo.utils import counters

    for policy in ("full", "selective"):
        torch._dynamo.reset()
        counters.clear()
        m = set_activation_checkpointing(_model(), policy)
        layer = m.model.layers[1]
        layer.mlp.experts.use_grouped_mm = False
        layer.mlp.experts._looped = lambda x, counts, e=layer.mlp.experts: _static_loop(e, x)  # no .tolist()
        layer.compile(backend="eager")
        x = torch.randn(2, 8, 64, requires_grad=True)
        cos, sin = m.rotary(torch.arange(8).expand(2, 8))
        y, stats = layer(x, cos, sin)
        (y.sum() + stats.seq_aux_loss).backward()
        assert dict(counters["graph_break"]) == {}, policy
        assert counters["stats"]["unique_graphs"] == 1, policy
    torch._dynamo.reset()


def test_mtp_module_with_a_validity_mask_traces_as_one_graph():
    """The MTP block's validity mask (masked seq-aux, entropy, counts) adds no graph break or host sync."""
    from torch._dynamo.utils import counters

    for policy in ("none", "full"):
        torch._dynamo.reset()
        counters.clear()
        m = set_activation_checkpointing(_model(mtp_depth=1), policy)
        module = m.mtp[0]
        experts = module.block.mlp.experts
        experts.use_grouped_mm = False
        experts._looped = lambda x, counts, e=experts: _static_loop(e, x)  # no .tolist()
        module.compile(backend="eager")
        h, emb = torch.randn(2, 8, 64, requires_grad=True), torch.randn(2, 8, 64)
        cos, sin = m.rotary(torch.arange(8).expand(2, 8))
        valid = torch.ones(2, 8, dtype=torch.bool)
        valid[:, -1] = False
        _, normed, stats = module(h, emb, cos, sin, None, valid)
        (normed.sum() + stats.seq_aux_loss).backward()
        assert dict(counters["graph_break"]) == {}, policy
        assert counters["stats"]["unique_graphs"] == 1, policy
        assert stats.tokens_per_expert_E.sum().item() == 2 * 7 * m.cfg.num_experts_per_tok
    torch._dynamo.reset()


def _static_loop(experts, x_sorted_ND):
    # stand-in for the CUDA grouped path with static shapes: every slot through expert 0
    h = x_sorted_ND @ experts.gate_up_proj[0].t()
    return experts._swiglu_rows(h) @ experts.down_proj[0].t()


def test_activation_checkpointing_per_layer_and_bad_input():
    m = set_activation_checkpointing(_model(), "full", layers=[2])
    assert [layer.checkpoint_policy for layer in m.model.layers] == ["none", "none", "full"]
    with pytest.raises(ValueError, match="policy 'some'"):
        set_activation_checkpointing(m, "some")
    with pytest.raises(ValueError, match="out of range"):
        set_activation_checkpointing(m, "full", layers=[3])
    with torch.no_grad():  # no grad: plain forward, no checkpoint
        assert m(torch.randint(0, 101, (1, 5))).logits.shape == (1, 5, 101)


# ------------------------------------------------------------------ FP8 linear

def test_quantize_rows_scales_each_row_to_the_fp8_range():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 50.0, 1e4, 0.0])[:, None]
    q, s = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    torch.testing.assert_close(q.float().abs().amax(1)[:4], torch.full((4,), 448.0))
    assert (q.float()[4] == 0).all() and torch.isfinite(s).all()  # an all-zero row gives zeros, not NaN
    rel = (q.float() * s - x).norm(dim=1)[:4] / x.norm(dim=1)[:4]
    assert (rel < 0.05).all()


def test_fp8_linear_forward_and_gradients_match_their_reference():
    torch.manual_seed(1)
    x = (torch.randn(3, 32, 64) * 3).requires_grad_(True)
    w = (torch.randn(48, 64) * 0.1).requires_grad_(True)
    y = fp8.fp8_linear(x, w)
    x2 = x.detach().reshape(-1, 64)
    torch.testing.assert_close(y.reshape(-1, 48), fp8.reference_fp8_linear(x2, w.detach()), rtol=1e-5, atol=1e-5)
    exact = x2 @ w.detach().t()
    assert 0 < ((y.reshape(-1, 48) - exact).norm() / exact.norm()).item() < 0.06
    dy = torch.randn_like(y)
    y.backward(dy)
    dy2 = dy.reshape(-1, 48)
    gq, gs = fp8.quantize_rows(dy2)
    wq, ws = fp8.quantize_rows(w.detach().t().contiguous())  # W quantised per input column
    ref_dx = (gq.float() * gs) @ (wq.float() * ws).t()
    torch.testing.assert_close(x.grad.reshape(-1, 64), ref_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, dy2.t() @ x2, rtol=1e-5, atol=1e-5)  # wgrad in full precision


def test_enable_fp8_swaps_only_chosen_groups_keeps_parameters_and_learns():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=128, qk_rope_head_dim=16)  # every shape a multiple of 16
    ref, m = MoETransformer(cfg), MoETransformer(cfg)
    m.load_state_dict(ref.state_dict())
    params_before = {n: p for n, p in m.named_parameters()}
    swapped = fp8.enable_fp8(m, ["attn", "dense"])
    assert "model.layers.0.mlp.gate_proj" in swapped and "model.layers.2.self_attn.o_proj" in swapped
    assert not any("shared_experts" in n or n == "lm_head" for n in swapped)
    assert isinstance(m.model.layers[1].self_attn.kv_b_proj, fp8.Fp8Linear)
    assert fp8.enable_fp8(_model(), ["attn"])  # tiny's kv_a_proj (64 -> 32 + 8) is not a multiple of 16: kept
    assert not any("kv_a_proj" in n for n in fp8.enable_fp8(_model(), ["attn"]))
    assert {n: p for n, p in m.named_parameters()} == params_before  # same Parameter objects, same names
    assert list(m.state_dict()) == list(ref.state_dict())
    with pytest.raises(ValueError, match="unknown module group"):
        fp8.enable_fp8(m, ["mlp"])
    ids = torch.randint(0, 128, (4, 32))
    losses = {}
    for name, model in (("bf", ref), ("fp8", m)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        hist = []
        for _ in range(25):
            loss = model(ids, targets=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            hist.append(loss.item())
        losses[name] = hist
    assert losses["fp8"][-1] < losses["fp8"][0] - 1.0  # it learns
    assert abs(losses["fp8"][-1] - losses["bf"][-1]) < 0.05 * losses["bf"][-1]  # close to the reference


# ------------------------------------------------------------------ batched router-bias update

def test_batched_router_bias_update_equals_the_per_router_rule():
    from moeflow.models import balancing

    m = _model(num_layers=4)
    for r in m.routers():
        r.e_score_correction_bias.normal_(0, 1e-3)
    before = [r.e_score_correction_bias.clone() for r in m.routers()]
    counts_LE = torch.randint(0, 20, (len(before), 8)).float()
    m.apply_router_bias_update(counts_LE, gamma=1e-2)
    for r, b, c in zip(m.routers(), before, counts_LE):
        torch.testing.assert_close(r.e_score_correction_bias, balancing.update_router_bias(b, c, 1e-2))


# ------------------------------------------------------------------ graphed step / sync-free embedding

def test_sync_free_embedding_matches_nn_embedding():
    torch.manual_seed(0)
    w = torch.randn(50, 16, requires_grad=True)
    ids = torch.randint(0, 50, (3, 40))  # repeated ids: gradients must accumulate
    dy = torch.randn(3, 40, 16)
    sync_free_embedding(ids, w).backward(dy)
    w2 = w.detach().clone().requires_grad_(True)
    F.embedding(ids, w2).backward(dy)
    torch.testing.assert_close(w.grad, w2.grad)


def test_static_copy_keeps_strides_of_sliced_inputs():
    batch = torch.arange(30).view(3, 10)
    targets = batch[:, 1:]  # what the loop passes: a strided view
    copy = static_copy(targets)
    assert copy.stride() == targets.stride() and torch.equal(copy, targets)
    assert copy.data_ptr() != targets.data_ptr()
    assert targets.clone().stride() != targets.stride()  # why clone() would not do


def test_graphed_step_off_cuda_is_the_plain_step():
    ids = torch.randint(0, 101, (2, 10))
    a, b = _model(), _model()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3)

    def body(x):
        loss = a(x, targets=x).loss
        loss.backward()
        opt_a.step()
        return loss.detach()

    step = GraphedStep(body, [opt_a], warmup_steps=1)
    for _ in range(3):
        step(ids)
        loss = b(ids, targets=ids).loss
        loss.backward()
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
    assert not step.captured
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    with pytest.raises(ValueError, match="warmup_steps"):
        GraphedStep(body, [opt_a], warmup_steps=0)


@pytest.mark.gpu
@cuda
def test_graphed_step_on_cuda_matches_eager_steps():
    """Replays of the captured step follow the eager steps, batch by batch (bf16, grouped_mm path)."""
    from moeflow.models.kernels.graph_step import make_capture_safe

    batches = [torch.randint(0, 101, (2, 64), device="cuda") for _ in range(6)]
    models, losses = [], []
    for graphed in (False, True):
        m = _model().cuda().to(torch.bfloat16)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True, capturable=graphed)

        def body(x, m=m, opt=opt):
            out = m(x, targets=x)
            out.loss.backward()
            opt.step()
            m.apply_router_bias_update(out.aux["tokens_per_expert"])
            return out.loss.detach()

        hist = []
        if graphed:
            make_capture_safe(m)
            step = GraphedStep(body, [opt], warmup_steps=2)
            hist = [step(x).float().item() for x in batches]
            assert step.captured and step.calls == 6
        else:
            for x in batches:
                hist.append(body(x).float().item())
                opt.zero_grad(set_to_none=True)
        models.append(m)
        losses.append(hist)
    assert len(set(losses[1])) == 6  # every replay saw its own batch
    for a, b in zip(*losses):
        assert abs(a - b) < 2e-2 * abs(a)
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=2e-3, msg=n)
    for r0, r1 in zip(models[0].routers(), models[1].routers()):  # bias update ran inside the graph
        assert r1.e_score_correction_bias.abs().sum() > 0
        torch.testing.assert_close(r0.e_score_correction_bias, r1.e_score_correction_bias, atol=2e-3, rtol=0)


@pytest.mark.gpu
@cuda
def test_fp8_linear_on_cuda_matches_reference():
    torch.manual_seed(0)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(384, 512, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_(True)
    y = fp8.fp8_linear(x, w)
    ref = fp8.reference_fp8_linear(x.detach().float(), w.detach().float())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2  # bf16 output rounding only
    exact = x.detach().float() @ w.detach().float().t()
    assert ((y.float() - exact).norm() / exact.norm()).item() < 0.06
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_dx = dy.float() @ w.detach().float()
    assert ((x.grad.float() - ref_dx).norm() / ref_dx.norm()).item() < 0.06
    ref_dw = dy.float().t() @ x.detach().float()
    assert ((w.grad.float() - ref_dw).norm() / ref_dw.norm()).item() < 1e-2
