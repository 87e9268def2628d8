"""Every route of the node's HTTP API, declared as data.

``{name}`` is a repository name and may contain slashes, so it is matched
greedily up to the fixed suffix that names the resource.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NamedTuple

from aiohttp import web

from . import (
    admin,
    base,
    blobs,
    configuration,
    grey,
    inventory,
    listings,
    manifests,
    metadata,
    metrics,
    retention,
    tag_moves,
    throttling,
    uploads,
    webhooks,
)


class Route(NamedTuple):
    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]


_NAME = "/v2/{name:.+}"
_ACR = "/acr/v1/{name:.+}"

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v2/", base.version_check),
    Route("GET", "/v2", base.version_check),
    Route("GET", "/v2/_catalog", listings.catalog),
    Route("GET", _NAME + "/tags/list", listings.list_tags),
    Route("GET", _NAME + "/referrers/{digest}", listings.referrers),
    Route("GET", _NAME + "/manifests/{reference}", manifests.get_manifest),
    Route("HEAD", _NAME + "/manifests/{reference}", manifests.get_manifest),
    Route("PUT", _NAME + "/manifests/{reference}", manifests.put_manifest),
    Route("DELETE", _NAME + "/manifests/{reference}", manifests.delete_manifest),
    Route("POST", _NAME + "/blobs/uploads/", uploads.start_upload),
    Route("GET", _NAME + "/blobs/uploads/{uuid}", uploads.upload_status),
    Route("PATCH", _NAME + "/blobs/uploads/{uuid}", uploads.patch_upload),
    Route("PUT", _NAME + "/blobs/uploads/{uuid}", uploads.finish_upload),
    Route("DELETE", _NAME + "/blobs/uploads/{uuid}", uploads.cancel_upload),
    Route("GET", _NAME + "/blobs/{digest}", blobs.get_blob),
    Route("HEAD", _NAME + "/blobs/{digest}", blobs.get_blob),
    Route("DELETE", _NAME + "/blobs/{digest}", blobs.delete_blob),
    # ACR's own API, beside the OCI one. The suffixed routes come first: a
    # repository name may hold slashes, and the bare one would take them all.
    Route("GET", _ACR + "/_deleted", metadata.list_deleted),
    Route("POST", _ACR + "/_deleted/{reference}", metadata.restore),
    Route("GET", _ACR + "/_tags", metadata.list_tags),
    Route("GET", _ACR + "/_tags/{tag}", metadata.get_tag),
    Route("PATCH", _ACR + "/_tags/{tag}", metadata.patch_tag),
    Route("DELETE", _ACR + "/_tags/{tag}", metadata.delete_tag),
    Route("GET", _ACR + "/_manifests", metadata.list_manifests),
    Route("GET", _ACR + "/_manifests/{digest}", metadata.get_manifest),
    Route("PATCH", _ACR + "/_manifests/{digest}", metadata.patch_manifest),
    Route("GET", _ACR, metadata.get_repository),
    Route("PATCH", _ACR, metadata.patch_repository),
    Route("DELETE", _ACR, listings.delete_repository),
    # Fault injection's storage seam.
    Route("GET", "/georeg/v1/faults/storage", admin.get_storage_faults),
    Route("PUT", "/georeg/v1/faults/storage", admin.put_storage_faults),
    # Grey failures: blob bodies that stall (api.grey).
    Route("GET", "/georeg/v1/faults/stall", grey.get_stall),
    Route("PUT", "/georeg/v1/faults/stall", grey.put_stall),
    Route("POST", "/georeg/v1/faults/bitrot", admin.post_bitrot),
    # Bit rot found and repaired (registry_node.blob_repair): the record, a scrub.
    Route("GET", "/georeg/v1/blobs/repairs", admin.get_repairs),
    Route("POST", "/georeg/v1/blobs/scrub", admin.post_scrub),
    # Fault injection's clock seam, and the node's clock against its peers'.
    Route("GET", "/georeg/v1/faults/clock", admin.get_clock),
    Route("PUT", "/georeg/v1/faults/clock", admin.put_clock_fault),
    # Request throttling: its fault, its state, zone siblings' reports (api.throttling).
    Route("GET", "/georeg/v1/faults/throttle", throttling.get_throttle_fault),
    Route("PUT", "/georeg/v1/faults/throttle", throttling.put_throttle_fault),
    Route("GET", "/georeg/v1/throttle", throttling.get_throttle),
    Route("POST", "/georeg/v1/throttle/debits", throttling.post_debits),
    # What this node stores, with stamps and origins (georeg verify).
    Route("GET", "/georeg/v1/inventory", inventory.get_inventory),
    Route("GET", "/georeg/v1/usage", inventory.get_usage),
    # Registry configuration as this node holds it; writes come from the home
    # region's management API (registry_node.configuration).
    Route("GET", "/georeg/v1/configuration", configuration.list_configuration),
    Route("GET", "/georeg/v1/configuration/{kind}", configuration.list_configuration),
    Route("GET", "/georeg/v1/configuration/{kind}/{name}", configuration.get_object),
    Route("PUT", "/georeg/v1/configuration/{kind}/{name}", configuration.put_object),
    Route("DELETE", "/georeg/v1/configuration/{kind}/{name}", configuration.delete_object),
    # One sweep of untagged manifests, asked by the control process (registry_node.untagged).
    Route("POST", "/georeg/v1/retention/sweep", retention.sweep),
    # Where tags moved, from the node's log (the control process's base-image triggers).
    Route("GET", "/georeg/v1/tag-moves", tag_moves.get_tag_moves),
    # Webhook deliveries from this node (the control plane's ping, list-events, redeliver).
    Route("POST", "/georeg/v1/webhooks/{name}/ping", webhooks.ping),
    Route("GET", "/georeg/v1/webhooks/{name}/events", webhooks.list_events),
    Route("POST", "/georeg/v1/webhooks/{name}/events/{id}/redeliver", webhooks.redeliver),
    # Prometheus: the node's error answers, and what its extensions register.
    Route("GET", "/metrics", metrics.get_metrics),
)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register every route; each GET also answers HEAD (same headers, no body)."""
    explicit_head = {r.path for r in ROUTES if r.method == "HEAD"}
    for route in ROUTES:
        router.add_route(route.method, route.path, route.handler)
        if route.method == "GET" and route.path not in explicit_head:
            router.add_route("HEAD", route.path, route.handler)
