"""Issue 16's acceptance on a real ``auth = "token"`` cluster (``georeg up --detach``:
node processes, endpoints, the management API), driven as a user would with
skopeo and the ``georeg`` CLI:

* the home region crashed: logins, pulls and pushes through another region's
  global endpoint go on (a token minted before the crash and a fresh login),
  while a configuration change fails with the home-region message; healed,
  everything converges;
* an identity's credential through ``/oauth2/exchange`` as ``az acr login``
  uses it (refresh token, then the null-GUID username), within its role
  assignment;
* anonymous pull switched on and off through the home region, on every node;
  Standard allows it, Basic refuses it.

The cluster is shared by the module: the crash test runs last and heals.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import aiohttp
import pytest

from cluster.control.state import running_state
from registry_node.auth.gate import NULL_GUID

from .helpers import Skopeo, eventually, write_oci_layout
from .test_cluster import georeg
from .test_interop import gzip_image

HOME, OTHER = "westeurope", "northeurope"
SPEC = f"""\
registry = "georegacc"
home_region = "{HOME}"
paired_copies = false
auth = "token"
[[replicas]]
region = "{OTHER}"
[network]
port_base = 0
"""
REPLICATION_S = 60      # a generous bound on what replication needs here; a hang still fails


class Running:
    """What a test needs of the cluster ``georeg up --detach`` started."""

    def __init__(self, data: Path) -> None:
        self.data = data
        status = georeg("status", "--json", data_dir=data)
        assert status.returncode == 0, status.stderr
        self.status = json.loads(status.stdout)
        self.service = self.status["login_server"]
        shown = self.cli("credential", "show")
        self.username = shown["username"]
        self.password = next(p["value"] for p in shown["passwords"] if p["name"] == "password")

    def cli(self, *args: str):
        done = georeg(*args, data_dir=self.data)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return json.loads(done.stdout) if done.stdout.lstrip()[:1] in ("{", "[") else done.stdout

    def host(self, region: str) -> str:
        """The global endpoint as a client in ``region`` reaches it (host:port)."""
        return self.status["global_endpoints"][region].removeprefix("http://")

    def node(self, region: str) -> str:
        return next(n["http"] for n in self.status["nodes"] if n["region"] == region)

    @property
    def nodes(self) -> list[str]:
        return [n["http"] for n in self.status["nodes"]]


def _start(root: Path, spec: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.toml").write_text(spec)
    data = root / "data"
    up = georeg("up", "--detach", "--config", str(root / "spec.toml"), data_dir=data)
    if up.returncode != 0:
        georeg("down", data_dir=data)
        raise AssertionError(up.stdout + up.stderr)
    return data


def _stop(data: Path) -> None:
    down = georeg("down", data_dir=data)
    assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    data = _start(tmp_path_factory.mktemp("acceptance"), SPEC)
    try:
        yield Running(data)
    finally:
        _stop(data)


def _basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


async def _status(http: aiohttp.ClientSession, method: str, url: str, **kwargs) -> int | None:
    """The status ``url`` answers, or None when nothing listens there."""
    try:
        async with http.request(method, url, **kwargs) as r:
            return r.status
    except aiohttp.ClientConnectionError:
        return None


async def _login(skopeo: Skopeo, username: str, password: str, *, check: bool = True):
    return await skopeo.run("login", "--tls-verify=false", "--authfile", str(skopeo.auth),
                            "-u", username, "--password-stdin", skopeo.host, check=check,
                            stdin=password.encode() + b"\n")


def _layout(tmp_path: Path, seed: int) -> tuple[bytes, str]:
    image = gzip_image(seed, [2000 + seed, 600])
    path = tmp_path / f"layout-{seed}"
    write_oci_layout(path, image, tag="v1")
    return image.manifest, f"oci:{path}:v1"


# -- an identity's credential, as az acr login uses it -------------------------------------


async def _exchange(http: aiohttp.ClientSession, base: str, service: str, identity: str,
                    secret: str) -> tuple[int, dict]:
    async with http.post(f"{base}/oauth2/exchange", data={
            "grant_type": "password", "service": service,
            "username": identity, "password": secret}) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.interop
async def test_an_identitys_exchanged_refresh_token_logs_skopeo_in_within_its_role(
        cluster, http, tmp_path):
    """``az acr login`` trades the identity's credential at ``/oauth2/exchange``
    for a refresh token and hands docker the null GUID as username with the
    refresh token as password; what it may then do is its role assignment's."""
    pusher = cluster.cli("identity", "create", "--name", "ci-push")
    puller = cluster.cli("identity", "create", "--name", "ci-pull")
    cluster.cli("role", "assignment", "create", "--role", "AcrPush", "--assignee", pusher["id"])
    cluster.cli("role", "assignment", "create", "--role", "AcrPull", "--assignee", puller["id"])

    async def exchanged_everywhere(who: dict) -> bool:
        for node in cluster.nodes:
            status, _ = await _exchange(http, node, cluster.service, who["id"], who["secret"])
            if status != 200:
                return False
        return True

    for who in (pusher, puller):
        await eventually(lambda w=who: exchanged_everywhere(w), timeout=REPLICATION_S,
                         what=f"{who['displayName']}'s exchange on every node")
    endpoint = f"http://{cluster.host(OTHER)}"
    # A wrong secret is no exchange.
    status, body = await _exchange(http, endpoint, cluster.service, pusher["id"], "wrong")
    assert status == 401 and body["errors"][0]["code"] == "UNAUTHORIZED"

    status, body = await _exchange(http, endpoint, cluster.service, pusher["id"], pusher["secret"])
    assert status == 200, body
    push_refresh = body["refresh_token"]
    push = Skopeo(tmp_path / "push", cluster.host(OTHER))
    await _login(push, NULL_GUID, push_refresh)
    manifest, source = _layout(tmp_path, 1)
    await push.copy(source, push.ref("ids/app:v1"))
    assert await push.inspect_raw(push.ref("ids/app:v1")) == manifest

    status, body = await _exchange(http, endpoint, cluster.service, puller["id"], puller["secret"])
    assert status == 200, body
    pull = Skopeo(tmp_path / "pull", cluster.host(OTHER))
    await _login(pull, NULL_GUID, body["refresh_token"])
    await pull.copy(pull.ref("ids/app:v1"), f"oci:{tmp_path / 'pulled'}:v1")
    assert json.loads((tmp_path / "pulled" / "index.json").read_text())["manifests"][0][
        "digest"].startswith("sha256:")
    assert await pull.inspect_raw(pull.ref("ids/app:v1")) == manifest
    # AcrPull: a push is beyond it, refused with the registry's DENIED, nothing stored.
    _, other = _layout(tmp_path, 2)
    code, _, err = await pull.run("copy", "--quiet", "--authfile", str(pull.auth),
                                  "--dest-tls-verify=false", other, pull.ref("ids/other:v1"),
                                  check=False)
    assert code != 0 and "denied" in err.lower(), err
    assert await push.list_tags("ids/app") == ["v1"]
    code, _, err = await push.run("list-tags", "--tls-verify=false", "--authfile",
                                  str(push.auth), push.ref("ids/other"), check=False)
    assert code != 0 and ("404" in err or "NAME_UNKNOWN" in err.upper()), err
    # The exchange is for identities: the admin user's credentials get nothing.
    status, _ = await _exchange(http, endpoint, cluster.service, cluster.username,
                                cluster.password)
    assert status == 401
    # Without its role assignment the identity's refresh token pulls nothing.
    cluster.cli("role", "assignment", "delete", "--assignee", puller["id"], "--role", "AcrPull")

    async def refused_everywhere() -> bool:
        for node in cluster.nodes:
            async with http.get(f"{node}/oauth2/token", params={
                    "service": cluster.service, "scope": "repository:ids/app:pull"},
                    headers=_basic(puller["id"], puller["secret"])) as r:
                token = (await r.json())["access_token"]
            if await _status(http, "GET", f"{node}/v2/ids/app/manifests/v1",
                             headers={"Authorization": f"Bearer {token}"}) != 403:
                return False
        return True

    await eventually(refused_everywhere, timeout=REPLICATION_S,
                     what="the removed role refused on every node")
    code, _, err = await pull.run("inspect", "--raw", "--tls-verify=false", "--authfile",
                                  str(pull.auth), pull.ref("ids/app:v1"), check=False)
    assert code != 0, err


