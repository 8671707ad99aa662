"""The Ray Serve application: one Serve app per model version, a gateway ingress, a route store.

- Each ``ServedModel`` runs as its own Serve application (``moeflow-model-<name>-<version>``, no HTTP
  route): ``ModelServer`` as a deployment with ``num_replicas`` or an autoscaling range. Ray Serve
  balances a version's requests over its replicas (power of two choices on queue length), restarts a
  replica that dies, and drains a replica's requests before stopping it.
- The gateway (``moeflow-gateway``, route ``/``) is ``gateway.create_app`` as the ingress; its backend
  streams from a version's app through a ``DeploymentHandle`` (``stream=True``) and cancels the call
  when the client goes away.
- The route table lives in a named Ray actor (``moeflow-routes``) that every gateway replica reads
  per request. Moving an alias is one update of that actor: new requests go to the new version at
  once, requests in flight finish on the version they started on, nothing is restarted.

API keys (``MOEFLOW_SERVE_API_KEYS``, comma-separated) are hashed here, in the process that starts
serving; only the sha256 hashes reach the gateway replicas, so no key is in a deployment's config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..compute import ensure_ray, local_head_address
from .config import GatewayConfig, ServeConfig, ServedModel
from .routing import Arm, RouteTable

NAMESPACE = "moeflow"
ROUTE_STORE = "moeflow-routes"
GATEWAY_APP = "moeflow-gateway"
API_KEYS_ENV = "MOEFLOW_SERVE_API_KEYS"


def app_name(name: str, version: str) -> str:
    return f"moeflow-model-{name}-{version}"


def api_key_hashes(keys: list[str] | None = None) -> list[str]:
    from .gateway import hash_key

    if keys is None:
        keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",")]
    return sorted({hash_key(k) for k in keys if k})


# ---------------------------------------------------------------------- pieces that run in Ray
class RouteStoreActor:
    """The route table, shared by all gateway replicas (a named, detached actor)."""

    def __init__(self, table: dict) -> None:
        self.table = RouteTable.model_validate(table)

    def get(self) -> RouteTable:
        return self.table

    def update(self, table: dict) -> int:
        new = RouteTable.model_validate(table)
        if new.revision <= self.table.revision:
            raise ValueError(f"stale route table: revision {new.revision} <= {self.table.revision}")
        self.table = new
        return new.revision


class RayRouteStore:
    def __init__(self, actor) -> None:
        self.actor = actor

    async def get(self) -> RouteTable:
        return await self.actor.get.remote()


class RayBackend:
    """Streams from a version's Serve app; the call is cancelled when the consumer stops early."""

    def __init__(self) -> None:
        self._handles: dict[str, object] = {}

    def _handle(self, app: str):
        from ray import serve

        if app not in self._handles:
            self._handles[app] = serve.get_app_handle(app).options(stream=True)
        return self._handles[app]

    async def stream(self, route, payload: dict):
        response = self._handle(app_name(route.name, route.version)).generate.remote(payload)
        finished = False
        try:
            async for ev in response:
                yield ev
            finished = True
        finally:
            if not finished:
                response.cancel()


def _gateway_deployment(gateway: GatewayConfig):
    from ray import serve

    from .gateway import Gateway, create_app

    @serve.deployment(name="Gateway", num_replicas=gateway.num_replicas, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=max(gateway.max_inflight, 1) + 8, graceful_shutdown_timeout_s=60)
    @serve.ingress()
    class GatewayIngress:
        def __init__(self, config: dict, key_hashes: list[str], routes: dict | None = None) -> None:
            import ray

            actor = _route_store(routes) if routes is not None else ray.get_actor(ROUTE_STORE, namespace=NAMESPACE)
            store = RayRouteStore(actor)
            self.gateway = Gateway(GatewayConfig.model_validate(config), store, RayBackend(), set(key_hashes))

        def __serve_build_asgi_app__(self):
            return create_app(self.gateway)

    return GatewayIngress


def _model_deployment(spec: ServedModel):
    from ray import serve

    from .model_server import ModelServer

    opts: dict = dict(name="ModelServer", ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
                      max_ongoing_requests=spec.engine.max_batch + spec.engine.max_waiting,
                      graceful_shutdown_timeout_s=120, health_check_period_s=5)
    if spec.num_replicas == "auto":
        opts["autoscaling_config"] = {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                                      "target_ongoing_requests": spec.engine.max_batch}
    else:
        opts["num_replicas"] = spec.num_replicas
    return serve.deployment(**opts)(ModelServer)


def _route_store(routes: dict):
    """The route-store actor holding ``routes`` (created if absent; updated if it holds another table)."""
    import ray

    table = RouteTable.model_validate(routes)
    store = ray.remote(RouteStoreActor).options(name=ROUTE_STORE, namespace=NAMESPACE, lifetime="detached",
                                                get_if_exists=True, num_cpus=0).remote(table.model_dump())
    current = ray.get(store.get.remote())
    if current.model_dump(exclude={"revision"}) != table.model_dump(exclude={"revision"}):
        try:
            ray.get(store.update.remote(table.model_copy(update={"revision": current.revision + 1}).model_dump()))
        except ValueError:  # another gateway replica updated it first, to the same table
            pass
    return store


