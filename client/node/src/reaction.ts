/**
 * Central Hub's reaction table, as code: it reads `status` and reacts; it
 * never infers a state.
 *
 * | status       | action                                          |
 * |--------------|-------------------------------------------------|
 * | init         | request_qr                                      |
 * | qr_required  | show_qr                                         |
 * | connecting   | wait                                            |
 * | connected    | send                                            |
 * | disconnected | block_offer_reconnect                           |
 * | error        | block_alert (shows `last_error_message`)        |
 *
 * `ensureCanSend` is seed 000's pre-send check: unless the session is
 * connected it throws `SessionNotReadyError` with the seed's Spanish message
 * (`message`) and an English one (`messageEn`).
 */

import { SessionStatus, statusOf } from "./enums.js";
import type { WhatsAppSession } from "./gen/sessionmanager/v1/session_pb.js";

export const Action = Object.freeze({
  REQUEST_QR: "request_qr",
  SHOW_QR: "show_qr",
  WAIT: "wait",
  SEND: "send",
  BLOCK_OFFER_RECONNECT: "block_offer_reconnect",
  BLOCK_ALERT: "block_alert",
} as const);
export type Action = (typeof Action)[keyof typeof Action];

export const REACTIONS: Readonly<Record<SessionStatus, Action>> = Object.freeze({
  [SessionStatus.INIT]: Action.REQUEST_QR,
  [SessionStatus.QR_REQUIRED]: Action.SHOW_QR,
  [SessionStatus.CONNECTING]: Action.WAIT,
  [SessionStatus.CONNECTED]: Action.SEND,
  [SessionStatus.DISCONNECTED]: Action.BLOCK_OFFER_RECONNECT,
  [SessionStatus.ERROR]: Action.BLOCK_ALERT,
});

/** Pre-send rejection messages: Spanish (seed 000) and English. `error` uses the session's own. */
export const NOT_READY_MESSAGES: Readonly<
  Record<Exclude<SessionStatus, "connected" | "error">, { es: string; en: string }>
> = Object.freeze({
  [SessionStatus.INIT]: { es: "Escanea el código QR para conectar", en: "Scan the QR code to connect" },
  [SessionStatus.QR_REQUIRED]: { es: "Debes escanear el código QR", en: "You must scan the QR code" },
  [SessionStatus.CONNECTING]: {
    es: "Esperando conexión, intenta de nuevo",
    en: "Waiting for the connection, try again",
  },
  [SessionStatus.DISCONNECTED]: {
    es: "WhatsApp desconectado, reconecta",
    en: "WhatsApp is disconnected, reconnect",
  },
});

/** What Central Hub may do with the session, by its `status` alone. */
export function reaction(session: Pick<WhatsAppSession, "status">): Action {
  return REACTIONS[statusOf(session)];
}

/** The session cannot send: `message` is Spanish (seed 000), `messageEn` English. */
export class SessionNotReadyError extends Error {
  readonly instanceId: string;
  readonly status: SessionStatus;
  readonly action: Action;
  readonly messageEn: string;

  constructor(readonly session: WhatsAppSession) {
    const status = statusOf(session);
    let es: string;
    let en: string;
    if (status === SessionStatus.ERROR || status === SessionStatus.CONNECTED) {
      es = en = session.lastErrorMessage || session.lastErrorCode || status;
    } else {
      ({ es, en } = NOT_READY_MESSAGES[status]);
    }
    super(es);
    this.name = "SessionNotReadyError";
    this.instanceId = session.instanceId;
    this.status = status;
    this.action = reaction(session);
    this.messageEn = en;
  }
}

/** Seed 000's name for the same error. */
export const SessionManagerSessionNotReadyError = SessionNotReadyError;

/** Throws `SessionNotReadyError` unless the session is `connected`. */
export function ensureCanSend(session: WhatsAppSession): void {
  if (statusOf(session) !== SessionStatus.CONNECTED) {
    throw new SessionNotReadyError(session);
  }
}
