/** Every contract error reaches Central Hub as its own class, against a real server. */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";

import { ErrorInfoSchema, RetryInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { ErrorReasonSchema } from "../src/gen/sessionmanager/v1/session_pb.js";
import {
  fromError,
  InvalidArgumentError,
  InvalidInstanceIdError,
  InvalidTransitionError,
  LimitExceededError,
  MessageOutcomeUnknownError,
  StorageUnavailableError,
  PermissionDeniedError,
  QRGenerationFailedError,
  QRNotAvailableError,
  REASONS,
  SessionAlreadyConnectedError,
  SessionAlreadyExistsError,
  SessionManagerClient,
  SessionManagerClientError,
  SessionManagerError,
  SessionManagerTimeoutError,
  SessionManagerUnavailableError,
  SessionNotConnectedError,
  SessionNotFoundError,
  UnauthenticatedError,
  WhatsAppError,
} from "../src/index.js";
import { closedPort, Server } from "./server.js";

const PHONE = "+5491122334455";

async function connected(client: SessionManagerClient, instanceId: string): Promise<void> {
  await client.createSession(instanceId);
  await client.requestQR(instanceId);
  await client.simulator.scanQR(instanceId, PHONE);
}

test("one class per contract reason, as the protos list them", () => {
  const reasons = ErrorReasonSchema.values
    .filter((value) => value.number !== 0)
    .map((value) => value.name.replace(/^ERROR_REASON_/, ""));
  assert.deepEqual(Object.keys(REASONS).sort(), reasons.sort());
  assert.equal(new Set(Object.values(REASONS)).size, reasons.length);
  for (const ErrorClass of Object.values(REASONS)) {
    assert.ok(ErrorClass.prototype instanceof SessionManagerClientError);
  }
});

describe("against a server", () => {
  let server: Server;
  let client: SessionManagerClient;

  before(async () => {
    server = await Server.start({ flags: ["--send-rate", "0.001", "--send-burst", "2"] });
    client = new SessionManagerClient({ address: server.address, timeoutMs: 5_000 });
  });
  after(async () => {
    client.close();
    await server.stop();
  });

  test("SESSION_NOT_FOUND", async () => {
    const error = await rejection(client.getSession("sender_404"), SessionNotFoundError);
    assert.equal(error.reason, "SESSION_NOT_FOUND");
    assert.equal(error.code, Code.NotFound);
    assert.equal(error.codeName, "NOT_FOUND");
    assert.equal(error.instanceId, "sender_404");
    assert.match(error.message, /sender_404/);
  });

  test("INVALID_INSTANCE_ID", async () => {
    const error = await rejection(client.createSession("not valid!"), InvalidInstanceIdError);
    assert.equal(error.code, Code.InvalidArgument);
  });

  test("INVALID_ARGUMENT names the field", async () => {
    await connected(client, "sender_arg");
    const error = await rejection(
      client.sendMessage({ instanceId: "sender_arg", to: "+5491100000000", text: "" }),
      InvalidArgumentError,
    );
    assert.equal(error.field, "text");
    const listing = await rejection(client.listSessions({ pageSize: 5000 }), InvalidArgumentError);
    assert.equal(listing.field, "page_size");
  });

  test("SESSION_ALREADY_EXISTS", async () => {
    await client.createSession("sender_twice");
    const error = await rejection(client.createSession("sender_twice"), SessionAlreadyExistsError);
    assert.equal(error.code, Code.AlreadyExists);
  });

  test("SESSION_ALREADY_CONNECTED", async () => {
    await connected(client, "sender_conn");
    const error = await rejection(client.requestQR("sender_conn"), SessionAlreadyConnectedError);
    assert.equal(error.code, Code.FailedPrecondition);
    assert.equal(error.status, "connected");
  });

  test("SESSION_NOT_CONNECTED carries the status", async () => {
    await client.createSession("sender_idle");
    const send = () => client.sendMessage({ instanceId: "sender_idle", to: "+5491100000000", text: "hola" });
    assert.equal((await rejection(send(), SessionNotConnectedError)).status, "init");
    await client.requestQR("sender_idle");
    assert.equal((await rejection(send(), SessionNotConnectedError)).status, "qr_required");
  });

  test("QR_NOT_AVAILABLE while connecting", async () => {
    await client.createSession("sender_held");
    await client.requestQR("sender_held");
    await client.simulator.scanQR("sender_held", PHONE, { holdHandshake: true });
    const error = await rejection(client.requestQR("sender_held"), QRNotAvailableError);
    assert.equal(error.status, "connecting");
  });

  test("QR_GENERATION_FAILED", async () => {
    await client.createSession("sender_noqr");
    await client.simulator.injectFault("sender_noqr", "pairing");
    const error = await rejection(client.requestQR("sender_noqr"), QRGenerationFailedError);
    assert.equal(error.code, Code.Internal);
  });

  test("WHATSAPP_ERROR is not 'server unreachable'", async () => {
    await connected(client, "sender_wa");
    await client.simulator.injectFault("sender_wa", "send");
    const error = await rejection(
      client.sendMessage({ instanceId: "sender_wa", to: "+5491100000000", text: "hola", idempotencyKey: "k1" }),
      WhatsAppError,
    );
    assert.equal(error.code, Code.Unavailable);
    assert.ok(!(error instanceof SessionManagerUnavailableError));
  });

  test("LIMIT_EXCEEDED names the limit and when to retry", async () => {
    await connected(client, "sender_fast");
    const send = (n: number) =>
      client.sendMessage({ instanceId: "sender_fast", to: "+5491100000000", text: `hola ${n}` });
    await send(1);
    await send(2);
    const error = await rejection(send(3), LimitExceededError);
    assert.equal(error.code, Code.ResourceExhausted);
    assert.equal(error.limit, "send_rate");
    assert.ok(error.retryAfterMs !== undefined && error.retryAfterMs > 0, String(error.retryAfterMs));
  });

  test("a passed deadline is SessionManagerTimeoutError", async () => {
    await client.createSession("sender_slow");
    server.process.kill("SIGSTOP");
    try {
      const error = await rejection(client.getSession("sender_slow", { timeoutMs: 300 }), SessionManagerTimeoutError);
      assert.equal(error.reason, undefined);
      assert.equal(error.code, Code.DeadlineExceeded);
    } finally {
      server.process.kill("SIGCONT");
    }
    assert.equal((await client.getSession("sender_slow")).instanceId, "sender_slow");
  });
});

test("an unreachable server is SessionManagerUnavailableError, after the read retries", async () => {
  const address = `127.0.0.1:${await closedPort()}`;
  const client = new SessionManagerClient({
    address,
    retry: { initialMs: 10, maximumMs: 20, multiplier: 2, maxAttempts: 2 },
  });
  try {
    const error = await rejection(client.getSession("sender_1"), SessionManagerUnavailableError);
    assert.equal(error.reason, undefined);
    assert.equal(error.code, Code.Unavailable);
  } finally {
    client.close();
  }
});

test("tokens: UNAUTHENTICATED without, PERMISSION_DENIED with the wrong one", async () => {
  const server = await Server.start({
    env: { SESSION_MANAGER_PUBLIC_TOKEN: "pub", SESSION_MANAGER_INTERNAL_TOKEN: "int" },
  });
  const anonymous = new SessionManagerClient({ address: server.address });
  const hub = new SessionManagerClient({ address: server.address, token: "pub" });
  const engine = new SessionManagerClient({ address: server.address, token: "pub", simulatorToken: "int" });
  try {
    const denied = await rejection(anonymous.createSession("sender_t"), UnauthenticatedError);
    assert.equal(denied.code, Code.Unauthenticated);
    await hub.createSession("sender_t");
    await rejection(hub.simulator.failSession("sender_t"), PermissionDeniedError);
    const failed = await engine.simulator.failSession("sender_t");
    assert.equal(failed.lastErrorCode, "TEMPORARY_BAN");
  } finally {
    for (const client of [anonymous, hub, engine]) {
      client.close();
    }
    await server.stop();
  }
});

test("reasons a client cannot provoke from outside map to their classes too", () => {
  const cases = [
    ["SESSION_MANAGER_ERROR", Code.Internal, SessionManagerError],
    ["INVALID_TRANSITION", Code.FailedPrecondition, InvalidTransitionError],
    ["MESSAGE_OUTCOME_UNKNOWN", Code.Unknown, MessageOutcomeUnknownError],
    ["STORAGE_UNAVAILABLE", Code.Unavailable, StorageUnavailableError],
  ] as const;
  for (const [reason, code, ErrorClass] of cases) {
    const info = create(ErrorInfoSchema, {
      reason,
      domain: "sessionmanager.v1",
      metadata: { instance_id: "sender_1", status: "init", message_id: "m-1" },
    });
    const retry = create(RetryInfoSchema, { retryDelay: { seconds: 1n, nanos: 500_000_000 } });
    const thrown = new ConnectError("told so", code, undefined, [
      { desc: ErrorInfoSchema, value: info },
      { desc: RetryInfoSchema, value: retry },
    ]);
    const error = fromError(thrown);
    assert.ok(error instanceof ErrorClass, error.name);
    assert.equal(error.message, "told so");
    assert.equal(error.status, "init");
    assert.equal(error.retryAfterMs, 1500);
    assert.equal(error.code, code);
  }
  const unknown = fromError(
    new ConnectError("unknown", Code.Unknown, undefined, [
      { desc: ErrorInfoSchema, value: create(ErrorInfoSchema, { reason: "MESSAGE_OUTCOME_UNKNOWN", metadata: { message_id: "m-1" } }) },
    ]),
  );
  assert.ok(unknown instanceof MessageOutcomeUnknownError);
  assert.equal(unknown.messageId, "m-1");
  const bare = fromError(new ConnectError("nope", Code.PermissionDenied));
  assert.equal(bare.constructor, SessionManagerClientError);
  assert.equal(bare.code, Code.PermissionDenied);
});

async function rejection<T extends SessionManagerClientError>(
  promise: Promise<unknown>,
  ErrorClass: new (...args: never[]) => T,
): Promise<T> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof ErrorClass, `expected ${ErrorClass.name}, got ${String(error)}`);
    return error;
  }
  assert.fail(`expected ${ErrorClass.name}, the call succeeded`);
}