# -- anonymous pull ------------------------------------------------------------------------


async def _anonymous_manifest(http, nodes: list[str], expected: int) -> bool:
    for node in nodes:
        if await _status(http, "GET", f"{node}/v2/anon/app/manifests/v1",
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}) \
                != expected:
            return False
    return True


async def _anonymous_pull_on_and_off(cluster: Running, http, tmp_path: Path,
                                     region: str) -> None:
    admin = Skopeo(tmp_path / "admin", cluster.host(region))
    await _login(admin, cluster.username, cluster.password)
    manifest, source = _layout(tmp_path, 3)
    await admin.copy(source, admin.ref("anon/app:v1"))
    anonymous = Skopeo(tmp_path / "anonymous", cluster.host(region))
    # Off (the default): refused without credentials (skopeo reports the token
    # endpoint's 401 as "invalid username/password: unauthorized").
    assert await _anonymous_manifest(http, cluster.nodes, 401)
    code, _, err = await anonymous.run("inspect", "--raw", "--tls-verify=false", "--no-creds",
                                       anonymous.ref("anon/app:v1"), check=False)
    assert code != 0 and "unauthorized" in err.lower(), err

    cluster.cli("registry", "update", "--anonymous-pull-enabled", "true")
    assert cluster.cli("registry", "show", "--json")["anonymousPullEnabled"] is True
    await eventually(lambda: _anonymous_manifest(http, cluster.nodes, 200),
                     timeout=REPLICATION_S, what="anonymous pull on every node")
    _, out, _ = await anonymous.run("inspect", "--raw", "--tls-verify=false", "--no-creds",
                                    anonymous.ref("anon/app:v1"))
    assert out == manifest
    await anonymous.run("copy", "--quiet", "--src-tls-verify=false", "--src-no-creds",
                        anonymous.ref("anon/app:v1"), f"oci:{tmp_path / 'pulled'}:v1")
    assert (tmp_path / "pulled" / "index.json").exists()
    # Reads only: a push without credentials is a 401, and nothing is stored.
    _, other = _layout(tmp_path, 4)
    code, _, err = await anonymous.run("copy", "--quiet", "--dest-tls-verify=false",
                                       "--dest-no-creds", other, anonymous.ref("anon/pushed:v1"),
                                       check=False)
    assert code != 0 and "unauthorized" in err.lower(), err
    base = f"http://{cluster.host(region)}"
    async with http.post(f"{base}/v2/anon/pushed/blobs/uploads/") as r:
        assert r.status == 401 and (await r.json())["errors"][0]["code"] == "UNAUTHORIZED"
    async with http.get(f"{base}/v2/_catalog") as r:          # the catalog stays closed
        assert r.status == 401 and (await r.json())["errors"][0]["code"] == "UNAUTHORIZED"
    code, _, err = await admin.run("list-tags", "--tls-verify=false", "--authfile",
                                   str(admin.auth), admin.ref("anon/pushed"), check=False)
    assert code != 0, err

    cluster.cli("registry", "update", "--anonymous-pull-enabled", "false")
    assert cluster.cli("registry", "show", "--json")["anonymousPullEnabled"] is False
    await eventually(lambda: _anonymous_manifest(http, cluster.nodes, 401),
                     timeout=REPLICATION_S, what="anonymous pull refused on every node")
    code, _, err = await anonymous.run("inspect", "--raw", "--tls-verify=false", "--no-creds",
                                       anonymous.ref("anon/app:v1"), check=False)
    assert code != 0 and "unauthorized" in err.lower(), err
    assert await admin.inspect_raw(admin.ref("anon/app:v1")) == manifest   # credentials still do


