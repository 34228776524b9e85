/**
 * `SessionManagerClient`: the public SessionService for Central Hub, over gRPC.
 *
 * Every call has a deadline (`timeoutMs`, default 10 s, overridable per call)
 * and carries the bearer token; every failure is one error class of
 * `errors.ts`. Only what the contract allows is retried, on UNAVAILABLE from
 * the transport: the idempotent reads (`getSession`, `listSessions`, opening
 * `watchSession`) and a `sendMessage` that carries its idempotency key (the
 * server answers a repeated key with the first result and sends nothing
 * again). A send without a key is never retried.
 */

import { setTimeout as sleep } from "node:timers/promises";

import { type CallOptions as ConnectCallOptions, type Client, createClient } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import { statusNumber, type SessionStatus } from "./enums.js";
import { fromError, SessionManagerUnavailableError } from "./errors.js";
import type { WhatsAppSession } from "./gen/sessionmanager/v1/session_pb.js";
import {
  EventType,
  type Message,
  type PairPhoneResponse,
  type SendResponse,
  SessionService,
  type WatchSessionsResponse,
} from "./gen/sessionmanager/v1/session_service_pb.js";
import { Fault, SimulatorService } from "./gen/sessionmanager/v1/simulator_service_pb.js";
import {
  type Backoff,
  backoffDelay,
  Resubscription,
  StreamCursor,
  WATCH_BACKOFF,
  WatchCursor,
} from "./watch.js";

export const DEFAULT_ADDRESS = "127.0.0.1:50051";
export const DEFAULT_TIMEOUT_MS = 10_000;

/** How idempotent calls are retried on UNAVAILABLE. */
export const READ_RETRY: Backoff = Object.freeze({
  initialMs: 200,
  maximumMs: 2_000,
  multiplier: 2,
  maxAttempts: 3,
});

/** TLS for the connection: PEM root CAs and, for mutual TLS, a client pair. */
export interface TLSOptions {
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
}

export interface ClientOptions {
  /** `host:port` of the server. */
  address?: string;
  /** Sent as `authorization: Bearer <token>` on every call. */
  token?: string;
  /** The token of the simulated phone's service (an internal one); default `token`. */
  simulatorToken?: string;
  /** TLS; `true` uses the system's root CAs. */
  tls?: TLSOptions | boolean;
  /** The deadline of each call, unless the call names its own. */
  timeoutMs?: number;
  /** How idempotent calls are retried; `false` never retries. */
  retry?: Backoff | false;
  /** How `watchSession` subscribes again after UNAVAILABLE. */
  watchBackoff?: Backoff;
}

export interface CallOptions {
  /** This call's deadline. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface SendMessage {
  instanceId: string;
  /** A phone number in international format or a WhatsApp JID. */
  to: string;
  text: string;
  /** A repeated key returns the first result and sends nothing again; it makes retries safe. */
  idempotencyKey?: string;
}

export interface ListOptions extends CallOptions {
  pageSize?: number;
  pageToken?: string;
  /** Only sessions in this status. */
  status?: SessionStatus;
}

export interface Page {
  sessions: WhatsAppSession[];
  /** The token of the next page; `""` at the end. */
  nextPageToken: string;
}

export interface WatchOptions {
  /** Aborting it ends the watch. */
  signal?: AbortSignal;
  backoff?: Backoff;
}

/** The event types of the log, by their text form. */
export type EventTypeText = "session.updated" | "session.deleted" | "message.updated";

const EVENT_TYPES: Readonly<Record<EventTypeText, EventType>> = Object.freeze({
  "session.updated": EventType.SESSION_UPDATED,
  "session.deleted": EventType.SESSION_DELETED,
  "message.updated": EventType.MESSAGE_UPDATED,
});

export interface WatchSessionsOptions extends WatchOptions {
  /** Resume: every event after this sequence number, instead of the current state first. */
  afterSequence?: bigint;
  /** Keeps where the stream stands; pass your own to read `cursor.sequence` and store it. */
  cursor?: StreamCursor;
  /** Only sessions in this status: the events that bring one into it, keep it or take it out. */
  status?: SessionStatus;
  /** Only sessions (and their messages) whose instance id starts with this. */
  instanceIdPrefix?: string;
  /** Only these event types. */
  types?: EventTypeText[];
}

