// The Session Manager console: the sessions list and one live session.
//
// Everything it shows comes from the service's HTTP API under /api/session-manager.
// One Server-Sent Events stream of the event log (/events) keeps the whole page live:
// it starts with every session as it stands, then each change; the list and the open
// session are drawn from it and never polled. After a drop or a restart the browser
// resumes it after the last event it received (Last-Event-ID).

const API = "/api/session-manager";
const INSTANCE_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const PAGE_SIZE = 50;
const RECONNECT_DELAYS_MS = [500, 1000, 2000, 4000, 5000];

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------
// The HTTP API.

class ApiError extends Error {
  constructor(status, code, message, details = {}, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfter = retryAfter;
  }
}

/** Calls the API; resolves to the JSON body (null for 204), rejects with an ApiError. */
async function api(method, path, body, extraHeaders = {}) {
  const headers = { Accept: "application/json", ...extraHeaders };
  // With the auth cookie, every request that changes something must carry this header:
  // a cross-site form or image cannot set it.
  if (method !== "GET") headers["X-Session-Manager-CSRF"] = "1";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(API + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "UNREACHABLE", "The service cannot be reached. Is it running?");
  }
  noteServerTime(Date.parse(response.headers.get("Date") ?? ""));
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (response.ok) {
    // A change this request made was committed a moment ago.
    const changed = method === "GET" ? null : (data?.session ?? data);
    if (changed?.updated_at) noteServerTime(Date.parse(changed.updated_at));
    return data;
  }
  const error = new ApiError(
    response.status,
    data?.code ?? `HTTP_${response.status}`,
    data?.message ?? (response.statusText || "The service refused the request."),
    data?.details ?? {},
    response.headers.get("Retry-After"),
  );
  if (response.status === 401) showGate(gateReasonFor(error));
  throw error;
}

/** A sentence for a user, from any failure of an API call. */
function describe(error) {
  if (!(error instanceof ApiError)) return `Something went wrong: ${error.message}`;
  let text = sentence(error.message);
  if (error.status === 429 && error.retryAfter) text += ` Try again in ${error.retryAfter} s.`;
  if (error.status === 503) text += " The service is shutting down or busy; try again shortly.";
  return error.status === 0 ? text : `${text} (${error.code})`;
}

function sentence(text) {
  const trimmed = String(text).trim();
  if (!trimmed) return "The service refused the request.";
  const capital = trimmed[0].toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

const sessionPath = (instanceId) => `/sessions/${encodeURIComponent(instanceId)}`;

// ---------------------------------------------------------------------------
// Authentication: a token is asked for only when the service answers 401.

let tokenTried = false;

function gateReasonFor(error) {
  return tokenTried
    ? `The token was refused: ${sentence(error.message)}`
    : "This service needs an access token.";
}

function showGate(reason) {
  clearView();
  $("main").hidden = true;
  $("connection").hidden = true;
  $("logout").hidden = true;
  $("gate").hidden = false;
  $("gate-reason").textContent = reason;
  $("token").value = "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) {
    $("gate-reason").textContent = "Type the access token first.";
    $("token").focus();
    return;
  }
  tokenTried = true;
  try {
    await api("POST", "/auth/cookie", undefined, { Authorization: `Bearer ${token}` });
  } catch (error) {
    if (error.status !== 401) showGate(describe(error));
    return;
  }
  localStorage.setItem("sm.signedIn", "1");
  $("gate").hidden = true;
  await startConsole();
}

async function signOut() {
  try {
    await api("DELETE", "/auth/cookie");
  } catch {
    // Signing out of an open service, or one already unreachable, leaves nothing to undo.
  }
  localStorage.removeItem("sm.signedIn");
  tokenTried = false;
  location.hash = "";
  await startConsole();
}

// ---------------------------------------------------------------------------
// Time.

/** How far the service's clock is ahead of this computer's; 0 when within 2.5 s. */
let serverOffsetMs = 0;
const clockSamples = [];

/**
 * Notes a time the service's clock has certainly reached (a Date header, the commit time
 * of a state just received): countdowns follow the service's clock, since a computer's
 * clock can be minutes off. Each sample can only be late, so the latest of the last few
 * is the best estimate.
 */
