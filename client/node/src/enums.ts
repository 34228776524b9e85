/**
 * The frozen enums of the contract, as their text values (`'qr_required'`).
 *
 * The text form of a value is its protobuf name without the enum's prefix,
 * lower-cased (`SESSION_STATUS_QR_REQUIRED` -> `qr_required`): one mechanical
 * rule, applied here to the generated descriptors. The objects below spell the
 * same values as seed 000's `SessionStatus` and `QRStatus`, so Central Hub's
 * code compares `statusOf(session) === SessionStatus.CONNECTED` as before; a
 * test checks that they and the descriptors agree.
 */

import type { DescEnum } from "@bufbuild/protobuf";

import {
  QRStatusSchema,
  SessionStatusSchema,
  type SessionStatus as SessionStatusNumber,
  type WhatsAppSession,
} from "./gen/sessionmanager/v1/session_pb.js";

export const SessionStatus = Object.freeze({
  INIT: "init",
  QR_REQUIRED: "qr_required",
  CONNECTING: "connecting",
  CONNECTED: "connected",
  DISCONNECTED: "disconnected",
  ERROR: "error",
} as const);
export type SessionStatus = (typeof SessionStatus)[keyof typeof SessionStatus];

export const QRStatus = Object.freeze({
  NONE: "none",
  GENERATED: "generated",
  EXPIRED: "expired",
  USED: "used",
} as const);
export type QRStatus = (typeof QRStatus)[keyof typeof QRStatus];

/** `number -> text` for one generated enum, by the contract's one rule. */
export function textForms(schema: DescEnum, prefix: string): Map<number, string> {
  return new Map(
    schema.values.map((value) => {
      if (!value.name.startsWith(prefix)) {
        throw new Error(`${value.name} does not start with ${prefix}`);
      }
      return [value.number, value.name.slice(prefix.length).toLowerCase()];
    }),
  );
}

const STATUS_TEXT = textForms(SessionStatusSchema, "SESSION_STATUS_") as Map<number, SessionStatus>;
const QR_TEXT = textForms(QRStatusSchema, "QR_STATUS_") as Map<number, QRStatus>;
const STATUS_NUMBER = new Map([...STATUS_TEXT].map(([number, text]) => [text, number]));

function known<T>(table: Map<number, T>, number: number, what: string): T {
  const text = table.get(number);
  if (text === undefined) {
    throw new RangeError(`${what} ${number} is not in the contract`);
  }
  return text;
}

/** The session's `status` in its text form (`'connected'`). */
export function statusOf(session: Pick<WhatsAppSession, "status">): SessionStatus {
  return known(STATUS_TEXT, session.status, "session status");
}

/** The session's `qr_status` in its text form (`'generated'`). */
export function qrStatusOf(session: Pick<WhatsAppSession, "qrStatus">): QRStatus {
  return known(QR_TEXT, session.qrStatus, "QR status");
}

/** `'qr_required'` -> the generated enum's number (for request filters). */
export function statusNumber(status: SessionStatus): SessionStatusNumber {
  const number = STATUS_NUMBER.get(status);
  if (number === undefined) {
    throw new RangeError(`unknown session status '${String(status)}'`);
  }
  return number;
}
