/*
 * Scholia: what the analysts' page (app.js) and the operators' console (admin.js) share,
 * loaded before either as `window.Scholia`: DOM and date helpers, the HTTP API (SPEC §5)
 * with a bearer token, the websocket (SPEC §6) that reconnects, and the parts of the
 * markup both pages have: the connection badge #conn and the message box #message
 * (#message-text, #message-close).
 */
(function () {
  'use strict';

  const DAY = 864e5;

  // ---------------------------------------------------------------- small utilities

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text != null) e.textContent = text;
    return e;
  }

  function pad2(n) { return String(n).padStart(2, '0'); }

  /** UTC ms → 'YYYY-MM-DD'. */
  function dayKey(ms) { return new Date(ms).toISOString().slice(0, 10); }

  /** The last `days` UTC days, today included: {from, to}, `to` exclusive. */
  function lastDays(days) {
    const n = new Date();
    const today = Date.UTC(n.getUTCFullYear(), n.getUTCMonth(), n.getUTCDate());
    return { from: dayKey(today - (days - 1) * DAY), to: dayKey(today + DAY) };
  }

  /** Replaces the address bar's query (and history's) with `q`; the path and hash stay. */
  function replaceQuery(q) {
    const s = q.toString();
    history.replaceState(null, '', `${location.pathname}${s ? `?${s}` : ''}${location.hash}`);
  }

  /** The token kept in `storage` ('localStorage' or 'sessionStorage'), or ''. */
  function storedToken(storage, key) {
    try { return window[storage].getItem(key) || ''; } catch (_) { return ''; }
  }

  function storeToken(storage, key, token) {
    try {
      if (token) window[storage].setItem(key, token);
      else window[storage].removeItem(key);
    } catch (_) { /* storage may be disabled */ }
  }

  // ---------------------------------------------------------------- messages and the badge

  /** A notice or an error in #message: `context` in bold (when given), then `text`. */
  function showMessage(kind, context, text) {
    $('message').dataset.kind = kind;
    const parts = [];
    if (context) parts.push(el('strong', null, `${context}: `));
    parts.push(document.createTextNode(text));
    $('message-text').replaceChildren(...parts);
    $('message').hidden = false;
  }

  function clearMessage() {
    $('message').hidden = true;
    $('message-text').replaceChildren();
  }

  /** The connection badge: idle | connecting | live | down, and what it says. */
  function setConn(name, text) {
    const conn = $('conn');
    conn.dataset.state = name;
    conn.textContent = text;
  }

  // ---------------------------------------------------------------- HTTP API

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /**
   * Calls the API with `token` as a bearer token, `body` (when given) as JSON, and answers
   * its JSON (null when empty or not JSON). When the service does not answer it throws an
   * ApiError of status 0 with `texts.network(error)`; when it refuses, one of its status
   * with `texts.refusal(json, text, resp)`.
   */
  async function request(token, method, path, body, texts) {
    const headers = { Accept: 'application/json, application/problem+json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let resp;
    try {
      resp = await fetch(new URL(path, document.baseURI), {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch (e) {
      throw new ApiError(0, texts.network(e));
    }
    const text = await resp.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
    if (!resp.ok) throw new ApiError(resp.status, texts.refusal(json, text, resp));
    return json;
  }

  // ---------------------------------------------------------------- websocket

  /**
   * The websocket of live updates, `v1/ws?token=`, shown on the badge. Once closed it is
   * opened again by `on.retry()` after 0.5 s, doubling up to 15 s (± 20 %). `on.open()` runs
   * when it opens, `on.message(msg)` for each message (a JSON object), and
   * `on.closed(opened)` once it closed (or could not be made) and the retry is set.
   */
  class LiveSocket {
    constructor(on) {
      this.on = on;
      this.ws = null;
      this.attempt = 0;
      this.timer = null;
    }

    isOpen() { return !!this.ws && this.ws.readyState === WebSocket.OPEN; }

    /** Sends `obj` as JSON when the socket is open; answers whether it did. */
    send(obj) {
      if (!this.isOpen()) return false;
      this.ws.send(JSON.stringify(obj));
      return true;
    }

    /** Stops retrying and closes the socket, without its handlers. */
    close(reason) {
      clearTimeout(this.timer);
      this.timer = null;
      if (this.ws) {
        const old = this.ws;
        this.ws = null;
        old.onopen = old.onmessage = old.onclose = old.onerror = null;
        try { old.close(1000, reason); } catch (_) { /* already closed */ }
      }
    }

    open(token) {
      setConn('connecting', this.attempt ? `reconnecting (attempt ${this.attempt + 1})…` : 'connecting…');
      const u = new URL('v1/ws', document.baseURI);
      u.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
      u.search = '';
      u.hash = '';
      u.searchParams.set('token', token);
      let ws;
      try {
        ws = new WebSocket(u.toString());
      } catch (_) {
        this.retry(null, false);
        return;
      }
      this.ws = ws;
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this.attempt = 0;
        this.on.open();
      };
      ws.onmessage = (ev) => {
        if (typeof ev.data !== 'string') return;
        let msg;
        try { msg = JSON.parse(ev.data); } catch (_) { return; }
        if (msg && typeof msg === 'object') this.on.message(msg);
      };
      ws.onerror = () => { /* a close event follows */ };
      ws.onclose = (ev) => {
        if (this.ws !== ws) return;
        this.ws = null;
        this.retry(ev, opened);
      };
    }

    retry(ev, opened) {
      const base = Math.min(15000, 500 * 2 ** this.attempt);
      const delay = Math.round(base * (0.8 + Math.random() * 0.4));
      this.attempt = Math.min(this.attempt + 1, 10);
      const why = ev && ev.reason ? ` (${ev.reason})` : '';
      setConn('down', `disconnected${why}; retrying in ${Math.max(1, Math.round(delay / 1000))} s`);
      this.timer = setTimeout(this.on.retry, delay);
      this.on.closed(opened);
    }
  }

  window.Scholia = Object.freeze({
    DAY, $, el, pad2, dayKey, lastDays, replaceQuery, storedToken, storeToken,
    showMessage, clearMessage, setConn, ApiError, request, LiveSocket,
  });
})();