function noteServerTime(serverMs) {
  if (Number.isNaN(serverMs)) return;
  clockSamples.push(serverMs - Date.now());
  if (clockSamples.length > 10) clockSamples.shift();
  const offset = Math.max(...clockSamples);
  // A Date header alone can be two seconds late: smaller differences are not corrected.
  serverOffsetMs = Math.abs(offset) > 2500 ? offset : 0;
}

const serverNow = () => Date.now() + serverOffsetMs;

const absoluteTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const relativeTime = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

function ago(iso) {
  // Every time shown is past: one a moment "in the future" is clock noise.
  const seconds = Math.min(0, Math.round((Date.parse(iso) - serverNow()) / 1000));
  const units = [["day", 86400], ["hour", 3600], ["minute", 60]];
  for (const [unit, size] of units) {
    if (Math.abs(seconds) >= size) return relativeTime.format(Math.round(seconds / size), unit);
  }
  return relativeTime.format(seconds, "second");
}

function setTime(element, iso) {
  if (!iso) {
    element.removeAttribute("datetime");
    element.textContent = "—";
    element.title = "";
    return;
  }
  element.dateTime = iso;
  element.textContent = `${absoluteTime.format(new Date(iso))} (${ago(iso)})`;
  element.title = iso;
}

function clockText(milliseconds) {
  const total = Math.max(0, Math.ceil(milliseconds / 1000));
  return `${Math.floor(total / 60)}:${String(total % 60).padStart(2, "0")}`;
}

// ---------------------------------------------------------------------------
// The sessions list: every session, live from the event log; 50 per page, filtered by status.

const list = { status: "", index: 0, sessions: new Map(), drawn: false };

function badge(status) {
  const element = document.createElement("span");
  element.className = `badge status-${status}`;
  element.textContent = status;
  return element;
}

function sessionRow(session) {
  const row = document.createElement("tr");
  row.dataset.instance = session.instance_id;
  const name = document.createElement("th");
  name.scope = "row";
  const link = document.createElement("a");
  link.href = `#/sessions/${encodeURIComponent(session.instance_id)}`;
  link.textContent = session.instance_id;
  if (session.instance_id === current?.instanceId) link.setAttribute("aria-current", "page");
  name.append(link);
  const status = document.createElement("td");
  status.append(badge(session.status));
  const phone = document.createElement("td");
  phone.textContent = session.phone_number ?? "—";
  const changed = document.createElement("td");
  const time = document.createElement("time");
  time.dateTime = session.updated_at;
  time.title = absoluteTime.format(new Date(session.updated_at));
  time.textContent = ago(session.updated_at);
  changed.append(time);
  row.append(name, status, phone, changed);
  return row;
}

/** The sessions the filter shows, ordered by instance_id (its characters are ASCII). */
function shownSessions() {
  const shown = [...list.sessions.values()].filter((s) => !list.status || s.status === list.status);
  return shown.sort((a, b) => (a.instance_id < b.instance_id ? -1 : a.instance_id > b.instance_id ? 1 : 0));
}

/** Draws the current page from the sessions as the stream last told them. */
function renderList() {
  list.drawn = false;
  const shown = shownSessions();
  const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
  list.index = Math.min(list.index, pages - 1);
  const page = shown.slice(list.index * PAGE_SIZE, (list.index + 1) * PAGE_SIZE);
  $("sessions-body").replaceChildren(...page.map(sessionRow));
  renderPager(page.length, list.index < pages - 1);
}

/** Many changes at once are drawn once. */
function scheduleRender() {
  if (list.drawn) return;
  list.drawn = true;
  requestAnimationFrame(renderList);
}

function renderPager(shown, more) {
  const filter = list.status ? ` with status ${list.status}` : "";
  $("list-caption").textContent =
    shown === 0 && list.index === 0
      ? `No sessions${filter} yet.`
      : `Page ${list.index + 1}: ${shown} session${shown === 1 ? "" : "s"}${filter}.`;
  $("page-number").textContent = `Page ${list.index + 1}`;
  $("first-page").disabled = list.index === 0;
  $("previous-page").disabled = list.index === 0;
  $("next-page").disabled = !more;
}

function showListError(text) {
  $("list-error").hidden = !text;
  $("list-error").textContent = text;
}

function goToPage(index) {
  list.index = Math.max(0, index);
  renderList();
}

function filterList() {
  list.status = $("status-filter").value;
  list.index = 0;
  renderList();
}

