"""What a build context may be (``cluster.control.containerfile``), as pure
unit tests on temp dirs: hostile archives are refused and write nothing
outside the directory they are unpacked into, unpacking is bounded as it
reads, and a task's directory is archived with the same bounds. Each test
runs in milliseconds, without a cluster.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from cluster.control.containerfile import (
    ContextRefused,
    ContextTooLarge,
    archive_directory,
    unpack_context,
)


def _tar(members, fmt=tarfile.PAX_FORMAT, compress=True) -> bytes:
    """``members``: (TarInfo, data or None) pairs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(buf.getvalue(), 1) if compress else buf.getvalue()


def _info(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.fixture
def unpack(tmp_path):
    """Unpack bytes into tmp/a/context; assert nothing appeared beside it."""
    into = tmp_path / "a" / "context"
    into.mkdir(parents=True)

    def run(data: bytes, **limits):
        archive = tmp_path / "context.tar"
        archive.write_bytes(data)
        try:
            unpack_context(archive, into, **limits)
        finally:
            archive.unlink()
            assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
            assert [p.name for p in (tmp_path / "a").iterdir()] == ["context"]
        return into
    return run


def test_a_plain_context_with_dirs_and_links_inside_unpacks(unpack):
    into = unpack(_tar([(_info("src", tarfile.DIRTYPE), None),
                        (_info("src/main.c"), b"int main;"),
                        (_info("./Containerfile"), b"FROM scratch\n"),
                        (_info("src/up", tarfile.SYMTYPE, "../Containerfile"), None),
                        (_info("hard", tarfile.LNKTYPE, "src/main.c"), None)]))
    assert (into / "src/main.c").read_bytes() == b"int main;"
    assert os.readlink(into / "src/up") == "../Containerfile"
    assert (into / "hard").read_bytes() == b"int main;"


def test_the_long_symlink_chain_that_defeats_the_data_filter_is_refused(unpack):
    # CVE-2025-4517's shape: realpath gives up past PATH_MAX, the kernel follows.
    comp, steps, members, path = "d" * 247, "abcdefghijklmnop", [], ""
    for s in steps:
        members.append((_info(os.path.join(path, comp), tarfile.DIRTYPE), None))
        members.append((_info(os.path.join(path, s), tarfile.SYMTYPE, comp), None))
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append((_info(linkpath, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps))), None))
    members.append((_info("escape", tarfile.SYMTYPE, linkpath + "/.."), None))
    members.append((_info("escape/PWNED"), b"written outside\n"))
    with pytest.raises(ContextRefused):
        unpack(_tar(members))


@pytest.mark.parametrize("member, words", [
    ((_info("/etc/escape"), b"x"), "absolute name"),
    ((_info("../escape"), b"x"), "'..'"),
    ((_info("abs", tarfile.SYMTYPE, "/etc"), None), "absolute symlink"),
    ((_info("sub/up", tarfile.SYMTYPE, "../../escape"), None), "outside the context"),
    ((_info("passwd", tarfile.LNKTYPE, "/etc/passwd"), None), "absolute name"),
    ((_info("passwd", tarfile.LNKTYPE, "nothere"), None), "not an earlier file"),
    ((_info("tty", tarfile.CHRTYPE), None), "device, fifo"),
    ((_info("pipe", tarfile.FIFOTYPE), None), "device, fifo"),
])
def test_a_member_that_could_reach_outside_is_refused(unpack, member, words):
    with pytest.raises(ContextRefused, match=words):
        unpack(_tar([(_info("Containerfile"), b"FROM scratch\n"), member]))


def test_a_file_through_an_earlier_symlink_is_refused(unpack, tmp_path):
    with pytest.raises(ContextRefused, match="not a directory"):
        unpack(_tar([(_info("link", tarfile.SYMTYPE, "."), None),
                     (_info("link/file"), b"x")]))


def test_a_long_name_header_is_refused_before_it_is_read(unpack):
    # GNU long names are read whole into memory by tarfile: capped before that.
    with pytest.raises(ContextRefused, match="header record"):
        unpack(_tar([(_info("n" * 100_000), b"x")], fmt=tarfile.GNU_FORMAT))


def test_a_gzip_bomb_and_too_many_entries_are_a_413(unpack):
    zeros = _tar([(_info("zeros"), bytes(2 * 2**20))])
    assert len(zeros) < 10_000
    with pytest.raises(ContextTooLarge):
        unpack(zeros, max_bytes=2**20)
    many = _tar([(_info(f"f{i}"), b"") for i in range(6)])
    with pytest.raises(ContextTooLarge):
        unpack(many, max_members=5)


