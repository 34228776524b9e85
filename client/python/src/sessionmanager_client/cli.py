"""``smctl``: the Session Manager from the command line.

Exit codes: 0 ok, 1 other failure, 2 invalid argument, 3 not found,
4 failed precondition or already exists, 5 unavailable or timed out.
Contract errors print one line (``smctl: SESSION_NOT_FOUND: ...``), never a
traceback. ``--json`` prints JSON (status in its text form, ``qr_required``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from sessionmanager.v1 import session_pb2, session_service_pb2
from sessionmanager_client import terminal_qr
from sessionmanager_client._base import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, TLS
from sessionmanager_client.aio import AsyncSessionManagerClient
from sessionmanager_client.enums import QRStatus, SessionStatus, qr_status_of, status_of
from sessionmanager_client.errors import SessionManagerClientError

Session = session_pb2.WhatsAppSession

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_INVALID = 2
EXIT_NOT_FOUND = 3
EXIT_PRECONDITION = 4
EXIT_UNAVAILABLE = 5

_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
}


def exit_code(error: SessionManagerClientError) -> int:
    return _EXIT_BY_CODE.get(error.code, EXIT_OTHER)


# Output.


def session_dict(session: Session) -> dict[str, Any]:
    """The session as JSON: proto field names, enums in text form, int64 as numbers."""
    data: dict[str, Any] = json_format.MessageToDict(
        session, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    data["id"] = session.id
    data["revision"] = session.revision
    data["status"] = status_of(session).value
    data["qr_status"] = qr_status_of(session).value
    return data


def send_dict(response: session_service_pb2.SendResponse) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    data["status"] = (
        session_service_pb2.MessageStatus.Name(response.status)
        .removeprefix("MESSAGE_STATUS_")
        .lower()
    )
    return data


def _print_json(data: object) -> None:
    print(json.dumps(data, ensure_ascii=False), flush=True)


def _when(stamp: Any) -> str:
    return str(stamp.ToDatetime(tzinfo=UTC).isoformat()) if stamp.ByteSize() else "-"


def summary(session: Session) -> str:
    """One line: instance, status/qr_status, revision, then phone or error."""
    line = (
        f"{session.instance_id}  {status_of(session).value}/{qr_status_of(session).value}"
        f"  rev {session.revision}"
    )
    return line + _detail(session)


def _detail(session: Session) -> str:
    parts = []
    if session.HasField("phone_number"):
        parts.append(f"phone {session.phone_number}")
    if session.HasField("last_error_code") or session.HasField("last_error_message"):
        parts.append(f"{session.last_error_code}: {session.last_error_message}")
    return "".join(f"  {part}" for part in parts)


def _print_session(session: Session, as_json: bool) -> None:
    if as_json:
        _print_json(session_dict(session))
        return
    print(summary(session))
    for name in (
        "qr_generated_at",
        "qr_expires_at",
        "connected_at",
        "disconnected_at",
        "created_at",
        "updated_at",
    ):
        if session.HasField(name):
            print(f"  {name}: {_when(getattr(session, name))}")


# Commands.


async def cmd_create(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    _print_session(await client.create_session(args.instance_id), args.json)
    return EXIT_OK


async def cmd_get(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    _print_session(await client.get_session(args.instance_id), args.json)
    return EXIT_OK


async def cmd_list(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    sessions = [s async for s in client.iter_sessions(page_size=args.page_size, status=args.status)]
    if args.json:
        _print_json([session_dict(s) for s in sessions])
    else:
        for session in sessions:
            print(summary(session))
    return EXIT_OK


async def cmd_send(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    response = await client.send(args.instance_id, args.to, args.text, args.key)
    if args.json:
        _print_json(send_dict(response))
    else:
        data = send_dict(response)
        replay = " (replayed: nothing sent again)" if response.replayed else ""
        wa_id = data.get("whatsapp_message_id", "-")
        print(f"{response.message_id}  {data['status']}  whatsapp id {wa_id}{replay}")
    return EXIT_OK


async def cmd_pair_phone(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    response = await client.pair_phone(args.instance_id, args.phone_number)
    code = response.linking_code
    if args.json:
        _print_json({"linking_code": code, "session": session_dict(response.session)})
    else:
        shown = f"{code[:4]}-{code[4:]}" if len(code) == 8 else code
        print(f"{args.instance_id}: linking code {shown}")
        print(
            "  on the phone: WhatsApp > Linked devices > Link a device > "
            "Link with phone number instead, then type the code"
        )
    return EXIT_OK


async def cmd_disconnect(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    _print_session(await client.disconnect(args.instance_id), args.json)
    return EXIT_OK


async def cmd_delete(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    await client.delete_session(args.instance_id)
    if args.json:
        _print_json({"instance_id": args.instance_id, "deleted": True})
    else:
        print(f"{args.instance_id} deleted")
    return EXIT_OK


async def cmd_health(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    status = await client.health(args.service)
    if args.json:
        _print_json({"service": args.service, "status": status})
    else:
        print(status)
    return EXIT_OK if status == "SERVING" else EXIT_OTHER


def _transition(session: Session) -> str:
    return (
        f"rev {session.revision}  {status_of(session).value}/{qr_status_of(session).value}"
        + _detail(session)
    )


async def cmd_watch(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    async with contextlib.aclosing(client.watch(args.instance_id)) as watch:
        async for session in watch:
            if args.json:
                _print_json(session_dict(session))
            else:
                print(f"{_now()}  {_transition(session)}", flush=True)
            if args.until is not None and status_of(session).value == args.until:
                return EXIT_OK
    return EXIT_OK


def _now() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S")


class _QRScreen:
    """Draws the code and its countdown; redraws when the code rotates."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._invert = args.invert
        self._json = args.json
        self._tty = sys.stdout.isatty() and not args.json
        self._shown: str | None = None
        self._expires: datetime | None = None

    def lines(self, session: Session) -> list[str]:
        matrix = terminal_qr.modules(session.qr_string)
        return terminal_qr.render(matrix, invert=self._invert)

    def show(self, session: Session) -> None:
        if session.qr_string == self._shown:
            return
        self._shown = session.qr_string
        self._expires = (
            session.qr_expires_at.ToDatetime(tzinfo=UTC)
            if session.HasField("qr_expires_at")
            else None
        )
        lines = self.lines(session)
        if self._json:
            data = session_dict(session)
            data["qr_terminal"] = lines
            _print_json(data)
            return
        if self._tty:
            print("\x1b[2J\x1b[H", end="")
        print("\n".join(lines))
        print(f"{session.instance_id}: scan with WhatsApp > Linked devices > Link a device")
        self.tick(newline=not self._tty)

    def tick(self, newline: bool = False) -> None:
        if self._json or self._expires is None or not (self._tty or newline):
            return
        left = max(0, int((self._expires - datetime.now(UTC)).total_seconds()))
        text = f"expires in {left:3d} s"
        print(f"\r{text}" if self._tty else text, end="\n" if newline else "", flush=True)

    def say(self, text: str) -> None:
        if self._json:
            return
        if self._tty:
            print()
        print(text, flush=True)


