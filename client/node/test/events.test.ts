/** The event log from Node: the list-wide stream resumes from its cursor; messages and receipts. */

import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { test } from "node:test";

import {
  CursorExpiredError,
  MessageNotFoundError,
  MessageStatus,
  SessionManagerClient,
  StreamCursor,
  type WatchSessionsResponse,
} from "../src/index.js";
import { Server } from "./server.js";

const FAST = { initialMs: 50, maximumMs: 300, multiplier: 2, maxAttempts: 100 };
const PHONE = "+5491122334455";

/** The iterator's next item, within a bounded time. */
async function next(stream: AsyncIterator<WatchSessionsResponse>, timeoutMs = 15_000): Promise<WatchSessionsResponse> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, failed) => {
    timer = setTimeout(() => failed(new Error(`no item within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    const step = await Promise.race([stream.next(), late]);
    assert.ok(!step.done, "the stream ended");
    return step.value;
  } finally {
    clearTimeout(timer);
  }
}

/** The status of the message an event carries, by name (`READ`). */
function messageStatus(item: WatchSessionsResponse): string {
  assert.equal(item.item.case, "event");
  const resource = item.item.value.resource;
  assert.equal(resource.case, "message");
  return MessageStatus[resource.value.status];
}

test("the list-wide stream resumes after the server is killed, after its cursor, each event once", async () => {
  const first = await Server.start();
  let second: Server | undefined;
  const client = new SessionManagerClient({ address: first.address, timeoutMs: 5_000, watchBackoff: FAST });
  try {
    await client.createSession("sender_51");
    const cursor = new StreamCursor();
    const stream = client.watchSessions({ cursor, types: ["session.updated", "session.deleted"] });
    const state = await next(stream);
    assert.equal(state.item.case, "session");
    const checkpoint = await next(stream);
    assert.equal(checkpoint.item.case, "checkpoint");
    const start = cursor.sequence;
    assert.ok(start !== undefined && start > 0n);
    await client.requestQR("sender_51");
    assert.equal((await next(stream)).item.case, "event");
    assert.equal(cursor.sequence, start + 1n);

    const pending = next(stream, 30_000);
    await first.kill("SIGKILL");
    second = await first.restart();
    const phone = new SessionManagerClient({ address: second.address });
    try {
      await phone.simulator.scanQR("sender_51", PHONE, { holdHandshake: true });
      await phone.simulator.completeHandshake("sender_51");
      await phone.deleteSession("sender_51");
    } finally {
      phone.close();
    }
    const received = [await pending, await next(stream), await next(stream)];
    assert.deepEqual(
      received.map((item) => (item.item.case === "event" ? item.item.value.sequence : -1n)),
      [start + 2n, start + 3n, start + 4n],
    );
    const last = received[2]?.item;
    assert.ok(last?.case === "event" && last.value.resource.case === "session");
    assert.equal(last.value.resource.value.instanceId, "sender_51");
    assert.equal(cursor.sequence, start + 4n);
    await stream.return(undefined);
  } finally {
    client.close();
    await second?.stop();
    await first.stop();
  }
});

test("a message moves forward with its receipts, and each move is an event", async () => {
  const server = await Server.start();
  const client = new SessionManagerClient({ address: server.address, timeoutMs: 5_000 });
  try {
    await client.createSession("sender_52");
    await client.requestQR("sender_52");
    await client.simulator.scanQR("sender_52", PHONE);
    const messages = client.watchSessions({ types: ["message.updated"] });
    assert.equal((await next(messages)).item.case, "checkpoint");
    const sent = await client.sendMessage({ instanceId: "sender_52", to: "+5491100000000", text: "hola" });
    assert.equal((await client.getMessage("sender_52", sent.messageId)).status, MessageStatus.SENT);
    await client.simulator.deliverMessage("sender_52", sent.messageId);
    const read = await client.simulator.readMessage("sender_52", sent.messageId);
    assert.equal(read.status, MessageStatus.READ);
    const late = await client.simulator.deliverMessage("sender_52", sent.messageId);
    assert.equal(late.status, MessageStatus.READ); // never back
    const got = await client.getMessage("sender_52", sent.messageId);
    assert.equal(got.status, MessageStatus.READ);
    assert.ok(got.deliveredAt !== undefined && got.readAt !== undefined);
    const moves = [];
    for (let n = 0; n < 4; n++) {
      moves.push(messageStatus(await next(messages)));
    }
    assert.deepEqual(moves, ["PENDING", "SENT", "DELIVERED", "READ"]);
    await messages.return(undefined);
    await assert.rejects(client.getMessage("sender_52", "no-such-message"), (error: unknown) => {
      assert.ok(error instanceof MessageNotFoundError);
      assert.equal(error.messageId, "no-such-message");
      return true;
    });
  } finally {
    client.close();
    await server.stop();
  }
});

test("a cursor older than the log keeps is CursorExpiredError", async () => {
  const server = await Server.start({ flags: ["--event-retention", "0.4"] });
  const client = new SessionManagerClient({ address: server.address, timeoutMs: 5_000 });
  try {
    await client.createSession("sender_53");
    const deadline = Date.now() + 15_000;
    for (;;) {
      const stream = client.watchSessions({ afterSequence: 0n });
      try {
        await next(stream, 1_000);
      } catch (error) {
        if (error instanceof CursorExpiredError) {
          assert.ok((error.trimmedThrough ?? 0n) >= 1n);
          assert.match(error.message, /from the current state/);
          break;
        }
        if (!(error instanceof Error && /no item within/.test(error.message))) {
          throw error;
        }
      } finally {
        await stream.return(undefined);
      }
      assert.ok(Date.now() < deadline, "the log was never trimmed");
      await sleep(100); // the log is trimmed every tenth of a second here
    }
  } finally {
    client.close();
    await server.stop();
  }
});