@pytest.mark.interop
async def test_anonymous_pull_reads_only_on_every_replica_while_enabled(cluster, http, tmp_path):
    """Premium, two regions: the switch travels to both; through the other
    region's global endpoint skopeo pulls without credentials."""
    await _anonymous_pull_on_and_off(cluster, http, tmp_path, OTHER)


@pytest.mark.interop
async def test_anonymous_pull_on_a_standard_registry_and_refused_on_basic(tmp_path, http):
    data = _start(tmp_path / "standard", 'tier = "Standard"\nauth = "token"\n'
                  '[network]\nport_base = 0\n')
    try:
        standard = Running(data)
        await _anonymous_pull_on_and_off(standard, http, tmp_path, standard.status["home_region"])
    finally:
        _stop(data)
    data = _start(tmp_path / "basic", 'tier = "Basic"\nauth = "token"\n[network]\nport_base = 0\n')
    try:
        basic = Running(data)
        refused = georeg("registry", "update", "--anonymous-pull-enabled", "true", data_dir=data)
        assert refused.returncode == 2
        assert "anonymous pull needs the Standard or Premium tier; this registry is Basic" \
            in refused.stderr
        assert basic.cli("registry", "show", "--json")["anonymousPullEnabled"] is False
        assert await _anonymous_manifest(http, basic.nodes, 401)
    finally:
        _stop(data)


