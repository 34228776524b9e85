/** The calls Central Hub makes, against a real server: reads, QR, send, admin, TLS, retries. */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import {
  MessageStatus,
  QRStatus,
  qrStatusOf,
  SessionManagerClient,
  SessionManagerUnavailableError,
  SessionNotConnectedError,
  SessionNotFoundError,
  SessionStatus,
  statusOf,
} from "../src/index.js";
import { makeCertificates, removeTemporary, Server, temporaryFolder } from "./server.js";

const PHONE = "+5491122334455";

describe("calls", () => {
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

  test("create, request the QR (the same code while valid), get, connect", async () => {
    const created = await client.createSession("sender_1");
    assert.deepEqual([statusOf(created), qrStatusOf(created)], [SessionStatus.INIT, QRStatus.NONE]);
    assert.equal(created.revision, 1n);

    const shown = await client.requestQR("sender_1");
    assert.equal(statusOf(shown), SessionStatus.QR_REQUIRED);
    assert.equal(qrStatusOf(shown), QRStatus.GENERATED);
    assert.match(shown.qrString ?? "", /^data:image\/png;base64,/);
    assert.ok(shown.qrExpiresAt !== undefined);
    const again = await client.requestQR("sender_1");
    assert.equal(again.qrString, shown.qrString);

    await client.simulator.scanQR("sender_1", PHONE);
    const read = await client.getSession("sender_1");
    assert.deepEqual([statusOf(read), read.phoneNumber, read.id], [SessionStatus.CONNECTED, PHONE, created.id]);
  });

  test("send with an idempotency key: a repeated key sends nothing again", async () => {
    await client.createSession("sender_2");
    await client.requestQR("sender_2");
    await client.simulator.scanQR("sender_2", PHONE);
    const message = { instanceId: "sender_2", to: "+5491100000000", text: "hola", idempotencyKey: "order-2-1" };
    const first = await client.sendMessage(message);
    assert.equal(first.status, MessageStatus.SENT);
    assert.equal(first.replayed, false);
    const second = await client.sendMessage(message);
    assert.equal(second.messageId, first.messageId);
    assert.equal(second.replayed, true);
    const other = await client.sendMessage({ ...message, idempotencyKey: "order-2-2" });
    assert.notEqual(other.messageId, first.messageId);
  });

  test("disconnect unlinks; pairPhone gives an 8-character linking code", async () => {
    await client.createSession("sender_3");
    await client.requestQR("sender_3");
    await client.simulator.scanQR("sender_3", PHONE);
    const disconnected = await client.disconnect("sender_3");
    assert.equal(statusOf(disconnected), SessionStatus.DISCONNECTED);
    assert.equal(disconnected.lastErrorCode, "LOGOUT");

    const paired = await client.pairPhone("sender_3", PHONE);
    assert.match(paired.linkingCode, /^[1-9A-Z]{8}$/);
    assert.equal(statusOf(paired.session ?? assert.fail("no session")), SessionStatus.QR_REQUIRED);
  });

  test("list page by page, filter by status, delete", async () => {
    for (const iid of ["list_a", "list_b", "list_c"]) {
      await client.createSession(iid);
    }
    await client.requestQR("list_b");
    const page = await client.listSessions({ pageSize: 2 });
    assert.equal(page.sessions.length, 2);
    assert.notEqual(page.nextPageToken, "");
    const all: string[] = [];
    for await (const session of client.iterSessions({ pageSize: 2 })) {
      all.push(session.instanceId);
    }
    assert.ok(["list_a", "list_b", "list_c"].every((iid) => all.includes(iid)), all.join());
    assert.equal(new Set(all).size, all.length);
    const waiting: string[] = [];
    for await (const session of client.iterSessions({ status: SessionStatus.QR_REQUIRED })) {
      waiting.push(session.instanceId);
      assert.equal(statusOf(session), SessionStatus.QR_REQUIRED);
    }
    assert.ok(waiting.includes("list_b") && !waiting.includes("list_a"));

    await client.deleteSession("list_a");
    await assert.rejects(client.getSession("list_a"), SessionNotFoundError);
  });
});

test("TLS, and mutual TLS with a client certificate", async () => {
  const pki = temporaryFolder();
  makeCertificates(pki);
  const pem = (name: string) => readFileSync(join(pki, name));
  const server = await Server.start({
    flags: ["--tls-cert", join(pki, "server.pem"), "--tls-key", join(pki, "server.key"), "--tls-client-ca", join(pki, "ca.pem")],
  });
  const trusted = new SessionManagerClient({
    address: server.address,
    tls: { ca: pem("ca.pem"), cert: pem("client.pem"), key: pem("client.key") },
    timeoutMs: 5_000,
  });
  const anonymous = new SessionManagerClient({
    address: server.address,
    tls: { ca: pem("ca.pem") },
    timeoutMs: 5_000,
    retry: false,
  });
  try {
    assert.equal((await trusted.createSession("tls_1")).instanceId, "tls_1");
    await assert.rejects(anonymous.getSession("tls_1"), SessionManagerUnavailableError);
  } finally {
    trusted.close();
    anonymous.close();
    await server.stop();
    removeTemporary(pki);
  }
});

test("a keyed send is retried until the server is back; a send without a key never is", async () => {
  const first = await Server.start();
  let second: Server | undefined;
  const patient = { initialMs: 100, maximumMs: 200, multiplier: 2, maxAttempts: 150 };
  const client = new SessionManagerClient({ address: first.address, timeoutMs: 5_000, retry: patient });
  try {
    await client.createSession("sender_r");
    await first.kill("SIGTERM");

    const message = { instanceId: "sender_r", to: "+5491100000000", text: "hola" };
    await assert.rejects(client.sendMessage(message), SessionManagerUnavailableError);
    // The session is not connected, so the server's answer, once it is back,
    // is SESSION_NOT_CONNECTED: proof that the keyed send was tried again.
    const keyed = client.sendMessage({ ...message, idempotencyKey: "order-r-1" });
    second = await first.restart();
    await assert.rejects(keyed, (error: unknown) => {
      assert.ok(error instanceof SessionNotConnectedError, String(error));
      assert.equal(error.status, "init");
      return true;
    });
  } finally {
    client.close();
    await second?.stop();
    await first.stop();
  }
});
