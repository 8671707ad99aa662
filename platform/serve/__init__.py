"""Serving: an OpenAI-compatible gateway (FastAPI) over continuous-batching model replicas, on Ray Serve.

- ``config``: what to serve (model versions, replicas, quantization) and the gateway's limits;
- ``routing``: which version answers a request (``name``, ``name@alias``, ``name@3``, A/B splits
  with sticky per-user assignment) and the route store that moving an alias updates;
- ``engine_loop``: the engine's step loop in a thread, one asyncio stream per request;
- ``engine_proc``: the same in a child process that loads the model (``EngineConfig.process``: the default on CUDA);
- ``model_server``: one model version: load, tokenize, stream protocol-neutral events;
- ``protocol``: the OpenAI request models, response/chunk builders and error bodies;
- ``metrics``: Prometheus series of the gateway;
- ``gateway``: the FastAPI app (auth, validation, routing, SSE, metrics);
- ``sse``: the lean ASGI response that streams the gateway's SSE chunks;
- ``heap``: ``gc.freeze()`` once a serving process has started (full collections skip what it loaded);
- ``app``: the Ray Serve application (one app per model version + the gateway ingress).
"""