# -- the home region crashed (last: it heals, and the cluster must converge) ----------------


@pytest.mark.interop
async def test_with_the_home_region_crashed_clients_log_in_pull_and_push_but_config_waits(
        cluster, http, tmp_path):
    home_node = cluster.node(HOME)
    # Before the crash: an image, and a token minted by the home region's own node.
    before = Skopeo(tmp_path / "before", cluster.host(OTHER))
    await _login(before, cluster.username, cluster.password)
    manifest, source = _layout(tmp_path, 5)
    await before.copy(source, before.ref("crash/app:v1"))
    async with http.get(f"{home_node}/oauth2/token", params={
            "service": cluster.service, "scope": "repository:crash/app:pull,push"},
            headers=_basic(cluster.username, cluster.password)) as r:
        assert r.status == 200, await r.text()
        minted = (await r.json())["access_token"]

    fault = georeg("fault", "region-outage", HOME, "--mode", "crash", data_dir=cluster.data)
    assert fault.returncode == 0, fault.stderr
    try:
        await eventually(lambda: _gone(http, home_node), timeout=REPLICATION_S,
                         what="the home region's node down")
        # The token minted at home before the crash: pull and push elsewhere.
        with_token = Skopeo(tmp_path / "token", cluster.host(OTHER))
        _, out, _ = await with_token.run("inspect", "--raw", "--tls-verify=false",
                                         "--registry-token", minted, with_token.ref("crash/app:v1"))
        assert out == manifest
        manifest2, source2 = _layout(tmp_path, 6)
        await with_token.run("copy", "--quiet", "--dest-tls-verify=false",
                             "--dest-registry-token", minted, source2,
                             with_token.ref("crash/app:v2"))
        # A fresh login with the existing admin credentials, then pull and push.
        fresh = Skopeo(tmp_path / "fresh", cluster.host(OTHER))
        await _login(fresh, cluster.username, cluster.password)
        assert await fresh.inspect_raw(fresh.ref("crash/app:v2")) == manifest2
        manifest3, source3 = _layout(tmp_path, 7)
        await fresh.copy(source3, fresh.ref("crash/app:v3"))
        assert sorted(await fresh.list_tags("crash/app")) == ["v1", "v2", "v3"]
        # Configuration waits for the home region, with ACR's reason.
        refused = georeg("token", "create", "--name", "during-outage", "--scope-map",
                         "_repositories_pull", data_dir=cluster.data)
        assert refused.returncode == 2, refused.stdout
        assert f"the home region {HOME} holds the control plane and cannot be reached" \
            in refused.stderr, refused.stderr
        assert "Pushes, pulls and deletes keep working" in refused.stderr
    finally:
        healed = georeg("fault", "heal", "--all", data_dir=cluster.data)
        assert healed.returncode == 0, healed.stderr

    # Healed: the home node serves what was pushed during its outage, the token
    # command works again, and verify finds the cluster clean.
    bearer = {"Authorization": f"Bearer {minted}"}
    for tag in ("v2", "v3"):
        await eventually(
            lambda t=tag: _answers(http, f"{home_node}/v2/crash/app/manifests/{t}", bearer, 200),
            timeout=REPLICATION_S, what=f"crash/app:{tag} on the home node")
    made = cluster.cli("token", "create", "--name", "after-outage", "--scope-map",
                       "_repositories_pull")
    assert made["status"] == "enabled"

    async def clean() -> bool:
        done = await asyncio.to_thread(georeg, "verify", "--json", data_dir=cluster.data)
        return done.returncode == 0

    await eventually(clean, timeout=REPLICATION_S, interval=1, what="a clean georeg verify")
    assert running_state(cluster.data) is not None


async def _gone(http, node: str) -> bool:
    return await _status(http, "GET", f"{node}/v2/") is None


async def _answers(http, url: str, headers: dict, expected: int) -> bool:
    return await _status(http, "GET", url, headers={
        **headers, "Accept": "application/vnd.oci.image.manifest.v1+json"}) == expected
