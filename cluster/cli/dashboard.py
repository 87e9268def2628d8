"""`georeg dashboard`: the running cluster's web dashboard (``cluster.control.dashboard``):
its URL, and with ``--open`` one that signs the browser in as the owner."""

from __future__ import annotations

import argparse
import os
import sys
import webbrowser

from ..control.dashboard import LOGIN_TOKEN_TTL_S, dashboard_url
from ..control.state import saved_spec
from .common import add_data_dir, call, command, data_dir_of, management_url


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboard", help="the live web dashboard: map, faults, lag heatmap (prints its URL)",
        description="Print the URL of the running cluster's web dashboard, served by its "
                    "management server. With --open, the URL carries a one-time login token "
                    f"(valid once, for {LOGIN_TOKEN_TTL_S} s) that signs the browser in as the "
                    "cluster owner, and a browser is opened on it when one is available. "
                    "Without it, the page asks for the owner credential or an identity's id "
                    "and secret (a viewer: sees everything, changes nothing).")
    add_data_dir(p)
    p.add_argument("--open", action="store_true",
                   help="mint a one-time login token, print the URL that uses it and open it")
    p.set_defaults(func=command(run_dashboard))


def run_dashboard(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    url = dashboard_url(management_url(data_dir))
    spec = saved_spec(data_dir)
    if not args.open:
        print(url)
        return 0
    if spec is not None and spec.auth_enabled:
        token = call(data_dir, "POST", "/georeg/v1/dashboard/login-tokens")["loginToken"]
        # In the fragment: a browser never sends it to a server, so it lands in no log.
        url = f"{url}#login={token}"
    print(url, flush=True)
    # Only where a browser can show it: without a display, webbrowser would pick a
    # text browser and take over this terminal.
    if any(os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")) \
            or sys.platform == "darwin":
        webbrowser.open(url)
    else:
        print("no display here: open the URL above in a browser", file=sys.stderr)
    return 0
