/**
 * Contract errors as exceptions: one class per `ErrorInfo.reason`.
 *
 * The Session Manager sends every error as a gRPC status plus one
 * `google.rpc.ErrorInfo` (inside the `google.rpc.Status` details, which the
 * transport decodes) whose `reason` is the contract code and whose `metadata`
 * carries the dynamic values (`instance_id`, often `status`). `fromError`
 * turns whatever a call threw into the matching class; `REASONS` is the one
 * reason -> class table. The class names follow seed 000 where it has them
 * (`SessionNotFoundError`, `SessionAlreadyConnectedError`,
 * `QRGenerationFailedError`).
 */

import { Code, ConnectError } from "@connectrpc/connect";

import { ErrorInfoSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** The gRPC status code's name (`NOT_FOUND`), from Connect's `Code` (`NotFound`). */
export function codeName(code: Code): string {
  return (Code[code] ?? "Unknown").replace(/(?<=[a-z])(?=[A-Z])/g, "_").toUpperCase();
}

export interface ErrorFields {
  /** The contract code (`SESSION_NOT_FOUND`), or `undefined` when the status carried no ErrorInfo. */
  reason?: string | undefined;
  /** The gRPC status code, as a number (5 is NOT_FOUND). */
  code: Code;
  /** The ErrorInfo metadata: `instance_id`, `status`, `field`, `limit`... */
  metadata?: Record<string, string>;
  /** Milliseconds to wait before trying again, from a `google.rpc.RetryInfo`. */
  retryAfterMs?: number | undefined;
  cause?: unknown;
}

/** Any failure of a call to the Session Manager. */
export class SessionManagerClientError extends Error {
  readonly reason: string | undefined;
  readonly code: Code;
  readonly metadata: Readonly<Record<string, string>>;
  readonly retryAfterMs: number | undefined;

  constructor(message: string, fields: ErrorFields) {
    super(message, { cause: fields.cause });
    this.name = new.target.name;
    this.reason = fields.reason;
    this.code = fields.code;
    this.metadata = Object.freeze({ ...fields.metadata });
    this.retryAfterMs = fields.retryAfterMs;
  }

  /** The gRPC status code's name, e.g. `FAILED_PRECONDITION`. */
  get codeName(): string {
    return codeName(this.code);
  }

  get instanceId(): string | undefined {
    return this.metadata["instance_id"];
  }

  /** The session's status in text form, when the error depends on it. */
  get status(): string | undefined {
    return this.metadata["status"];
  }

  /** The invalid request field, for INVALID_ARGUMENT. */
  get field(): string | undefined {
    return this.metadata["field"];
  }
}

/** SESSION_NOT_FOUND (NOT_FOUND, 404). */
export class SessionNotFoundError extends SessionManagerClientError {}
/** INVALID_INSTANCE_ID (INVALID_ARGUMENT, 400). */
export class InvalidInstanceIdError extends SessionManagerClientError {}
/** INVALID_ARGUMENT (INVALID_ARGUMENT, 400); `field` names the field. */
export class InvalidArgumentError extends SessionManagerClientError {}
/** SESSION_ALREADY_CONNECTED (FAILED_PRECONDITION, 409). */
export class SessionAlreadyConnectedError extends SessionManagerClientError {}
/** SESSION_NOT_CONNECTED (FAILED_PRECONDITION, 409); `status` is the current status. */
export class SessionNotConnectedError extends SessionManagerClientError {}
/** QR_NOT_AVAILABLE (FAILED_PRECONDITION, 409), e.g. while `connecting`. */
export class QRNotAvailableError extends SessionManagerClientError {}
/** QR_GENERATION_FAILED (INTERNAL, 500). */
export class QRGenerationFailedError extends SessionManagerClientError {}
/** SESSION_MANAGER_ERROR (INTERNAL, 500). */
export class SessionManagerError extends SessionManagerClientError {}
/** WHATSAPP_ERROR (UNAVAILABLE, 502): WhatsApp or the engine refused or failed. */
export class WhatsAppError extends SessionManagerClientError {}
/** SESSION_ALREADY_EXISTS (ALREADY_EXISTS, 409). */
export class SessionAlreadyExistsError extends SessionManagerClientError {}
/** INVALID_TRANSITION (FAILED_PRECONDITION, 409); only the engine's reports get it. */
export class InvalidTransitionError extends SessionManagerClientError {}
/** UNAUTHENTICATED (401): no valid bearer token. */
export class UnauthenticatedError extends SessionManagerClientError {}
/** PERMISSION_DENIED (403): the token is not for this service. */
export class PermissionDeniedError extends SessionManagerClientError {}
/** LIMIT_EXCEEDED (RESOURCE_EXHAUSTED, 429); `limit` names it, `retryAfterMs` says when. */
export class LimitExceededError extends SessionManagerClientError {
  get limit(): string | undefined {
    return this.metadata["limit"];
  }
}
/**
 * MESSAGE_OUTCOME_UNKNOWN (UNKNOWN, 500): WhatsApp may or may not have the
 * message. It is never sent again by itself; `messageId` names it. Do not send
 * it again without its idempotency key.
 */
export class MessageOutcomeUnknownError extends SessionManagerClientError {
  get messageId(): string | undefined {
    return this.metadata["message_id"];
  }
}
/**
 * STORAGE_UNAVAILABLE (UNAVAILABLE, 503): the Session Manager's database could
 * not store the change, so it was not made; `storageCause` says why, for the
 * operator (`disk_full`, `locked`, `corrupt`, `read_only`, `io_error`, `unreachable`).
 */
export class StorageUnavailableError extends SessionManagerClientError {
  get storageCause(): string | undefined {
    return this.metadata["cause"];
  }
}
/**
 * SESSION_MOVING (UNAVAILABLE, 503): with several nodes, the session is changing
 * owner. Nothing was changed; retry after `retryAfter` seconds.
 */
export class SessionMovingError extends SessionManagerClientError {}
/**
 * CURSOR_EXPIRED (OUT_OF_RANGE, 410): the events after the stream's cursor are
 * no longer kept (retention). Start again without a cursor, from the current state.
 */
export class CursorExpiredError extends SessionManagerClientError {
  /** The last sequence number the log no longer keeps. */
  get trimmedThrough(): bigint | undefined {
    const value = this.metadata["trimmed_through"];
    return value === undefined ? undefined : BigInt(value);
  }
}
/** MESSAGE_NOT_FOUND (NOT_FOUND, 404): the session sent no message with that id. */
export class MessageNotFoundError extends SessionManagerClientError {
  get messageId(): string | undefined {
    return this.metadata["message_id"];
  }
}
/** The call's deadline passed (DEADLINE_EXCEEDED); no ErrorInfo. */
export class SessionManagerTimeoutError extends SessionManagerClientError {}
/** The Session Manager could not be reached (UNAVAILABLE without ErrorInfo). */
export class SessionManagerUnavailableError extends SessionManagerClientError {}

type ErrorClass = new (message: string, fields: ErrorFields) => SessionManagerClientError;

/** The one mapping from `ErrorInfo.reason` to error class. */
export const REASONS: Readonly<Record<string, ErrorClass>> = Object.freeze({
  SESSION_NOT_FOUND: SessionNotFoundError,
  INVALID_INSTANCE_ID: InvalidInstanceIdError,
  INVALID_ARGUMENT: InvalidArgumentError,
  SESSION_ALREADY_CONNECTED: SessionAlreadyConnectedError,
  SESSION_NOT_CONNECTED: SessionNotConnectedError,
  QR_NOT_AVAILABLE: QRNotAvailableError,
  QR_GENERATION_FAILED: QRGenerationFailedError,
  SESSION_MANAGER_ERROR: SessionManagerError,
  WHATSAPP_ERROR: WhatsAppError,
  SESSION_ALREADY_EXISTS: SessionAlreadyExistsError,
  INVALID_TRANSITION: InvalidTransitionError,
  UNAUTHENTICATED: UnauthenticatedError,
  PERMISSION_DENIED: PermissionDeniedError,
  LIMIT_EXCEEDED: LimitExceededError,
  MESSAGE_OUTCOME_UNKNOWN: MessageOutcomeUnknownError,
  STORAGE_UNAVAILABLE: StorageUnavailableError,
  SESSION_MOVING: SessionMovingError,
  CURSOR_EXPIRED: CursorExpiredError,
  MESSAGE_NOT_FOUND: MessageNotFoundError,
});

/** Failures that carry no ErrorInfo, by gRPC code. */
const TRANSPORT: Partial<Record<Code, ErrorClass>> = {
  [Code.DeadlineExceeded]: SessionManagerTimeoutError,
  [Code.Unavailable]: SessionManagerUnavailableError,
};

function durationMs(seconds: bigint, nanos: number): number {
  return Number(seconds) * 1000 + nanos / 1e6;
}

/**
 * The error class instance for whatever a call threw.
 *
 * `signal` is the call's own: a call cancelled although it was not aborted
 * lost its connection (a killed server resets its HTTP/2 streams with
 * CANCEL), and so did one aborted by a reset socket (ECONNRESET): both are
 * UNAVAILABLE as far as the caller is concerned.
 */
export function fromError(thrown: unknown, signal?: AbortSignal): SessionManagerClientError {
  if (thrown instanceof SessionManagerClientError) {
    return thrown;
  }
  const error = ConnectError.from(thrown);
  const [info] = error.findDetails(ErrorInfoSchema);
  if (info !== undefined) {
    const [retry] = error.findDetails(RetryInfoSchema);
    const delay = retry?.retryDelay;
    const ErrorType = REASONS[info.reason] ?? SessionManagerClientError;
    return new ErrorType(error.rawMessage, {
      reason: info.reason,
      code: error.code,
      metadata: info.metadata,
      retryAfterMs: delay === undefined ? undefined : durationMs(delay.seconds, delay.nanos),
      cause: error,
    });
  }
  // A reset connection surfaces as Aborted, a killed server's stream as Canceled;
  // the service itself never answers either, so both mean the connection was lost.
  const lost = error.code === Code.Aborted || (error.code === Code.Canceled && !signal?.aborted);
  if (lost) {
    const message = `the connection to the Session Manager was lost (${error.rawMessage})`;
    return new SessionManagerUnavailableError(message, { code: Code.Unavailable, cause: error });
  }
  const ErrorType = TRANSPORT[error.code] ?? SessionManagerClientError;
  return new ErrorType(error.rawMessage || codeName(error.code), { code: error.code, cause: error });
}