function baseUrl(address: string, tls: boolean): string {
  return `${tls ? "https" : "http"}://${address}`;
}

function bearer(token: string | undefined): Record<string, string> {
  return token ? { authorization: `Bearer ${token}` } : {};
}

function present<T>(value: T | undefined, what: string): T {
  if (value === undefined) {
    throw new Error(`the server's answer carries no ${what}`);
  }
  return value;
}

/** The calls of one service with the deadline, token and error mapping of the client. */
class Calls {
  constructor(
    private readonly timeoutMs: number,
    private readonly headers: Record<string, string>,
    private readonly retry: Backoff | false,
  ) {}

  options(call: CallOptions = {}): ConnectCallOptions {
    return { timeoutMs: call.timeoutMs ?? this.timeoutMs, signal: call.signal, headers: this.headers };
  }

  /** Once; a failure becomes its error class. */
  async once<T>(call: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    try {
      return await call();
    } catch (thrown) {
      throw fromError(thrown, signal);
    }
  }

  /** For calls the contract lets us repeat: again after UNAVAILABLE, with bounded backoff. */
  async idempotent<T>(call: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.once(call, signal);
      } catch (error) {
        const retry = this.retry;
        const again =
          error instanceof SessionManagerUnavailableError &&
          retry !== false &&
          (retry.maxAttempts === null || attempt <= retry.maxAttempts);
        if (!again) {
          throw error;
        }
        await sleep(backoffDelay(retry, attempt), undefined, { signal });
      }
    }
  }
}

/** Commands to the simulated engine's phone (servers run with `--engine simulated`). */
export class Simulator {
  constructor(
    private readonly rpc: Client<typeof SimulatorService>,
    private readonly calls: Calls,
  ) {}

  /** The phone scans the current code: connecting, then connected unless `holdHandshake`. */
  async scanQR(
    instanceId: string,
    phoneNumber = "",
    options: CallOptions & { holdHandshake?: boolean } = {},
  ): Promise<WhatsAppSession> {
    const request = { instanceId, phoneNumber, holdHandshake: options.holdHandshake ?? false };
    const call = () => this.rpc.scanQR(request, this.calls.options(options));
    return present((await this.calls.once(call, options.signal)).session, "session");
  }

  async completeHandshake(instanceId: string, options?: CallOptions): Promise<WhatsAppSession> {
    const call = () => this.rpc.completeHandshake({ instanceId }, this.calls.options(options));
    return present((await this.calls.once(call, options?.signal)).session, "session");
  }

  async dropNetwork(
    instanceId: string,
    options: CallOptions & { holdReconnect?: boolean } = {},
  ): Promise<WhatsAppSession> {
    const request = { instanceId, holdReconnect: options.holdReconnect ?? false };
    const call = () => this.rpc.dropNetwork(request, this.calls.options(options));
    return present((await this.calls.once(call, options?.signal)).session, "session");
  }

  async unlinkDevice(instanceId: string, options?: CallOptions): Promise<WhatsAppSession> {
    const call = () => this.rpc.unlinkDevice({ instanceId }, this.calls.options(options));
    return present((await this.calls.once(call, options?.signal)).session, "session");
  }

  async failSession(instanceId: string, code = "", message = "", options?: CallOptions): Promise<WhatsAppSession> {
    const call = () => this.rpc.failSession({ instanceId, code, message }, this.calls.options(options));
    return present((await this.calls.once(call, options?.signal)).session, "session");
  }

  /** WhatsApp reports the sent message delivered to the recipient's phone. */
  async deliverMessage(instanceId: string, messageId: string, options?: CallOptions): Promise<Message> {
    const call = () => this.rpc.deliverMessage({ instanceId, messageId }, this.calls.options(options));
    return present((await this.calls.once(call, options?.signal)).message, "message");
  }

  /** WhatsApp reports the sent message read by the recipient. */
  async readMessage(instanceId: string, messageId: string, options?: CallOptions): Promise<Message> {
    const call = () => this.rpc.readMessage({ instanceId, messageId }, this.calls.options(options));
    return present((await this.calls.once(call, options?.signal)).message, "message");
  }

  /** WhatsApp reports that it could not deliver the sent message after all. */
  async failMessage(
    instanceId: string,
    messageId: string,
    code = "",
    message = "",
    options?: CallOptions,
  ): Promise<Message> {
    const request = { instanceId, messageId, code, message };
    const call = () => this.rpc.failMessage(request, this.calls.options(options));
    return present((await this.calls.once(call, options?.signal)).message, "message");
  }