def test_a_task_directory_is_archived_bounded_and_odd_files_are_a_400(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "Containerfile").write_text("FROM scratch\n")
    (src / "sub" / "a").write_bytes(b"a" * 100)
    (src / "link").symlink_to("sub/a")
    archive = tmp_path / "ctx.tar"
    archive_directory(src, archive)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [".", "Containerfile", "link", "sub", "sub/a"]
    with pytest.raises(ContextTooLarge):
        archive_directory(src, archive, max_bytes=50)
    with pytest.raises(ContextTooLarge):
        archive_directory(src, archive, max_members=3)
    os.mkfifo(src / "pipe")
    with pytest.raises(ContextRefused, match=f"{src}/pipe"):
        archive_directory(src, archive)


def test_an_unreadable_task_directory_is_a_400_naming_the_path(tmp_path):
    # sysfs files claim 4096 bytes and hold fewer: reading one fails mid-archive.
    with pytest.raises(ContextRefused, match="cannot be read: /sys/kernel/mm"):
        archive_directory(Path("/sys/kernel/mm"), tmp_path / "ctx.tar")


def test_a_task_context_lies_under_a_configured_root_and_never_in_the_data_dir(tmp_path):
    from cluster.control.containerfile import task_context

    root, data = tmp_path / "sources", tmp_path / "sources" / "data"
    (root / "app").mkdir(parents=True)
    (data / "keys").mkdir(parents=True)
    (root / "sneaky").symlink_to(data / "keys")
    roots = (str(root),)
    assert task_context(str(root / "app"), roots, data) == root / "app"
    for inside in (data, data / "keys", root, root / "sneaky"):   # is, in, holds, links to
        with pytest.raises(ContextRefused, match="data dir"):
            task_context(str(inside), roots, data)
    with pytest.raises(ContextRefused, match="must lie under one of"):
        task_context("/etc", roots, data)
    with pytest.raises(ContextRefused, match=r"\[tasks\] context_roots \(none is set\)"):
        task_context(str(root / "app"), (), data)
    with pytest.raises(ContextRefused, match="absolute"):
        task_context("app", roots, data)


def test_the_runtime_base_is_found_through_the_final_stages_chain():
    from cluster.control.containerfile import base_images

    lines = ["FROM r:1/tools:1 AS tools", "FROM r:1/sdk:2 AS builder", "RUN make",
             "FROM builder AS tested", "FROM tools", "FROM tested", "COPY --from=tools /t /t"]
    bases = base_images(lines, "r:1")
    # The final stage is FROM tested, which is FROM builder, which is FROM sdk:2.
    assert [(b.repository, b.reference, b.runtime) for b in bases] == \
        [("tools", "1", False), ("sdk", "2", True)]
    assert [b.runtime for b in base_images(["FROM r:1/a", "FROM scratch"], "r:1")] == [False]


def test_from_lines_take_args_the_login_server_continuations_and_digests():
    from cluster.control.containerfile import base_images

    digest = "sha256:" + "a" * 64
    lines = ["ARG REGISTRY_NAME", "ARG TAG=1", "FROM ${REGISTRY_NAME}/baseimages/node:$TAG",
             "FROM \\", "  r:1/base:2@" + digest + " AS b",
             "FROM reg.azurecr.io/app AS c"]
    bases = base_images(lines, "r:1", aliases=("reg.azurecr.io",),
                        build_args=(("REGISTRY_NAME", "r:1"), ("OTHER", "x")))
    assert [(b.repository, b.reference) for b in bases] == \
        [("baseimages/node", "1"), ("base", digest), ("app", "latest")]
    assert lines[2] == "FROM r:1/baseimages/node:1" and lines[4] == ""
    assert lines[5].startswith("FROM r:1/app")              # buildah pulls from the endpoint
    with pytest.raises(ContextRefused, match="no ARG before the first FROM"):
        base_images(["FROM $NOPE/x"], "r:1")
    with pytest.raises(ContextRefused, match="must be in this registry"):
        base_images(["ARG R=docker.io", "FROM $R/library/alpine"], "r:1")


def test_registry_is_substituted_in_from_lines_and_images_but_not_in_run_steps():
    from cluster.control.containerfile import RunVariables

    variables = RunVariables("ca3", "h:1", "20261207-221500z")
    assert variables.containerfile("FROM $Registry/b\nRUN echo $Registry {{.Run.ID}}\n") == \
        ["FROM h:1/b", "RUN echo $Registry ca3"]
    assert variables.substitute("${Registry}/a:{{.Run.Date}}") == "h:1/a:20261207-221500z"