async def cmd_qr(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    session = await client.request_qr(args.instance_id)
    screen = _QRScreen(args)
    screen.show(session)
    if args.once:
        return EXIT_OK
    queue: asyncio.Queue[Session | BaseException] = asyncio.Queue()
    watch = client.watch(args.instance_id)

    async def pump() -> None:
        try:
            async for state in watch:
                queue.put_nowait(state)
        except Exception as error:  # noqa: BLE001 - handed to the reader
            queue.put_nowait(error)

    task = asyncio.create_task(pump())
    said_connecting = False
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), 1.0)
            except TimeoutError:
                screen.tick()
                continue
            if isinstance(item, BaseException):
                raise item
            status, qr = status_of(item), qr_status_of(item)
            if status is SessionStatus.CONNECTED:
                if args.json:
                    _print_json(session_dict(item))
                screen.say(f"{item.instance_id}: connected as {item.phone_number}")
                return EXIT_OK
            if status is SessionStatus.QR_REQUIRED and qr is QRStatus.GENERATED:
                screen.show(item)
            elif status is SessionStatus.QR_REQUIRED and qr is QRStatus.EXPIRED:
                if args.json:
                    _print_json(session_dict(item))
                screen.say(f"{item.instance_id}: the code expired; run `smctl qr` again")
                return EXIT_PRECONDITION
            elif status is SessionStatus.CONNECTING and not said_connecting:
                said_connecting = True
                if args.json:
                    _print_json(session_dict(item))
                screen.say(f"{item.instance_id}: scanned, connecting...")
            elif status in (SessionStatus.DISCONNECTED, SessionStatus.ERROR, SessionStatus.INIT):
                if args.json:
                    _print_json(session_dict(item))
                screen.say(f"{item.instance_id}: {status.value}{_detail(item)}")
                return EXIT_OTHER
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await watch.aclose()