  /** Makes the session's next `"pairing"` or `"send"` fail. */
  async injectFault(instanceId: string, fault: "pairing" | "send", options?: CallOptions): Promise<void> {
    const request = { instanceId, fault: fault === "pairing" ? Fault.PAIRING : Fault.SEND };
    await this.calls.once(() => this.rpc.injectFault(request, this.calls.options(options)), options?.signal);
  }
}

export class SessionManagerClient {
  readonly address: string;
  /** The simulated engine's phone, for tests and demos. */
  readonly simulator: Simulator;
  private readonly connection: Http2SessionManager;
  private readonly rpc: Client<typeof SessionService>;
  private readonly calls: Calls;
  private readonly watchBackoff: Backoff;

  constructor(options: ClientOptions = {}) {
    this.address = options.address ?? DEFAULT_ADDRESS;
    const tls = options.tls ?? false;
    const nodeOptions = typeof tls === "object" ? { ca: tls.ca, cert: tls.cert, key: tls.key } : {};
    this.connection = new Http2SessionManager(baseUrl(this.address, tls !== false), {}, nodeOptions);
    const transport = createGrpcTransport({
      baseUrl: baseUrl(this.address, tls !== false),
      sessionManager: this.connection,
    });
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const retry = options.retry ?? READ_RETRY;
    this.rpc = createClient(SessionService, transport);
    this.calls = new Calls(timeoutMs, bearer(options.token), retry);
    const simulatorCalls = new Calls(timeoutMs, bearer(options.simulatorToken ?? options.token), false);
    this.simulator = new Simulator(createClient(SimulatorService, transport), simulatorCalls);
    this.watchBackoff = options.watchBackoff ?? WATCH_BACKOFF;
  }

  /** Closes the connection; calls under way fail. */
  close(): void {
    this.connection.abort();
  }

  /** The session as the Session Manager has it: never cached, never inferred. */
  async getSession(instanceId: string, options?: CallOptions): Promise<WhatsAppSession> {
    const call = () => this.rpc.getSession({ instanceId }, this.calls.options(options));
    return present((await this.calls.idempotent(call, options?.signal)).session, "session");
  }

  /** The session with its valid QR code (`qrString`, `qrExpiresAt`): the same code while it is valid. */
  async requestQR(instanceId: string, options?: CallOptions): Promise<WhatsAppSession> {
    const call = () => this.rpc.requestQR({ instanceId }, this.calls.options(options));
    return present((await this.calls.once(call, options?.signal)).session, "session");
  }

  /** WhatsApp's 8-character linking code to type on `phoneNumber`'s phone, instead of a QR. */
  async pairPhone(instanceId: string, phoneNumber: string, options?: CallOptions): Promise<PairPhoneResponse> {
    const call = () => this.rpc.pairPhone({ instanceId, phoneNumber }, this.calls.options(options));
    return this.calls.once(call, options?.signal);
  }

  /** Sends a text from a connected session; with an idempotency key it is safe to repeat. */
  async sendMessage(message: SendMessage, options?: CallOptions): Promise<SendResponse> {
    const call = () => this.rpc.send(message, this.calls.options(options));
    if (message.idempotencyKey === undefined) {
      return this.calls.once(call, options?.signal);
    }
    return this.calls.idempotent(call, options?.signal);
  }

  /** A message the session sent, and where it stands (delivered, read, ...). */
  async getMessage(instanceId: string, messageId: string, options?: CallOptions): Promise<Message> {
    const call = () => this.rpc.getMessage({ instanceId, messageId }, this.calls.options(options));
    return present((await this.calls.idempotent(call, options?.signal)).message, "message");
  }

  /** Unlinks the device: disconnected, reason LOGOUT. */
  async disconnect(instanceId: string, options?: CallOptions): Promise<WhatsAppSession> {
    const call = () => this.rpc.disconnect({ instanceId }, this.calls.options(options));
    return present((await this.calls.once(call, options?.signal)).session, "session");
  }

  /** A new session: init / none. */
  async createSession(instanceId: string, options?: CallOptions): Promise<WhatsAppSession> {
    const call = () => this.rpc.createSession({ instanceId }, this.calls.options(options));
    return present((await this.calls.once(call, options?.signal)).session, "session");
  }

