from __future__ import annotations

from .helpers import make_image, push_image, urlopen


async def test_push_and_pull_an_image(node, http):
    image = make_image([10, 20])
    digest = await push_image(http, node.url, "smoke/app", image, tag="v1")
    assert digest == image.digest
    async with http.get(f"{node.url}/v2/smoke/app/manifests/v1") as r:
        assert r.status == 200
        assert await r.read() == image.manifest


def test_node_process_restarts(node_process):
    proc = node_process("n")
    assert urlopen(proc.url + "/v2/").status == 200
    proc.restart()
    assert urlopen(proc.url + "/v2/").status == 200
