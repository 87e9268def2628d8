"""The cluster spec's validation, the WAN model and the plan: pure, no processes."""

from __future__ import annotations

import pytest

from cluster.control import spec as specs
from cluster.control.plan import plan
from cluster.control.regions import REGIONS, distance_km
from cluster.control.supervisor import Supervisor
from cluster.network.wan import PairOverride, WanModel

from .command_line import georeg_command


def problems(raw: dict) -> list[str]:
    with pytest.raises(specs.SpecError) as info:
        specs.parse(raw, "test.toml")
    return info.value.problems


def test_the_default_spec_is_valid_and_shows_zones_routing_and_residency():
    spec = specs.load(None)
    assert spec.tier == "Premium" and spec.home_region == "eastus"
    assert [(r.region, r.zone_redundant) for r in spec.all_replicas] == [
        ("eastus", True), ("westeurope", True), ("brazilsouth", False), ("southeastasia", False)]
    assert set(spec.residency.confined_regions) == {"brazilsouth", "southeastasia"}
    assert spec.node_count() == 8


def test_unknown_region_suggests_the_nearest_names():
    [problem] = problems({"home_region": "eastsu"})
    assert "unknown region 'eastsu'" in problem and "eastus" in problem
    [problem] = problems({"replicas": [{"region": "west europe"}]})
    assert "westeurope" in problem


def test_geo_replication_and_zones_need_premium():
    found = problems({"tier": "Standard", "replicas": [{"region": "westeurope"}]})
    assert any("geo-replication needs the Premium tier" in p for p in found)
    found = problems({"tier": "Basic", "home_zone_redundant": True})
    assert any("zone redundancy needs the Premium tier" in p for p in found)


def test_blob_downloads_are_relayed_or_redirected():
    assert specs.load(None).blob_downloads == "relay"
    assert specs.parse({"blob_downloads": "redirect"}).blob_downloads == "redirect"
    [problem] = problems({"blob_downloads": "proxy"})
    assert "blob_downloads 'proxy' is not one of 'relay'" in problem and "'redirect'" in problem
    [problem] = problems({"blob_downloads": "Redirects"})
    assert "did you mean 'redirect'?" in problem


def test_auth_is_token_or_none_and_plans_each_nodes_access_files(tmp_path):
    # Credentials are the default, as in ACR; "none" is asked for by name.
    assert specs.load(None).auth == "token" and specs.parse({}).auth == "token"
    assert specs.parse({"auth": "none"}).auth_enabled is False
    assert plan(specs.parse({"auth": "none"}).seeded(1), tmp_path).nodes[0].access is None
    spec = specs.parse({"registry": "contoso"}).seeded(1)
    assert spec.auth_enabled and spec.login_server == "contoso.azurecr.io"
    cluster_plan = plan(spec, tmp_path)
    for node in cluster_plan.all_nodes:       # paired-region copies included
        access = node.access
        assert access is not None and access.service == "contoso.azurecr.io"
        assert node.name in str(access.cert_file) and node.name in str(access.key_file)
        assert access.ca_file == cluster_plan.nodes[0].access.ca_file
    [problem] = problems({"auth": "Token "})
    assert "auth 'Token ' is not one of 'token'" in problem and "did you mean 'token'" in problem


def test_every_node_of_an_auth_cluster_gets_the_same_login_server_and_no_identities_file(
        tmp_path):
    """Tokens are checked against the service every node is told: the spec's
    login server, passed to each node (its own default would differ); what a
    node enforces is the registry configuration it holds, no file."""
    spec = specs.parse({"auth": "token", "registry": "contoso",
                        "replicas": [{"region": "northeurope"}]}).seeded(1)
    cluster_plan = plan(spec, tmp_path)
    supervisor = Supervisor(cluster_plan)
    for node in cluster_plan.all_nodes:
        command = supervisor.node_command(node)
        assert command[command.index("--auth-service") + 1] == "contoso.azurecr.io"
        assert "--auth-identities" not in command


def test_zone_redundancy_needs_a_region_with_zones():
    [problem] = problems({"replicas": [{"region": "westus", "zone_redundant": True}]})
    assert "westus has no availability zones" in problem
    assert "westus2" in problem  # a nearby region that has them