# ---------------------------------------------------------------------- Serve config builders (RayService)
# A Serve config file (what a KubeRay RayService's ``serveConfigV2`` holds) names an application by
# ``import_path`` and passes it ``args``; these two builders are those import paths. Ray Serve then
# owns deploying, scaling and upgrading (a changed config is rolled out by KubeRay without downtime).
def model_app(args: dict):
    """One model version (``args`` = a ``ServedModel``). Its application must be named
    ``moeflow-model-<name>-<version>`` (what the gateway's backend looks up); ``model_dir`` may be any
    model reference (``name@alias``, a store URI): each replica resolves and downloads it itself."""
    spec = ServedModel.model_validate(args)
    return _model_deployment(spec).bind(spec.model_dump())


def gateway_app(args: dict):
    """The gateway ingress (``args`` = ``{"gateway": GatewayConfig, "routes": RouteTable}``): its replicas
    create the route store with ``routes``; API keys come from the environment (``MOEFLOW_SERVE_API_KEYS``)
    and only their hashes are passed on."""
    unknown = set(args) - {"gateway", "routes"}
    if unknown:
        raise ValueError(f"gateway_app: unknown args {sorted(unknown)} (expected 'gateway' and 'routes')")
    gw = GatewayConfig.model_validate(args.get("gateway") or {})
    routes = RouteTable.model_validate(args["routes"])
    return _gateway_deployment(gw).bind(gw.model_dump(), api_key_hashes(), routes.model_dump())


# ---------------------------------------------------------------------- control (the driver side)
@dataclass
class Serving:
    """What ``start`` started: the HTTP address and the route store to change aliases with."""

    url: str
    store: object  # the RouteStoreActor handle

    def table(self) -> RouteTable:
        import ray

        return ray.get(self.store.get.remote())

    def update(self, table: RouteTable) -> int:
        import ray

        return ray.get(self.store.update.remote(table.model_dump()))

    def move_alias(self, name: str, alias: str, version: str) -> RouteTable:
        """Point ``name@alias`` at ``version``: new requests go there at once, in-flight ones finish."""
        table = self.table().with_alias(name, alias, version)
        self.update(table)
        return table

    def set_split(self, name: str, arms: list[Arm] | None) -> RouteTable:
        table = self.table().with_split(name, arms)
        self.update(table)
        return table

    def add_version(self, spec: ServedModel) -> RouteTable:
        """Deploy one more version (its own Serve app) and make it routable."""
        deploy_version(spec)
        table = self.table().with_version(spec.name, spec.version)
        self.update(table)
        return table


def deploy_version(spec: ServedModel) -> None:
    from ray import serve

    serve.run(_model_deployment(spec).bind(spec.model_dump()), name=spec.app_name, route_prefix=None)


def start(config: ServeConfig, *, api_keys: list[str] | None = None, settings=None) -> Serving:
    """Deploy every version, the route store and the gateway on the local (or configured) Ray.

    All applications are submitted in one ``run_many``, so their replicas start side by side.
    """
    from ray import serve
    from ray.serve.api import RunTarget

    ensure_ray(settings)
    gw = config.gateway
    serve.start(http_options={"host": gw.host, "port": gw.port})
    versions: dict[str, list[str]] = {}
    for spec in config.models:
        versions.setdefault(spec.name, []).append(spec.version)
    table = RouteTable(versions=versions, aliases=config.aliases, default_alias=gw.default_alias, revision=1)
    for name, arms in config.splits.items():
        table = table.with_split(name, [Arm.model_validate(a) for a in arms])  # every arm must resolve
    store = _route_store(table.model_dump())
    targets = [RunTarget(_model_deployment(s).bind(s.model_dump()), name=s.app_name, route_prefix=None)
               for s in config.models]
    targets.append(RunTarget(_gateway_deployment(gw).bind(gw.model_dump(), api_key_hashes(api_keys)),
                             name=GATEWAY_APP, route_prefix="/"))
    serve.run_many(targets)
    return Serving(url=f"http://{gw.host}:{gw.port}", store=store)


def running_gateway(settings=None) -> "Serving | None":
    """The serving set-up on the configured / local Ray cluster, if a gateway runs there (never starts Ray)."""
    import ray

    from ..settings import get_settings

    settings = settings or get_settings()
    if not ray.is_initialized() and not (settings.ray_address or local_head_address(settings)):
        return None
    ensure_ray(settings)
    try:
        store = ray.get_actor(ROUTE_STORE, namespace=NAMESPACE)
    except ValueError:
        return None
    return Serving(url="", store=store)


def sync_alias(name: str, alias: str, version: str, model_dir: str | None, *, settings=None,
               template: ServedModel | None = None) -> str:
    """Make a running gateway follow an alias move: deploy ``version`` if it is not served yet
    (like ``template``, or defaults), then move ``name@alias``. Returns what was done, in words."""
    serving = running_gateway(settings)
    if serving is None:
        return "no gateway is running: the alias is read when `moeflow serve` starts"
    table = serving.table()
    if version not in table.versions.get(name, []):
        if model_dir is None:
            return f"the gateway does not serve {name}@{version} and no export was given: not moved"
        base = template.model_dump() if template is not None else {}
        spec = ServedModel.model_validate({**base, "name": name, "version": version, "model_dir": model_dir})
        serving.add_version(spec)
    serving.move_alias(name, alias, version)
    return f"the gateway now answers {name}@{alias} with version {version}"


def shutdown() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    try:
        ray.kill(ray.get_actor(ROUTE_STORE, namespace=NAMESPACE))
    except ValueError:
        pass
