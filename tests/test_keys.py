"""The key grammar of a node's metadata database (``registry_node.keys``).

* Round trip: for every family of the tree, a key built from fields parses back
  to exactly those fields, and the parsed value encodes to the same bytes —
  with repository names, tags and digests drawn from the distribution-spec
  grammar (names with slashes included).
* Refusal: bytes that no builder makes raise ``MalformedKey``, never another
  exception and never a wrong value.
* The bytes themselves: one example per family, written out, so a change of the
  on-disk layout (which existing data dirs would not survive) cannot pass.
"""

from __future__ import annotations

import pytest
from hypothesis import Phase, example, find, given, settings
from hypothesis import strategies as st

from registry_node import keys
from registry_node.reference import MAX_NAME_LENGTH, validate_name, validate_tag

from .profiles import scaled

# The distribution-spec grammar, written out here rather than taken from ``reference``.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
repositories = st.lists(st.from_regex(_COMPONENT, fullmatch=True), min_size=1, max_size=4) \
    .map("/".join).filter(lambda name: len(name) <= MAX_NAME_LENGTH)
tags = st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}", fullmatch=True)
digests = st.one_of(st.binary(min_size=32, max_size=32).map(lambda b: f"sha256:{b.hex()}"),
                    st.binary(min_size=64, max_size=64).map(lambda b: f"sha512:{b.hex()}"))
uploads = st.uuids().map(str)
peers = st.from_regex(r"[a-z0-9]+(?:-[a-z0-9]+)*", fullmatch=True)
seqs = st.integers(0, keys.LAST_SEQ)
config_kinds = st.from_regex(r"[a-z][a-z-]{0,30}", fullmatch=True)
config_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", fullmatch=True)
webhooks = st.from_regex(r"[A-Za-z0-9]{5,50}", fullmatch=True)

# family → (builder, parsed type, strategies of the builder's arguments)
buckets = st.integers(0, keys.FINGERPRINT_BUCKETS - 1).map(lambda b: f"{b:02x}")