def test_home_region_as_replica_and_duplicates_are_refused():
    found = problems({"replicas": [{"region": "eastus"}, {"region": "westeurope"},
                                   {"region": "westeurope"}]})
    assert any("eastus is the home region" in p for p in found)
    assert any("westeurope is replicated twice" in p for p in found)


def test_ports_that_collide_or_overflow_are_refused():
    [problem] = problems({"network": {"port_base": 5000, "management_port": 5100}})
    assert "collides" in problem and "5100" in problem
    [problem] = problems({"network": {"port_base": 65400}})
    assert "leaves no room" in problem
    [problem] = problems({"network": {"port_base": -1}})
    assert "must be a port number, or 0 for any free range" in problem


def test_a_base_of_0_leaves_the_ports_to_the_start_and_cannot_be_planned(tmp_path):
    spec = specs.parse({"network": {"port_base": 0}}).seeded(1)
    assert spec.network.port_base == specs.ANY_PORT_BASE
    with pytest.raises(ValueError, match="ports are decided"):
        plan(spec, tmp_path)
    assert plan(spec.with_port_base(20000), tmp_path).management_port == 20099


def test_typos_in_keys_are_caught_with_a_suggestion():
    [problem] = problems({"home_regoin": "eastus"})
    assert "unknown key 'home_regoin'" in problem and "home_region" in problem
    [problem] = problems({"replicas": [{"region": "westeurope", "zone_redundnat": True}]})
    assert "zone_redundant" in problem


def test_wrong_types_name_the_field():
    [problem] = problems({"replicas": [{"region": 3}]})
    assert "replicas[0].region" in problem


def test_every_problem_is_reported_at_once():
    found = problems({"tier": "Premum", "home_region": "nowhere",
                      "replicas": [{"region": "westus", "zone_redundant": True}]})
    assert len(found) == 3
    assert any("did you mean 'Premium'" in p for p in found)


