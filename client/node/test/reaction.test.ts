/** The frozen enums, the reaction table and seed 000's pre-send check, for all six statuses. */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { create } from "@bufbuild/protobuf";

import { QRStatusSchema, SessionStatusSchema, WhatsAppSessionSchema } from "../src/gen/sessionmanager/v1/session_pb.js";
import {
  Action,
  ensureCanSend,
  QRStatus,
  qrStatusOf,
  reaction,
  SessionManagerClient,
  SessionManagerSessionNotReadyError,
  SessionNotReadyError,
  SessionStatus,
  statusNumber,
  statusOf,
  type WhatsAppSession,
} from "../src/index.js";
import { Server } from "./server.js";

const EXPECTED = {
  init: [Action.REQUEST_QR, "Escanea el código QR para conectar", "Scan the QR code to connect"],
  qr_required: [Action.SHOW_QR, "Debes escanear el código QR", "You must scan the QR code"],
  connecting: [Action.WAIT, "Esperando conexión, intenta de nuevo", "Waiting for the connection, try again"],
  connected: [Action.SEND, undefined, undefined],
  disconnected: [Action.BLOCK_OFFER_RECONNECT, "WhatsApp desconectado, reconecta", "WhatsApp is disconnected, reconnect"],
  error: [Action.BLOCK_ALERT, "Cuenta bloqueada temporalmente", "Cuenta bloqueada temporalmente"],
} as const;

test("the frozen enums are the contract's text values, as the descriptors give them", () => {
  assert.deepEqual(
    Object.values(SessionStatus),
    ["init", "qr_required", "connecting", "connected", "disconnected", "error"],
  );
  assert.deepEqual(Object.values(QRStatus), ["none", "generated", "expired", "used"]);
  for (const value of SessionStatusSchema.values) {
    const text = value.name.replace(/^SESSION_STATUS_/, "").toLowerCase();
    assert.equal(statusOf({ status: value.number }), text);
    assert.equal(statusNumber(text as SessionStatus), value.number);
  }
  for (const value of QRStatusSchema.values) {
    assert.equal(qrStatusOf({ qrStatus: value.number }), value.name.replace(/^QR_STATUS_/, "").toLowerCase());
  }
  assert.throws(() => statusOf({ status: 6 as never }), RangeError);
  assert.ok(Object.isFrozen(SessionStatus) && Object.isFrozen(QRStatus));
});

test("the reaction table and the pre-send messages, for every status", () => {
  for (const [status, [action, spanish, english]] of Object.entries(EXPECTED)) {
    const session = create(WhatsAppSessionSchema, {
      instanceId: "sender_51",
      status: statusNumber(status as SessionStatus),
      lastErrorCode: status === "error" ? "TEMPORARY_BAN" : undefined,
      lastErrorMessage: status === "error" ? "Cuenta bloqueada temporalmente" : undefined,
    });
    assert.equal(reaction(session), action, status);
    if (spanish === undefined) {
      ensureCanSend(session);
      continue;
    }
    assert.throws(
      () => ensureCanSend(session),
      (error: unknown) => {
        assert.ok(error instanceof SessionNotReadyError);
        assert.ok(error instanceof SessionManagerSessionNotReadyError);
        assert.equal(error.message, spanish);
        assert.equal(error.messageEn, english);
        assert.equal(error.status, status);
        assert.equal(error.action, action);
        assert.equal(error.instanceId, "sender_51");
        return true;
      },
    );
  }
});

describe("the pre-send check against real sessions in each status", () => {
  let server: Server;
  let client: SessionManagerClient;
  before(async () => {
    server = await Server.start();
    client = new SessionManagerClient({ address: server.address, timeoutMs: 5_000 });
  });
  after(async () => {
    client.close();
    await server.stop();
  });

  /** Central Hub's sender: read the session, check it, send only when connected. */
  async function send(instanceId: string, key: string): Promise<string> {
    const session = await client.getSession(instanceId);
    try {
      ensureCanSend(session);
    } catch (error) {
      if (error instanceof SessionNotReadyError) {
        return error.message;
      }
      throw error;
    }
    const sent = await client.sendMessage({ instanceId, to: "+5491100000000", text: "hola", idempotencyKey: key });
    return `sent ${sent.messageId}`;
  }

  test("each status gives its action and its message; connected sends", async () => {
    let iid = "sender_ready";
    const statuses: [WhatsAppSession, string][] = [];
    const observe = async (expected: string) => {
      const session = await client.getSession(iid);
      statuses.push([session, expected]);
      return send(iid, `order-${statuses.length}`);
    };

    await client.createSession(iid);
    assert.equal(await observe("init"), EXPECTED.init[1]);
    await client.requestQR(iid);
    assert.equal(await observe("qr_required"), EXPECTED.qr_required[1]);
    await client.simulator.scanQR(iid, "+5491122334455", { holdHandshake: true });
    assert.equal(await observe("connecting"), EXPECTED.connecting[1]);
    await client.simulator.completeHandshake(iid);
    assert.match(await observe("connected"), /^sent /);
    await client.disconnect(iid);
    assert.equal(await observe("disconnected"), EXPECTED.disconnected[1]);
    // A logged-out device reports nothing more: the fault comes from another session.
    iid = "sender_banned";
    await client.createSession(iid);
    await client.simulator.failSession(iid, "TEMPORARY_BAN", "Cuenta bloqueada temporalmente");
    assert.equal(await observe("error"), "Cuenta bloqueada temporalmente");

    for (const [session, expected] of statuses) {
      assert.equal(statusOf(session), expected);
      assert.equal(reaction(session), EXPECTED[expected as SessionStatus][0]);
    }
  });
});
