/**
 * wslb-recovery.js: the reference browser client of quart-wslb's recovery mode
 * (a route decorated with `ws_route(recovery=True)`). No dependencies; an ES module.
 *
 * The protocol, in short (docs/recovery.md has it all):
 * - The client's FIRST frame is the resume frame: `{"t":"resume"}` for a new session, or
 *   `{"t":"resume","session","token","epoch","pos"}` to resume one (never the token in
 *   the URL). The server closes 1008 on anything else, or after 10 s of silence.
 * - The server answers `{"t":"welcome","session","token","epoch","pos","recovered","end"}`;
 *   `recovered: false` means the session asked to resume but what it missed could not be
 *   replayed in full (Redis lost history, retention exceeded, session expired...).
 * - Then the messages: `{"t":"msg","pos":"<ms>-<seq>","d"|"j"|"b": ...}`: text, a JSON
 *   value, or base64 bytes. Those numbered up to the welcome's `end` are the missed ones;
 *   those with no pos were written by the handler to this connection only, not kept.
 *   Now and then `{"t":"pos","pos"}`: everything before it has reached the client.
 * - The client stores session, token, epoch and the pos of the last message it
 *   processed, and resumes with them on every reconnect, to any instance. A session
 *   stays resumable for WSLB_RECOVERY_TTL seconds (120 by default) after it closed.
 * - Close 4409: another connection resumed this session (say, a duplicated tab, whose
 *   sessionStorage is a copy): final. Close 1008: the resume frame was refused: the
 *   client forgets the session and tries once more with a new one.
 *
 * Usage: `const ws = new WslbSocket("/ws?room=lobby", {onmessage: (data, pos, replay) =>
 * ..., onwelcome: ({recovered}) => ...})`, then `ws.send({...})`, `ws.close()`.
 */

/** The sequence number of a position "<ms>-<seq>": what orders positions. */
const seqOf = (pos) => BigInt(pos.slice(pos.indexOf("-") + 1));

const FINAL = 4409;            // session resumed elsewhere: never reconnect
const REFUSED = 1008;          // resume frame refused: one more try, as a new session

export class WslbSocket {
  /**
   * @param {string} url  ws(s):// URL, or a path on this page's host ("/ws?room=lobby").
   * @param {object} options  storageKey ("wslb"), storage (sessionStorage), fresh (true:
   *   forget the stored session first), minDelay and maxDelay (ms, the reconnect
   *   backoff), and the callbacks onmessage(data, pos, replay), onwelcome(welcome) and
   *   onclose({code, reason, reconnecting, delay}), which may also be set as properties.
   */
  constructor(url, options = {}) {
    const { storageKey = "wslb", storage = globalThis.sessionStorage, fresh = false,
            minDelay = 500, maxDelay = 15000, ...callbacks } = options;
    this.url = new URL(url, globalThis.location?.href.replace(/^http/, "ws"));
    Object.assign(this, { storageKey, storage, minDelay, maxDelay }, callbacks);
    this.welcome = null;       // the last welcome frame (without its token)
    this.attempt = 0;          // reconnects since the last welcome
    this.closed = false;       // close() was called: no more reconnects
    this.refusedOnce = false;  // a 1008 already made us start a new session
    this.lastSeq = null;       // dedup: the highest seq processed in this epoch
    this.replayEnd = null;     // the seq up to which messages are the replay (missed)
    this.saved = this.load();
    if (fresh) this.forget();
    this.open();
  }

  /** {session, epoch, pos, welcome, connected, attempt}: for a UI or a test. */
  get state() {
    const { session = null, epoch = null, pos = null } = this.saved;
    return { session, epoch, pos, welcome: this.welcome, attempt: this.attempt,
             connected: this.ws?.readyState === 1 && this.welcome !== null };
  }

  /** Send a frame: a string as it is, anything else as JSON. False if not connected. */
  send(frame) {
    if (this.ws?.readyState !== 1) return false;
    this.ws.send(typeof frame === "string" ? frame : JSON.stringify(frame));
    return true;
  }

  /** Close for good (the session stays resumable, e.g. by a reload, until its TTL). */
  close(code = 1000, reason = "") {
    this.closed = true;
    clearTimeout(this.timer);
    this.ws?.close(code, reason);
  }

  /** Forget the stored session: the next connection starts a new one. */
  forget() {
    this.saved = {};
    this.lastSeq = null;
    try { this.storage?.removeItem(this.storageKey); } catch { /* storage disabled */ }
  }

  load() {
    try { return JSON.parse(this.storage?.getItem(this.storageKey)) || {}; } catch { return {}; }
  }

  save(changes) {
    Object.assign(this.saved, changes);
    try { this.storage?.setItem(this.storageKey, JSON.stringify(this.saved)); } catch { /* */ }
  }

  open() {
    const ws = new WebSocket(this.url);
    this.ws = ws;
    this.welcome = null;
    const { session, token, epoch, pos } = this.saved;
    const resume = session ? { t: "resume", session, token, epoch, pos } : { t: "resume" };
    ws.onopen = () => ws.send(JSON.stringify(resume));  // always the first frame
    ws.onmessage = (event) => { if (this.ws === ws) this.receive(event.data, resume); };
    ws.onclose = (event) => { if (this.ws === ws) this.closedWith(event); };
  }

  receive(raw, resume) {
    let frame;
    try { frame = JSON.parse(raw); } catch { return; }  // pings, anything not JSON
    if (frame === null || typeof frame !== "object") return;
    if (frame.t === "welcome") {
      const { session, token, epoch, pos, recovered, end } = frame;
      this.save({ session, token, epoch, pos });
      this.lastSeq = seqOf(pos);
      // Messages numbered up to `end` were missed while away (the replay); later, live.
      this.replayEnd = recovered && typeof end === "string" ? seqOf(end) : null;
      this.welcome = { session, epoch, pos, recovered, end };
      this.attempt = 0;
      this.refusedOnce = false;
      this.onwelcome?.(this.welcome);
    } else if (frame.t === "pos") {
      // A mark: everything before pos has reached us, so a resume may start there (a
      // quiet client's position would otherwise fall out of the history kept).
      const seq = seqOf(frame.pos);
      if (this.lastSeq === null || seq > this.lastSeq) {
        this.lastSeq = seq;
        this.save({ pos: frame.pos });
      }
    } else if (frame.t === "msg") {
      const data = "b" in frame ? Uint8Array.from(atob(frame.b), (c) => c.charCodeAt(0))
        : "j" in frame ? frame.j : frame.d;
      let replay = false;
      if (typeof frame.pos === "string") {
        const seq = seqOf(frame.pos);
        if (this.lastSeq !== null && seq <= this.lastSeq) return;  // a duplicate
        replay = this.replayEnd !== null && seq <= this.replayEnd;
        this.lastSeq = seq;
        this.save({ pos: frame.pos });  // before delivery: a throwing callback can't loop
      }
      this.onmessage?.(data, frame.pos ?? null, replay);
    }
  }

  closedWith({ code, reason }) {
    let delay = null;
    if (!this.closed && code !== FINAL) {
      if (code === REFUSED) {
        if (!this.refusedOnce) {
          this.refusedOnce = true;
          this.forget();
          delay = 0;
        }
      } else {  // capped exponential backoff, with jitter: half fixed, half random
        const cap = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempt);
        delay = Math.round(cap / 2 + (Math.random() * cap) / 2);
        this.attempt += 1;
      }
    }
    if (delay !== null) this.timer = setTimeout(() => this.closed || this.open(), delay);
    this.onclose?.({ code, reason, reconnecting: delay !== null, delay });
  }
}
