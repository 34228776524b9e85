"""The state machine under random sequences of events: every invariant holds
after every accepted event, a rejected event changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain import errors, states
from service.domain.contract import LOGOUT, NETWORK, TIMEOUT, UNKNOWN

START = datetime(2026, 1, 4, 12, tzinfo=UTC)
PNG = "data:image/png;base64,iVBORw0KGgo="

events = st.one_of(
    st.builds(
        lambda lifetime: ("qr", lifetime),
        st.integers(min_value=1, max_value=120),
    ),
    st.just(("expire", None)),
    st.just(("scan", None)),
    st.just(("reconnecting", None)),
    st.builds(
        lambda phone: ("connected", phone), st.sampled_from(["+5491122334455", "+15550000000"])
    ),
    st.builds(
        lambda reason: ("disconnected", reason),
        st.sampled_from([LOGOUT, NETWORK, TIMEOUT, UNKNOWN]),
    ),
    st.builds(lambda code: ("failed", code), st.sampled_from(["TEMPORARY_BAN", "CLIENT_OUTDATED"])),
    st.builds(
        lambda code: ("pairing_failed", code), st.sampled_from(["DIAL_FAILED", "WORKER_CRASHED"])
    ),
    st.builds(
        lambda code: ("disconnected_code", code),
        st.sampled_from(["STREAM_REPLACED", "WORKER_CRASHED"]),
    ),
)


def _event(kind: str, arg: object, session: states.Session, now: datetime) -> states.Event:
    if kind == "qr":
        return states.QRShown(PNG, now + timedelta(seconds=int(arg)))  # type: ignore[call-overload]
    if kind == "expire":
        return states.QRExpired(session.qr_expires_at or now)
    if kind == "scan":
        return states.QRScanned()
    if kind == "reconnecting":
        return states.Reconnecting()
    if kind == "connected":
        return states.Connected(str(arg))
    if kind == "disconnected":
        return states.Disconnected(arg, "")  # type: ignore[arg-type]
    if kind == "disconnected_code":
        return states.Disconnected(UNKNOWN, "a cause", str(arg))
    if kind == "pairing_failed":
        return states.PairingFailed(str(arg), "pairing failed")
    return states.Failed(str(arg), "a fault")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(events, st.integers(min_value=0, max_value=90)), max_size=40))
def test_invariants_hold_after_every_event(steps: list[tuple[tuple[str, object], int]]) -> None:
    session = states.new_session("sender_1", START)
    states.check_invariants(session)
    now = START
    for (kind, arg), seconds in steps:
        now += timedelta(seconds=seconds)
        event = _event(kind, arg, session, now)
        try:
            updated = states.apply(session, event, now)
        except errors.ContractError:
            continue  # rejected: the session is unchanged, since apply is pure
        if updated is None:
            continue
        states.check_invariants(updated)
        assert updated.revision == session.revision + 1
        assert updated.updated_at >= session.updated_at
        assert updated.instance_id == session.instance_id
        assert updated.created_at == session.created_at
        session = updated


def test_expired_code_cannot_be_scanned() -> None:
    session = states.new_session("s", START)
    shown = states.apply(session, states.QRShown(PNG, START + timedelta(seconds=60)), START)
    assert shown is not None
    later = START + timedelta(seconds=61)
    with pytest.raises(errors.ContractError) as refused:
        states.apply(shown, states.QRScanned(), later)
    assert refused.value.code == "QR_NOT_AVAILABLE"
