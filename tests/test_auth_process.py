"""Access on real ``georeg node`` processes: a token minted by one node works on
another that shares only the CA; a 64 KiB ``Authorization`` header is refused, not
a 500; and no secret used in a run — password, token, Basic value — reaches a log."""

from __future__ import annotations

import base64
import subprocess
import sys

import aiohttp
import pytest

from cluster.control.ca import ClusterCA
from registry_node.auth.gate import NULL_GUID

from .auth_helpers import (
    ADMIN_PASSWORD,
    DISABLED_PASSWORD,
    EXPIRED_PASSWORD,
    IDENTITY_ID,
    IDENTITY_SECRET,
    PULL_PASSWORD,
    PUSH_PASSWORD,
    REGISTRY,
    SECRETS,
    SERVICE,
    TEAM_PASSWORD,
    auth_files,
    basic,
    bearer,
    identities,
    seed_configuration,
)
from .helpers import assert_error, make_image, push_image


@pytest.fixture
def files(tmp_path):
    return auth_files(tmp_path, "node-a", "node-b")


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def _token(http, url, headers, *scopes, offline=False) -> dict:
    params = [("service", SERVICE), *(("scope", s) for s in scopes)]
    if offline:
        params.append(("offline_token", "true"))
    async with http.get(f"{url}/oauth2/token", headers=headers, params=params) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_a_token_minted_by_one_node_works_on_another(node_process, files, http):
    a = node_process("a", *files.node_args("node-a"))
    b = node_process("b", *files.node_args("node-b"))
    source = identities()        # one set of hashes, as replication would give both
    for node in (a, b):
        await seed_configuration(http, node.url, source, files.internal_headers())
    token = (await _token(http, a.url, basic("pusher", PUSH_PASSWORD), "repository:x/app:pull,push"))["token"]
    async with aiohttp.ClientSession(headers=bearer(token)) as client:
        await push_image(client, b.url, "x/app", make_image(seed=3), tag="v1")
        async with client.get(f"{b.url}/v2/x/app/tags/list") as r:
            assert r.status == 200 and (await r.json())["tags"] == ["v1"]
    # b's own tokens are good on a too.
    token_b = (await _token(http, b.url, basic("puller", PULL_PASSWORD), "repository:x/app:pull"))["token"]
    async with http.get(f"{a.url}/v2/", headers=bearer(token_b)) as r:
        assert r.status == 200


async def test_a_64_kib_authorization_header_is_refused_without_a_500_or_a_log_of_it(
        node_process, files, http):
    node = node_process("a", *files.node_args("node-a"))
    await seed_configuration(http, node.url, identities(), files.internal_headers())
    # A Basic credential padded past the parser's limit: its head holds the password.
    value = "Basic " + base64.b64encode(f"{REGISTRY}:{ADMIN_PASSWORD}".encode()).decode()
    value += "A" * (64 * 1024 - len(value))
    async with http.get(f"{node.url}/v2/", headers={"Authorization": value}) as r:
        assert r.status == 400                 # aiohttp's parser: before any route runs
    async with http.get(f"{node.url}/v2/", headers=basic(REGISTRY, ADMIN_PASSWORD)) as r:
        assert r.status == 200                 # the node serves on
    assert node.terminate() == 0
    log = node.log_path.read_text()
    assert value[6:30] not in log and "AAAAAAAAAAAAAAAA" not in log
    assert "request refused by the HTTP parser: LineTooLong" in log


async def test_secrets_never_reach_the_log(node_process, files, http):
    node = node_process("a", *files.node_args("node-a"))
    await seed_configuration(http, node.url, identities(), files.internal_headers())
    url = node.url
    used: list[str] = list(SECRETS)
    # Good and bad logins, every way in.
    for user, password in ((REGISTRY, ADMIN_PASSWORD), ("puller", PULL_PASSWORD),
                           ("team", TEAM_PASSWORD), ("puller", "bad-pw-0d2f4b6a8c"),
                           ("off", DISABLED_PASSWORD), ("old", EXPIRED_PASSWORD)):
        headers = basic(user, password)
        used += [headers["Authorization"].split()[1], password]
        async with http.get(f"{url}/v2/", headers=headers) as r:
            assert r.status in (200, 401)
        async with http.get(f"{url}/oauth2/token", headers=headers,
                            params={"service": SERVICE, "scope": "repository:a:pull"}) as r:
            assert r.status in (200, 401)
    first = await _token(http, url, basic("pusher", PUSH_PASSWORD), "repository:a:pull,push",
                         offline=True)
    used += [first["token"], first["refresh_token"]]
    async with aiohttp.ClientSession(headers=bearer(first["token"])) as client:
        await push_image(client, url, "a", make_image(seed=4), tag="v1")
    async with http.post(f"{url}/oauth2/token", data={
            "grant_type": "refresh_token", "service": SERVICE,
            "refresh_token": first["refresh_token"], "scope": "repository:a:pull"}) as r:
        assert r.status == 200
        used.append((await r.json())["access_token"])
    async with http.post(f"{url}/oauth2/token", data={
            "grant_type": "password", "service": SERVICE, "username": "puller",
            "password": "bad-pw-0d2f4b6a8c"}) as r:
        await assert_error(r, 401, "UNAUTHORIZED")
    async with http.post(f"{url}/oauth2/exchange", data={
            "grant_type": "password", "service": SERVICE, "username": IDENTITY_ID,
            "password": IDENTITY_SECRET}) as r:
        refresh = (await r.json())["refresh_token"]
        used.append(refresh)
    exchanged = await _token(http, url, basic(NULL_GUID, refresh), "repository:a:pull")
    used.append(exchanged["token"])
    tampered = first["token"][:-4] + "AAAA"
    used.append(tampered)
    for headers in (bearer(tampered), bearer("not-a-token-3e5a7c9b1d")):
        async with http.get(f"{url}/v2/a/tags/list", headers=headers) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
    used.append("not-a-token-3e5a7c9b1d")
    assert node.terminate() == 0
    log = node.log_path.read_text()
    assert "access_refused" in log and "login_refused" in log      # the refusals were logged
    leaked = [secret for secret in used if secret in log]
    # A JWT's first segment is its public header (alg, kid, x5c): only whole tokens and
    # their signatures count as secrets.
    leaked += [t.split(".")[2] for t in used if t.count(".") == 2 and t.split(".")[2] in log]
    assert leaked == []


def test_a_node_refuses_to_start_with_a_certificate_from_another_ca(tmp_path, files):
    foreign = ClusterCA.open(tmp_path / "foreign").node_certificate("node-a", "eastus")
    args = files.node_args("node-a")
    args[args.index("--auth-cert") + 1] = str(foreign.cert_file)
    args[args.index("--auth-key") + 1] = str(foreign.key_file)
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "node", "--data-dir",
                             str(tmp_path / "data"), "--listen", "127.0.0.1:0", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not issued by the cluster CA" in result.stderr
