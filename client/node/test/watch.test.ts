/** watchSession: resumes after a server restart and follows (id, revision), against real servers. */

import assert from "node:assert/strict";
import { test } from "node:test";

import { SessionManagerClient, SessionNotFoundError, SessionStatus, statusOf, type WhatsAppSession } from "../src/index.js";
import { Server } from "./server.js";

const FAST = { initialMs: 50, maximumMs: 300, multiplier: 2, maxAttempts: 100 };
const PHONE = "+5491122334455";

/** The iterator's next state, within a bounded time. */
async function next(watch: AsyncIterator<WhatsAppSession>, timeoutMs = 10_000): Promise<WhatsAppSession> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, failed) => {
    timer = setTimeout(() => failed(new Error(`no state within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    const step = await Promise.race([watch.next(), late]);
    assert.ok(!step.done, "the watch ended");
    return step.value;
  } finally {
    clearTimeout(timer);
  }
}

function seen(session: WhatsAppSession): [number, string] {
  return [Number(session.revision), statusOf(session)];
}

test("the watch resumes after the server is killed and another starts on the same database", async () => {
  const first = await Server.start();
  let second: Server | undefined;
  const client = new SessionManagerClient({ address: first.address, timeoutMs: 5_000, watchBackoff: FAST });
  try {
    await client.createSession("sender_51");
    const watch = client.watchSession("sender_51");
    assert.deepEqual(seen(await next(watch)), [1, SessionStatus.INIT]);
    await client.requestQR("sender_51");
    assert.deepEqual(seen(await next(watch)), [2, SessionStatus.QR_REQUIRED]);

    const pending = next(watch, 20_000);
    await first.kill("SIGKILL");
    second = await first.restart();
    const phone = new SessionManagerClient({ address: second.address });
    try {
      await phone.simulator.scanQR("sender_51", PHONE, { holdHandshake: true });
      // Whether the watch re-subscribed before the scan (then its first state,
      // revision 2, was already seen and is not repeated) or after, the next
      // state it yields is revision 3.
      assert.deepEqual(seen(await pending), [3, SessionStatus.CONNECTING]);
      await phone.simulator.completeHandshake("sender_51");
      const connected = await next(watch);
      assert.deepEqual(seen(connected), [4, SessionStatus.CONNECTED]);
      assert.equal(connected.phoneNumber, PHONE);
    } finally {
      phone.close();
    }
    await watch.return(undefined);
  } finally {
    client.close();
    await second?.stop();
    await first.stop();
  }
});

test("a session deleted and created again while the watch was away is followed from its new start", async () => {
  const first = await Server.start();
  let last: Server | undefined;
  const client = new SessionManagerClient({ address: first.address, timeoutMs: 5_000, watchBackoff: FAST });
  try {
    const old = await client.createSession("sender_51");
    await client.requestQR("sender_51");
    await client.simulator.scanQR("sender_51", PHONE);
    const watch = client.watchSession("sender_51");
    const before = await next(watch);
    assert.deepEqual(seen(before), [4, SessionStatus.CONNECTED]);
    const pending = next(watch, 20_000);
    await first.kill("SIGKILL");

    // Another server, on another port so that the watch cannot reach it,
    // deletes the session and creates it again: a new id, revision 2.
    const elsewhere = await Server.start({ database: first.database });
    const admin = new SessionManagerClient({ address: elsewhere.address });
    try {
      await admin.deleteSession("sender_51");
      await admin.createSession("sender_51");
      await admin.requestQR("sender_51");
    } finally {
      admin.close();
      await elsewhere.kill("SIGTERM");
    }

    last = await first.restart();
    const recreated = await pending;
    assert.notEqual(recreated.id, old.id);
    assert.deepEqual(seen(recreated), [2, SessionStatus.QR_REQUIRED]);
    await client.simulator.scanQR("sender_51", "+5491100000001");
    const following = [await next(watch), await next(watch)];
    assert.deepEqual(
      following.map((session) => [session.id, ...seen(session)]),
      [
        [recreated.id, 3, SessionStatus.CONNECTING],
        [recreated.id, 4, SessionStatus.CONNECTED],
      ],
    );
    await watch.return(undefined);
  } finally {
    client.close();
    await last?.stop();
    await first.stop();
  }
});

test("the watch ends with SessionNotFoundError on delete; a new one sees only the new session", async () => {
  const server = await Server.start();
  const client = new SessionManagerClient({ address: server.address, timeoutMs: 5_000 });
  try {
    await client.createSession("sender_51");
    const old = await client.requestQR("sender_51");
    const watch = client.watchSession("sender_51");
    assert.equal((await next(watch)).revision, 2n);
    await client.deleteSession("sender_51");
    await assert.rejects(next(watch), (error: unknown) => {
      assert.ok(error instanceof SessionNotFoundError, String(error));
      assert.equal(error.instanceId, "sender_51");
      return true;
    });

    const created = await client.createSession("sender_51");
    assert.notEqual(created.id, old.id);
    const again = client.watchSession("sender_51");
    const first = await next(again);
    assert.deepEqual([first.id, ...seen(first)], [created.id, 1, SessionStatus.INIT]);
    await client.requestQR("sender_51");
    const second = await next(again);
    assert.deepEqual([second.id, second.revision], [created.id, 2n]);
    await again.return(undefined);
  } finally {
    client.close();
    await server.stop();
  }
});

test("aborting the signal ends the watch", async () => {
  const server = await Server.start();
  const client = new SessionManagerClient({ address: server.address });
  try {
    await client.createSession("sender_51");
    const controller = new AbortController();
    const watch = client.watchSession("sender_51", { signal: controller.signal });
    assert.equal((await next(watch)).revision, 1n);
    const ended = next(watch);
    controller.abort();
    await assert.rejects(ended);
  } finally {
    client.close();
    await server.stop();
  }
});
