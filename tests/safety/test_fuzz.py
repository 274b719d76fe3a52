"""Fuzzing the live daemon's wire surface (issue 9: no client's mistake touches another
client or stops the daemon).

Every request message of ``kvbroker.v1.CacheBroker`` is built field by field from its
descriptor in ``kvbroker.v1.broker_pb2``, with adversarial values (the largest and the
negative-looking integers, enum values nobody defined, empty, overlong and non-printable
strings, ids that exist and ids that do not) and random ``kvbroker-session-id`` metadata,
and sent over a raw gRPC channel to a real daemon subprocess. Raw random bytes are sent
too, through a generic ``unary_unary`` with no serializer.

Guards against: a request that gets UNKNOWN or INTERNAL (an unhandled exception in the
daemon), a request that kills or wedges the daemon, accounting that drifts after
thousands of odd calls, segments or shm objects that leak, and error messages that echo a
client's overlong value back whole.
"""

from __future__ import annotations

import os
import string

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvbroker.v1 import broker_pb2 as pb

from .helpers import KiB, MiB, SESSION_KEY, Operator, accounting_problems, health_serving, shm_problems, wait_until

SERVICE = pb.DESCRIPTOR.services_by_name["CacheBroker"]
METHODS = {m.name: m for m in SERVICE.methods}

#: The codes the README's error table documents. Anything else (UNKNOWN, INTERNAL,
#: UNIMPLEMENTED, CANCELLED...) is a bug. UNAUTHENTICATED and PERMISSION_DENIED are
#: what a call carrying a session id without its secret gets once sessions carry one
#: (kvbroker/wire.py's SESSION_SECRET_KEY); they are documented with that work.
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
#: "A few hundred characters": the longest error message a client may get back.
MAX_DETAILS_CHARS = 512
#: Per-call deadline: a call that waits for memory longer than this ends DEADLINE_EXCEEDED.
CALL_TIMEOUT_S = 2.0
CI = bool(os.environ.get("CI"))

CONFIG = """
[devices]
host_capacity = "256MiB"

[[pools]]
name = "default"
segment_bytes = "32MiB"
block_bytes = "64KiB"

[[pools]]
name = "small"
max_bytes = "16MiB"
segment_bytes = "8MiB"
block_bytes = "4KiB"
persistent = true  # so that a fuzzed Checkpoint reaches its real work
"""

# -- value strategies ------------------------------------------------------------------

#: Ids the fuzz reuses, so Attach, Pin, Unpin and Release meet caches that exist and
#: Allocate meets ids that are taken.
KNOWN_CACHE_IDS = [f"fz-{i}" for i in range(12)]
KNOWN_SESSIONS = [f"fuzz-session-{i}" for i in range(4)]
ID_ALPHABET = string.ascii_letters + string.digits + "._:/@+=-"

U64_MAX = (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
U32_MAX = (1 << 32) - 1

overlong = st.integers(129, 20_000).map(lambda n: "z" * n)
strings = st.one_of(
    st.just(""),
    st.sampled_from(["default", "small", "host", "nope", "GPU-00000000", *KNOWN_CACHE_IDS]),
    st.text(ID_ALPHABET, min_size=1, max_size=40),
    st.text(max_size=60),  # any unicode, control characters included
    st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=20),  # non-printable only
    overlong,
    st.sampled_from([" ", "-leading-dash", "a b", "a\x00b", "..", "../../etc/passwd", "é" * 200]),
)
uint64s = st.one_of(
    st.sampled_from([0, 1, 4095, 4 * KiB, 64 * KiB, MiB, 8 * MiB, 16 * MiB, 200 * MiB, 1 << 32, I64_MAX, 1 << 63, U64_MAX - 1, U64_MAX]),
    st.integers(0, 4 * MiB),
    st.integers(0, U64_MAX),
)
int64s = st.one_of(
    st.sampled_from([0, 1, -1, 2, 64, 4096, I64_MAX, I64_MIN, 1 << 32, -(1 << 32)]),
    st.integers(I64_MIN, I64_MAX),
)
int32s = st.one_of(st.sampled_from([0, 1, -1, 100, -100, I32_MAX, I32_MIN]), st.integers(I32_MIN, I32_MAX))
uint32s = st.one_of(
    st.sampled_from([0, 0, 0, 1, 50, 200, 3_600_000, 3_600_001, U32_MAX]),
    st.integers(0, U32_MAX),
)
booleans = st.booleans()


