"""One node's storage and domain objects, opened and closed together.

Opening a data dir checks that it belongs to this node (region and zone) and
was encrypted with this key, and refuses to start otherwise with a message
that says what to do: serving a data dir with the wrong key would fail on
every read, and adopting another region's data would corrupt replication.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import keys
from .blobstore import BlobStore
from .clock import ClockGuard, WallClock
from .config import NodeConfig
from .configuration import Configuration
from .configuration_key import ConfigurationKey
from .crypto import NodeKey, Sealer
from .metastore import Batch, MetadataStore
from .records import NodeIdentity, decode, encode
from .registry import Limits, Registry
from .storage_faults import StorageFaults
from .webhook_outbox import WebhookOutbox

SCHEMA_VERSION = b"1"


class DataDirError(Exception):
    """The data dir cannot be used by this node; the message says why and what to do."""


@dataclass
class Node:
    config: NodeConfig
    identity: NodeIdentity
    meta: MetadataStore
    blobs: BlobStore
    registry: Registry
    executor: ThreadPoolExecutor
    configuration: Configuration
    # Webhook events to deliver; on the node that delivers its region's, the
    # feed's cursor holds the log's truncation back from the moment it opens.
    outbox: WebhookOutbox
    # Seals and opens the secrets configuration carries (``configuration_key``).
    configuration_key: ConfigurationKey

    @classmethod
    def open(cls, config: NodeConfig, *, wall_ns: Callable[[], int] = time.time_ns,
             monotonic: Callable[[], float] = time.monotonic) -> Node:
        """Open the node's storage; ``wall_ns`` and ``monotonic`` are the clocks
        its registry reads (record stamps; ages against GC grace and upload TTL).
        The wall clock is read through the node's skewable ``WallClock``
        (``registry.clock.clock``), so a clock fault reaches every stamp."""
        config.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(config.data_dir, 0o700)
        node_key = NodeKey.load_or_create(config.key_path) if config.key_file is None \
            else NodeKey.load(config.key_file)
        # The cluster's, read before anything opens (a bad file stops the start),
        # or a standalone node's own.
        configuration_key = ConfigurationKey.of_node(node_key) \
            if config.configuration_key_file is None \
            else ConfigurationKey.load(config.configuration_key_file)
        faults = StorageFaults()
        clock = ClockGuard(WallClock(wall_ns), monotonic)
        wall_ns = clock.clock.now_ns
        meta = MetadataStore(config.data_dir / "meta", sync=config.sync, faults=faults,
                             wall_ns=wall_ns)
        try:
            identity = _check_data_dir(meta, node_key, config)
        except BaseException:
            meta.close()
            raise
        executor = ThreadPoolExecutor(max_workers=config.io_threads, thread_name_prefix="georeg-io")
        blobs = BlobStore(config.data_dir, node_key, faults)

        def run_blocking(fn):
            return asyncio.get_running_loop().run_in_executor(executor, fn)

        registry = Registry(meta, blobs, Sealer(node_key.derive(b"manifest")), identity,
                            run_blocking=run_blocking, wall_ns=wall_ns, monotonic=monotonic,
                            clock=clock,
                            limits=Limits(max_storage=config.storage_limit))
        configuration = Configuration(registry, configuration_key)
        registry.tier = configuration.tier      # the storage maximum follows the live tier
        registry.bin.policy = configuration.soft_delete
        outbox = WebhookOutbox(meta, holds_log=config.webhooks.deliver)
        return cls(config, identity, meta, blobs, registry, executor,
                   configuration, outbox, configuration_key)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.meta.close()


def _check_data_dir(meta: MetadataStore, node_key: NodeKey, config: NodeConfig) -> NodeIdentity:
    batch = Batch()
    schema = meta.get(keys.SCHEMA)
    if schema is None:
        batch.put(keys.SCHEMA, SCHEMA_VERSION)
    elif schema != SCHEMA_VERSION:
        raise DataDirError(f"{config.data_dir} has storage schema {schema.decode()}, this georeg "
                           f"reads schema {SCHEMA_VERSION.decode()}")
    check = meta.get(keys.KEY_CHECK)
    if check is None:
        batch.put(keys.KEY_CHECK, node_key.check_value())
    elif not node_key.matches(check):
        raise DataDirError(f"{config.key_path} is not the key {config.data_dir} was encrypted "
                           f"with; pass the original with --key-file")
    raw = meta.get(keys.IDENTITY)
    if raw is None:
        identity = NodeIdentity(config.region, config.zone, uuid.uuid4().hex)
        batch.put(keys.IDENTITY, encode(identity))
    else:
        identity = decode(raw, NodeIdentity)
        if (identity.region, identity.zone) != (config.region, config.zone):
            zone = f" --zone {identity.zone}" if identity.zone else ""
            raise DataDirError(
                f"{config.data_dir} belongs to region {identity.region!r} zone {identity.zone!r}; "
                f"start it with --region {identity.region}{zone}, or use another --data-dir")
    if batch:
        meta.commit(batch)
    return identity