  /** Deletes the session and its messages. */
  async deleteSession(instanceId: string, options?: CallOptions): Promise<void> {
    const call = () => this.rpc.deleteSession({ instanceId }, this.calls.options(options));
    await this.calls.once(call, options?.signal);
  }

  /** One page of sessions. */
  async listSessions(options: ListOptions = {}): Promise<Page> {
    const request = {
      pageSize: options.pageSize ?? 0,
      pageToken: options.pageToken ?? "",
      status: options.status === undefined ? undefined : statusNumber(options.status),
    };
    const call = () => this.rpc.listSessions(request, this.calls.options(options));
    const response = await this.calls.idempotent(call, options.signal);
    return { sessions: response.sessions, nextPageToken: response.nextPageToken };
  }

  /** Every session, page after page. */
  async *iterSessions(options: Omit<ListOptions, "pageToken"> = {}): AsyncGenerator<WhatsAppSession> {
    let pageToken = "";
    do {
      const page = await this.listSessions({ ...options, pageToken });
      yield* page.sessions;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
  }

  /**
   * The session's current state, then each committed change, as they happen.
   *
   * After UNAVAILABLE (a server restart, a lost connection) it subscribes
   * again by itself, waiting `backoff` between attempts. It follows `(id,
   * revision)`: it never repeats a state nor goes back in revision, and a
   * session deleted and created again meanwhile (another `id`) is followed
   * from its first state on. Any contract error ends it: once the session is
   * deleted, `SessionNotFoundError`. Stop it with `break` or the `signal`.
   */
  async *watchSession(instanceId: string, options: WatchOptions = {}): AsyncGenerator<WhatsAppSession> {
    const cursor = new WatchCursor();
    const resubscription = new Resubscription(options.backoff ?? this.watchBackoff);
    const streamOptions = { ...this.calls.options({ signal: options.signal }), timeoutMs: undefined };
    for (;;) {
      let delay: number | undefined;
      try {
        for await (const response of this.rpc.watchSession({ instanceId }, streamOptions)) {
          resubscription.received();
          const session = present(response.session, "session");
          if (cursor.admit(session)) {
            yield session;
          }
        }
        return;
      } catch (thrown) {
        const error = fromError(thrown, options.signal);
        delay = options.signal?.aborted ? undefined : resubscription.delayAfter(error);
        if (delay === undefined) {
          throw error;
        }
      }
      await sleep(delay, undefined, { signal: options.signal });
    }
  }

  /**
   * Every session and message, from the event log, as they change.
   *
   * Without `afterSequence`: the current state first (`item.case === "session"`,
   * one per session, then `"checkpoint"`), then each event (`"event"`:
   * `session.updated`, `session.deleted`, `message.updated`, with its resource).
   * With it: every event after that sequence number. After UNAVAILABLE (a
   * restart, a lost connection) it subscribes again by itself after the last
   * event or checkpoint received (kept in `cursor`), so nothing is missed and
   * nothing comes twice. `CursorExpiredError` ends it when the log no longer
   * keeps what follows the cursor: start again without one. Stop it with
   * `break` or the `signal`.
   */
  async *watchSessions(options: WatchSessionsOptions = {}): AsyncGenerator<WatchSessionsResponse> {
    const cursor = options.cursor ?? new StreamCursor(options.afterSequence);
    const resubscription = new Resubscription(options.backoff ?? this.watchBackoff);
    const streamOptions = { ...this.calls.options({ signal: options.signal }), timeoutMs: undefined };
    for (;;) {
      const request = {
        afterSequence: cursor.sequence,
        status: options.status === undefined ? undefined : statusNumber(options.status),
        instanceIdPrefix: options.instanceIdPrefix ?? "",
        types: (options.types ?? []).map((type) => EVENT_TYPES[type]),
      };
      let delay: number | undefined;
      try {
        for await (const item of this.rpc.watchSessions(request, streamOptions)) {
          resubscription.received();
          if (cursor.admit(item)) {
            yield item;
          }
        }
        return;
      } catch (thrown) {
        const error = fromError(thrown, options.signal);
        delay = options.signal?.aborted ? undefined : resubscription.delayAfter(error);
        if (delay === undefined) {
          throw error;
        }
      }
      await sleep(delay, undefined, { signal: options.signal });
    }
  }
}