def test_georeg_up_refuses_an_invalid_spec_file_and_says_why(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('tier = "Standard"\n[[replicas]]\nregion = "japaneast"\n')
    result = georeg_command(["up", "--config", str(bad), "--data-dir", str(tmp_path / "data")],
                            timeout=60)
    assert result.returncode == 2
    assert "geo-replication needs the Premium tier" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("tier = \n")
    result = georeg_command(["up", "--config", str(broken), "--data-dir", str(tmp_path / "data")],
                            timeout=60)
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_wan_model_matches_known_round_trips():
    wan = WanModel()
    assert wan.rtt_ms("eastus", "westeurope") == pytest.approx(80, abs=5)
    assert wan.rtt_ms("eastus", "eastus") == pytest.approx(1.0)
    # Farther is slower, and the model is symmetric.
    assert wan.rtt_ms("eastus", "southeastasia") > wan.rtt_ms("eastus", "westeurope")
    assert wan.rtt_ms("westeurope", "eastus") == wan.rtt_ms("eastus", "westeurope")
    link = wan.link("eastus", "westeurope")
    assert link.latency_ms == pytest.approx(wan.rtt_ms("eastus", "westeurope") / 2)
    assert link.jitter_ms > 0 and link.bandwidth_mbps > 0
    overridden = WanModel((PairOverride("eastus", "brazilsouth", rtt_ms=120),))
    assert overridden.rtt_ms("brazilsouth", "eastus") == 120


def test_regions_know_their_pairs_and_geography():
    assert REGIONS["eastus"].pair == "westus" and REGIONS["westus"].pair == "eastus"
    assert REGIONS["brazilsouth"].pair == "southcentralus"   # one-way, outside Brazil
    assert REGIONS["southeastasia"].pair == "eastasia"
    assert 6000 < distance_km("eastus", "westeurope") < 7000


def test_plan_gives_each_node_ports_and_a_link_to_every_peer(tmp_path):
    p = plan(specs.load(None).seeded(1), tmp_path)
    names = [n.name for n in p.nodes]
    assert names == ["eastus-1", "eastus-2", "eastus-3", "westeurope-1", "westeurope-2",
                     "westeurope-3", "brazilsouth", "southeastasia"]
    # A link for every ordered pair of nodes, and each paired copy (eastus's in
    # westus, westeurope's in northeurope; none for confined regions) linked both
    # ways with the three zones of the region it keeps.
    assert [(c.name, c.region, c.copy_of) for c in p.pair_copies] == [
        ("pair-eastus", "westus", "eastus"), ("pair-westeurope", "northeurope", "westeurope")]
    assert len(p.links) == 8 * 7 + 2 * 3 * 2
    # The management API reaches each serving node through a link of its own.
    assert [(m.target, m.target_port) for m in p.management_links] == \
        [(n.name, n.http_port) for n in p.nodes]
    ports = [n.http_port for n in p.all_nodes] + [n.grpc_port for n in p.all_nodes] + \
        [link.port for link in p.links] + [e.port for e in p.endpoints] + [p.management_port] + \
        [m.port for m in p.management_links]
    assert len(ports) == len(set(ports))
    assert set(ports) <= set(specs.port_layout(p.spec).all_ports())
    assert {peer.name for peer in p.view(p.pair_copy("eastus")).peers} == \
        {"eastus-1", "eastus-2", "eastus-3"}
    view = p.view(p.node("westeurope-1"))
    assert {peer.name for peer in view.peers} == set(names) - {"westeurope-1"}
    assert view.zone_redundant and {z.name for z in view.zone_peers} == {"westeurope-2", "westeurope-3"}
    # Adding a replica only appends: every port in use keeps its meaning.
    bigger = plan(specs.validate(p.spec.with_replicas(
        (*p.spec.replicas, specs.ReplicaSpec("japaneast"))), "t"), tmp_path)
    assert bigger.links[:8 * 7] == p.links[:8 * 7]
    assert bigger.nodes[:len(p.nodes)] == p.nodes
    assert {link.port for link in p.links} <= {link.port for link in bigger.links}
    assert bigger.management_links[:len(p.nodes)] == p.management_links


def test_each_link_draws_from_its_own_seed_whatever_the_order_of_links(tmp_path):
    """A plan carries the cluster's seed and, per link, one derived from it and
    the link's two ends: the same in two plans of the same seed even where the
    link's place (and port) differ; different under another seed."""
    spec = specs.load(None)
    reordered = spec.with_replicas(tuple(reversed(spec.replicas)))
    seeds = {}
    for name, s in (("a", spec.seeded(5)), ("b", reordered.seeded(5)), ("c", spec.seeded(6))):
        p = plan(s, tmp_path)
        assert p.seed == s.seed
        seeds[name] = {(link.source, link.target): link.seed for link in p.links}
    assert seeds["a"] == seeds["b"]
    assert [link.name for link in plan(spec.seeded(5), tmp_path).links] != \
        [link.name for link in plan(reordered.seeded(5), tmp_path).links]
    assert len(set(seeds["a"].values())) == len(seeds["a"])   # no two links alike
    assert all(seeds["c"][k] != v for k, v in seeds["a"].items())
    with pytest.raises(ValueError, match="seeded spec"):
        plan(spec, tmp_path)


def test_a_spec_seed_is_kept_and_an_open_one_is_decided_once(tmp_path):
    from cluster.control.cluster import Cluster

    assert specs.parse({"seed": 42}).seeded().seed == 42
    assert specs.parse({"seed": 42}).seeded(7).seed == 7         # georeg up --seed 7
    assert "seed -1 must be between 0 and 2**64 - 1" in problems({"seed": -1})
    open_spec = specs.load(None)
    assert open_spec.seed is None
    drawn = open_spec.seeded().seed
    assert isinstance(drawn, int) and 0 <= drawn < specs.SEEDS
    cluster = Cluster(open_spec, tmp_path)        # not started: only its plan is made
    assert cluster.spec.seed is not None and cluster.plan.seed == cluster.spec.seed
    assert cluster.status()["seed"] == cluster.spec.seed


def test_replication_settings_come_from_the_spec_and_reach_every_nodes_view(tmp_path):
    from cluster.control.cluster import Cluster
    from replicator.topology import ReplicationSettings

    assert specs.load(None).replication.settings() == ReplicationSettings()
    spec = specs.parse({"replication": {"peer_horizon_s": 120, "tombstone_grace_s": 0,
                                        "one_wan_copy_per_region": False,
                                        "log_retain_events": 50}})
    settings = spec.replication.settings()
    assert (settings.peer_horizon_s, settings.tombstone_grace_s, settings.log_retain_events,
            settings.one_wan_copy_per_region) == (120.0, 0.0, 50, False)
    assert settings.anti_entropy_interval_s == ReplicationSettings().anti_entropy_interval_s
    cluster = Cluster(spec.seeded(1), tmp_path)
    assert cluster.settings == settings
    view = cluster.plan.view(cluster.plan.nodes[0], cluster.settings)
    assert view.replication == settings


def test_webhook_settings_come_from_the_spec_and_reach_every_nodes_view(tmp_path):
    from registry_node.config import WebhookSettings
    from replicator.topology import ClusterView

    defaults = WebhookSettings()
    assert specs.load(None).webhooks.settings() == defaults
    toml = tmp_path / "spec.toml"
    toml.write_text('[[replicas]]\nregion = "westeurope"\nzone_redundant = true\n\n'
                    '[webhooks]\ntimeout_s = 2\nbackoff_cap_s = 0.5\n'
                    'retry_horizon_s = 600\nlog_size = 20\n')
    spec = specs.load(toml)
    p = plan(spec.seeded(1).with_port_base(20000), tmp_path / "data")
    wan = spec.wan_model()
    for node in p.all_nodes:
        settings = p.view(node).webhooks
        assert (settings.timeout_s, settings.backoff_cap_s, settings.retry_horizon_s,
                settings.log_size) == (2.0, 0.5, 600.0, 20), node.name
        # What the table does not give keeps its default; what the plan decides stays its own.
        assert (settings.backoff_base_s, settings.completion_wait_s) == \
            (defaults.backoff_base_s, defaults.completion_wait_s)
        assert settings.deliver == (node.name in ("eastus", "westeurope-1")), node.name
        assert settings.wan_latency_ms["japaneast"] == \
            wan.link(node.region, "japaneast").latency_ms
    # As the node reads it: through its view file.
    node = p.node("westeurope-1")
    p.view(node).dump(tmp_path / "view.json")
    assert ClusterView.load(tmp_path / "view.json").webhook_settings.backoff_cap_s == 0.5


def test_webhook_settings_out_of_range_or_misspelt_are_refused():
    found = problems({"webhooks": {"timeout_s": 0, "backoff_cap_s": -1, "retry_horizon_s": 0,
                                   "log_size": 0}})
    assert sorted(p.split(" ")[0] for p in found) == [
        "webhooks.backoff_cap_s", "webhooks.log_size", "webhooks.retry_horizon_s",
        "webhooks.timeout_s"]
    [problem] = problems({"webhooks": {"timeout": 5}})
    assert "unknown key webhooks.'timeout'" in problem and "timeout_s" in problem
    [problem] = problems({"webhooks": {"log_size": "many"}})
    assert "webhooks.log_size" in problem
    # The plan decides which node delivers and the latency to receivers: not the spec.
    [problem] = problems({"webhooks": {"deliver": False}})
    assert "unknown key webhooks.'deliver'" in problem


def test_replication_settings_out_of_range_or_misspelt_are_refused():
    found = problems({"replication": {"peer_horizon_s": 0, "quorum_timeout_s": -1,
                                      "tombstone_grace_s": -5, "log_retain_events": -1}})
    assert sorted(p.split(" ")[0] for p in found) == [
        "replication.log_retain_events", "replication.peer_horizon_s",
        "replication.quorum_timeout_s", "replication.tombstone_grace_s"]
    [problem] = problems({"replication": {"tombstone_grace": 60}})
    assert "unknown key replication.'tombstone_grace'" in problem
    assert "tombstone_grace_s" in problem


def test_throttling_is_off_unless_the_limits_table_turns_it_on(tmp_path):
    """Off by default (``make up`` and the suite push as fast as the machine allows);
    ``limits = "tier"`` gives the tier's rates per replica (ACR-SEMANTICS.md),
    a rate given overrides its kind and turns throttling on, 0 turns a kind off."""
    from replicator.topology import ClusterView

    assert specs.load(None).limits.request_limits("Premium") is None
    tier = specs.parse({"tier": "Standard", "limits": {"limits": "tier"}})
    limits = tier.limits.request_limits(tier.tier)
    assert limits.per_minute() == {"read": 10_000, "write": 2_000, "delete": 1_000,
                                   "referrers": 500}
    assert (limits.per_identity_fraction, limits.burst_s) == (0.5, 60.0)
    premium = specs.parse({"limits": {"limits": "tier"}}).limits.request_limits("Premium")
    assert premium.per_minute() == {"read": 20_000, "write": 4_000, "delete": 4_000,
                                    "referrers": 2_000}
    no_deletes = specs.parse({"limits": {"limits": "tier", "deletes_per_min": 0}})
    assert "delete" not in no_deletes.limits.request_limits("Basic").per_minute()
    only_writes = specs.parse({"limits": {"writes_per_min": 60}}).limits.request_limits("Basic")
    assert only_writes.per_minute() == {"write": 60}
    assert specs.parse({"limits": {"writes_per_min": 0}}).limits.request_limits("Basic") is None
    toml = tmp_path / "spec.toml"
    toml.write_text('home_zone_redundant = true\n[[replicas]]\nregion = "westeurope"\n\n'
                    '[limits]\nlimits = "tier"\nwrites_per_min = 60\nper_identity_fraction = 1\n'
                    'burst_s = 5\n')
    spec = specs.load(toml)
    p = plan(spec.seeded(1).with_port_base(20000), tmp_path / "data")
    for node in p.nodes:
        limits = p.view(node).request_limits
        assert limits.per_minute() == {"read": 20_000, "write": 60, "delete": 4_000,
                                       "referrers": 2_000}, node.name
        assert (limits.per_identity_fraction, limits.burst_s) == (1.0, 5.0)
        # The whole replica's limit on each zone node, shared with its zone peers
        # (what `georeg node` hands the node as its zone siblings).
        siblings = {f"http://127.0.0.1:{other.http_port}" for other in p.nodes_in(node.region)
                    if other is not node}
        assert {peer.http for peer in p.view(node).zone_peers} == siblings, node.name
    assert len(p.view(p.node("eastus-1")).zone_peers) == 2
    assert p.view(p.node("westeurope")).zone_peers == ()
    for copy in p.pair_copies:                       # storage only: no clients, no limits
        assert p.view(copy).request_limits is None
    node = p.node("eastus-2")
    p.view(node).dump(tmp_path / "view.json")
    assert ClusterView.load(tmp_path / "view.json").request_limits == p.view(node).request_limits


def test_limits_out_of_range_contradictory_or_misspelt_are_refused():
    found = problems({"limits": {"writes_per_min": float("inf"), "reads_per_min": -5,
                                 "per_identity_fraction": 1.5, "burst_s": 0}})
    assert sorted(p.split(" ")[0] for p in found) == [
        "limits.burst_s", "limits.per_identity_fraction", "limits.reads_per_min",
        "limits.writes_per_min"]
    [problem] = problems({"limits": {"limits": "teir"}})
    assert "did you mean 'tier'" in problem
    # Tiny rates and shares would make waits overflow; NaN is no number; 0 is "off".
    found = problems({"limits": {"writes_per_min": 1e-320, "reads_per_min": float("nan"),
                                 "per_identity_fraction": 1e-320, "burst_s": float("nan"),
                                 "deletes_per_min": 0}})
    assert sorted(p.split(" ")[0] for p in found) == [
        "limits.burst_s", "limits.per_identity_fraction", "limits.reads_per_min",
        "limits.writes_per_min"], found
    [problem] = problems({"limits": {"write_per_min": 60}})
    assert "unknown key limits.'write_per_min'" in problem and "writes_per_min" in problem
