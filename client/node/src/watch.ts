/**
 * The watch's policy, apart from its I/O: which states reach the caller and
 * when to subscribe again.
 */

import type { WhatsAppSession } from "./gen/sessionmanager/v1/session_pb.js";
import type { WatchSessionsResponse } from "./gen/sessionmanager/v1/session_service_pb.js";
import { SessionManagerClientError, SessionManagerUnavailableError } from "./errors.js";

/** Exponential, bounded waits between attempts. */
export interface Backoff {
  initialMs: number;
  maximumMs: number;
  multiplier: number;
  /** Failed attempts in a row after which the last error is thrown; `null` tries for ever. */
  maxAttempts: number | null;
}

/** How a watch subscribes again after UNAVAILABLE (a restart, a lost connection). */
export const WATCH_BACKOFF: Backoff = Object.freeze({
  initialMs: 200,
  maximumMs: 5_000,
  multiplier: 2,
  maxAttempts: 20,
});

/** The wait before attempt number `attempt` (1, 2, ...). */
export function backoffDelay(backoff: Backoff, attempt: number): number {
  return Math.min(backoff.maximumMs, backoff.initialMs * backoff.multiplier ** Math.max(0, attempt - 1));
}

/**
 * Which states of a watch reach the caller: it follows `(id, revision)`.
 *
 * A state of the incarnation already followed passes only with a higher
 * revision (a re-subscription starts with the current state, already seen).
 * A state with another `id` is a new incarnation (the session was deleted and
 * created again, e.g. while the watch was re-subscribing): it passes whatever
 * its revision, and from then on only that incarnation is followed.
 */
export class WatchCursor {
  private id: bigint | undefined;
  private revision = 0n;

  admit(session: WhatsAppSession): boolean {
    if (session.id === this.id && session.revision <= this.revision) {
      return false;
    }
    this.id = session.id;
    this.revision = session.revision;
    return true;
  }
}

/** When a watch subscribes again: after UNAVAILABLE only, with bounded backoff. */
export class Resubscription {
  private failures = 0;

  constructor(private readonly backoff: Backoff) {}

  /** A state arrived: the connection works again. */
  received(): void {
    this.failures = 0;
  }

  /**
   * Milliseconds to wait before subscribing again, or `undefined`: the watch
   * ends with `error`. Any contract error ends it (`SessionNotFoundError` once
   * the session is deleted); so do too many failed attempts in a row.
   */
  delayAfter(error: SessionManagerClientError): number | undefined {
    if (!(error instanceof SessionManagerUnavailableError)) {
      return undefined;
    }
    this.failures += 1;
    const limit = this.backoff.maxAttempts;
    if (limit !== null && this.failures > limit) {
      return undefined;
    }
    return backoffDelay(this.backoff, this.failures);
  }
}

/**
 * Where a list-wide stream stands: the sequence number of the last event or
 * checkpoint received (`undefined` until the first one: resuming then starts
 * over from the current state). Keep `sequence` to resume in another process.
 */
export class StreamCursor {
  constructor(public sequence: bigint | undefined = undefined) {}

  /** Whether `item` reaches the caller: it never repeats an event nor goes back. */
  admit(item: WatchSessionsResponse): boolean {
    const kind = item.item.case;
    if (kind === "session") {
      return true;
    }
    const sequence = kind === "event" ? item.item.value.sequence : kind === "checkpoint" ? item.item.value.sequence : undefined;
    if (sequence === undefined || (this.sequence !== undefined && sequence <= this.sequence)) {
      return false;
    }
    this.sequence = sequence;
    return true;
  }
}
