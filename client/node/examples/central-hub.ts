import {
  Action,
  ensureCanSend,
  reaction,
  SessionAlreadyExistsError,
  SessionManagerClient,
  SessionManagerClientError,
  SessionNotReadyError,
  SessionStatus,
  statusOf,
  timestampDate,
  type WhatsAppSession,
} from "sessionmanager-client";

async function main(clienteId: number): Promise<void> {
  const instanceId = `sender_${clienteId}`; // Central Hub's convention
  const client = new SessionManagerClient({
    address: process.env.SESSION_MANAGER_ADDRESS ?? "127.0.0.1:50051",
    token: process.env.SESSION_MANAGER_TOKEN, // Authorization: Bearer, when the server asks for one
    timeoutMs: 10_000, // the deadline of each call
  });
  try {
    // Make sure the session exists.
    let session: WhatsAppSession;
    try {
      session = await client.createSession(instanceId);
    } catch (error) {
      if (!(error instanceof SessionAlreadyExistsError)) throw error;
      session = await client.getSession(instanceId);
    }

    // React to the status, by the table; never infer.
    const action = reaction(session);
    if (action === Action.BLOCK_ALERT) {
      throw new Error(`alert: ${session.lastErrorMessage}`);
    }
    if (action === Action.REQUEST_QR || action === Action.SHOW_QR || action === Action.BLOCK_OFFER_RECONNECT) {
      session = await client.requestQR(instanceId); // the same code while it is valid
      // qrString is a PNG data URL: the page shows it as <img src="..."> until it expires.
      const expires = session.qrExpiresAt && timestampDate(session.qrExpiresAt);
      console.log(`show ${session.qrString?.slice(0, 22)}... until ${expires?.toISOString()}`);
      await client.simulator.scanQR(instanceId, "+5491122334455"); // demo: the phone scans
    }

    // Wait for `connected`, live (the watch resumes by itself after a server restart).
    for await (const state of client.watchSession(instanceId)) {
      console.log(`rev ${state.revision}: ${statusOf(state)} -> ${reaction(state)}`);
      if (statusOf(state) === SessionStatus.CONNECTED) break;
    }

    // Pre-send check (seed 000's messages), then send with an idempotency key:
    // repeating the call with the same key sends nothing again.
    try {
      ensureCanSend(await client.getSession(instanceId));
      const sent = await client.sendMessage({
        instanceId,
        to: "+5491100000000",
        text: "hola",
        idempotencyKey: `order-${clienteId}-1`,
      });
      console.log("sent", sent.messageId, sent.replayed ? "replayed" : "");
    } catch (error) {
      if (error instanceof SessionNotReadyError) {
        console.log(error.message); // e.g. "Debes escanear el código QR"
      } else if (error instanceof SessionManagerClientError) {
        console.log(error.reason, error.status, error.message);
      } else {
        throw error;
      }
    }
  } finally {
    client.close();
  }
}

main(51).catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
