"""Speed paths of the model: a CUDA-graphed training step (graph_step), fused routed experts for decode-sized
calls (moe_decode, Triton; optional). Each has a reference path
that computes the same function and a test comparing the two."""