function rowOf(instanceId) {
  return document.querySelector(`#sessions-body tr[data-instance="${CSS.escape(instanceId)}"]`);
}

async function createSession(event) {
  event.preventDefault();
  const input = $("new-instance");
  const instanceId = input.value;
  const problem = !instanceId
    ? "Type an instance id, e.g. sender_51."
    : !INSTANCE_ID.test(instanceId)
      ? "Invalid instance id: use 1–64 letters, digits, _ . or -, starting with a letter or digit."
      : "";
  if (!problem) {
    try {
      await api("POST", "/sessions", { instance_id: instanceId });
    } catch (error) {
      if (error.status !== 401) setFieldError(input, $("new-instance-error"), describe(error));
      return;
    }
    setFieldError(input, $("new-instance-error"), "");
    input.value = "";
    location.hash = `#/sessions/${encodeURIComponent(instanceId)}`;
    return;
  }
  setFieldError(input, $("new-instance-error"), problem);
  input.focus();
}

function setFieldError(input, holder, text) {
  holder.textContent = text;
  if (text) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

// ---------------------------------------------------------------------------
// The event log's stream: one connection for the whole page.

const LIST_EVENTS = `${API}/events?types=session.updated,session.deleted`;

/** The open stream: the current state it is receiving, and where it stands in the log. */
let feed = null;

/** Opens the stream: after `after` (a sequence number), or from the current state. */
function openFeed(after = null) {
  closeFeed();
  const url = after === null ? LIST_EVENTS : `${LIST_EVENTS}&after=${after}`;
  const source = new EventSource(url);
  const view = {
    source,
    state: after === null ? new Map() : null,
    lastId: after,
    attempts: 0,
    live: false,
    wasLive: after !== null,
  };
  feed = view;
  source.addEventListener("open", () => {
    view.live = view.wasLive = true;
    view.attempts = 0;
    if (view.state !== null) view.state = new Map(); // a current state (again) follows
    showFeedState();
  });
  // The current state: every session as it stands, then a checkpoint.
  source.addEventListener("session", (event) => {
    view.state ??= new Map();
    const session = JSON.parse(event.data);
    view.state.set(session.instance_id, session);
  });
  source.addEventListener("checkpoint", (event) => {
    view.lastId = Number(event.lastEventId);
    if (view.state === null) return;
    list.sessions = view.state;
    view.state = null;
    $("main").hidden = false;
    renderList();
    if (current) {
      const session = list.sessions.get(current.instanceId);
      if (session) applySession(current, session);
    }
  });
  source.addEventListener("session.updated", (event) => {
    view.lastId = Number(event.lastEventId);
    const session = JSON.parse(event.data).session;
    // Every change on the stream was committed a moment ago.
    noteServerTime(Date.parse(session.updated_at));
    const previous = list.sessions.get(session.instance_id);
    if (previous && previous.id === session.id && previous.revision >= session.revision) return;
    list.sessions.set(session.instance_id, session);
    scheduleRender();
    if (current?.instanceId === session.instance_id) applySession(current, session);
  });
  source.addEventListener("session.deleted", (event) => {
    view.lastId = Number(event.lastEventId);
    const session = JSON.parse(event.data).session;
    if (list.sessions.get(session.instance_id)?.id !== session.id) return;
    list.sessions.delete(session.instance_id);
    scheduleRender();
    if (current?.instanceId === session.instance_id) showGone(current, `${session.instance_id} was deleted.`);
  });
  source.addEventListener("end", (event) => {
    if (feed !== view) return;
    const end = JSON.parse(event.data);
    view.live = false;
    if (end.reason === "expired") {
      openFeed(); // the log no longer keeps what followed: start again from the current state
      return;
    }
    showFeedState("The service is restarting: reconnecting…");
  });
  source.addEventListener("error", () => {
    if (feed !== view) return;
    view.live = false;
    showFeedState();
    // The browser retries a dropped stream by itself, after the last event it received;
    // a refused one is closed for good: ask why (a token, an expired cursor), then reopen.
    if (source.readyState === EventSource.CLOSED) reopenLater(view);
  });
}

function closeFeed() {
  feed?.source.close();
  clearTimeout(feed?.retryTimer);
  feed = null;
}

function reopenLater(view) {
  view.source.close();
  const delay = RECONNECT_DELAYS_MS[Math.min(view.attempts, RECONNECT_DELAYS_MS.length - 1)];
  view.attempts += 1;
  view.retryTimer = setTimeout(async () => {
    if (feed !== view) return;
    let after = view.state === null ? view.lastId : null;
    if (after !== null) {
      try {
        await api("HEAD", `/events?types=session.updated&after=${after}`);
      } catch (error) {
        if (error.status === 401 || feed !== view) return;
        if (error.status === 410) after = null; // expired: from the current state again
        else return reopenLater(view);
      }
    }
    const attempts = view.attempts;
    openFeed(after);
    feed.attempts = attempts;
  }, delay);
}

/** The page's connection, shown while a session is open. */
function showFeedState(text = "Connection lost: reconnecting…") {
  if (!current || current.closed) return;
  if (feed?.live) setConnection("live", "Live");
  else setConnection("reconnecting", feed?.wasLive ? text : "Connecting…");
}

// ---------------------------------------------------------------------------
// One session, live from the page's stream.

/** The open session: what is shown, and the linking code, if one was asked for. */
let current = null;

function openSession(instanceId) {
  closeSession();
  current = {
    instanceId,
    session: null,
    linkingCode: null,
    attempts: 0,
    retryTimer: null,
    countdownTimer: null,
    expiredShown: false,
  };
  for (const link of document.querySelectorAll("#sessions-body a")) {
    if (link.textContent === instanceId) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  $("main").classList.add("has-session");
  $("detail-title").textContent = instanceId;
  $("detail-empty").hidden = true;
  $("detail-body").hidden = true;
  showActionError("");
  $("detail-title").focus();
  follow(current);
}

function stopFollowing() {
  if (!current) return;
  clearTimeout(current.retryTimer);
  clearInterval(current.countdownTimer);
  current.closed = true;
}

/** Reads the session (which tells a missing one apart); its changes then come from the stream. */
async function follow(view) {
  let session;
  try {
    session = await api("GET", sessionPath(view.instanceId));
  } catch (error) {
    if (view.closed || error.status === 401) return;
    if (error.status === 404) {
      // Shown before, then gone: deleted meanwhile.
      return showGone(view, view.session ? `${view.instanceId} was deleted.` : describe(error));
    }
    setConnection("reconnecting", "Connection lost: reconnecting…");
    const delay = RECONNECT_DELAYS_MS[Math.min(view.attempts, RECONNECT_DELAYS_MS.length - 1)];
    view.attempts += 1;
    view.retryTimer = setTimeout(() => {
      if (!view.closed) follow(view);
    }, delay);
    return;
  }
  if (view.closed) return;
  remember(session);
  applySession(view, list.sessions.get(session.instance_id) ?? session);
  showFeedState();
}

function showGone(view, text) {
  if (view.closed) return;
  view.closed = true;
  clearInterval(view.countdownTimer);
  setConnection(null);
  $("detail-body").hidden = true;
  $("detail-empty").hidden = false;
  $("detail-empty").textContent = text;
}

/** Keeps a state an answer carried, unless the stream already told a newer one. */
function remember(session) {
  const known = list.sessions.get(session.instance_id);
  if (known && known.id === session.id && known.revision >= session.revision) return;
  list.sessions.set(session.instance_id, session);
  scheduleRender();
}

/** Shows a state of the session, unless an older one of the same incarnation. */
function applySession(view, session) {
  if (view.closed || session.instance_id !== view.instanceId) return;
  const previous = view.session;
  const sameIncarnation = previous && previous.id === session.id;
  if (sameIncarnation && session.revision <= previous.revision) return;
  view.session = session;
  if (session.status !== "qr_required") view.linkingCode = null;
  renderSession(view, previous);
  if (!previous || previous.status !== session.status || !sameIncarnation) {
    announce(`${session.instance_id} is ${session.status}.`);
  }
}

const PANELS = ["init", "qr", "linking", "connecting", "connected", "disconnected", "error"];

function renderSession(view, previous) {
  const session = view.session;
  $("detail-body").hidden = false;
  $("detail-empty").hidden = true;
  const status = $("detail-status");
  status.className = `badge status-${session.status}`;
  status.textContent = session.status;
  $("detail-qr-status").textContent = `QR: ${session.qr_status}`;
  const shown = new Set(panelsFor(session, view));
  for (const panel of PANELS) $(`panel-${panel}`).hidden = !shown.has(panel);

  renderQr(view, previous);
  $("linking-code").textContent = view.linkingCode ? groupCode(view.linkingCode) : "";
  $("connected-phone").textContent = session.phone_number ?? "—";
  setTime($("connected-since"), session.connected_at);
  $("disconnected-when").textContent = session.disconnected_at
    ? ` ${ago(session.disconnected_at)}`
    : "";
  $("disconnected-why").textContent = session.last_error_message ?? "the connection ended.";
  $("disconnected-code").textContent = session.last_error_code ?? "";
  $("error-code").textContent = session.last_error_code ?? "";
  $("error-message").textContent = session.last_error_message ?? "";
  setTime($("created-at"), session.created_at);
  setTime($("updated-at"), session.updated_at);
  $("revision").textContent = String(session.revision);
  renderActions(session);
}

function panelsFor(session, view) {
  switch (session.status) {
    case "init":
      return ["init"];
    case "qr_required":
      return [session.qr_string ? "qr" : null, view.linkingCode ? "linking" : null];
    default:
      return [session.status];
  }
}

function groupCode(code) {
  return code.length === 8 ? `${code.slice(0, 4)}-${code.slice(4)}` : code;
}

function renderActions(session) {
  const { status, qr_status: qrStatus } = session;
  const requestQr = $("request-qr");
  const canPair = ["init", "qr_required", "disconnected", "error"].includes(status);
  requestQr.hidden = !canPair || (status === "qr_required" && qrStatus === "generated");
  requestQr.textContent =
    status === "disconnected"
      ? "Reconnect with a QR code"
      : status === "qr_required"
        ? "New QR code"
        : "Show QR code";
  $("pair-form").hidden = !canPair;
  $("disconnect").hidden = status === "init" || isLoggedOut(session);
}

function isLoggedOut(session) {
  return session.status === "disconnected" && session.last_error_code === "LOGOUT";
}

function renderQr(view, previous) {
  const session = view.session;
  clearInterval(view.countdownTimer);
  if (!session.qr_string) return;
  const image = $("qr-image");
  if (image.getAttribute("src") !== session.qr_string) {
    image.src = session.qr_string;
    if (previous?.qr_string && previous.qr_string !== session.qr_string) {
      announce("A new QR code is shown.");
    }
  }
  view.expiredShown = false;
  const tick = () => showCountdown(view);
  tick();
  if (session.qr_status === "generated") view.countdownTimer = setInterval(tick, 250);
}

function showCountdown(view) {
  const session = view.session;
  const left = Date.parse(session.qr_expires_at) - serverNow();
  const expired = session.qr_status === "expired" || left <= 0;
  $("qr-figure").classList.toggle("expired", expired);
  $("qr-expired").hidden = !expired;
  $("qr-countdown").textContent = expired
    ? "This code expired: ask for a new one."
    : `Expires in ${clockText(left)}`;
  if (expired) {
    clearInterval(view.countdownTimer);
    $("request-qr").hidden = false;
    if (!view.expiredShown) announce("The QR code expired.");
    view.expiredShown = true;
  }
}

function announce(text) {
  $("announce").textContent = text;
}

function setConnection(state, text = "") {
  const element = $("connection");
  element.hidden = !state;
  element.className = `connection ${state ?? ""}`;
  element.textContent = text;
}

function showActionError(text) {
  $("action-error").hidden = !text;
  $("action-error").textContent = text;
}

// ---------------------------------------------------------------------------
// Actions on the open session.

/** Runs one action: its button is busy meanwhile, and its failure is shown in words. */
async function act(button, call) {
  const view = current;
  if (!view) return;
  showActionError("");
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    await call(view);
  } catch (error) {
    if (error.status !== 401) showActionError(describe(error));
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    // An action can hide its own button (no QR button while a code is valid): keep the
    // keyboard's place in the session rather than losing it to the page.
    const focus = document.activeElement;
    if (focus === document.body || (focus === button && !button.checkVisibility())) {
      $("detail-title").focus();
    }
  }
}

async function requestQr(view) {
  const reply = await api("POST", `${sessionPath(view.instanceId)}/qr`);
  remember(reply.session);
  applySession(view, reply.session);
}

async function pairByPhone(view) {
  const phoneNumber = $("pair-phone").value.trim();
  if (!phoneNumber) {
    showActionError("Type the phone number in international format, e.g. +5491122334455.");
    $("pair-phone").focus();
    return;
  }
  const reply = await api("POST", `${sessionPath(view.instanceId)}/pair-phone`, {
    phone_number: phoneNumber,
  });
  view.linkingCode = reply.linking_code;
  remember(reply.session);
  applySession(view, reply.session);
  renderSession(view, view.session);
}

async function disconnect(view) {
  const sure = await confirmAction(
    `Disconnect ${view.instanceId}?`,
    "This unlinks the device from WhatsApp; connecting again needs a new QR code.",
    "Disconnect",
  );
  if (!sure) return;
  const session = await api("POST", `${sessionPath(view.instanceId)}/disconnect`);
  remember(session);
  applySession(view, session);
}

async function deleteSession(view) {
  const sure = await confirmAction(
    `Delete ${view.instanceId}?`,
    "The session, its state and its WhatsApp credentials are removed for good.",
    "Delete",
  );
  if (!sure) return;
  await api("DELETE", sessionPath(view.instanceId));
  showGone(view, `${view.instanceId} was deleted.`);
  history.replaceState(null, "", location.pathname);
  if (list.sessions.get(view.instanceId)?.id === view.session?.id) {
    list.sessions.delete(view.instanceId);
    scheduleRender();
  }
  $("sessions-title").focus();
}

/** Asks in a modal dialog; resolves true only when the user confirms. */
function confirmAction(title, text, verb) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = verb;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// ---------------------------------------------------------------------------
// Start-up and navigation: #/sessions/<instance_id> names the open session.

function routedInstance() {
  const match = /^#\/sessions\/(.+)$/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

function clearView() {
  closeSession();
  closeFeed();
  list.sessions = new Map();
  $("sessions-body").replaceChildren();
  $("list-caption").textContent = "";
}

/** Whether this page may read the sessions (EventSource cannot tell a 401 apart). */
async function mayRead() {
  try {
    await api("GET", "/sessions?page_size=1");
    showListError("");
    return true;
  } catch (error) {
    // A token of another role (the engine side's) may not read sessions: ask for another.
    if (error.status === 403) showGate(`This token may not use the console. ${describe(error)}`);
    else if (error.status !== 401) {
      $("main").hidden = false;
      showListError(describe(error));
    }
    return false;
  }
}

async function startConsole() {
  clearView();
  if (!(await mayRead())) return;
  $("main").hidden = false;
  $("logout").hidden = localStorage.getItem("sm.signedIn") !== "1";
  openFeed();
  const instanceId = routedInstance();
  if (instanceId) openSession(instanceId);
}

function route() {
  if (!$("gate").hidden) return;
  const instanceId = routedInstance();
  if (instanceId && instanceId !== current?.instanceId) openSession(instanceId);
  if (!instanceId && current) closeSession();
}

/** Back to the list alone (the browser's Back button from a session). */
function closeSession() {
  stopFollowing();
  current = null;
  setConnection(null);
  $("main").classList.remove("has-session");
  $("detail-title").textContent = "No session selected";
  $("detail-body").hidden = true;
  $("detail-empty").hidden = false;
  $("detail-empty").textContent = "Choose a session in the list, or create one.";
  for (const link of document.querySelectorAll("#sessions-body a[aria-current]")) {
    link.removeAttribute("aria-current");
  }
}

function wire() {
  $("token-form").addEventListener("submit", signIn);
  $("logout").addEventListener("click", signOut);
  $("create-form").addEventListener("submit", createSession);
  $("status-filter").addEventListener("change", filterList);
  $("refresh").addEventListener("click", () => openFeed()); // the current state, read again
  $("first-page").addEventListener("click", () => goToPage(0));
  $("previous-page").addEventListener("click", () => goToPage(list.index - 1));
  $("next-page").addEventListener("click", () => goToPage(list.index + 1));
  $("request-qr").addEventListener("click", (e) => act(e.currentTarget, requestQr));
  $("pair-form").addEventListener("submit", (e) => {
    e.preventDefault();
    act(e.submitter ?? e.currentTarget, pairByPhone);
  });
  $("disconnect").addEventListener("click", (e) => act(e.currentTarget, disconnect));
  $("delete").addEventListener("click", (e) => act(e.currentTarget, deleteSession));
  window.addEventListener("hashchange", route);
}

wire();
startConsole();