def _enum_values(field: FieldDescriptor) -> st.SearchStrategy[int]:
    """Defined values, and values nobody defined (proto3 enums are open on the wire)."""
    defined = [v.number for v in field.enum_type.values]
    return st.one_of(st.sampled_from(defined), st.sampled_from([-1, max(defined) + 1, 999, I32_MAX, I32_MIN]), int32s)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum_values(field)
    by_type = {
        FieldDescriptor.TYPE_STRING: strings,
        FieldDescriptor.TYPE_UINT64: uint64s,
        FieldDescriptor.TYPE_INT64: int64s,
        FieldDescriptor.TYPE_INT32: int32s,
        FieldDescriptor.TYPE_UINT32: uint32s,
        FieldDescriptor.TYPE_BOOL: booleans,
        FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
        FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    }
    if field.type not in by_type:
        raise NotImplementedError(f"no strategy for {field.full_name} (type {field.type})")
    return by_type[field.type]


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


#: Values a well-behaved client would send, by field name: mixed in so that requests
#: also get past validation and reach placement, holds, pins and sessions.
PLAUSIBLE = {
    "pool": st.sampled_from(["default", "default", "small"]),
    "cache_id": st.one_of(*[st.sampled_from(KNOWN_CACHE_IDS)] * 3, st.text(ID_ALPHABET[:62], min_size=1, max_size=12)),
    "model_name": st.sampled_from(["", "llama", "vista-7b"]),
    "size_bytes": st.one_of(st.just(0), st.integers(1, 64).map(lambda n: n * 4 * KiB), st.integers(1, 4 * MiB)),
    "dtype": st.sampled_from([pb.DTYPE_UINT8, pb.DTYPE_FLOAT16, pb.DTYPE_FLOAT32]),
    "shape": st.lists(st.integers(1, 64), min_size=1, max_size=3),
    "priority": st.integers(-10, 10),
    "device": st.sampled_from(["", "host"]),
    "wait_timeout_ms": st.sampled_from([0, 0, 1, 100]),
    "state": st.sampled_from([0, pb.CACHE_STATE_RESIDENT, pb.CACHE_STATE_EVICTED]),
    "page_size": st.sampled_from([0, 1, 5, 1000]),
    "page_token": st.sampled_from(["", *KNOWN_CACHE_IDS]),
    "session_id": st.sampled_from(KNOWN_SESSIONS),
    "segment_id": st.integers(0, 8),
    "segment_generation": st.integers(0, 8),
    "client_name": st.text(max_size=20),
    "pid": st.integers(0, 1 << 22),
    "host": st.sampled_from(["", "localhost"]),
    # paged pools (test_fuzz_paged.py)
    "sequence_id": st.one_of(*[st.sampled_from(KNOWN_CACHE_IDS)] * 3, st.text(ID_ALPHABET[:62], min_size=1, max_size=12)),
    "prompt_tokens": st.integers(0, 64),
    "max_tokens": st.sampled_from([0, 0, 100, 10_000]),
    "tokens_wanted": st.integers(0, 200),
    "tokens_used": st.integers(0, 64),
    "tokens_needed": st.integers(0, 128),
    "on_oom": st.sampled_from([0, pb.OOM_STRATEGY_REJECT, pb.OOM_STRATEGY_REDUCE, pb.OOM_STRATEGY_WAIT]),
}


def _field_values(field: FieldDescriptor) -> st.SearchStrategy:
    adversarial = _scalar(field)
    if _is_repeated(field):
        adversarial = st.one_of(st.lists(adversarial, max_size=4), st.lists(adversarial, min_size=15, max_size=40))
    return adversarial


def _plausible(field: FieldDescriptor) -> st.SearchStrategy:
    return PLAUSIBLE.get(field.name, booleans if field.type == FieldDescriptor.TYPE_BOOL else _field_values(field))