FAMILIES = {
    "log": (keys.log, keys.LogKey, (seqs,)),
    "blob": (keys.blob, keys.BlobKey, (digests,)),
    "ref": (keys.ref, keys.RefKey, (digests, repositories, digests)),
    "user": (keys.blob_user, keys.BlobUserKey, (digests, repositories)),
    "unreferenced": (keys.unreferenced, keys.UnreferencedKey, (digests,)),
    "referring counts": (keys.referring_counts, keys.ReferringCountsKey, (digests,)),
    "repo": (keys.repo, keys.RepoKey, (repositories,)),
    "blob link": (keys.blob_link, keys.BlobLinkKey, (repositories, digests)),
    "manifest": (keys.manifest, keys.ManifestKey, (repositories, digests)),
    "tag": (keys.tag, keys.TagKey, (repositories, tags)),
    "referrer": (keys.referrer, keys.ReferrerKey, (repositories, digests, digests)),
    "upload": (keys.upload, keys.UploadKey, (uploads,)),
    "tag tomb": (keys.tag_tomb, keys.TagTombKey, (repositories, tags)),
    "manifest tomb": (keys.manifest_tomb, keys.ManifestTombKey, (repositories, digests)),
    "blob tomb": (keys.blob_tomb, keys.BlobTombKey, (repositories, digests)),
    "cursor": (keys.cursor, keys.CursorKey, (peers,)),
    "failure": (keys.failure, keys.FailureKey, (repositories, st.one_of(digests, tags))),
    "untagged": (keys.untagged, keys.UntaggedKey, (peers, repositories, digests)),
    "transfer": (keys.transfer, keys.TransferKey, (digests,)),
    "configuration": (keys.configuration, keys.ConfigKey, (config_kinds, config_names)),
    "fingerprint": (lambda bucket, repo: keys.fingerprint_in(int(bucket, 16), repo),
                    keys.FingerprintKey, (buckets, repositories)),
    "bucket fingerprint": (lambda bucket: keys.bucket_fingerprint(int(bucket, 16)),
                           keys.BucketFingerprintKey, (buckets,)),
    "reader": (keys.reader, keys.ReaderKey, (st.tuples(peers, peers).map("/".join),)),
    "tombstone candidate": (lambda seq, tomb: keys.tombstone_candidate(seq, tomb.encode()),
                            keys.TombstoneCandidateKey,
                            (seqs, st.one_of(st.builds(keys.TagTombKey, repositories, tags),
                                             st.builds(keys.ManifestTombKey, repositories, digests),
                                             st.builds(keys.BlobTombKey, repositories, digests)))),
    "webhook pending": (keys.webhook_pending, keys.WebhookPendingKey, (webhooks, seqs)),
    "webhook log": (keys.webhook_log, keys.WebhookLogKey, (webhooks, seqs)),
    "completion question": (keys.completion_question, keys.CompletionQuestionKey,
                            (st.uuids().map(str),)),
    "repository attributes": (keys.repository_attributes, keys.RepositoryAttributesKey,
                              (repositories,)),
    "tag attributes": (keys.tag_attributes, keys.TagAttributesKey, (repositories, tags)),
    "manifest attributes": (keys.manifest_attributes, keys.ManifestAttributesKey,
                            (repositories, digests)),
    "recycled manifest": (keys.recycled_manifest, keys.RecycledManifestKey,
                          (repositories, digests)),
    "recycled tag": (keys.recycled_tag, keys.RecycledTagKey, (repositories, tags)),
    "recycled reference": (keys.recycled_ref, keys.RecycledRefKey,
                           (digests, repositories, digests)),
}
META = {keys.SCHEMA: "schema", keys.IDENTITY: "identity", keys.HLC: "hlc",
        keys.KEY_CHECK: "keycheck", keys.FINGERPRINTS: "fingerprints",
        keys.UNREFERENCED_SCHEME: "unreferenced", keys.CONTENT_COUNTS_SCHEME: "contentcounts",
        keys.CONTENT_COUNTS: "content", keys.LOG_FLOOR: "logfloor"}

# The scan prefix each family is found under, from the same arguments.
PREFIXES = {
    "ref": lambda target, repo, _: keys.ref_repo_prefix(target, repo),
    "user": lambda digest, _: keys.blob_users_prefix(digest),
    "blob link": lambda repo, _: keys.blob_link_prefix(repo),
    "manifest": lambda repo, _: keys.manifest_prefix(repo),
    "tag": lambda repo, _: keys.tag_prefix(repo),
    "referrer": lambda repo, subject, _: keys.referrer_prefix(repo, subject),
    "tag tomb": lambda repo, _: keys.tomb_prefix(repo),
    "manifest tomb": lambda repo, _: keys.tomb_prefix(repo),
    "blob tomb": lambda repo, _: keys.tomb_prefix(repo),
    "configuration": lambda kind, _: keys.configuration_prefix(kind),
    "fingerprint": lambda bucket, _: keys.fingerprint_prefix(int(bucket, 16)),
    "webhook pending": lambda webhook, _: keys.webhook_pending_prefix(webhook),
    "webhook log": lambda webhook, _: keys.webhook_log_prefix(webhook),
    "repository attributes": lambda repo: keys.attributes_prefix(repo),
    "tag attributes": lambda repo, _: keys.tag_attributes_prefix(repo),
    "manifest attributes": lambda repo, _: keys.manifest_attributes_prefix(repo),
}

D1 = "sha256:" + "a" * 64
D2 = "sha512:" + "b" * 128

