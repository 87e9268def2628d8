"""What a georeg process's log shows of a failure: the exception and where it
happened, never a secret that one of the failing frames held."""

from __future__ import annotations

import io

import structlog

from cluster.control.imports import ImportRequest
from registry_node import logs
from registry_node.upstream import parse_source

PASSWORD = "hunter2-source-password"


def fail_with(request: ImportRequest) -> None:
    password = request.credentials[1] if request.credentials else None   # a local, as in real code
    raise RuntimeError(f"the import failed ({len(password or '')})")


def test_a_console_traceback_shows_no_credential_a_frame_held():
    """Console tracebacks used to render every frame's locals (rich's default):
    an ``ImportRequest`` there, or a ``password`` local, showed the source's
    password."""
    request = ImportRequest(parse_source("registry.example.com/app:1"), (("app", "1"),), (),
                            credentials=("puller", PASSWORD), ca_pem="-----BEGIN CERT")
    assert PASSWORD not in repr(request) and "BEGIN" not in repr(request)
    stream = io.StringIO()
    logs.configure("console", "info", stream=stream)
    try:
        try:
            fail_with(request)
        except RuntimeError:
            structlog.get_logger("test").exception("import failed")
    finally:
        logs.configure("console", "warning")           # what conftest set
    written = stream.getvalue()
    assert "import failed" in written and "RuntimeError" in written and "fail_with" in written
    assert PASSWORD not in written