async def cmd_sim(client: AsyncSessionManagerClient, args: argparse.Namespace) -> int:
    sim = client.simulator
    iid = args.instance_id
    if args.sim_command == "scan":
        session = await sim.scan_qr(iid, args.phone, hold_handshake=args.hold)
    elif args.sim_command == "handshake":
        session = await sim.complete_handshake(iid)
    elif args.sim_command == "drop":
        session = await sim.drop_network(iid, hold_reconnect=args.hold)
    elif args.sim_command == "unlink":
        session = await sim.unlink_device(iid)
    elif args.sim_command == "fail":
        session = await sim.fail_session(iid, args.code, args.message)
    else:  # fault
        await sim.inject_fault(iid, args.fault)
        if args.json:
            _print_json({"instance_id": iid, "fault": args.fault, "armed": True})
        else:
            print(f"{iid}: the next {args.fault} fails")
        return EXIT_OK
    _print_session(session, args.json)
    return EXIT_OK


# Parsing.


def _common() -> argparse.ArgumentParser:
    """Options accepted before and after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    common.add_argument(
        "--address",
        default=s,
        help=f"host:port of the server [env SESSION_MANAGER_ADDRESS, default {DEFAULT_ADDRESS}]",
    )
    common.add_argument(
        "--token",
        default=s,
        help="bearer token [env SESSION_MANAGER_TOKEN, else SESSION_MANAGER_PUBLIC_TOKEN]",
    )
    common.add_argument(
        "--internal-token",
        default=s,
        help="bearer token for `sim` (internal service) [env SESSION_MANAGER_INTERNAL_TOKEN,"
        " default --token]",
    )
    common.add_argument("--tls-ca", default=s, type=Path, help="PEM root certificates; enables TLS")
    common.add_argument("--tls-cert", default=s, type=Path, help="PEM client certificate (mTLS)")
    common.add_argument("--tls-key", default=s, type=Path, help="PEM client private key (mTLS)")
    common.add_argument(
        "--timeout", default=s, type=float, help=f"deadline of each call in s [{DEFAULT_TIMEOUT}]"
    )
    common.add_argument("--json", default=s, action="store_true", help="print JSON")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="smctl",
        description="Command line for the Session Manager.",
        parents=[common],
        epilog="exit codes: 0 ok, 1 other, 2 invalid argument, 3 not found, "
        "4 failed precondition or already exists, 5 unavailable or timeout",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, *, instance: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, parents=[common])
        if instance:
            sub.add_argument("instance_id", help="the session, e.g. sender_51")
        return sub

    command("create", "create a session (init/none)").set_defaults(run=cmd_create)
    command("get", "show a session").set_defaults(run=cmd_get)
    listing = command("list", "list sessions (every page)", instance=False)
    listing.add_argument("--status", choices=[s.value for s in SessionStatus])
    listing.add_argument("--page-size", type=int, default=100)
    listing.set_defaults(run=cmd_list)
    qr = command("qr", "show the QR code in the terminal until the session connects")
    qr.add_argument("--once", action="store_true", help="draw the current code once and exit")
    qr.add_argument(
        "--invert", action="store_true", help="draw dark modules (for light backgrounds)"
    )
    qr.set_defaults(run=cmd_qr)
    pair = command("pair-phone", "get a linking code to pair by phone number instead of QR")
    pair.add_argument("phone_number", help="the phone's number in international format")
    pair.set_defaults(run=cmd_pair_phone)
    send = command("send", "send a text message from a connected session")
    send.add_argument("to", help="phone number in international format or a WhatsApp JID")
    send.add_argument("text")
    send.add_argument("--key", help="idempotency key: a repeated key sends nothing again")
    send.set_defaults(run=cmd_send)
    command("disconnect", "unlink the device (disconnected, LOGOUT)").set_defaults(
        run=cmd_disconnect
    )
    command("delete", "delete the session and its messages").set_defaults(run=cmd_delete)
    watch = command("watch", "print every transition as it happens")
    watch.add_argument(
        "--until", choices=[s.value for s in SessionStatus], help="exit once in this status"
    )
    watch.set_defaults(run=cmd_watch)
    health = command("health", "grpc.health.v1 check", instance=False)
    health.add_argument("--service", default="", help="service name; empty is the server")
    health.set_defaults(run=cmd_health)

    sim = commands.add_parser("sim", help="drive the simulated engine's phone", parents=[common])
    sims = sim.add_subparsers(dest="sim_command", required=True, metavar="SIM_COMMAND")

    def sim_command(name: str, help: str) -> argparse.ArgumentParser:
        sub = sims.add_parser(name, help=help, parents=[common])
        sub.add_argument("instance_id")
        sub.set_defaults(run=cmd_sim)
        return sub

    scan = sim_command("scan", "the phone scans the code (connecting, then connected)")
    scan.add_argument("--phone", default="", help="the phone's number [+15550000000]")
    scan.add_argument("--hold", action="store_true", help="stay connecting until `handshake`")
    sim_command("handshake", "finish a held handshake or reconnection")
    drop = sim_command("drop", "the network drops (then reconnects by itself)")
    drop.add_argument("--hold", action="store_true", help="stay connecting until `handshake`")
    sim_command("unlink", "the phone unlinks the device (disconnected, LOGOUT)")
    fail = sim_command("fail", "the session fails for good (error)")
    fail.add_argument("--code", default="", help="fault code [TEMPORARY_BAN]")
    fail.add_argument("--message", default="", help="fault message")
    fault = sim_command("fault", "make the next pairing or send fail")
    fault.add_argument("fault", choices=["pairing", "send"])
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    env = os.environ
    ca = getattr(args, "tls_ca", None)
    cert = getattr(args, "tls_cert", None)
    key = getattr(args, "tls_key", None)
    tls = TLS(ca, cert, key) if (ca or cert or key) else None
    token = (
        getattr(args, "token", None)
        or env.get("SESSION_MANAGER_TOKEN")
        or env.get("SESSION_MANAGER_PUBLIC_TOKEN")
        or None
    )
    internal = (
        getattr(args, "internal_token", None) or env.get("SESSION_MANAGER_INTERNAL_TOKEN") or None
    )
    return {
        "address": getattr(args, "address", None)
        or env.get("SESSION_MANAGER_ADDRESS")
        or DEFAULT_ADDRESS,
        "token": token,
        "simulator_token": internal,
        "tls": tls,
        "timeout": getattr(args, "timeout", DEFAULT_TIMEOUT),
    }


async def _run(args: argparse.Namespace) -> int:
    async with AsyncSessionManagerClient(**_settings(args)) as client:
        code: int = await args.run(client, args)
        return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        return asyncio.run(_run(args))
    except SessionManagerClientError as error:
        label = error.reason or error.code.name
        print(f"smctl: {label}: {error.message}", file=sys.stderr)
        return exit_code(error)
    except (OSError, ValueError) as error:
        print(f"smctl: {error}", file=sys.stderr)
        return EXIT_OTHER
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