# What existing data dirs hold: one key per family, byte for byte.
ON_DISK = [
    (keys.SCHEMA, b"meta\x00schema"),
    (keys.IDENTITY, b"meta\x00identity"),
    (keys.HLC, b"meta\x00hlc"),
    (keys.KEY_CHECK, b"meta\x00keycheck"),
    (keys.log(1), b"log\x00\x00\x00\x00\x00\x00\x00\x00\x01"),
    (keys.log(0x0102030405060708), b"log\x00\x01\x02\x03\x04\x05\x06\x07\x08"),
    (keys.blob(D1), b"blob\x00" + D1.encode()),
    (keys.ref(D1, "lib/app", D2), b"ref\x00" + D1.encode() + b"\x00lib/app\x00" + D2.encode()),
    (keys.blob_user(D1, "lib/app"), b"user\x00" + D1.encode() + b"\x00lib/app"),
    (keys.repo("lib/app"), b"repo\x00lib/app"),
    (keys.blob_link("lib/app", D1), b"r\x00lib/app\x00b\x00" + D1.encode()),
    (keys.manifest("lib/app", D1), b"r\x00lib/app\x00m\x00" + D1.encode()),
    (keys.tag("lib/app", "v1.0"), b"r\x00lib/app\x00t\x00v1.0"),
    (keys.referrer("lib/app", D1, D2),
     b"r\x00lib/app\x00s\x00" + D1.encode() + b"\x00" + D2.encode()),
    (keys.upload("1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
     b"upload\x001b4e28ba-2fa1-11d2-883f-0016d3cca427"),
    (keys.tag_tomb("lib/app", "v1.0"), b"tomb\x00lib/app\x00t\x00v1.0"),
    (keys.manifest_tomb("lib/app", D1), b"tomb\x00lib/app\x00m\x00" + D1.encode()),
    (keys.blob_tomb("lib/app", D1), b"tomb\x00lib/app\x00b\x00" + D1.encode()),
    (keys.cursor("eastus-2"), b"cursor\x00eastus-2"),
    (keys.failure("lib/app", D1), b"fail\x00lib/app\x00" + D1.encode()),
    (keys.transfer(D1), b"xfer\x00" + D1.encode()),
    (keys.untagged("eastus", "lib/app", D1), b"untag\x00eastus\x00lib/app\x00" + D1.encode()),
    (keys.configuration("registry", "default"), b"conf\x00registry\x00default"),
    (keys.FINGERPRINTS, b"meta\x00fingerprints"),
    (keys.fingerprint("lib/app"), b"fp\x00" + f"{keys.fingerprint_bucket('lib/app'):02x}".encode()
     + b"\x00lib/app"),
    (keys.bucket_fingerprint(10), b"fpb\x000a"),
    (keys.UNREFERENCED_SCHEME, b"meta\x00unreferenced"),
    (keys.unreferenced(D1), b"unref\x00" + D1.encode()),
    (keys.CONTENT_COUNTS_SCHEME, b"meta\x00contentcounts"),
    (keys.CONTENT_COUNTS, b"meta\x00content"),
    (keys.referring_counts(D1), b"cnt\x00" + D1.encode()),
    (keys.reader("eastus/2"), b"reader\x00eastus/2"),
    (keys.tombstone_candidate(1, keys.tag_tomb("lib/app", "v1.0")),
     b"tgc\x00\x00\x00\x00\x00\x00\x00\x00\x01tomb\x00lib/app\x00t\x00v1.0"),
    (keys.WEBHOOK_FEED, b"meta\x00webhookfeed"),
    (keys.WEBHOOK_SEQ, b"meta\x00webhookseq"),
    (keys.webhook_pending("deploy1", 0x1f), b"whp\x00deploy1\x00000000000000001f"),
    (keys.webhook_log("deploy1", 2), b"whl\x00deploy1\x000000000000000002"),
    (keys.completion_question("q1"), b"whq\x00q1"),
    (keys.repository_attributes("lib/app"), b"attr\x00lib/app\x00r"),
    (keys.tag_attributes("lib/app", "v1.0"), b"attr\x00lib/app\x00t\x00v1.0"),
    (keys.manifest_attributes("lib/app", D1), b"attr\x00lib/app\x00m\x00" + D1.encode()),
    (keys.recycled_manifest("lib/app", D1), b"bin\x00lib/app\x00m\x00" + D1.encode()),
    (keys.recycled_tag("lib/app", "v1.0"), b"bin\x00lib/app\x00t\x00v1.0"),
    (keys.recycled_ref(D1, "lib/app", D1),
     b"binref\x00" + D1.encode() + b"\x00lib/app\x00" + D1.encode()),
]


@pytest.mark.parametrize("built,stored", ON_DISK, ids=lambda v: v.decode(errors="replace")[:20])
def test_keys_are_the_bytes_existing_data_dirs_hold(built, stored):
    assert built == stored
    assert keys.parse(stored).encode() == stored


def test_every_family_of_the_grammar_is_exercised():
    """A family added to ``keys`` without a place here fails this."""
    covered = {kind for _, kind, _ in FAMILIES.values()} | {keys.MetaKey}
    assert covered == set(keys.Key.__args__)
    assert {type(keys.parse(stored)) for _, stored in ON_DISK} == covered


def test_the_tree_draws_every_family():
    """The docstring's tree stays the description of the key space: every family
    head and every meta key is drawn in it."""
    heads = [keys.LOG, keys.BLOB, keys.REF, keys.BLOB_USER, keys.REPO, keys.REPO_DATA,
             keys.UPLOAD, keys.TOMB, keys.CURSOR, keys.FAIL, keys.UNTAGGED, keys.TRANSFER, keys.CONFIG,
             keys.FINGERPRINT, keys.FINGERPRINT_BUCKET, keys.READER, keys.TOMB_CANDIDATE,
             keys.WEBHOOK_PENDING, keys.WEBHOOK_LOG, keys.COMPLETION_QUESTION, keys.ATTRIBUTES,
             keys.REFERRING_COUNTS, keys.RECYCLE_BIN, keys.RECYCLED_REF,
             keys.WEBHOOK_FEED, keys.WEBHOOK_SEQ, *META]
    drawn = keys.__doc__
    missing = [h for h in heads if h.decode().replace("\x00", "\\0") not in drawn]
    assert missing == []


@settings(max_examples=scaled(30))
@given(repositories, tags)
def test_the_strategies_draw_what_the_grammar_allows(name, tag):
    assert validate_name(name) == name and validate_tag(tag) == tag


def test_the_names_drawn_include_names_with_slashes():
    # Drawing one is the point; shrinking it to the smallest such name (which
    # took ~15 s of CPU) would only change which name is shown.
    found = find(repositories, lambda name: name.count("/") >= 2,
                 settings=settings(phases=[Phase.generate], database=None))
    assert found.count("/") >= 2


# Twenty keys of each family in ``ci`` (a family's strategies draw names from
# the grammar, ~40 ms a key): every family runs, and ``soak`` draws ten times as many.
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=scaled(20))
@given(data=st.data())
def test_a_built_key_parses_back_to_its_fields(family, data):
    builder, kind, strategies = FAMILIES[family]
    fields = [data.draw(strategy, label=name)
              for strategy, name in zip(strategies, kind.__struct_fields__, strict=True)]
    key = builder(*fields)
    parsed = keys.parse(key)
    assert parsed == kind(*fields)
    assert keys.parse(key, kind) == parsed
    assert parsed.encode() == key
    if family in PREFIXES:
        assert key.startswith(PREFIXES[family](*fields))
    others = [other for _, other, _ in FAMILIES.values() if not issubclass(kind, other)]
    with pytest.raises(keys.MalformedKey, match="not a"):
        keys.parse(key, data.draw(st.sampled_from(others), label="another family"))


