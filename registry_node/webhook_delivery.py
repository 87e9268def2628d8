"""Webhook delivery on one node: from the node's event log to the receivers,
at least once, in order per webhook, surviving restarts and ``kill -9``.

**Which node fires.** A webhook belongs to a region (``location``); that
region fires it for what it receives — the push one of its nodes took, and
each copy as it lands there — so the events come from the log of a node of
that region. Where the region is zone redundant every zone logs the same
events, and a receiver must not get three copies: only one node delivers,
the node of the region's *first* zone (lowest zone name), as the plan decides
it (``WebhookSettings.deliver``, carried in the node's view; a standalone node
delivers). The price of a fixed choice, said plainly: while that zone is down
its region's webhook events wait for it (they are in its log and in its
siblings' logs, and it feeds them when it is back, nothing is lost); no other
zone takes over. A node that does not deliver still answers ``ping`` and
``redeliver`` (from itself) but makes no events from its log.

**The pipeline.**

1. The *feed* tails this node's durable event log (local pushes and applied
   replicated events both land there) from a persisted cursor, turns each
   event into webhook events (``webhook_events``) for the enabled webhooks of
   this region, and commits them to the outbox together with the new cursor,
   in one batch (``webhook_outbox``). The cursor holds the log's truncation
   back, so bounded metadata never drops an event before it was fed.
2. One *worker* per webhook with events in its outbox delivers them oldest
   first: an event waits until the one before it is delivered, failed or
   given up. Workers are independent tasks: a slow or dead receiver holds up
   only its own webhook, never a push, replication or another webhook (the
   HTTP client has no shared connection limit). Before each attempt the worker
   waits the modelled one-way WAN latency from this region to the receiver's
   (``receiver_location``; ``WebhookSettings.wan_latency_ms``).
3. An attempt is a ``POST`` of the event's JSON with ``Content-Type:
   application/json`` and the webhook's custom headers, within
   ``timeout_s``. The header values are stored sealed; each attempt opens
   them with the node's configuration key just before sending, and holds
   them only as long as the request. A value that does not open here
   (sealed for another webhook or header, or under another key) fails the
   event at once, unsent and without retry: a request without its credential,
   or with ciphertext in its place, is no delivery; the reason names the
   header, never its value, and ``redeliver`` sends it once the value is set
   again. A 2xx delivers it. Connection errors, timeouts, 5xx and 429
   are retried with exponential backoff and jitter (a 429's or 503's
   ``Retry-After`` is honoured, up to ``retry_after_cap_s``) until the event is
   ``retry_horizon_s`` old, then given up. Any other answer (3xx, other 4xx)
   fails the event at once, without retry. Each attempt is persisted; a
   restart resumes with the oldest event, at once.
4. ``replicated`` / ``replication_failed``: when a push lands here and a
   webhook of this region takes one of them, the feed persists a *question*
   beside the push's events; a task asks replication (``ReplicationCompletion``,
   which the replication extension registers; a standalone node has none, and
   never fires these) until it answers that every allowed replica holds the
   image, or that one gave up, then enqueues the event and drops the question
   in one batch. Questions survive restarts; one older than
   ``completion_horizon_s`` is dropped.

**States.** ``pending`` (in the outbox) → ``delivered`` | ``failed`` (the
receiver refused it) | ``gave_up`` (past the horizon, or its webhook was
deleted or replaced). A disabled webhook makes no events and delivers none of
those queued until it is enabled again. The delivery log keeps the last
``log_size`` finished events per webhook; ``redeliver`` queues one of them
(or a pending one) again with the same id and body.

Memory stays bounded: the feed reads the log in pieces, a worker holds one
event, at most ``QUESTIONS_AT_ONCE`` questions are asked at a time, and
everything else waits on disk.

No aiohttp here: the HTTP client is injected (``Sender``), as are the clocks,
the sleep and the randomness of the jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec
import structlog

from . import keys
from .config import WebhookSettings
from .configuration import Configuration
from .configuration_key import ConfigurationKey
from .errors import ErrorCode, RegistryError
from .identities import ENABLED, InvalidValue
from .records import (
    ClientRequest,
    CompletionQuestion,
    DeliveryAttempt,
    ManifestRecord,
    WebhookEntry,
    decode,
)
from .registry import Registry
from .webhook_events import (
    Made,
    ManifestFacts,
    Occurrence,
    awaiting_completion,
    event_id,
    for_webhooks,
    occurrence,
    ping_payload,
    replication_payload,
    timestamp,
)
from .webhook_outbox import KEEP_ATTEMPTS, WebhookOutbox
from .webhooks import WEBHOOK, ReplicationCompletion, Webhook, open_headers

log = structlog.get_logger("georeg.webhooks")

FEED_BATCH = 256                 # log events turned into webhook events per commit
QUESTIONS_AT_ONCE = 64
RESPONSE_BODY_KEPT = 1024        # characters of a receiver's answer kept in the log
RESPONSE_HEADERS_KEPT = 20
PENDING, DELIVERED, FAILED, GAVE_UP = "pending", "delivered", "failed", "gave_up"


# -- the transport (injected) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    method: str
    uri: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: str


class NoAnswer(Exception):
    """No HTTP answer: the connection failed or the receiver did not answer in time."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind            # "connection" | "timeout"
        self.detail = detail


