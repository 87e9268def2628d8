"""Calling a running cluster's management API (cluster.control.management) from another
process: the CLI, the benchmarks. Plain urllib, so a short-lived command needs
no event loop.

A cluster is reached directly, whatever ``http_proxy`` says: a proxy in the
environment is for the world outside, and the rest of georeg (aiohttp without
``trust_env``, skopeo run with ``NO_PROXY``) already ignores it. urllib would
not: by default it sends even loopback requests to the proxy."""

from __future__ import annotations

import contextlib
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def open_direct(request: urllib.request.Request | str, timeout: float,
                tls: ssl.SSLContext | None = None):
    """``urllib.request.urlopen``, never through a proxy; ``tls``: what verifies
    an https URL (a TLS cluster's CA) instead of the system's CAs."""
    if tls is None:
        return _DIRECT.open(request, timeout=timeout)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=tls))
    return opener.open(request, timeout=timeout)


class ManagementError(Exception):
    """The API refused (its own message; ``status`` its HTTP status), or could
    not be reached (``status`` 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def request(base_url: str, method: str, path: str, body: dict | None = None,
            timeout: float = 120, headers: dict[str, str] | None = None,
            tls: ssl.SSLContext | None = None) -> object:
    """One call; ``headers`` carry the owner credential of a cluster with auth,
    ``tls`` verifies the API's certificate on a cluster with TLS (its CA)."""
    data = json.dumps(body).encode() if body is not None else None
    with _open(base_url, method, path, data, timeout,
               {"Content-Type": "application/json", **(headers or {})}, tls) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def stream(base_url: str, method: str, path: str, data=None, timeout: float = 120,
           headers: dict[str, str] | None = None, tls: ssl.SSLContext | None = None):
    """One call whose answer is read as it comes (a run's log): its chunks of
    bytes; ``data`` a body of bytes or an open file (a build context)."""
    with _open(base_url, method, path, data, timeout, headers or {}, tls) as r:
        while chunk := r.read1(65536):
            yield chunk


@contextlib.contextmanager
def _open(base_url: str, method: str, path: str, data, timeout: float,
          headers: dict[str, str], tls: ssl.SSLContext | None):
    url = base_url.rstrip("/") + path
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with open_direct(req, timeout=timeout, tls=tls) as r:
            yield r
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"{method} {path}: HTTP {exc.code} {exc.reason}"
        raise ManagementError(message, exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ManagementError(f"cannot reach the cluster's management API at {url}: "
                              f"{getattr(exc, 'reason', exc)}") from None


# -- registry configuration (GET|PUT|DELETE /georeg/v1/configuration/{kind}[/{name}]) --------
# Each object comes back as the home node stored it: {"kind", "name", "value",
# "deleted", "stamp": {"hlc", "region", "zone"}, "acked_ns"}.


def _object_path(kind: str, name: str = "") -> str:
    path = "/georeg/v1/configuration/" + urllib.parse.quote(kind, safe="")
    return path + ("/" + urllib.parse.quote(name, safe="") if name else "")


def list_objects(base_url: str, kind: str, headers: dict[str, str] | None = None) -> list[dict]:
    return request(base_url, "GET", _object_path(kind), headers=headers)


def get_object(base_url: str, kind: str, name: str,
               headers: dict[str, str] | None = None) -> dict:
    return request(base_url, "GET", _object_path(kind, name), headers=headers)


def set_object(base_url: str, kind: str, name: str, value: dict,
               headers: dict[str, str] | None = None) -> dict:
    """Write through the home region; ``ManagementError`` while it cannot be reached."""
    return request(base_url, "PUT", _object_path(kind, name), value, headers=headers)


def delete_object(base_url: str, kind: str, name: str,
                  headers: dict[str, str] | None = None) -> dict:
    return request(base_url, "DELETE", _object_path(kind, name), headers=headers)


# -- webhooks (/georeg/v1/webhooks, cluster.control.webhooks) ---------------------------------
# A webhook comes back as {"name", "location", "receiverLocation", "actions", "scope",
# "status", "creationDate", "provisioningState"}: never its URI or a header value, which
# only ``webhook_config`` returns.


def _webhook_path(name: str = "", *rest: str) -> str:
    parts = [name, *rest] if name else []
    return "/georeg/v1/webhooks" + "".join("/" + urllib.parse.quote(p, safe="") for p in parts)


def list_webhooks(base_url: str, headers: dict[str, str] | None = None) -> list[dict]:
    return request(base_url, "GET", _webhook_path(), headers=headers)


def create_webhook(base_url: str, name: str, *, uri: str, actions: list[str], scope: str = "",
                   custom_headers: dict[str, str] | None = None, status: str = "enabled",
                   location: str | None = None, receiver_location: str | None = None,
                   headers: dict[str, str] | None = None) -> dict:
    """``headers`` are this request's (the owner credential); ``custom_headers``
    the webhook's, sent with every delivery."""
    body = {"name": name, "serviceUri": uri, "actions": actions, "scope": scope,
            "status": status, "customHeaders": custom_headers or {}}
    if location is not None:
        body["location"] = location
    if receiver_location is not None:
        body["receiverLocation"] = receiver_location
    return request(base_url, "POST", _webhook_path(), body, headers=headers)


def show_webhook(base_url: str, name: str, headers: dict[str, str] | None = None) -> dict:
    return request(base_url, "GET", _webhook_path(name), headers=headers)


def update_webhook(base_url: str, name: str, changes: dict,
                   headers: dict[str, str] | None = None) -> dict:
    """``changes``: any of "serviceUri", "actions", "scope", "customHeaders",
    "status", "location", "receiverLocation"; the rest stays."""
    return request(base_url, "PATCH", _webhook_path(name), changes, headers=headers)


def delete_webhook(base_url: str, name: str, headers: dict[str, str] | None = None) -> None:
    request(base_url, "DELETE", _webhook_path(name), headers=headers)


def webhook_config(base_url: str, name: str, headers: dict[str, str] | None = None) -> dict:
    """{"serviceUri", "customHeaders"}, values included."""
    return request(base_url, "GET", _webhook_path(name, "config"), headers=headers)


def ping_webhook(base_url: str, name: str, headers: dict[str, str] | None = None) -> str:
    """The id of the ping event queued in the webhook's region."""
    return request(base_url, "POST", _webhook_path(name, "ping"), headers=headers)["id"]


def webhook_events(base_url: str, name: str, limit: int | None = None,
                   headers: dict[str, str] | None = None) -> list[dict]:
    """Its deliveries, newest first (``cluster.control.webhooks.event_view``)."""
    query = f"?limit={int(limit)}" if limit is not None else ""
    return request(base_url, "GET", _webhook_path(name, "events") + query, headers=headers)


def redeliver_event(base_url: str, name: str, event_id: str,
                    headers: dict[str, str] | None = None) -> str:
    return request(base_url, "POST", _webhook_path(name, "events", event_id, "redeliver"),
                   headers=headers)["id"]