@pytest.mark.parametrize("key,name", META.items())
def test_meta_keys_parse_to_their_name(key, name):
    assert keys.parse(key) == keys.MetaKey(name)
    assert keys.MetaKey(name).encode() == key


@settings(max_examples=scaled(40))
@given(a=repositories, b=repositories, tag=tags, digest=digests)
@example(a="app", b="app/web", tag="v1", digest=D1)
@example(a="app/web", b="app", tag="v1", digest=D1)
def test_a_repository_scan_never_reaches_another_repository(a, b, tag, digest):
    """What the NUL separator is for: ``r\\0app\\0`` does not match ``app/web``."""
    for key in (keys.tag(a, tag), keys.manifest(a, digest), keys.blob_link(a, digest),
                keys.referrer(a, digest, digest)):
        assert keys.in_repository(key, b) == (a == b)
        assert keys.parse(key, keys.RepoDataKey).repository == a
    assert keys.tag_tomb(a, tag).startswith(keys.tomb_prefix(b)) == (a == b)


@given(st.lists(seqs, min_size=2, max_size=2, unique=True))
def test_log_keys_sort_in_sequence_order(pair):
    low, high = sorted(pair)
    assert keys.log(low) < keys.log(high) <= keys.log(keys.LAST_SEQ)


MALFORMED = [
    b"",
    b"blob",                                    # no separator
    b"nope\x00thing",                           # unknown family
    b"log\x00\x01\x02",                         # short sequence
    b"log\x00" + b"\x00" * 9,                   # long sequence
    b"meta\x00schemas",                         # not a meta key
    b"blob\x00",                                # empty component
    b"repo\x00lib/app\x00",                     # trailing empty component
    b"ref\x00" + D1.encode() + b"\x00lib/app",  # a component short
    b"user\x00" + D1.encode() + b"\x00a\x00b",  # a component too many
    b"r\x00lib/app",                            # no kind
    b"r\x00lib/app\x00x\x00v1",                 # unknown kind
    b"r\x00lib/app\x00t",                       # kind without its field
    b"r\x00lib/app\x00t\x00v1\x00extra",        # a tag has one field
    b"r\x00lib/app\x00s\x00" + D1.encode(),     # a referrer has two
    b"tomb\x00lib/app\x00s\x00" + D1.encode(),  # referrers have no tombstones
    b"blob\x00sha256:\xff\xfe",                 # not UTF-8
    b"conf\x00registry",                        # a configuration object has a kind and a name
    b"whp\x00deploy1",                          # a webhook entry has a number
    b"whp\x00deploy1\x0012",                    # of 16 hex digits
    b"whl\x00deploy1\x00000000000000000G",      # hex
    b"whl\x00\x000000000000000001",             # and a webhook
]


