"""The management REST API of a running cluster, served by the supervisor
process beside the ``Cluster`` it manages. Its nouns follow ``az acr``:
replications, repositories; it is what the ``georeg`` CLI talks to. While it
serves, it keeps the data dir's state file (``cluster.control.state``), by
which other processes find it.

    GET    /georeg/v1/cluster                     status: nodes, replicas, endpoints
    GET    /georeg/v1/replications                replicas (ACR's replication resources)
    POST   /georeg/v1/replications                {"location", "zoneRedundancy", "regionEndpointEnabled"}
    GET    /georeg/v1/replications/{region}
    PATCH  /georeg/v1/replications/{region}       {"regionEndpointEnabled": false}
    DELETE /georeg/v1/replications/{region}
    GET    /georeg/v1/faults                      faults injected (cluster.faults.controller)
    POST   /georeg/v1/faults                      {"kind", "duration_s", "flap", "flap_jitter",
                                                   "flap_seed", …target}
    DELETE /georeg/v1/faults[/{id}]               heal one, or all
    GET    /georeg/v1/repositories                the catalog of every region: {"repositories":
                                                  [{"name", "regions"}], "unavailable"}
    GET    /georeg/v1/repositories/{name}/tags    per tag, the digest each region resolves it to
    GET|PATCH /georeg/v1/repositories/{name}/acr[?tag=T|?digest=D]
                                                  ACR's properties and changeable attributes of the
                                                  repository, a tag or a manifest (the node's
                                                  /acr/v1/ answer, from the first region holding it)
    GET    /georeg/v1/repositories/{name}/acr/_tags|_manifests[?orderby&n&last&stamp]
                                                  ACR's listings with times and attributes
    DELETE /georeg/v1/repositories/{name}/_untag/{tag}  remove the tag only
    GET    /georeg/v1/repositories/{name}/_deleted  soft delete's recycle bin (az acr manifest
                                                  list-deleted, list-deleted-tags)
    POST   /georeg/v1/repositories/{name}/_restore/{tag|digest}[?force=true]
                                                  az acr manifest restore (registry_node.recycle_bin)
    DELETE /georeg/v1/repositories/{name}/_images/{tag|digest}
                                                  delete the manifest and every tag on it (ACR);
                                                  ``_`` because no component of a repository
                                                  name starts with one (``images`` may be one)
    DELETE /georeg/v1/repositories/{name}         delete every manifest and tag of a repository in
                                                  every region that holds it (ACR's
                                                  DELETE /acr/v1/{name} on a node of each)
    POST   /georeg/v1/imports                     az acr import: {"source", "targetTags",
                                                  "untaggedTargetRepositories", "mode":
                                                  "NoForce"|"Force", "includeReferrers",
                                                  "region", "username", "password",
                                                  "sourceCaPem"}; 200 with what was copied
                                                  (``cluster.control.imports``)
    POST   /georeg/v1/builds?image=REPO:TAG[&file&buildArg=K=V…&region&timeout]
                                                  az acr build: the body is the context (a tar,
                                                  gzip or not); the caller's registry login in
                                                  ``X-Registry-Authorization: Basic …``; 202 with
                                                  the queued run (``cluster.control.builds``)
    GET    /georeg/v1/tasks                       tasks (az acr task list; ``cluster.control.tasks``)
    POST   /georeg/v1/tasks                       {"name", "image", "contextPath", "file", "region",
                                                  "buildArgs", "timeout", "status",
                                                  "baseImageTriggerEnabled", "branch",
                                                  "commitTriggerEnabled"}; triggered runs:
                                                  ``cluster.control.triggers``
    GET    /georeg/v1/tasks/{name}
    PATCH  /georeg/v1/tasks/{name}                az acr task update: the fields given change
    DELETE /georeg/v1/tasks/{name}
    POST   /georeg/v1/tasks/{name}/runs           az acr task run: 202 with the queued run (the
                                                  caller's login as for a build)
    GET    /georeg/v1/runs[?task=NAME]            runs, newest first (az acr task list-runs)
    GET    /georeg/v1/runs/{id}                   one run: status, images, base images, times
    GET    /georeg/v1/runs/{id}/log[?follow=true] its log (text), followed until the run ends
    POST   /georeg/v1/runs/{id}/cancel            az acr task cancel-run
    POST   /georeg/v1/regions/{region}/restore    rebuild a region from its paired copy
    GET    /georeg/v1/verify[?timeout=S]          convergence check (cluster.faults.verify), as JSON
    POST   /georeg/v1/shutdown                    stop the cluster
    POST   /georeg/v1/dashboard/login-tokens      a one-time token that signs a browser in to the
                                                  dashboard (``georeg dashboard``)
    GET    /dashboard/                            the live web dashboard, its assets and its own
                                                  API under /dashboard/api/ (``dashboard``)
    GET    /georeg/v1/registry                    the registry: name, location, loginServer, sku,
                                                  adminUserEnabled, anonymousPullEnabled, …
    PATCH  /georeg/v1/registry                    {"adminUserEnabled", "anonymousPullEnabled",
                                                  "sku": "Basic"|"Standard"|"Premium" or
                                                  {"name": …[, "tier": …]}}: a refused tier
                                                  change is a 409
                                                  that names every reason (``sku``)
    GET    /georeg/v1/registry/retention          az acr config retention show: {"type", "days",
                                                  "status", "enabledSince"} (``lifecycle``)
    PATCH  /georeg/v1/registry/retention          {"days": 0..365, "status": "enabled"|"disabled"}
    GET    /georeg/v1/schedules                   the spec's [[schedules]], each with its last run
                                                  and next time (``schedules``)
    POST   /georeg/v1/schedules/{name}/run        run one now: its run ({"started", "ended",
                                                  "result", "detail"})
    GET    /georeg/v1/registry/soft-delete        az acr config soft-delete show: {"status":
                                                  "enabled"|"disabled", "retentionDays"}
    PATCH  /georeg/v1/registry/soft-delete        {"status", "retentionDays": 1..90}, written at
                                                  home (``cluster.control.soft_delete``)
    GET    /georeg/v1/registry/usages             az acr show-usage: {"value": [{name,
                                                  currentValue, limit, unit}], "storage",
                                                  "replicas"} (``cluster.control.usage``)
    GET    /georeg/v1/registry/health             az acr check-health: {"healthy", "checks",
                                                  "broken"} (``cluster.control.health``)
    GET    /georeg/v1/registry/credentials        the admin user's name and passwords
                                                  (az acr credential show)
    POST   /georeg/v1/registry/credentials/renew  {"name": "password"|"password2"}
    GET    /georeg/v1/scope-maps                  system and user scope maps
    POST   /georeg/v1/scope-maps                  {"name", "repositories": [[REPO, ACTION...]],
                                                  "description"}
    GET    /georeg/v1/scope-maps/{name}
    PATCH  /georeg/v1/scope-maps/{name}           {"addRepositories", "removeRepositories",
                                                  "description"}
    DELETE /georeg/v1/scope-maps/{name}
    GET    /georeg/v1/tokens                      tokens (never a password)
    POST   /georeg/v1/tokens                      {"name", "scopeMap" | "repositories", "status",
                                                  "expirationInDays"}: both passwords, once
    GET    /georeg/v1/tokens/{name}
    PATCH  /georeg/v1/tokens/{name}               {"scopeMap", "status"}
    DELETE /georeg/v1/tokens/{name}
    POST   /georeg/v1/tokens/{name}/credentials   {"name": "password1"|"password2",
                                                  "expirationInDays"}: the new password, once
    GET    /georeg/v1/identities                  identities (never a secret)
    POST   /georeg/v1/identities                  {"name"}: its id and secret, once
    DELETE /georeg/v1/identities/{id}             it and its role assignments
    GET    /georeg/v1/role-assignments[?assignee=ID]
    POST   /georeg/v1/role-assignments            {"role", "assignee", "scope": "repository/NAME"}
    DELETE /georeg/v1/role-assignments/{id}
    GET    /georeg/v1/cache-rules                 cache rules (az acr cache list)
    POST   /georeg/v1/cache-rules                 {"name", "sourceRepository", "targetRepository",
                                                  "credentialSetName"?} (az acr cache create)
    GET    /georeg/v1/cache-rules/{name}
    DELETE /georeg/v1/cache-rules/{name}
    GET    /georeg/v1/credential-sets             credential sets (never a password)
    POST   /georeg/v1/credential-sets             {"name", "loginServer", "username", "password"}
    GET    /georeg/v1/credential-sets/{name}
    PATCH  /georeg/v1/credential-sets/{name}      {"username"?, "password"}
    DELETE /georeg/v1/credential-sets/{name}      refused while a cache rule uses it
    GET    /georeg/v1/webhooks                    webhooks (never a URI or header value)
    POST   /georeg/v1/webhooks                    {"name", "serviceUri", "actions", "scope",
                                                  "customHeaders", "status", "location",
                                                  "receiverLocation"}
    GET    /georeg/v1/webhooks/{name}
    PATCH  /georeg/v1/webhooks/{name}             any of the fields above but "name"; the rest stay
    DELETE /georeg/v1/webhooks/{name}
    GET    /georeg/v1/webhooks/{name}/config      {"serviceUri", "customHeaders"} (az's get-config)
    POST   /georeg/v1/webhooks/{name}/ping        202 {"id"}: a ping queued in the webhook's region
    GET    /georeg/v1/webhooks/{name}/events[?limit=N]
                                                  its deliveries, newest first, from its region
    POST   /georeg/v1/webhooks/{name}/events/{id}/redeliver
                                                  202 {"id"}: that event sent again
    GET    /georeg/v1/configuration/{kind}        registry configuration objects of one kind
                                                  (a webhook's header values as "***")
    GET    /georeg/v1/configuration/{kind}/{name}
    PUT    /georeg/v1/configuration/{kind}/{name} the object's value (JSON), validated at home
                                                  (not for identities or webhooks: their
                                                  routes above)
    DELETE /georeg/v1/configuration/{kind}/{name}

On a cluster with auth (``cluster.control.access``) every route answers only
the cluster owner: a request without ``Authorization: Bearer <owner
credential>`` gets ``401 Unauthorized``, whose message says where the
credential is kept; the CLI sends it from the data dir. Reading status is
refused too: it names data dirs and processes, and ``verify`` costs work.
The dashboard's page and sign-in are the exception; its API answers the
owner credential or a dashboard session (``dashboard``: a viewer's session
reads, only an owner's changes), and no other route accepts a session.

Errors are JSON ``{"error": {"code", "message"}}`` with a fitting status; a
management write while the home region cannot be reached is a 503 that says so
(registry configuration included: its writes go to a home node, which
validates, stamps and logs them; replication delivers them everywhere).
Repository reads and deletes go through the data plane of one node of every
region (``cluster.control.repositories``): a region that cannot be asked is
named in the answer's ``unavailable``, never left out in silence.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

from aiohttp import web

from registry_node.errors import RegistryError
from registry_node.reference import is_digest, validate_name

from ..faults.controller import FaultError
from . import soft_delete
from .access import authorization, owner_credential_path
from .builds import BuildRuns, build_request
from .dashboard import OWNER, ROLE, Dashboard
from .errors import ClusterError, NotFound
from .health import check_health
from .imports import ImageImports, import_request
from .regions import REGIONS, unknown_region_message
from .repositories import Repositories
from .request_body import field as _field
from .request_body import json_object as _json
from .state import clear_running_state, write_running_state
from .tasks import RegistryTasks
from .triggers import TaskTriggers

if TYPE_CHECKING:                      # the API serves a Cluster; the Cluster never sees the API
    from .cluster import Cluster


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ClusterError as exc:
        return _error(exc.status, exc.code, str(exc))
    except ValueError as exc:  # spec validation and bad input
        return _error(400, "BadRequest", str(exc))
    except RegistryError as exc:
        return _error(exc.status, exc.code.name, exc.message + (f": {exc.detail}" if exc.detail else ""))


def _access(cluster: Cluster, dashboard: Dashboard):
    """A middleware admitting the cluster owner's credential everywhere (everyone
    without auth), a dashboard session on the dashboard's own API
    (``Dashboard.session_role``), and anyone on the dashboard's page and sign-in;
    the role is ``request[ROLE]``."""
    where = owner_credential_path(cluster.data_dir)
    expected = (authorization(cluster.secrets.owner)["Authorization"].encode()
                if cluster.secrets is not None else None)

    @web.middleware
    async def access(request: web.Request, handler):
        sent = request.headers.get("Authorization", "")
        if expected is None or hmac.compare_digest(sent.encode(errors="replace"), expected):
            request[ROLE] = OWNER
            return await handler(request)
        role = dashboard.session_role(request)
        if role is not None:
            request[ROLE] = role
            return await handler(request)
        if dashboard.is_public(request):
            return await handler(request)
        response = _error(401, "Unauthorized",
                          f"this cluster's management API answers only its owner: send the owner "
                          f"credential as `Authorization: Bearer <credential>`. It is kept in "
                          f"{where} (mode 0600), made when the cluster first started; georeg "
                          f"commands run by that user with --data-dir {cluster.data_dir} send it"
                          + ("; the dashboard's API takes a session from its sign-in too"
                             if request.path.startswith("/dashboard/") else ""))
        response.headers["WWW-Authenticate"] = 'Bearer realm="georeg management"'
        return response

    return access


def _sku_name(sku: object) -> str:
    """The tier a PATCH names: ``"Basic"``, or ARM's sku object as ``az acr
    show`` prints it, ``{"name": "Basic", "tier": "Basic"}`` (``tier`` may be
    left out; given, it is the name again, as ARM has it for a registry)."""
    if isinstance(sku, dict) and "name" in sku and set(sku) <= {"name", "tier"}:
        name, tier = sku["name"], sku.get("tier", sku["name"])
        if isinstance(name, str) and (not isinstance(tier, str)
                                      or tier.strip().lower() != name.strip().lower()):
            raise ClusterError(f"sku.name {name[:32]!r} and sku.tier {str(tier)[:32]!r} differ: "
                               f"a registry's tier is its sku's name (give the name alone)")
        sku = name
    if not isinstance(sku, str):
        raise ClusterError(f'sku is "Basic", "Standard" or "Premium" (or {{"name": …, '
                           f'"tier": …}}), not {sku!r}'[:200])
    return sku


class ManagementServer:
    """``async with ManagementServer(cluster):`` serves the API (and keeps the
    state file) for as long as the block runs."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.repositories = Repositories(cluster)
        self.imports = ImageImports(cluster)
        self.builds = BuildRuns(cluster)
        self.tasks = RegistryTasks(cluster, self.builds)
        self.triggers = TaskTriggers(cluster, self.tasks, self.builds)
        self._runner: web.AppRunner | None = None
        self.dashboard = Dashboard(cluster, faults={
            "inject": self.inject_fault, "heal": self.heal_fault, "heal_all": self.heal_all})

    @property
    def url(self) -> str:
        host, port = self.cluster.management_address
        return f"{self.cluster.scheme}://{host}:{port}"

    async def __aenter__(self) -> ManagementServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.builds.recover()
        app = web.Application(middlewares=[_access(self.cluster, self.dashboard), _errors])
        r = app.router
        self.dashboard.add_routes(r)
        r.add_get("/georeg/v1/cluster", self.cluster_status)
        r.add_get("/georeg/v1/replications", self.list_replications)
        r.add_post("/georeg/v1/replications", self.create_replication)
        r.add_get("/georeg/v1/replications/{region}", self.show_replication)
        r.add_patch("/georeg/v1/replications/{region}", self.update_replication)
        r.add_delete("/georeg/v1/replications/{region}", self.delete_replication)
        r.add_get("/georeg/v1/repositories", self.list_repositories)
        r.add_get("/georeg/v1/repositories/{name:.+}/tags", self.show_tags)
        # ACR's data plane about one repository, through a node of the first
        # region that holds it (``Repositories.on_data_plane``).
        r.add_get("/georeg/v1/repositories/{name:.+}/acr", self.acr_metadata)
        r.add_patch("/georeg/v1/repositories/{name:.+}/acr", self.acr_metadata)
        r.add_get("/georeg/v1/repositories/{name:.+}/acr/_tags", self.acr_listing)
        r.add_get("/georeg/v1/repositories/{name:.+}/acr/_manifests", self.acr_listing)
        # The actions start with ``_``, which no component of a repository
        # name can: ``…/team/images/base`` is the repository team/images/base.
        r.add_delete("/georeg/v1/repositories/{name:.+}/_untag/{tag}", self.untag)
        r.add_get("/georeg/v1/repositories/{name:.+}/_deleted", self.list_deleted)
        r.add_post("/georeg/v1/repositories/{name:.+}/_restore/{reference}", self.restore)
        r.add_delete("/georeg/v1/repositories/{name:.+}/_images/{reference}", self.delete_image)
        r.add_delete("/georeg/v1/repositories/{name:.+}", self.delete_repository)
        r.add_post("/georeg/v1/imports", self.import_image)
        r.add_post("/georeg/v1/builds", self.start_build)
        r.add_get("/georeg/v1/tasks", self.list_tasks)
        r.add_post("/georeg/v1/tasks", self.create_task)
        r.add_get("/georeg/v1/tasks/{name}", self.show_task)
        r.add_patch("/georeg/v1/tasks/{name}", self.update_task)
        r.add_delete("/georeg/v1/tasks/{name}", self.delete_task)
        r.add_post("/georeg/v1/tasks/{name}/runs", self.run_task)
        r.add_get("/georeg/v1/runs", self.list_runs)
        r.add_get("/georeg/v1/runs/{id}", self.show_run)
        r.add_get("/georeg/v1/runs/{id}/log", self.run_log)
        r.add_post("/georeg/v1/runs/{id}/cancel", self.cancel_run)
        r.add_get("/georeg/v1/registry", self.show_registry)
        r.add_patch("/georeg/v1/registry", self.update_registry)
        r.add_get("/georeg/v1/registry/retention", self.show_retention)
        r.add_patch("/georeg/v1/registry/retention", self.update_retention)
        r.add_get("/georeg/v1/schedules", self.list_schedules)
        r.add_post("/georeg/v1/schedules/{name}/run", self.run_schedule)
        r.add_get("/georeg/v1/registry/soft-delete", self.show_soft_delete)
        r.add_patch("/georeg/v1/registry/soft-delete", self.update_soft_delete)
        r.add_get("/georeg/v1/registry/usages", self.show_usage)
        r.add_get("/georeg/v1/registry/health", self.check_health)
        r.add_get("/georeg/v1/registry/credentials", self.show_credentials)
        r.add_post("/georeg/v1/registry/credentials/renew", self.renew_credential)
        r.add_get("/georeg/v1/scope-maps", self.list_scope_maps)
        r.add_post("/georeg/v1/scope-maps", self.create_scope_map)
        r.add_get("/georeg/v1/scope-maps/{name}", self.show_scope_map)
        r.add_patch("/georeg/v1/scope-maps/{name}", self.update_scope_map)
        r.add_delete("/georeg/v1/scope-maps/{name}", self.delete_scope_map)
        r.add_get("/georeg/v1/tokens", self.list_tokens)
        r.add_post("/georeg/v1/tokens", self.create_token)
        r.add_get("/georeg/v1/tokens/{name}", self.show_token)
        r.add_patch("/georeg/v1/tokens/{name}", self.update_token)
        r.add_delete("/georeg/v1/tokens/{name}", self.delete_token)
        r.add_post("/georeg/v1/tokens/{name}/credentials", self.generate_token_password)
        r.add_get("/georeg/v1/identities", self.list_identities)
        r.add_post("/georeg/v1/identities", self.create_identity)
        r.add_delete("/georeg/v1/identities/{id}", self.delete_identity)
        r.add_get("/georeg/v1/role-assignments", self.list_role_assignments)
        r.add_post("/georeg/v1/role-assignments", self.create_role_assignment)
        r.add_delete("/georeg/v1/role-assignments/{id}", self.delete_role_assignment)
        r.add_get("/georeg/v1/cache-rules", self.list_cache_rules)
        r.add_post("/georeg/v1/cache-rules", self.create_cache_rule)
        r.add_get("/georeg/v1/cache-rules/{name}", self.show_cache_rule)
        r.add_delete("/georeg/v1/cache-rules/{name}", self.delete_cache_rule)
        r.add_get("/georeg/v1/credential-sets", self.list_credential_sets)
        r.add_post("/georeg/v1/credential-sets", self.create_credential_set)
        r.add_get("/georeg/v1/credential-sets/{name}", self.show_credential_set)
        r.add_patch("/georeg/v1/credential-sets/{name}", self.update_credential_set)
        r.add_delete("/georeg/v1/credential-sets/{name}", self.delete_credential_set)
        r.add_get("/georeg/v1/webhooks", self.list_webhooks)
        r.add_post("/georeg/v1/webhooks", self.create_webhook)
        r.add_get("/georeg/v1/webhooks/{name}", self.show_webhook)
        r.add_patch("/georeg/v1/webhooks/{name}", self.update_webhook)
        r.add_delete("/georeg/v1/webhooks/{name}", self.delete_webhook)
        r.add_get("/georeg/v1/webhooks/{name}/config", self.webhook_config)
        r.add_post("/georeg/v1/webhooks/{name}/ping", self.ping_webhook)
        r.add_get("/georeg/v1/webhooks/{name}/events", self.webhook_events)
        r.add_post("/georeg/v1/webhooks/{name}/events/{id}/redeliver", self.redeliver_event)
        r.add_get("/georeg/v1/configuration/{kind}", self.list_configuration)
        r.add_get("/georeg/v1/configuration/{kind}/{name}", self.show_configuration)
        r.add_put("/georeg/v1/configuration/{kind}/{name}", self.set_configuration)
        r.add_delete("/georeg/v1/configuration/{kind}/{name}", self.delete_configuration)
        r.add_post("/georeg/v1/shutdown", self.shutdown)
        r.add_get("/georeg/v1/verify", self.verify)
        r.add_post("/georeg/v1/regions/{region}/restore", self.restore_region)
        r.add_get("/georeg/v1/faults", self.list_faults)
        r.add_get("/georeg/v1/links", self.list_links)
        r.add_post("/georeg/v1/faults", self.inject_fault)
        r.add_delete("/georeg/v1/faults", self.heal_all)
        r.add_delete("/georeg/v1/faults/{id}", self.heal_fault)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        reserved = self.cluster.take_management_socket()   # bound when the cluster started
        # On a TLS cluster, HTTPS with the endpoints' certificate: the owner
        # credential never crosses a network in clear.
        tls = self.cluster.tls.server if self.cluster.tls is not None else None
        if reserved is not None:
            site: web.BaseSite = web.SockSite(self._runner, reserved, ssl_context=tls)
        else:
            host, port = self.cluster.management_address
            site = web.TCPSite(self._runner, host, port, reuse_address=True, ssl_context=tls)
        await site.start()
        self.triggers.start()
        write_running_state(self.cluster.data_dir, self.url, self.cluster.started_at)

    async def stop(self) -> None:
        clear_running_state(self.cluster.data_dir)
        await self.triggers.stop()
        await self.builds.stop()
        await self.dashboard.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- cluster & replicas ------------------------------------------------------------

    async def cluster_status(self, request: web.Request) -> web.Response:
        return web.json_response({**self.cluster.status(), "management": self.url})

    async def list_replications(self, request: web.Request) -> web.Response:
        return web.json_response([self.cluster.replica_status(r.region)
                                  for r in self.cluster.spec.all_replicas])

    async def show_replication(self, request: web.Request) -> web.Response:
        return web.json_response(self.cluster.replica_status(request.match_info["region"]))

    async def create_replication(self, request: web.Request) -> web.Response:
        body = await _json(request)
        region = body.get("location") or body.get("region")
        if not isinstance(region, str):
            raise ClusterError("give the replica's region as \"location\"")
        if region not in REGIONS:
            raise ClusterError(unknown_region_message(region))
        zone = body.get("zoneRedundancy", "Disabled")
        zone_redundant = zone is True or str(zone).lower() in ("enabled", "true")
        routing = body.get("regionEndpointEnabled", True)
        status = await self.cluster.create_replication(region, zone_redundant=zone_redundant,
                                                       global_routing=bool(routing))
        return web.json_response(status, status=201)

    async def update_replication(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if "regionEndpointEnabled" not in body:
            raise ClusterError("nothing to update: send {\"regionEndpointEnabled\": true|false}")
        status = await self.cluster.update_replication(
            request.match_info["region"], global_routing=bool(body["regionEndpointEnabled"]))
        return web.json_response(status)

    async def delete_replication(self, request: web.Request) -> web.Response:
        await self.cluster.delete_replication(request.match_info["region"])
        return web.Response(status=204)

    async def restore_region(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.restore_region(request.match_info["region"]))

    async def shutdown(self, request: web.Request) -> web.Response:
        asyncio.get_running_loop().call_soon(self.cluster.request_stop)
        return web.json_response({"stopping": True}, status=202)

    async def verify(self, request: web.Request) -> web.Response:
        try:
            timeout = float(request.query.get("timeout", 60))
        except ValueError:
            raise ClusterError("timeout must be a number of seconds") from None
        return web.json_response((await self.cluster.verify(timeout)).as_dict())

    # -- registry configuration ------------------------------------------------------------

    async def show_registry(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.registry_properties())

    async def update_registry(self, request: web.Request) -> web.Response:
        body = await _json(request)
        switches = {"adminUserEnabled": "admin_enabled",
                    "anonymousPullEnabled": "anonymous_pull_enabled"}
        _only_fields(body, {*switches, "sku"},
                     '{"adminUserEnabled": true|false, "anonymousPullEnabled": true|false, '
                     '"sku": "Basic"|"Standard"|"Premium"}', empty_ok=False)
        changes: dict = {}
        for field, name in switches.items():
            if field in body:
                if not isinstance(body[field], bool):
                    raise ClusterError(f"{field} is true or false, not {body[field]!r}")
                changes[name] = body[field]
        if "sku" in body:
            changes["sku"] = _sku_name(body["sku"])
        return web.json_response(await self.cluster.update_registry(**changes))

    async def show_retention(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.lifecycle.retention())

    async def update_retention(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only_fields(body, {"days", "status"}, '{"days": 0..365, "status": "enabled"|"disabled"}')
        return web.json_response(await self.cluster.lifecycle.update_retention(
            days=body.get("days"), status=body.get("status")))

    async def list_schedules(self, request: web.Request) -> web.Response:
        return web.json_response(self.cluster.schedules.listing())

    async def run_schedule(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.cluster.schedules.schedules:
            raise NotFound(f"no schedule {name[:64]!r}; the spec's schedules are "
                           f"{', '.join(self.cluster.schedules.schedules) or 'none'}")
        return web.json_response((await self.cluster.schedules.run_now(name, manual=True)).as_dict())

    async def show_usage(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.usage())

    async def check_health(self, request: web.Request) -> web.Response:
        return web.json_response(await check_health(self.cluster))

    async def list_configuration(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.list_configuration(request.match_info["kind"]))

    async def show_configuration(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.get_configuration(
            request.match_info["kind"], request.match_info["name"]))

    async def set_configuration(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.set_configuration(
            request.match_info["kind"], request.match_info["name"], await _json(request)))

    async def delete_configuration(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.delete_configuration(
            request.match_info["kind"], request.match_info["name"]))

    # -- identities (cluster.control.identities) ---------------------------------------------

    async def show_credentials(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.access.admin_credentials())

    async def renew_credential(self, request: web.Request) -> web.Response:
        body = await _json(request)
        return web.json_response(await self.cluster.access.renew_admin_password(
            _field(body, "name", str)))

    async def list_scope_maps(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.access.list_scope_maps())

    async def show_scope_map(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.access.show_scope_map(request.match_info["name"]))

    async def create_scope_map(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "name", "repositories", "description")
        created = await self.cluster.access.create_scope_map(
            _field(body, "name", str), _field(body, "repositories", list, []),
            _field(body, "description", str, ""))
        return web.json_response(created, status=201)

    async def update_scope_map(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "addRepositories", "removeRepositories", "description")
        return web.json_response(await self.cluster.access.update_scope_map(
            request.match_info["name"], add=_field(body, "addRepositories", list, []),
            remove=_field(body, "removeRepositories", list, []),
            description=_field(body, "description", str, None)))

    async def delete_scope_map(self, request: web.Request) -> web.Response:
        await self.cluster.access.delete_scope_map(request.match_info["name"])
        return web.Response(status=204)

    async def list_tokens(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.access.list_tokens())

    async def show_token(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.access.show_token(request.match_info["name"]))

    async def create_token(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "name", "scopeMap", "repositories", "status", "expirationInDays")
        created = await self.cluster.access.create_token(
            _field(body, "name", str), scope_map=_field(body, "scopeMap", str, None),
            repositories=_field(body, "repositories", list, []),
            status=_field(body, "status", str, "enabled"),
            expiration_in_days=_field(body, "expirationInDays", int, None))
        return web.json_response(created, status=201)

    async def update_token(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "scopeMap", "status")
        return web.json_response(await self.cluster.access.update_token(
            request.match_info["name"], scope_map=_field(body, "scopeMap", str, None),
            status=_field(body, "status", str, None)))

    async def delete_token(self, request: web.Request) -> web.Response:
        await self.cluster.access.delete_token(request.match_info["name"])
        return web.Response(status=204)

    async def generate_token_password(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "name", "expirationInDays")
        return web.json_response(await self.cluster.access.generate_token_password(
            request.match_info["name"], _field(body, "name", str),
            _field(body, "expirationInDays", int, None)))

    async def list_identities(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.access.list_identities())

    async def create_identity(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "name")
        return web.json_response(await self.cluster.access.create_identity(
            _field(body, "name", str)), status=201)

    async def delete_identity(self, request: web.Request) -> web.Response:
        await self.cluster.access.delete_identity(request.match_info["id"])
        return web.Response(status=204)

    async def list_role_assignments(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.access.list_role_assignments(
            request.query.get("assignee")))

    async def create_role_assignment(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "role", "assignee", "scope")
        return web.json_response(await self.cluster.access.create_role_assignment(
            _field(body, "role", str), _field(body, "assignee", str),
            _field(body, "scope", str, None)), status=201)

    async def delete_role_assignment(self, request: web.Request) -> web.Response:
        await self.cluster.access.delete_role_assignment(request.match_info["id"])
        return web.Response(status=204)

    # -- webhooks (cluster.control.webhooks) -------------------------------------------------

    _WEBHOOK_FIELDS = {"serviceUri": ("uri", str), "actions": ("actions", list),
                       "scope": ("scope", str), "customHeaders": ("headers", dict),
                       "status": ("status", str), "location": ("location", str),
                       "receiverLocation": ("receiver_location", str)}

    def _webhook_fields(self, body: dict) -> dict:
        return {argument: _field(body, field, kind, None)
                for field, (argument, kind) in self._WEBHOOK_FIELDS.items()}

    async def list_webhooks(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.webhooks.list())

    async def show_webhook(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.webhooks.show(request.match_info["name"]))

    async def create_webhook(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "name", *self._WEBHOOK_FIELDS)
        fields = self._webhook_fields(body)
        if fields["uri"] is None or fields["actions"] is None:
            raise ClusterError("give 'serviceUri' and 'actions'")
        created = await self.cluster.webhooks.create(
            _field(body, "name", str), uri=fields["uri"], actions=fields["actions"],
            scope=fields["scope"] or "", headers=fields["headers"],
            status=fields["status"] or "enabled", location=fields["location"],
            receiver_location=fields["receiver_location"] or "")
        return web.json_response(created, status=201)

    async def update_webhook(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, *self._WEBHOOK_FIELDS)
        return web.json_response(await self.cluster.webhooks.update(
            request.match_info["name"], **self._webhook_fields(body)))

    async def delete_webhook(self, request: web.Request) -> web.Response:
        await self.cluster.webhooks.delete(request.match_info["name"])
        return web.Response(status=204)

    async def webhook_config(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.webhooks.get_config(
            request.match_info["name"]))

    async def ping_webhook(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.webhooks.ping(request.match_info["name"]),
                                 status=202)

    async def webhook_events(self, request: web.Request) -> web.Response:
        limit = request.query.get("limit")
        if limit is not None and not (limit.isascii() and limit.isdigit()):
            raise ClusterError(f"limit is a whole number, not {limit[:20]!r}")
        return web.json_response(await self.cluster.webhooks.events(
            request.match_info["name"], int(limit) if limit is not None else None))

    async def redeliver_event(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.webhooks.redeliver(
            request.match_info["name"], request.match_info["id"]), status=202)

    # -- the pull-through cache (cluster.control.cache) -------------------------------------

    async def list_cache_rules(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.cache.list_rules())

    async def show_cache_rule(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.cache.show_rule(request.match_info["name"]))

    async def create_cache_rule(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "name", "sourceRepository", "targetRepository", "credentialSetName")
        return web.json_response(await self.cluster.cache.create_rule(
            _field(body, "name", str), source_repo=_field(body, "sourceRepository", str),
            target_repo=_field(body, "targetRepository", str),
            credential_set=_field(body, "credentialSetName", str, None)), status=201)

    async def delete_cache_rule(self, request: web.Request) -> web.Response:
        await self.cluster.cache.delete_rule(request.match_info["name"])
        return web.Response(status=204)

    async def list_credential_sets(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.cache.list_credential_sets())

    async def show_credential_set(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster.cache.show_credential_set(
            request.match_info["name"]))

    async def create_credential_set(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "name", "loginServer", "username", "password")
        return web.json_response(await self.cluster.cache.create_credential_set(
            _field(body, "name", str), login_server=_field(body, "loginServer", str),
            username=_field(body, "username", str), password=_field(body, "password", str)),
            status=201)

    async def update_credential_set(self, request: web.Request) -> web.Response:
        body = await _json(request)
        _only(body, "username", "password")
        return web.json_response(await self.cluster.cache.update_credential_set(
            request.match_info["name"], username=_field(body, "username", str, None),
            password=_field(body, "password", str, None)))

    async def delete_credential_set(self, request: web.Request) -> web.Response:
        await self.cluster.cache.delete_credential_set(request.match_info["name"])
        return web.Response(status=204)

    # -- faults ----------------------------------------------------------------------------

    async def list_links(self, request: web.Request) -> web.Response:
        """Every WAN and zone link: its nodes, bytes delivered, bytes it holds
        (in transit or stalled), connections its reset fault broke, and how late
        it delivered against the model (``Link.stats``)."""
        return web.json_response([{"from": source, "to": target, **link.stats()}
                                  for (source, target), link in self.cluster.supervisor.links.items()])

    async def list_faults(self, request: web.Request) -> web.Response:
        return web.json_response([f.as_dict() for f in self.cluster.faults.faults.values()])

    async def inject_fault(self, request: web.Request) -> web.Response:
        body = await _json(request)
        kind = body.pop("kind", None)
        duration = body.pop("duration_s", None)
        if not isinstance(kind, str):
            raise ClusterError("give the fault's \"kind\"")
        try:
            fault = await self.cluster.faults.inject(kind, duration_s=duration, **body)
        except TypeError as exc:  # an argument the fault kind does not take
            raise ClusterError(f"{kind}: {exc}") from None
        except FaultError as exc:
            raise ClusterError(str(exc)) from None
        return web.json_response(fault.as_dict(), status=201)

    async def heal_fault(self, request: web.Request) -> web.Response:
        try:
            fault = await self.cluster.faults.heal(request.match_info["id"])
        except KeyError:
            raise NotFound(f"no fault {request.match_info['id']}; `georeg fault list` shows them") from None
        return web.json_response(fault.as_dict())

    async def heal_all(self, request: web.Request) -> web.Response:
        return web.json_response([f.as_dict() for f in await self.cluster.faults.heal_all()])

    # -- repositories (through the data plane of every region) ----------------------

    async def list_repositories(self, request: web.Request) -> web.Response:
        return web.json_response(await self.repositories.list())

    async def show_tags(self, request: web.Request) -> web.Response:
        name = validate_name(request.match_info["name"])
        return web.json_response(await self.repositories.show_tags(name))

    async def delete_repository(self, request: web.Request) -> web.Response:
        name = validate_name(request.match_info["name"])
        return web.json_response(await self.repositories.delete(name))

    async def acr_metadata(self, request: web.Request) -> web.Response:
        """``GET|PATCH …/acr[?tag=T|?digest=D]``: the attributes (and
        properties) of the repository, one tag or one manifest."""
        name = validate_name(request.match_info["name"])
        path = f"/acr/v1/{name}"
        if request.query.get("tag"):
            path += f"/_tags/{quote(request.query['tag'], safe='')}"
        elif request.query.get("digest"):
            path += f"/_manifests/{quote(request.query['digest'], safe=':')}"
        body = await _json(request) if request.method == "PATCH" else None
        return _node_answer(*await self.repositories.on_data_plane(name, request.method, path,
                                                                   body))

    async def acr_listing(self, request: web.Request) -> web.Response:
        """``GET …/acr/_tags|_manifests?orderby&n``: ACR's listings of one region."""
        name = validate_name(request.match_info["name"])
        which = request.path.rsplit("/", 1)[1]
        query = urlencode({k: v for k, v in request.query.items() if k in ("orderby", "n", "last", "stamp")})
        path = f"/acr/v1/{name}/{which}" + (f"?{query}" if query else "")
        return _node_answer(*await self.repositories.on_data_plane(name, "GET", path))

    async def untag(self, request: web.Request) -> web.Response:
        name = validate_name(request.match_info["name"])
        tag = quote(request.match_info["tag"], safe="")
        return _node_answer(*await self.repositories.on_data_plane(
            name, "DELETE", f"/acr/v1/{name}/_tags/{tag}"))

    async def delete_image(self, request: web.Request) -> web.Response:
        """ACR's delete of an image: by tag, the manifest it names and every
        tag on it; by digest, the manifest and its tags."""
        name = validate_name(request.match_info["name"])
        reference = request.match_info["reference"]
        digest = reference
        if not is_digest(reference):
            status, answer = await self.repositories.on_data_plane(
                name, "GET", f"/acr/v1/{name}/_tags/{quote(reference, safe='')}")
            if status != 200:
                return _node_answer(status, answer)
            digest = answer["tag"]["digest"]
        status, answer = await self.repositories.on_data_plane(
            name, "DELETE", f"/v2/{name}/manifests/{quote(digest, safe=':')}")
        if status == 202:
            answer = {"repository": name, "manifestDeleted": digest}
        return _node_answer(status, answer)

    async def list_deleted(self, request: web.Request) -> web.Response:
        """Soft delete's recycle bin of a repository, from the first region holding one."""
        name = validate_name(request.match_info["name"])
        return _node_answer(*await self.repositories.on_data_plane(
            name, "GET", f"/acr/v1/{name}/_deleted"))

    async def restore(self, request: web.Request) -> web.Response:
        """Restore from the first region whose bin holds the reference; it replicates."""
        name = validate_name(request.match_info["name"])
        reference = quote(request.match_info["reference"], safe=":")
        force = request.query.get("force", "false")
        return _node_answer(*await self.repositories.on_data_plane(
            name, "POST", f"/acr/v1/{name}/_deleted/{reference}?force={quote(force)}"))

    async def show_soft_delete(self, request: web.Request) -> web.Response:
        return web.json_response(await soft_delete.show(self.cluster))

    async def update_soft_delete(self, request: web.Request) -> web.Response:
        return web.json_response(await soft_delete.update(self.cluster, await _json(request)))

    async def import_image(self, request: web.Request) -> web.Response:
        return web.json_response(await self.imports.run(import_request(await _json(request))))

    # -- builds and runs (cluster.control.builds) ------------------------------------------

    async def start_build(self, request: web.Request) -> web.Response:
        build = build_request(request.query, registry_login(request))
        run = await self.builds.start(build, request.content.iter_chunked(1 << 16))
        return web.json_response(run, status=202)

    async def list_tasks(self, request: web.Request) -> web.Response:
        return web.json_response(await self.tasks.list())

    async def show_task(self, request: web.Request) -> web.Response:
        return web.json_response(await self.tasks.show(request.match_info["name"]))

    async def create_task(self, request: web.Request) -> web.Response:
        body = await _json(request)
        name = _field(body, "name", str)
        del body["name"]
        return web.json_response(await self.tasks.create(name, body), status=201)

    async def update_task(self, request: web.Request) -> web.Response:
        return web.json_response(await self.tasks.update(request.match_info["name"],
                                                         await _json(request)))

    async def delete_task(self, request: web.Request) -> web.Response:
        await self.tasks.delete(request.match_info["name"])
        return web.Response(status=204)

    async def run_task(self, request: web.Request) -> web.Response:
        return web.json_response(await self.tasks.run(request.match_info["name"],
                                                      registry_login(request)), status=202)

    async def list_runs(self, request: web.Request) -> web.Response:
        return web.json_response(self.builds.list(request.query.get("task")))

    async def show_run(self, request: web.Request) -> web.Response:
        return web.json_response(self.builds.show(request.match_info["id"]))

    async def run_log(self, request: web.Request) -> web.StreamResponse:
        run_id = request.match_info["id"]
        self.builds.show(run_id)                 # a 404 before the answer starts
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        if request.query.get("follow") == "true":
            async for chunk in self.builds.follow(run_id):
                await response.write(chunk)
        else:
            with contextlib.suppress(FileNotFoundError), \
                    open(self.builds.log_path(run_id), "rb") as f:  # noqa: ASYNC230 - a local log
                while chunk := f.read(1 << 20):      # bounded: a run's log is capped
                    await response.write(chunk)
        await response.write_eof()
        return response

    async def cancel_run(self, request: web.Request) -> web.Response:
        return web.json_response(await self.builds.cancel(request.match_info["id"]))


REGISTRY_LOGIN_HEADER = "X-Registry-Authorization"


def registry_login(request: web.Request) -> tuple[str, str] | None:
    """The caller's registry login (``Basic``) a build is authorised with: a
    header of its own, since ``Authorization`` carries the owner credential."""
    header = request.headers.get(REGISTRY_LOGIN_HEADER)
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    try:
        username, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        sep = ""
    if scheme.lower() != "basic" or not sep:
        raise ClusterError(f"{REGISTRY_LOGIN_HEADER} is `Basic base64(username:password)`")
    return username, password


def _node_answer(status: int, answer: dict) -> web.Response:
    """A node's answer to a request passed on to it, as it is; a refusal in
    this API's error shape (``{"error": {"code", "message"}}``), with the
    node's code, message and reason, so that whoever asked can say what was
    wrong (a 404 or 405 of the registry's own shape would reach the CLI as a
    bare status)."""
    if status < 400:
        return web.json_response(answer, status=status)
    errors = answer.get("errors") if isinstance(answer, dict) else None
    if not errors or not isinstance(errors[0], dict):
        return _error(status, "NodeError", f"the registry node answered HTTP {status}")
    error = errors[0]
    detail = error.get("detail")
    if isinstance(detail, dict):
        detail = detail.get("reason") or ", ".join(f"{k} {v}" for k, v in detail.items())
    message = f"{error.get('code')}: {error.get('message')}" + (f" ({detail})" if detail else "")
    return _error(status, str(error.get("code") or "NodeError"), message)


def _only_fields(body: dict, allowed: set[str], usage: str, *, empty_ok: bool = True) -> None:
    """A 400 saying what to send when ``body`` has a field not ``allowed`` (or
    none, unless ``empty_ok``)."""
    unknown = sorted(set(body) - allowed)
    if unknown or not (body or empty_ok):
        raise ClusterError((f"send {usage}" + (f"; unknown: {', '.join(unknown)}"
                                               if unknown else ""))[:300])


def _only(body: dict, *names: str) -> None:
    unknown = sorted(set(body) - set(names))
    if unknown:
        raise ClusterError(f"unknown fields {', '.join(unknown)[:200]}; send {', '.join(names)}")