def _well_formed(descriptor) -> st.SearchStrategy[dict]:
    """A request a careful client would send (coherent sizes for Allocate)."""
    optional = {f.name: _plausible(f) for f in descriptor.fields}
    if descriptor.name != "AllocateRequest":
        return st.fixed_dictionaries({}, optional=optional)
    for name in ("pool", "size_bytes", "dtype", "shape"):
        optional.pop(name)
    sizing = st.one_of(
        st.fixed_dictionaries({"size_bytes": PLAUSIBLE["size_bytes"]}),
        st.fixed_dictionaries({"dtype": PLAUSIBLE["dtype"], "shape": PLAUSIBLE["shape"]}),
    )
    return st.tuples(
        st.fixed_dictionaries({"pool": PLAUSIBLE["pool"]}, optional=optional), sizing
    ).map(lambda parts: {**parts[0], **parts[1]})


def message_fields(descriptor) -> st.SearchStrategy[dict]:
    """Keyword arguments for a request message, in three shapes: well formed; well formed
    but for one adversarial field (reaching the deepest check of each field); and every
    field independently absent, plausible or adversarial (repeated fields as lists:
    empty, a few, or more elements than any rule allows)."""
    fields = list(descriptor.fields)
    well_formed = _well_formed(descriptor)
    mixed = st.fixed_dictionaries(
        {}, optional={f.name: st.one_of(_plausible(f), _field_values(f)) for f in fields}
    )
    if not fields:
        return well_formed
    one_bad = st.tuples(well_formed, st.sampled_from(fields)).flatmap(
        lambda wf: _field_values(wf[1]).map(lambda bad: {**wf[0], wf[1].name: bad})
    )
    return st.one_of(well_formed, one_bad, one_bad, mixed)


def build(descriptor, kwargs: dict):
    return getattr(pb, descriptor.name)(**kwargs)


#: Metadata: none (the anonymous operator), a known session, a random id (valid or not),
#: an empty id, and sometimes a session secret nobody issued.
valid_session_ids = st.one_of(st.sampled_from(KNOWN_SESSIONS), st.text(ID_ALPHABET[:62], min_size=1, max_size=40))
bad_session_ids = st.one_of(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300), st.just(""))
metadata = st.one_of(
    st.just(()),
    st.tuples(st.tuples(st.just(SESSION_KEY), valid_session_ids)),
    st.tuples(st.tuples(st.just(SESSION_KEY), valid_session_ids)),
    st.tuples(st.tuples(st.just(SESSION_KEY), bad_session_ids)),
    st.tuples(
        st.tuples(st.just(SESSION_KEY), st.one_of(valid_session_ids, bad_session_ids)),
        st.tuples(st.just("kvbroker-session-secret"), st.text(string.hexdigits, max_size=64)),
    ),
)

# -- the daemon and the calls ----------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from .conftest import _stop_clean, start_safety_daemon

    where = tmp_path_factory.mktemp("fuzz")
    d = start_safety_daemon(
        where, CONFIG, "--lease-seconds", "0.5", "--segment-idle-seconds", "0.3",
        "--persistence-dir", str(where / "checkpoints"),
    )
    yield d
    _stop_clean(d)


@pytest.fixture(scope="module")
def channel(daemon):
    with grpc.insecure_channel(daemon.target) as ch:
        yield ch


def _path(method) -> str:
    return f"/{SERVICE.full_name}/{method.name}"


def call(channel: grpc.Channel, method, payload: bytes, md: tuple, timeout: float = CALL_TIMEOUT_S) -> tuple[grpc.StatusCode, str]:
    """Send serialized bytes to one method; returns (code, details). The Watch stream is
    read to its first event (SESSION_OPENED), then cancelled (the session then ends)."""
    if method.server_streaming:
        stream = channel.unary_stream(_path(method), request_serializer=None, response_deserializer=None)
        events = stream(payload, timeout=timeout, metadata=md)
        try:
            first = pb.WatchEvent.FromString(next(events))
            assert first.kind == pb.EVENT_KIND_SESSION_OPENED, first
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        finally:
            events.cancel()
    unary = channel.unary_unary(_path(method), request_serializer=None, response_deserializer=None)
    try:
        reply = unary(payload, timeout=timeout, metadata=md)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    if method.name == "Allocate":
        cache = pb.AllocateResponse.FromString(reply).cache
        if cache.cache_id not in KNOWN_CACHE_IDS:
            # Keep the daemon from filling up with one-off caches: give this one back
            # (an id outside the known set would never be touched again).
            release = channel.unary_unary(_path(METHODS["Release"]), request_serializer=None, response_deserializer=None)
            try:
                release(pb.ReleaseRequest(cache_id=cache.cache_id, force=True).SerializeToString(), timeout=CALL_TIMEOUT_S, metadata=md)
            except grpc.RpcError as err:
                assert err.code() in DOCUMENTED, (err.code(), err.details())
    return grpc.StatusCode.OK, ""