class Sender(Protocol):
    async def send(self, request: Outgoing, timeout_s: float) -> Answer:
        """The receiver's answer; ``NoAnswer`` when there is none."""
        ...


class DeliveryMetrics(Protocol):
    def attempted(self, webhook: str, outcome: str, attempt: int) -> None: ...

    def delivered(self, webhook: str, latency_s: float) -> None: ...


# -- the retry policy (pure) ------------------------------------------------------------


def verdict(status: int) -> str:
    """What an HTTP answer means for an event: delivered, retry, or failed."""
    if 200 <= status < 300:
        return DELIVERED
    if status == 429 or 500 <= status < 600:
        return "retry"
    return FAILED


def backoff_s(attempt: int, settings: WebhookSettings, rnd: random.Random) -> float:
    """The wait after failed attempt ``attempt`` (1-based): exponential, capped,
    half of it jittered (so waits grow, and receivers coming back are not hit
    by every node at once)."""
    ceiling = min(settings.backoff_cap_s, settings.backoff_base_s * 2 ** min(attempt - 1, 40))
    return ceiling / 2 + rnd.uniform(0, ceiling / 2)


def retry_after_s(value: str | None, now_s: float) -> float | None:
    """A ``Retry-After`` header's wait in seconds (delay-seconds or an HTTP
    date), or None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - now_s, 0.0)


# -- delivery ---------------------------------------------------------------------------


class WebhookDelivery:
    def __init__(self, outbox: WebhookOutbox, configuration: Configuration, registry: Registry,
                 settings: WebhookSettings, sender: Sender, metrics: DeliveryMetrics, *,
                 key: ConfigurationKey, host: str,
                 completion: Callable[[], ReplicationCompletion | None] = lambda: None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rnd: random.Random | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.outbox = outbox
        self.configuration = configuration
        self.registry = registry
        self.meta = registry.meta
        self.region = registry.identity.region
        self.settings = settings
        self.sender = sender
        self.metrics = metrics
        self.key = key                  # opens the header values, to send them
        self.host = host
        self._completion = completion
        self._sleep = sleep
        self._rnd = rnd or random.Random()
        self._monotonic = monotonic
        self._workers: dict[str, asyncio.Task] = {}
        self._asking: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        self._logged = asyncio.Event()          # the log grew
        self._questions = asyncio.Event()       # a question was added or answered
        self._changed = asyncio.Event()         # the configuration changed
        self.skipped = 0                        # log events lost to truncation before the feed
        self.fed = 0
        self.meta.on_commit(lambda seq: self._logged.set())
        configuration.on_change(lambda generation: self._changed.set())

    # -- lifetime --------------------------------------------------------------------------

    def start(self) -> None:
        self._changed.set()
        self._tasks.append(asyncio.create_task(self._watch_configuration(), name="webhook-config"))
        if self.settings.deliver:
            self._tasks.append(asyncio.create_task(self._feed_forever(), name="webhook-feed"))
            self._tasks.append(asyncio.create_task(self._ask_forever(), name="webhook-questions"))
        for name in self.outbox.pending_by_webhook():
            self._wake(name)

    async def stop(self) -> None:
        tasks = self._tasks + list(self._workers.values()) + list(self._asking.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    # -- the feed --------------------------------------------------------------------------

    async def _feed_forever(self) -> None:
        while True:
            self._logged.clear()
            try:
                fed = self.feed_once()
            except Exception:  # a failed commit (disk full): the cursor did not move
                log.exception("webhook_feed_failed")
                await self._sleep(1.0)
                continue
            if fed == FEED_BATCH:
                await asyncio.sleep(0)          # more to read: let the node breathe
                continue
            if self.meta.last_seq <= self.outbox.cursor:
                await self._logged.wait()

    def feed_once(self) -> int:
        """Turn the next log events into outbox entries (and questions), with
        the cursor, in one batch; returns how many events were read."""
        cursor = self.outbox.cursor
        floor = self.meta.log_floor
        if cursor < floor:
            # Only a node that did not deliver before (or an older georeg) can
            # be here: the feed's cursor holds truncation back.
            log.warning("webhook_feed_behind_log", cursor=cursor, log_floor=floor)
            self.skipped += floor - cursor
            cursor = floor
        events = self.meta.read_log(cursor, FEED_BATCH)
        if not events and cursor == self.outbox.cursor:
            return 0
        hooks = self._firing_webhooks()
        ob = self.outbox.begin()
        now = self.registry.wall_ns()
        asked = False
        for event in events:
            occ = occurrence(event, lookup=self._manifest, region=self.region, now_ns=now,
                             host=self.host)
            if occ is None:
                continue
            for made in for_webhooks(occ, hooks):
                self.outbox.stage(ob, made.webhook, self._entry(made, now))
            waiting = awaiting_completion(occ, hooks) if self._completion() is not None else {}
            if waiting:
                ident = event_id(occ.stamp, "", "completion", occ.repository, occ.digest, occ.tag)
                self.outbox.stage_question(ob, ident, _question(occ, waiting, now))
                asked = True
        self.outbox.stage_cursor(ob, events[-1].seq if events else cursor)
        self.outbox.commit(ob)
        self.fed += len(events)
        for name in ob.added:
            self._wake(name)
        if asked:
            self._questions.set()
        return len(events)

    def _firing_webhooks(self) -> list[tuple[str, Webhook]]:
        return [(name, hook) for name, hook in self.configuration.items(WEBHOOK)
                if isinstance(hook, Webhook) and hook.status == ENABLED
                and hook.location == self.region]

    def _manifest(self, repository: str, digest: str) -> ManifestFacts | None:
        raw = self.meta.get(keys.manifest(repository, digest))
        if raw is None:
            return None
        record = decode(raw, ManifestRecord)
        return ManifestFacts(record.media_type, record.size, record.artifact_type)

    @staticmethod
    def _entry(made: Made, now: int) -> WebhookEntry:
        return WebhookEntry(id=made.id, action=made.action, body=made.body,
                            webhook_created=made.webhook_created, created_ns=now,
                            event_ns=made.event_ns)

    # -- workers -----------------------------------------------------------------------------

    def _wake(self, webhook: str) -> None:
        if webhook not in self._workers:
            self._workers[webhook] = asyncio.create_task(self._work(webhook),
                                                         name=f"webhook:{webhook}")

    async def _work(self, webhook: str) -> None:
        try:
            while True:
                head = self.outbox.head(webhook)
                if head is None:
                    return
                number, entry = head
                hook = self.configuration.get(WEBHOOK, webhook)
                if not isinstance(hook, Webhook):
                    removed = self.outbox.purge(webhook)    # deleted: its events go with it
                    log.info("webhook_events_purged", webhook=webhook, events=removed)
                    return
                if hook.created != entry.webhook_created:
                    self._finish(webhook, number, entry, GAVE_UP,
                                 "the webhook was replaced by another of the same name")
                    continue
                if hook.status != ENABLED:
                    return      # held until it is enabled (a configuration change wakes it)
                await self._deliver(webhook, hook, number, entry)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A failed commit (disk full) or a bug: never leave the webhook
            # without a worker for good; the next wake-up (a new event, a
            # configuration change) starts one again.
            log.exception("webhook_worker_failed", webhook=webhook)
        finally:
            if self._workers.get(webhook) is asyncio.current_task():
                del self._workers[webhook]

    async def _deliver(self, webhook: str, hook: Webhook, number: int,
                       entry: WebhookEntry) -> None:
        """Attempt ``entry`` until it is delivered, failed or given up."""
        receiver = hook.receiver_location or hook.location
        latency_s = self.settings.wan_latency_ms.get(receiver, 0.0) / 1000
        while True:
            if latency_s:
                await self._sleep(latency_s)
            hook = self.configuration.get(WEBHOOK, webhook)
            if not isinstance(hook, Webhook) or hook.created != entry.webhook_created \
                    or hook.status != ENABLED:
                return          # the worker's loop settles it
            try:
                headers = open_headers(self.key, webhook, hook.headers)
            except InvalidValue as exc:
                self._finish(webhook, number, entry, FAILED, f"not sent: {exc}")
                return
            entry, answer = await self._attempt(hook, headers, entry)
            count = entry.attempt_count
            outcome = verdict(answer.status) if answer is not None else "retry"
            if outcome == DELIVERED:
                self._finish(webhook, number, entry, DELIVERED, "")
                self.metrics.attempted(webhook, DELIVERED, count)
                if entry.event_ns:
                    self.metrics.delivered(webhook, max(
                        (self.registry.wall_ns() - entry.event_ns) / 1e9, 0.0))
                return
            if outcome == FAILED:
                self._finish(webhook, number, entry, FAILED,
                             f"the receiver answered {answer.status}: not retried")
                self.metrics.attempted(webhook, FAILED, count)
                return
            age_s = (self.registry.wall_ns() - entry.created_ns) / 1e9
            left_s = self.settings.retry_horizon_s - age_s
            if left_s <= 0:
                self._finish(webhook, number, entry, GAVE_UP,
                             f"still failing after {count} attempts over "
                             f"{self.settings.retry_horizon_s:g} s")
                self.metrics.attempted(webhook, GAVE_UP, count)
                return
            self.outbox.update(webhook, number, entry)
            self.metrics.attempted(webhook, "retried", count)
            wait = backoff_s(count, self.settings, self._rnd)
            if answer is not None:
                asked = retry_after_s(next((v for k, v in answer.headers.items()
                                            if k.lower() == "retry-after"), None),
                                      self.registry.wall_ns() / 1e9)
                if asked is not None:
                    wait = max(wait, min(asked, self.settings.retry_after_cap_s))
            await self._sleep(min(wait, left_s))

    async def _attempt(self, hook: Webhook, opened: dict[str, str], entry: WebhookEntry
                       ) -> tuple[WebhookEntry, Answer | None]:
        headers = {**opened, "Content-Type": "application/json"}
        at = self.registry.wall_ns()
        started = self._monotonic()
        answer: Answer | None = None
        error = ""
        try:
            answer = await self.sender.send(Outgoing("POST", hook.uri, headers, entry.body),
                                            self.settings.timeout_s)
        except NoAnswer as exc:
            error = str(exc)
        duration_ms = round((self._monotonic() - started) * 1000, 3)
        attempt = DeliveryAttempt(at, duration_ms, answer.status if answer else 0, error)
        changes = {"attempts": (*entry.attempts, attempt)[-KEEP_ATTEMPTS:],
                   "attempt_count": entry.attempt_count + 1, "uri": hook.uri,
                   "header_names": tuple(hook.headers)}
        if answer is not None:
            changes |= {"response_status": answer.status,
                        "response_headers": dict(list(answer.headers.items())[:RESPONSE_HEADERS_KEPT]),
                        "response_body": answer.body[:RESPONSE_BODY_KEPT]}
        else:
            changes |= {"response_status": 0, "response_headers": {}, "response_body": ""}
        return msgspec.structs.replace(entry, **changes), answer

    def _finish(self, webhook: str, number: int, entry: WebhookEntry, state: str,
                reason: str) -> None:
        self.outbox.finish(webhook, number, msgspec.structs.replace(entry, state=state,
                                                                    reason=reason),
                           self.settings.log_size)
        if state != DELIVERED:
            log.info("webhook_event_not_delivered", webhook=webhook, id=entry.id, state=state,
                     reason=reason, attempts=entry.attempt_count)

    # -- replicated / replication_failed ------------------------------------------------------

    async def _ask_forever(self) -> None:
        while True:
            self._questions.clear()
            for ident, question in self.outbox.questions():
                if len(self._asking) >= QUESTIONS_AT_ONCE:
                    break
                if ident not in self._asking:
                    self._asking[ident] = asyncio.create_task(self._ask(ident, question),
                                                              name=f"webhook-question:{ident}")
            await self._questions.wait()

    async def _ask(self, ident: str, question: CompletionQuestion) -> None:
        try:
            answer = None
            attempt = 0
            while answer is None:
                age_s = (self.registry.wall_ns() - question.asked_ns) / 1e9
                if age_s > self.settings.completion_horizon_s:
                    log.warning("webhook_question_dropped", repository=question.repository,
                                digest=question.digest, age_s=round(age_s))
                    ob = self.outbox.begin()
                    self.outbox.stage_answered(ob, ident)
                    self.outbox.commit(ob)
                    return
                completion = self._completion()
                wait_s = self.settings.completion_wait_s
                if completion is None:
                    await self._sleep(min(wait_s, 1.0))
                    continue
                try:
                    said = await completion.wait(question.repository, question.digest,
                                                 deadline_s=wait_s)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - asked again, with backoff
                    attempt += 1
                    log.info("webhook_question_failed", digest=question.digest, error=str(exc))
                    await self._sleep(backoff_s(attempt, self.settings, self._rnd))
                    continue
                if said.complete or said.failures:
                    answer = said
                else:
                    await self._sleep(min(wait_s, 1.0))   # however soon it returned
            self._answered(ident, question, answer.complete, answer.arrivals, answer.failures)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook_question_failed", digest=question.digest)
        finally:
            if self._asking.get(ident) is asyncio.current_task():
                del self._asking[ident]
            self._questions.set()

    def _answered(self, ident: str, question: CompletionQuestion, complete: bool,
                  arrivals: dict[str, str], failures: dict[str, str]) -> None:
        action = "replicated" if complete else "replication_failed"
        now = self.registry.wall_ns()
        occ = Occurrence("push", question.chart, question.repository, question.digest,
                         question.tag, question.media_type, question.size,
                         (question.stamp_hlc, question.origin_region, question.origin_zone),
                         now, question.request or ClientRequest())
        ob = self.outbox.begin()
        for name, created in question.webhooks.items():
            hook = self.configuration.get(WEBHOOK, name)
            if not isinstance(hook, Webhook) or hook.created != created \
                    or action not in hook.actions:
                continue
            event, body = replication_payload(occ, name, action, arrivals, failures)
            self.outbox.stage(ob, name, WebhookEntry(id=event, action=action, body=body,
                                                     webhook_created=created, created_ns=now,
                                                     event_ns=now))
        self.outbox.stage_answered(ob, ident)
        self.outbox.commit(ob)
        for name in ob.added:
            self._wake(name)

    # -- the configuration ------------------------------------------------------------------

    async def _watch_configuration(self) -> None:
        """Webhooks deleted: their events go (outbox and log). Webhooks enabled
        again: their held events go out."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                live = {name for name, hook in self.configuration.items(WEBHOOK)}
                for name in sorted(self.outbox.webhooks() - live):
                    if name in self._workers:
                        continue        # its worker purges them when it next looks
                    removed = self.outbox.purge(name)
                    log.info("webhook_events_purged", webhook=name, events=removed)
                for name in self.outbox.pending_by_webhook():
                    self._wake(name)
            except Exception:
                log.exception("webhook_configuration_pass_failed")
            await asyncio.sleep(0)

    # -- what the node's routes ask ------------------------------------------------------------

    def _webhook(self, name: str) -> Webhook:
        hook = self.configuration.get(WEBHOOK, name)
        if not isinstance(hook, Webhook):
            raise RegistryError(ErrorCode.NAME_UNKNOWN, {"webhook": name[:64]},
                                message="webhook not found")
        return hook

    def ping(self, name: str) -> str:
        """Queue a ``ping`` for webhook ``name``; its id."""
        hook = self._webhook(name)
        now = self.registry.wall_ns()
        ident = str(uuid.uuid4())
        ob = self.outbox.begin()
        self.outbox.stage(ob, name, WebhookEntry(id=ident, action="ping",
                                                 body=ping_payload(ident, now),
                                                 webhook_created=hook.created, created_ns=now,
                                                 event_ns=now))
        self.outbox.commit(ob)
        self._wake(name)
        return ident

    def redeliver(self, name: str, ident: str) -> str:
        """Queue event ``ident`` of webhook ``name`` again (same id, same body)."""
        hook = self._webhook(name)
        entry = self.outbox.find(name, ident)
        if entry is None:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, {"webhook": name[:64], "event": ident[:64]},
                                message="webhook event not found")
        now = self.registry.wall_ns()
        ob = self.outbox.begin()
        self.outbox.stage(ob, name, WebhookEntry(id=entry.id, action=entry.action,
                                                 body=entry.body, webhook_created=hook.created,
                                                 created_ns=now, event_ns=entry.event_ns))
        self.outbox.commit(ob)
        self._wake(name)
        return entry.id

    def events(self, name: str, limit: int) -> list[dict]:
        """Webhook ``name``'s events held here, newest first, as ``list-events``
        shows them; custom header values are never shown."""
        hook = self._webhook(name)
        out = []
        for _, entry in self.outbox.entries(name, limit):
            names = entry.header_names if entry.attempt_count else tuple(hook.headers)
            try:
                body = msgspec.json.decode(entry.body)
            except msgspec.DecodeError:
                body = entry.body.decode(errors="replace")
            out.append({
                "id": entry.id, "webhook": name, "action": entry.action,
                "created": timestamp(entry.created_ns), "state": entry.state,
                "attempt_count": entry.attempt_count, "reason": entry.reason or None,
                "attempts": [{"at": timestamp(a.at_ns), "duration_ms": a.duration_ms,
                              "status": a.status or None, "error": a.error or None}
                             for a in entry.attempts],
                "request": {"method": "POST", "uri": entry.uri or hook.uri,
                            "headers": {"Content-Type": "application/json",
                                        **dict.fromkeys(names, "***")},
                            "body": body},
                "response": ({"status": entry.response_status,
                              "headers": entry.response_headers,
                              "body": entry.response_body}
                             if entry.response_status else None),
            })
        return out


def _question(occ: Occurrence, waiting: dict[str, float], now: int) -> CompletionQuestion:
    hlc, region, zone = occ.stamp
    return CompletionQuestion(occ.repository, occ.digest, occ.tag, occ.media_type, occ.size,
                              hlc, region, zone, waiting, now, occ.request, occ.chart)

