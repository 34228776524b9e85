/**
 * Central Hub's client for the Session Manager.
 *
 * `SessionManagerClient` speaks the public SessionService over gRPC; every
 * contract error is one class of `errors.ts`; `SessionStatus` / `QRStatus`
 * are the frozen enums as their text values; `reaction` and `ensureCanSend`
 * encode Central Hub's reaction table and seed 000's pre-send check.
 */

export {
  type CallOptions,
  type ClientOptions,
  DEFAULT_ADDRESS,
  DEFAULT_TIMEOUT_MS,
  type ListOptions,
  type Page,
  READ_RETRY,
  type SendMessage,
  SessionManagerClient,
  Simulator,
  type TLSOptions,
  type EventTypeText,
  type WatchOptions,
  type WatchSessionsOptions,
} from "./client.js";
export { QRStatus, qrStatusOf, SessionStatus, statusNumber, statusOf } from "./enums.js";
export * from "./errors.js";
export {
  Action,
  ensureCanSend,
  NOT_READY_MESSAGES,
  REACTIONS,
  reaction,
  SessionManagerSessionNotReadyError,
  SessionNotReadyError,
} from "./reaction.js";
export { type Backoff, StreamCursor, WATCH_BACKOFF, WatchCursor } from "./watch.js";
export type { WhatsAppSession } from "./gen/sessionmanager/v1/session_pb.js";
export type {
  Checkpoint,
  Event,
  Message,
  PairPhoneResponse,
  SendResponse,
  WatchSessionsResponse,
} from "./gen/sessionmanager/v1/session_service_pb.js";
export { EventType, MessageStatus } from "./gen/sessionmanager/v1/session_service_pb.js";
export { timestampDate } from "@bufbuild/protobuf/wkt";
