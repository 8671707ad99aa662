"""Speed paths of the model: a CUDA-graphed training step (graph_step), fused routed experts for decode-sized
calls (moe_decode, Triton; optional), RMSNorm and residual add + RMSNorm in one launch at inference (rmsnorm,
Triton; optional), rotary embedding in one launch at inference (rope, Triton; optional), MLA's cache step (latent
norm, key RoPE, cache write) with the queries' RoPE in one launch at inference (mla_prep, Triton; optional), the
absorbed MLA attention of decode-sized steps in one or two launches (mla_decode, Triton; optional), the router after
its logits in one launch at inference (router, Triton; optional), a one-token cache step's key mask, counts,
positions, attention mask and RoPE cos/sin in one launch at inference (cache_step, Triton; optional). Each has a
reference path that computes the same function and a test comparing the two."""
