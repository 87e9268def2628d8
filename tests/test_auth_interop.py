"""Real clients through the token flow: skopeo (containers/image) logs in, pushes and
pulls with the admin user and with a pull-only token (whose push is refused with
DENIED), and oras-py logs in and pushes with a token scoped to some repositories."""

from __future__ import annotations

import asyncio
import json
import tempfile

import oras.client
import pytest

from .auth_helpers import (
    ADMIN_PASSWORD,
    PULL_PASSWORD,
    REGISTRY,
    TEAM_PASSWORD,
    auth_files,
    basic,
    identities,
    start_auth_node,
)
from .helpers import Skopeo, write_oci_layout
from .test_interop import gzip_image

pytestmark = pytest.mark.interop


@pytest.fixture
async def node(tmp_path):
    files = auth_files(tmp_path, "node-a")
    running = await start_auth_node(files.config("node-a", tmp_path / "data"), identities())
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
def skopeo(node, tmp_path) -> Skopeo:
    return Skopeo(tmp_path / "skopeo", node.url.removeprefix("http://"))


@pytest.fixture(autouse=True)
def _scratch_in_tmp_path(monkeypatch, tmp_path):
    """oras-py writes scratch files into the system temp dir: keep them in the test's."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))


def layout(tmp_path, seed: int, tag: str = "v1"):
    image = gzip_image(seed, [20_000, 5_000])
    path = tmp_path / f"layout-{seed}"
    write_oci_layout(path, image, tag=tag)
    return image, f"oci:{path}:{tag}"


async def test_skopeo_login_push_and_pull_with_the_admin_password(skopeo, tmp_path):
    image, source = layout(tmp_path, 1)
    await skopeo.run("login", "--tls-verify=false", "--authfile", str(skopeo.auth),
                     "-u", REGISTRY, "-p", ADMIN_PASSWORD, skopeo.host)
    assert skopeo.host in json.loads(skopeo.auth.read_text())["auths"]
    await skopeo.copy(source, skopeo.ref("team/app:v1"))
    assert await skopeo.inspect_raw(skopeo.ref("team/app:v1")) == image.manifest
    await skopeo.copy(skopeo.ref("team/app:v1"), f"oci:{tmp_path / 'pulled'}:v1")
    pulled = json.loads((tmp_path / "pulled" / "index.json").read_text())
    assert pulled["manifests"][0]["digest"] == image.digest


async def test_skopeo_login_with_a_wrong_password_fails(skopeo):
    code, _, err = await skopeo.run("login", "--tls-verify=false", "--authfile", str(skopeo.auth),
                                    "-u", REGISTRY, "-p", "wrong", skopeo.host, check=False)
    assert code != 0 and "invalid username/password" in err, err


async def test_skopeo_with_a_pull_only_token_pulls_and_is_denied_push(skopeo, node, tmp_path, http):
    image, source = layout(tmp_path, 2)
    async with http.get(f"{node.url}/v2/", headers=basic(REGISTRY, ADMIN_PASSWORD)) as r:
        assert r.status == 200
    await skopeo.copy(source, skopeo.ref("team/app:v1"), "--dest-creds", f"{REGISTRY}:{ADMIN_PASSWORD}")
    # Pull with the token's credentials.
    await skopeo.copy(skopeo.ref("team/app:v1"), f"oci:{tmp_path / 'pulled'}:v1",
                      "--src-creds", f"puller:{PULL_PASSWORD}")
    assert json.loads((tmp_path / "pulled" / "index.json").read_text())["manifests"][0]["digest"] \
        == image.digest
    # Push with them: refused, and what skopeo reports is the registry's DENIED.
    _, other = layout(tmp_path, 3)
    code, _, err = await skopeo.run(
        "copy", "--quiet", "--authfile", str(skopeo.auth), "--dest-tls-verify=false",
        "--dest-creds", f"puller:{PULL_PASSWORD}", other, skopeo.ref("team/other:v1"), check=False)
    assert code != 0
    assert "denied" in err.lower(), err
    # Nothing was written.
    async with http.get(f"{node.url}/v2/team/other/tags/list",
                        headers=basic(REGISTRY, ADMIN_PASSWORD)) as r:
        assert r.status == 404


def oras_client(node) -> oras.client.OrasClient:
    client = oras.client.OrasClient(hostname=node.url.removeprefix("http://"), insecure=True)
    client.session.trust_env = False
    return client


async def test_oras_login_and_push_with_a_scoped_token(node, tmp_path, http):
    host = node.url.removeprefix("http://")
    client = oras_client(node)
    config = tmp_path / "docker-config.json"
    await asyncio.to_thread(client.login, username="team", password=TEAM_PASSWORD,
                            hostname=host, config_path=str(config))
    artifact = tmp_path / "model.bin"
    artifact.write_bytes(b"weights" * 1000)
    response = await asyncio.to_thread(
        client.push, target=f"{host}/team/model:v1", files=[str(artifact)],
        disable_path_validation=True, quiet=True)
    assert response.status_code == 201, response.text
    async with http.get(f"{node.url}/v2/team/model/tags/list",
                        headers=basic(REGISTRY, ADMIN_PASSWORD)) as r:
        assert (await r.json())["tags"] == ["v1"]
    # Outside the token's scope map the push is refused.
    with pytest.raises(Exception):  # noqa: B017 - oras-py raises its own kinds
        response = await asyncio.to_thread(
            client.push, target=f"{host}/elsewhere/model:v1", files=[str(artifact)],
            disable_path_validation=True, quiet=True)
        assert response.status_code == 201
    async with http.get(f"{node.url}/v2/elsewhere/model/tags/list",
                        headers=basic(REGISTRY, ADMIN_PASSWORD)) as r:
        assert r.status == 404