def seed_known_caches(channel: grpc.Channel) -> None:
    """Half the known ids exist before a run, retained; the operator pins each a few
    times and a known session pins the first, so Attach, Pin, Unpin, Release and
    duplicate Allocates meet live caches, pinned and not."""
    allocate = channel.unary_unary(_path(METHODS["Allocate"]), request_serializer=None, response_deserializer=None)
    pin = channel.unary_unary(_path(METHODS["Pin"]), request_serializer=None, response_deserializer=None)
    for i, cache_id in enumerate(KNOWN_CACHE_IDS[::2]):
        request = pb.AllocateRequest(pool="default", cache_id=cache_id, size_bytes=64 * KiB, retain=True, pinned=i == 0)
        md = ((SESSION_KEY, KNOWN_SESSIONS[0]),) if i == 0 else ()
        try:
            allocate(request.SerializeToString(), timeout=CALL_TIMEOUT_S, metadata=md)
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                # Sessions need their secret (a broker that issues them): seed anonymously.
                request.pinned = False
                try:
                    allocate(request.SerializeToString(), timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as again:
                    assert again.code() == grpc.StatusCode.ALREADY_EXISTS, again.details()
            else:
                assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
        for _ in range(4):
            pin(pb.PinRequest(cache_id=cache_id).SerializeToString(), timeout=CALL_TIMEOUT_S)


def _examples(method) -> int:
    """Examples per method: CI-sized, more for methods with more fields."""
    fields = len(method.input_type.fields)
    return 40 if fields == 0 else min(300, 60 + 25 * fields)


def settle_and_check(daemon, log_from: int, *, allow_decode_tracebacks: bool = False) -> None:
    """After a fuzz run: the daemon serves, logged no traceback, and its accounting is
    exact; once every fuzz session is over and every cache given back, every segment and
    shm object goes back (nothing leaked)."""
    assert daemon.alive(), daemon.log()[-4000:]
    assert health_serving(daemon.target), "health is not SERVING after the fuzz"
    log = daemon.log()[log_from:]
    assert "internal error" not in log, log[-4000:]
    tracebacks = log.count("Traceback")
    if allow_decode_tracebacks:  # grpc's own traceback for an unparseable request (9.6)
        tracebacks -= log.count("google.protobuf.message.DecodeError: Error parsing message")
    assert tracebacks == 0, log[-4000:]
    with Operator(daemon.target) as op:

        def exact() -> bool:
            stats, caches, again = op.stats(), op.caches(), op.stats()
            if (stats.total_allocated_bytes, stats.active_caches) != (again.total_allocated_bytes, again.active_caches):
                return False  # a session's lease ran out meanwhile: look again
            problems = accounting_problems(stats, caches)
            assert not problems, "\n".join(problems)
            shm = shm_problems(daemon, stats)
            if shm and shm_problems(daemon, op.stats()):  # allow one segment retiring meanwhile
                raise AssertionError("\n".join(shm))
            return True

        wait_until(exact, timeout=10, what="a quiet moment to compare Stats with ListCaches")

        def all_released() -> bool:
            for cache in op.caches():
                try:
                    op.stub.Release(pb.ReleaseRequest(cache_id=cache.cache_id, force=True), timeout=5)
                except grpc.RpcError as err:  # pinned by a fuzz session: its lease will end
                    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
            return op.stats().total_allocated_bytes == 0

        wait_until(
            all_released, timeout=15, what="every cache freed", interval=0.2,
            detail=lambda: [str(c).replace("\n", " ") for c in op.caches()][:5],
        )
        wait_until(
            lambda: op.stats().total_allocated_bytes == 0 and not any(p.usage.segments for p in op.stats().pools)
            and daemon.shm_objects() == [],
            timeout=15, what="every segment retired and every shm object unlinked",
        )
        final = op.stats()
        problems = accounting_problems(final, op.caches())
        assert not problems, (problems, str(final), daemon.shm_objects(), daemon.log()[-3000:])


FUZZ_SETTINGS = dict(
    deadline=None,
    derandomize=CI,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


#: The paged pool's methods: fuzzed by test_fuzz_paged.py, against a daemon that has one.
PAGED_METHODS = ("OpenPagedPool", "AllocateSequence", "ExtendSequence", "FreeSequence", "AttachSequence",
                 "PinSequence", "BlockMap")  # fmt: skip


@pytest.mark.parametrize("name", [n for n in METHODS if n not in PAGED_METHODS])
def test_fuzzed_requests_get_documented_codes(daemon, channel, name):
    """Field-by-field adversarial requests to one method, with random session metadata:
    every call ends with a documented status code (never UNKNOWN or INTERNAL), the daemon
    stays SERVING, logs no traceback, and its accounting stays exact; afterwards nothing
    has leaked (caches, segments, shm objects)."""
    method = METHODS[name]
    log_from = daemon.log_size()
    seed_known_caches(channel)
    seen: dict[grpc.StatusCode, int] = {}

    @settings(max_examples=_examples(method), **FUZZ_SETTINGS)
    @given(message_fields(method.input_type), metadata)
    def fuzz(kwargs, md):
        payload = build(method.input_type, kwargs).SerializeToString()
        code, details = call(channel, method, payload, md)
        seen[code] = seen.get(code, 0) + 1
        assert code in DOCUMENTED, f"{name}({kwargs!r:.500}) with {md!r:.200} -> {code.name}: {details[:500]}"

    fuzz()
    assert sum(seen.values()) >= _examples(method) // 2, seen
    # Not only rejections: the fuzz also reached the method's real work.
    assert seen.get(grpc.StatusCode.OK), f"no {name} call succeeded: {seen}"
    settle_and_check(daemon, log_from)


def call_raw(channel, method, payload: bytes, md: tuple) -> tuple[grpc.StatusCode, str]:
    """Like ``call`` but the payload may not parse: no assumption about the reply."""
    if method.server_streaming:
        stream = channel.unary_stream(_path(method), request_serializer=None, response_deserializer=None)
        events = stream(payload, timeout=CALL_TIMEOUT_S, metadata=md)
        try:
            next(events)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        finally:
            events.cancel()
    unary = channel.unary_unary(_path(method), request_serializer=None, response_deserializer=None)
    try:
        unary(payload, timeout=CALL_TIMEOUT_S, metadata=md)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def parses(method, payload: bytes) -> bool:
    """Whether ``payload`` is a valid encoding of the method's request message."""
    try:
        getattr(pb, method.input_type.name).FromString(payload)
    except DecodeError:
        return False
    return True


#: Bytes that never parse: field number 0 is invalid, and so is a truncated varint.
garbled_bytes = st.one_of(
    st.binary(max_size=200).map(lambda b: b"\x00" + b),
    st.binary(max_size=200).map(lambda b: b + b"\x08\xff"),
    st.binary(max_size=200).map(lambda b: b"\x0a\x7f" + b[:100]),  # a string field longer than the message
)


def test_random_bytes_leave_the_daemon_serving(daemon, channel):
    """Random bytes to every method: bytes that happen to parse are ordinary requests and
    get a documented code; whatever the bytes, the daemon keeps serving with exact
    accounting and leaks nothing. (What unparseable bytes must get is the next test.)"""
    log_from = daemon.log_size()
    outcomes: list[tuple[str, bool, grpc.StatusCode, str]] = []

    @settings(max_examples=150, **FUZZ_SETTINGS)
    @given(st.sampled_from(list(METHODS.values())), st.one_of(st.binary(max_size=256), garbled_bytes), metadata)
    def fuzz(method, payload, md):
        code, details = call_raw(channel, method, payload, md)
        outcomes.append((method.name, parses(method, payload), code, details))

    fuzz()
    parsed = [(m, c.name, d[:300]) for m, ok, c, d in outcomes if ok and c not in DOCUMENTED]
    assert not parsed, parsed[:5]
    assert any(not ok for _, ok, _, _ in outcomes), "no garbled payload was sent"
    # The log may hold the unparseable payloads' tracebacks today (issue 9.6): judged by
    # the next test; this one checks only that the daemon survives them intact.
    assert daemon.alive() and health_serving(daemon.target)
    settle_and_check(daemon, log_from, allow_decode_tracebacks=True)


def test_garbled_bytes_get_invalid_argument(daemon, channel):
    """Bytes that are not the method's request message get INVALID_ARGUMENT (not UNKNOWN
    with a traceback per request in the daemon's log)."""
    log_from = daemon.log_size()
    codes: list[tuple[str, grpc.StatusCode, str]] = []

    @settings(max_examples=60, **FUZZ_SETTINGS)
    @given(st.sampled_from(list(METHODS.values())), garbled_bytes, metadata)
    def fuzz(method, payload, md):
        # A few byte strings (b"\x00\x00", say) happen to parse as a valid message: they
        # are not garbled, and the previous test covers what they get.
        assume(not parses(method, payload))
        code, details = call_raw(channel, method, payload, md)
        codes.append((method.name, code, details))

    fuzz()
    wrong = [(m, c.name, d[:200]) for m, c, d in codes if c != grpc.StatusCode.INVALID_ARGUMENT]
    assert not wrong, f"{len(wrong)} of {len(codes)} garbled requests were not INVALID_ARGUMENT, e.g. {wrong[:3]}"
    assert "Traceback" not in daemon.log()[log_from:], "a garbled request logged a traceback"


# -- overlong values are not echoed ----------------------------------------------------

#: A request of each method that passes validation up to the field under test.
BASE_REQUESTS = {
    "Allocate": {"pool": "default", "size_bytes": 4 * KiB},
    "ListCaches": {},
    "Defragment": {"dry_run": True},
    "Watch": {},
}



def _overlong_cases():
    for method in METHODS.values():
        for field in method.input_type.fields:
            if field.type != FieldDescriptor.TYPE_STRING:
                continue
            for kind, value in (("valid-alphabet", "a" * 10_000), ("non-printable", "\x01" * 10_000)):
                yield pytest.param(method.name, field.name, value, id=f"{method.name}.{field.name}-{kind}")
        # The session id in the metadata is a string the client chooses, too.
        yield pytest.param(method.name, SESSION_KEY, "s" * 4000, id=f"{method.name}-{SESSION_KEY}")


@pytest.mark.parametrize("name, field, value", list(_overlong_cases()))
def test_overlong_values_are_not_echoed_whole(daemon, channel, name, field, value):
    """A 10,000-character value in any string field (or a 4,000-character session id)
    gets a documented code and an error message of at most a few hundred characters:
    the daemon names the field, it does not send the client's value back whole (nor
    write it whole into its log)."""
    method = METHODS[name]
    kwargs = dict(BASE_REQUESTS.get(name, {}))
    md: tuple = ()
    if field == SESSION_KEY:
        md = ((SESSION_KEY, value),)
    else:
        kwargs[field] = value
    log_from = daemon.log_size()
    code, details = call(channel, method, build(method.input_type, kwargs).SerializeToString(), md, timeout=20)
    assert code in DOCUMENTED - {grpc.StatusCode.DEADLINE_EXCEEDED}, (code, details[:300])
    # An overlong message in the trailers makes the client's gRPC drop the reply itself
    # ("received metadata size exceeds ... limit"): that is the same bug, seen client side.
    assert "metadata size exceeds" not in details, f"the daemon's reply was too large to receive: {details[:200]}"
    assert len(details) <= MAX_DETAILS_CHARS, f"{code.name}: {len(details)} characters: {details[:200]}..."
    logged = daemon.log()[log_from:]
    assert value not in logged, "the overlong value was logged whole"