@pytest.mark.parametrize("key", MALFORMED, ids=repr)
def test_a_malformed_key_is_refused_saying_why(key):
    with pytest.raises(keys.MalformedKey) as refused:
        keys.parse(key)
    assert refused.value.key == key
    assert repr(key) in str(refused.value) and refused.value.why in str(refused.value)


_HEADS = [b"meta", b"log", b"blob", b"ref", b"user", b"repo", b"r", b"upload", b"tomb",
          b"cursor", b"fail", b"xfer", b"t", b"m", b"b", b"s", b"schema", b"hlc", b"whp",
          b"whl", b"whq", b"0000000000000001", b""]
near_keys = st.lists(st.one_of(st.sampled_from(_HEADS), st.binary(max_size=12)),
                     min_size=1, max_size=6).map(b"\x00".join)


@given(st.one_of(near_keys, st.binary(max_size=40)))
def test_any_bytes_parse_to_a_key_that_encodes_back_or_are_refused(raw):
    """``parse`` is a partial inverse of the builders: whatever it accepts, it
    reads exactly; everything else is a ``MalformedKey``."""
    try:
        parsed = keys.parse(raw)
    except keys.MalformedKey:
        return
    assert parsed.encode() == raw


def test_render_reads_any_key():
    assert keys.render(keys.log(42)) == "log/42"
    assert keys.render(keys.tag("lib/app", "v1")) == "r/lib/app/t/v1"
    assert keys.render(b"odd\x00\xff") == "odd/\ufffd"
