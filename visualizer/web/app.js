/*
 * Scholia visualizer: watch an analysis' annotations as live charts.
 *
 * Talks to the service with the HTTP API (SPEC §5: analyses list, invalidations)
 * and the websocket protocol (SPEC §6: subscribe / partition / waiting / status /
 * ready / invalidated / error / resync). No framework; uPlot draws the charts, and
 * common.js (`window.Scholia`) has what this page shares with the console.
 *
 * DOM hooks that tests rely on:
 *   #status-strip .cell[data-partition][data-status]   one cell per partition key
 *   #status-strip[data-seen-states]                     every status shown so far
 *   #charts[data-ready="true"]                          at least one chart drawn with a point
 *   #charts .chart[data-ready="true"] canvas            a drawn uPlot chart
 *   #overlay (hidden attribute), #overlay-text          "Waiting for analysis…" overlay
 *   #conn[data-state]                                   idle | connecting | live | down
 *   #message[data-kind] #message-text                   API / protocol errors and notices
 */
(function () {
  'use strict';

  const { $, el, pad2, lastDays, replaceQuery, storedToken, storeToken, clearMessage, setConn, request, LiveSocket } = window.Scholia;

  // ---------------------------------------------------------------- constants

  const TIME_COLUMNS = ['day', 'hour', 'time', 'bucket', 'created',
    'date', 'timestamp', 'ts', 'minute', 'window_start', 'period'];
  const MAX_SERIES = 12;
  const CHART_HEIGHT = 240;
  const COMPACT_STRIP_AT = 48; // more partitions than this: small squares, text in tooltips
  const TOKEN_KEY = 'scholia.token';
  const PALETTE = ['#2563eb', '#dc2626', '#16a34a', '#d97706', '#7c3aed', '#0891b2',
    '#db2777', '#65a30d', '#ea580c', '#4f46e5', '#0d9488', '#a16207'];
  const MISSING = new Set(['pending', 'waiting', 'queued', 'running', 'invalidated', 'stale', 'missing']);
  const NATURAL = new Intl.Collator(undefined, { numeric: true, sensitivity: 'base' }).compare;

  // ---------------------------------------------------------------- elements

  const els = {
    form: $('watch-form'),
    token: $('token'),
    analysis: $('analysis'),
    from: $('from'),
    to: $('to'),
    watch: $('watch'),
    invalidate: $('invalidate'),
    info: $('analysis-info'),
    messageClose: $('message-close'),
    conn: $('conn'),
    strip: $('status-strip'),
    summary: $('partition-summary'),
    failures: $('failures'),
    lastUpdate: $('last-update'),
    chartSummary: $('chart-summary'),
    charts: $('charts'),
    overlay: $('overlay'),
    overlayText: $('overlay-text'),
  };

  // ---------------------------------------------------------------- state

  const state = {
    token: '',
    analyses: [],          // from GET /v1/analyses
    wantedAnalysis: '',    // from the URL, until the list arrives
    watch: null,           // {analysis, from, to} being watched
    subId: null,           // id of the live subscription
    subSeq: 0,
    subError: null,        // error message for the current subscription
    partitions: new Map(), // key -> {status, generation, version, rows, error}
    gotReady: false,
    version: null,
    lastUpdate: null,      // {at: Date, partition, generation}
    seen: new Set(),       // every partition status shown since the page loaded
    charts: new Map(),     // column -> {card, plot, u, labelsKey}
    renderTimer: null,
    invalidationPoll: null,
  };

  // ---------------------------------------------------------------- utilities

  /** Parses a date/time string to UTC seconds; strings without a zone are UTC. */
  function parseTime(s) {
    if (typeof s !== 'string') return null;
    s = s.trim();
    let m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(s);
    if (m) return Date.UTC(+m[1], +m[2] - 1, +m[3]) / 1000;
    m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2})$/.exec(s);
    if (m) return Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4]) / 1000;
    m = /^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)\s*(Z|[+-]\d{2}(?::?\d{2})?)?$/i.exec(s);
    if (m) {
      const time = m[2].replace(/(\.\d{3})\d+$/, '$1');
      let zone = (m[3] || 'Z').toUpperCase();
      if (zone !== 'Z') {
        zone = zone.length === 3 ? zone + ':00' : zone;
        if (!zone.includes(':')) zone = zone.slice(0, 3) + ':' + zone.slice(3);
      }
      const t = Date.parse(`${m[1]}T${time}${zone}`);
      if (!Number.isNaN(t)) return t / 1000;
    }
    const t = Date.parse(s);
    return Number.isNaN(t) ? null : t / 1000;
  }

  /** x value (UTC seconds) of one row: its time column, or its partition key. */
  function rowX(partitionKey, row, timeCol) {
    const start = parseTime(partitionKey);
    if (!timeCol) return start;
    const v = row[timeCol];
    if (typeof v === 'string') {
      const t = parseTime(v);
      return t == null ? start : t;
    }
    if (typeof v === 'number' && Number.isFinite(v)) {
      const a = Math.abs(v);
      if (a >= 1e17) return v / 1e9; // nanoseconds
      if (a >= 1e14) return v / 1e6; // microseconds
      if (a >= 1e11) return v / 1e3; // milliseconds
      if (a >= 1e8) return v;        // seconds
      const col = timeCol.toLowerCase();
      if (start != null && col === 'hour' && v >= 0 && v < 24) {
        return Math.floor(start / 86400) * 86400 + v * 3600; // EXTRACT(HOUR FROM …)
      }
      if (start != null && col === 'minute' && v >= 0 && v < 60) {
        return Math.floor(start / 3600) * 3600 + v * 60;
      }
    }
    return start;
  }

  function fmtUtc(sec) {
    if (sec == null || !Number.isFinite(sec)) return '—';
    const iso = new Date(sec * 1000).toISOString();
    return iso.endsWith('T00:00:00.000Z') ? iso.slice(0, 10) : iso.slice(0, 16).replace('T', ' ');
  }

  function fmtClock(d) {
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  function fmtNumber(v) {
    if (v == null || !Number.isFinite(v)) return '—';
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e9 || a < 1e-3)) return v.toExponential(3);
    return v.toLocaleString(undefined, { maximumFractionDigits: a >= 100 ? 1 : 4 });
  }

  function cssVar(name, fallback) {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }

  // ---------------------------------------------------------------- messages

  function showMessage(kind, text) { window.Scholia.showMessage(kind, null, text); }

  // ---------------------------------------------------------------- HTTP API

  const API_TEXTS = {
    network: (e) => `network error: ${e && e.message ? e.message : e}`,
    refusal: (json, text, resp) => {
      const detail = (json && (json.detail || json.title || json.message || json.error))
        || text.trim().slice(0, 300) || resp.statusText || 'request failed';
      return `${detail} (HTTP ${resp.status})`;
    },
  };

  /** Calls the API; errors carry the problem+json `detail` as their message. */
  function api(method, path, body) {
    return request(state.token, method, path, body, API_TEXTS);
  }

  async function loadAnalyses() {
    if (!state.token) {
      state.analyses = [];
      fillAnalyses('enter a token to list analyses');
      return;
    }
    try {
      const j = await api('GET', 'v1/analyses');
      state.analyses = j && Array.isArray(j.analyses) ? j.analyses : [];
      fillAnalyses(state.analyses.length ? '— choose an analysis —' : 'no analyses registered');
    } catch (e) {
      state.analyses = [];
      fillAnalyses('could not list analyses');
      showMessage('error', `Could not list analyses: ${e.message}`);
    }
  }

  function fillAnalyses(placeholder) {
    const wanted = (state.watch && state.watch.analysis) || els.analysis.value || state.wantedAnalysis;
    els.analysis.replaceChildren();
    const first = el('option', null, placeholder);
    first.value = '';
    els.analysis.append(first);
    const names = new Set();
    for (const a of state.analyses) {
      if (!a || typeof a.name !== 'string') continue;
      names.add(a.name);
      const bits = [];
      if (a.version != null) bits.push(`v${a.version}`);
      if (a.kind) bits.push(a.kind);
      if (a.partition) bits.push(a.partition);
      if (a.status && a.status !== 'active') bits.push(a.status);
      const o = el('option', null, bits.length ? `${a.name} (${bits.join(' · ')})` : a.name);
      o.value = a.name;
      els.analysis.append(o);
    }
    if (wanted && !names.has(wanted)) {
      const o = el('option', null, `${wanted} (not listed)`);
      o.value = wanted;
      els.analysis.append(o);
    }
    els.analysis.value = wanted || '';
    showAnalysisInfo();
  }

  function showAnalysisInfo() {
    const name = els.analysis.value;
    const a = state.analyses.find((x) => x && x.name === name);
    if (!a) {
      els.info.textContent = '';
      return;
    }
    const version = state.watch && state.watch.analysis === name && state.version != null
      ? state.version : a.version;
    const parts = [`${a.name} v${version}`];
    if (a.kind) parts.push(`kind ${a.kind}`);
    if (a.partition) parts.push(`partition ${a.partition}`);
    if (a.status) parts.push(a.status);
    els.info.textContent = parts.join(' · ') + (a.description ? ` — ${a.description}` : '');
  }

  // ---------------------------------------------------------------- invalidation

  async function invalidateVisibleRange() {
    const w = state.watch || readForm();
    if (!w || !w.analysis) {
      showMessage('error', 'Choose an analysis and a date range first.');
      return;
    }
    els.invalidate.disabled = true;
    try {
      const j = await api('POST', 'v1/invalidations', {
        analysis: w.analysis,
        from: w.from,
        to: w.to,
        reason: 'invalidated from the page',
        rebuild: 'eager',
      });
      const id = j && j.id != null ? j.id : null;
      showMessage('info', `Invalidation ${id == null ? '' : id + ' '}accepted: rebuilding ${w.analysis} from ${w.from} to ${w.to}…`);
      if (id != null) pollInvalidation(id, w);
    } catch (e) {
      showMessage('error', `Invalidate failed: ${e.message}`);
    } finally {
      els.invalidate.disabled = false;
    }
  }

  function pollInvalidation(id, w) {
    if (state.invalidationPoll) clearTimeout(state.invalidationPoll);
    const started = Date.now();
    let failures = 0;
    const tick = async () => {
      state.invalidationPoll = null;
      try {
        const j = await api('GET', `v1/invalidations/${encodeURIComponent(id)}`);
        failures = 0;
        const total = j && j.partitions_total != null ? j.partitions_total : '?';
        const done = j && j.partitions_done != null ? j.partitions_done : '?';
        const failed = j && j.partitions_failed ? j.partitions_failed : 0;
        const st = (j && j.state) || 'unknown';
        const text = `Invalidation ${id} (${w.analysis} ${w.from} → ${w.to}): ${st}, ${done}/${total} partitions rebuilt`
          + (failed ? `, ${failed} failed` : '');
        const terminal = ['done', 'failed', 'cancelled'].includes(st);
        showMessage(st === 'failed' || failed ? 'error' : 'info', text);
        if (terminal || Date.now() - started > 10 * 60 * 1000) return;
      } catch (e) {
        failures += 1;
        if (failures >= 3) {
          showMessage('error', `Could not follow invalidation ${id}: ${e.message}`);
          return;
        }
      }
      state.invalidationPoll = setTimeout(tick, 1000);
    };
    state.invalidationPoll = setTimeout(tick, 500);
  }

  // ---------------------------------------------------------------- form and URL

  function dateValue(input) {
    return input.dataset.exact || input.value;
  }

  function readForm() {
    return {
      analysis: els.analysis.value.trim(),
      from: dateValue(els.from).trim(),
      to: dateValue(els.to).trim(),
    };
  }

  function validate(w) {
    if (!state.token) return 'Enter a token (read or admin).';
    if (!w.analysis) return 'Choose an analysis.';
    const f = parseTime(w.from);
    const t = parseTime(w.to);
    if (f == null) return `"From" is not a date (YYYY-MM-DD): ${w.from || '(empty)'}`;
    if (t == null) return `"To" is not a date (YYYY-MM-DD): ${w.to || '(empty)'}`;
    if (t <= f) return '"To" must be after "From" (the range is half-open: [from, to)).';
    return null;
  }

  function setDateInput(input, value) {
    delete input.dataset.exact;
    if (/^\d{4}-\d{2}-\d{2}$/.test(value)) {
      input.value = value;
    } else {
      // RFC 3339 from the URL: keep it exactly, show its day.
      input.dataset.exact = value;
      input.value = value.slice(0, 10);
    }
  }

  function updateUrl() {
    const q = new URLSearchParams(location.search);
    q.delete('token');
    if (state.watch) {
      q.set('analysis', state.watch.analysis);
      q.set('from', state.watch.from);
      q.set('to', state.watch.to);
    }
    // The token stays in localStorage, never in the address bar or history.
    replaceQuery(q);
  }

  function setToken(token) {
    token = (token || '').trim();
    if (token === state.token) return false;
    state.token = token;
    storeToken('localStorage', TOKEN_KEY, token);
    return true;
  }

  function onSubmit(ev) {
    ev.preventDefault();
    const tokenChanged = setToken(els.token.value);
    const w = readForm();
    const problem = validate(w);
    if (tokenChanged) loadAnalyses();
    if (problem) {
      showMessage('error', problem);
      return;
    }
    clearMessage();
    startWatch(w, tokenChanged);
  }

  function onFieldChange() {
    showAnalysisInfo();
    if (!state.watch) return;
    const w = readForm();
    if (validate(w)) return; // incomplete edit: wait for the user
    startWatch(w, false);
  }

  // ---------------------------------------------------------------- watching

  function sameWatch(a, b) {
    return !!a && !!b && a.analysis === b.analysis && a.from === b.from && a.to === b.to;
  }

  function startWatch(w, reconnect) {
    if (!sameWatch(state.watch, w)) {
      state.watch = { analysis: w.analysis, from: w.from, to: w.to };
      state.partitions = new Map();
      state.gotReady = false;
      state.version = null;
      state.subError = null;
      state.lastUpdate = null;
      destroyCharts();
      updateUrl();
    }
    showAnalysisInfo();
    if (reconnect || !socket.ws) {
      connect();
    } else if (socket.isOpen()) {
      subscribe();
    } // else: connecting; onopen subscribes
    scheduleRender();
  }

  // ---------------------------------------------------------------- websocket

  const socket = new LiveSocket({
    open() {
      setConn('live', 'live');
      if (state.watch) subscribe();
    },
    message: handleMessage,
    closed(opened) {
      state.subId = null;
      if (!opened) probeToken();
    },
    retry: connect,
  });

  function send(obj) { return socket.send(obj); }

  function connect() {
    socket.close('reconnecting');
    state.subId = null;
    if (!state.token) {
      setConn('idle', 'no token');
      return;
    }
    socket.open(state.token);
  }

  /** The browser hides why an upgrade failed; ask the HTTP API, which says. */
  async function probeToken() {
    try {
      await api('GET', 'v1/analyses');
    } catch (e) {
      if (e.status === 401 || e.status === 403) showMessage('error', `Live updates refused: ${e.message}`);
    }
  }

  function subscribe() {
    if (!state.watch) return;
    if (state.subId) send({ op: 'unsubscribe', id: state.subId });
    const id = `c${++state.subSeq}`;
    const ok = send({
      op: 'subscribe',
      id,
      analysis: state.watch.analysis,
      from: state.watch.from,
      to: state.watch.to,
    });
    state.subId = ok ? id : null;
    state.gotReady = false;
    state.subError = null;
  }

  function partitionState(key) {
    let p = state.partitions.get(key);
    if (!p) {
      p = { status: 'pending', generation: null, version: null, rows: null, error: null };
      state.partitions.set(key, p);
    }
    return p;
  }

  function setStatus(key, status, error) {
    if (typeof key !== 'string' || !key) return;
    const p = partitionState(key);
    p.status = String(status || 'unknown');
    p.error = p.status === 'failed' ? String(error || 'analysis failed') : null;
  }

  function handleMessage(msg) {
    const type = msg.type;
    const mine = msg.sub == null || msg.sub === state.subId;
    if (!mine && type !== 'error') return; // a late message of an old subscription

    switch (type) {
      case 'partition': {
        if (!state.watch) return;
        if (msg.sub == null && msg.analysis && msg.analysis !== state.watch.analysis) return;
        const p = partitionState(String(msg.partition));
        p.status = 'ready';
        p.rows = Array.isArray(msg.rows) ? msg.rows : [];
        p.generation = msg.generation != null ? msg.generation : null;
        p.version = msg.version != null ? msg.version : null;
        p.error = null;
        if (msg.version != null) state.version = msg.version;
        state.lastUpdate = { at: new Date(), partition: String(msg.partition), generation: p.generation };
        break;
      }
      case 'waiting':
        for (const k of Array.isArray(msg.partitions) ? msg.partitions : []) setStatus(String(k), 'waiting');
        break;
      case 'status':
        setStatus(String(msg.partition), msg.status, msg.error);
        break;
      case 'ready':
        state.gotReady = true;
        // Every partition of the subscription is present: nothing is still missing.
        for (const p of state.partitions.values()) {
          if (MISSING.has(p.status)) {
            p.status = 'ready';
            if (!p.rows) p.rows = [];
          }
        }
        break;
      case 'invalidated':
        state.gotReady = false;
        for (const k of Array.isArray(msg.partitions) ? msg.partitions : []) setStatus(String(k), 'invalidated');
        break;
      case 'error': {
        const text = msg.message || msg.detail || msg.error || 'unknown error';
        if (mine) state.subError = String(text);
        showMessage('error', `Server: ${text}`);
        break;
      }
      case 'resync':
        // We fell behind and missed updates: subscribe again (new id); keep what is drawn.
        subscribe();
        break;
      default:
        return;
    }
    scheduleRender();
  }

  // ---------------------------------------------------------------- rendering

  function scheduleRender() {
    if (state.renderTimer) return;
    state.renderTimer = setTimeout(() => {
      state.renderTimer = null;
      render();
    }, 16);
  }

  function render() {
    renderStrip();
    let chartsHaveData = false;
    try {
      chartsHaveData = renderCharts();
    } catch (e) {
      showMessage('error', `Could not draw the charts: ${e && e.message ? e.message : e}`);
    }
    renderOverlay(chartsHaveData);
    renderLastUpdate();
    showAnalysisInfo();
  }

  function statusText(p) {
    switch (p.status) {
      case 'ready': return p.generation != null ? `ready · gen ${p.generation}` : 'ready';
      case 'failed': return 'failed';
      case 'invalidated': return 'invalidated';
      case 'pending': return '…';
      default: return p.status;
    }
  }

  function countStatuses() {
    const counts = new Map();
    for (const p of state.partitions.values()) counts.set(p.status, (counts.get(p.status) || 0) + 1);
    return counts;
  }

  function renderStrip() {
    const keys = [...state.partitions.keys()].sort();
    const compact = keys.length > COMPACT_STRIP_AT;
    els.strip.classList.toggle('compact', compact);
    const frag = document.createDocumentFragment();
    const failures = [];
    for (const key of keys) {
      const p = state.partitions.get(key);
      state.seen.add(p.status);
      const cell = el('div', 'cell');
      cell.dataset.partition = key;
      cell.dataset.status = p.status;
      let title = `${key}: ${statusText(p)}`;
      if (p.rows && p.status === 'ready') title += ` · ${p.rows.length} row${p.rows.length === 1 ? '' : 's'}`;
      if (p.version != null) title += ` · v${p.version}`;
      if (p.error) title += `\n${p.error}`;
      cell.title = title;
      cell.append(el('span', 'cell-key', key), el('span', 'cell-state', statusText(p)));
      if (p.status === 'failed') {
        cell.append(el('span', 'cell-error', p.error));
        failures.push([key, p.error]);
      }
      frag.append(cell);
    }
    els.strip.replaceChildren(frag);
    els.strip.dataset.seenStates = [...state.seen].sort().join(' ');

    els.failures.replaceChildren(...failures.map(([key, err]) => {
      const li = el('li');
      li.append(el('strong', null, key), document.createTextNode(`: ${err}`));
      return li;
    }));
    els.failures.hidden = failures.length === 0;

    const counts = countStatuses();
    const order = ['ready', 'running', 'queued', 'waiting', 'invalidated', 'pending', 'failed'];
    const parts = [];
    for (const s of order) if (counts.get(s)) parts.push(`${counts.get(s)} ${s}`);
    for (const [s, n] of counts) if (!order.includes(s)) parts.push(`${n} ${s}`);
    els.summary.textContent = keys.length
      ? `${keys.length} partition${keys.length === 1 ? '' : 's'}: ${parts.join(' · ')}`
      : (state.watch ? 'subscribing…' : '');
  }

  function renderOverlay(chartsHaveData) {
    let text = null;
    let kind = 'info';
    if (!state.watch) {
      text = 'Choose an analysis and a date range, then press Watch.';
    } else if (state.subError) {
      text = `Subscription refused: ${state.subError}`;
      kind = 'error';
    } else {
      const total = state.partitions.size;
      let ready = 0;
      let missing = 0;
      let failed = 0;
      for (const p of state.partitions.values()) {
        if (p.status === 'ready') ready += 1;
        else if (p.status === 'failed') failed += 1;
        else if (MISSING.has(p.status)) missing += 1;
      }
      if (missing > 0) {
        text = `Waiting for analysis… ${ready} of ${total} partition${total === 1 ? '' : 's'} ready`;
        kind = 'waiting';
      } else if (total === 0 && !state.gotReady) {
        text = els.conn.dataset.state === 'live' ? 'Waiting for analysis…' : 'Connecting…';
        kind = 'waiting';
      } else if (!chartsHaveData) {
        text = failed > 0
          ? `The analysis failed for ${failed} partition${failed === 1 ? '' : 's'}; see the errors above.`
          : 'No numeric rows in this range.';
        kind = failed > 0 ? 'error' : 'info';
      }
    }
    els.overlay.hidden = text == null;
    els.overlay.dataset.kind = kind;
    els.overlay.classList.toggle('over-charts', chartsHaveData);
    if (text != null) els.overlayText.textContent = text;
  }

  function renderLastUpdate() {
    const u = state.lastUpdate;
    if (!u) {
      els.lastUpdate.textContent = state.watch ? 'no update yet' : '';
      els.lastUpdate.removeAttribute('title');
      return;
    }
    const ago = Math.max(0, Math.round((Date.now() - u.at.getTime()) / 1000));
    const agoText = ago < 60 ? `${ago} s ago` : ago < 3600 ? `${Math.floor(ago / 60)} min ago` : `${Math.floor(ago / 3600)} h ago`;
    els.lastUpdate.textContent = `last update ${fmtClock(u.at)} (${agoText}) · ${u.partition}`
      + (u.generation != null ? ` gen ${u.generation}` : '');
    els.lastUpdate.title = u.at.toISOString();
  }

  // ---------------------------------------------------------------- chart models

  /** One model per numeric column: {column, note, labels, data, points}. */
  function buildModels() {
    const rows = [];
    for (const [key, p] of state.partitions) {
      if (p.status !== 'ready' || !Array.isArray(p.rows)) continue;
      for (const r of p.rows) if (r && typeof r === 'object' && !Array.isArray(r)) rows.push([key, r]);
    }
    if (!rows.length) return [];

    const order = [];
    const info = new Map();
    for (const [, r] of rows) {
      for (const k of Object.keys(r)) {
        let c = info.get(k);
        if (!c) {
          c = { num: 0, str: 0, other: 0 };
          info.set(k, c);
          order.push(k);
        }
        const v = r[k];
        if (v === null || v === undefined) continue;
        if (typeof v === 'number' && Number.isFinite(v)) c.num += 1;
        else if (typeof v === 'string') c.str += 1;
        else c.other += 1;
      }
    }
    const timeCol = order.find((k) => TIME_COLUMNS.includes(k.toLowerCase())) || null;
    const isNum = (k) => k !== timeCol && info.get(k).num > 0 && !info.get(k).str && !info.get(k).other;
    const isStr = (k) => k !== timeCol && info.get(k).str > 0 && !info.get(k).num && !info.get(k).other;
    const numCols = order.filter(isNum);
    const splitCol = info.has('source') && isStr('source') ? 'source' : (order.find(isStr) || null);

    const xs = rows.map(([key, r]) => rowX(key, r, timeCol));
    const splitOf = (r) => {
      if (!splitCol) return '';
      const v = r[splitCol];
      return v == null ? '(none)' : String(v);
    };

    return numCols.map((col) => {
      // split value -> Map(x -> y)
      const bySplit = new Map();
      rows.forEach(([, r], i) => {
        const v = r[col];
        const x = xs[i];
        if (typeof v !== 'number' || !Number.isFinite(v) || x == null) return;
        const s = splitOf(r);
        let m = bySplit.get(s);
        if (!m) { m = new Map(); bySplit.set(s, m); }
        m.set(x, v);
      });
      const allSplits = [...bySplit.keys()].sort(NATURAL);
      const shown = allSplits.slice(0, MAX_SERIES);
      const xset = new Set();
      for (const s of shown) for (const x of bySplit.get(s).keys()) xset.add(x);
      const xsSorted = [...xset].sort((a, b) => a - b);
      let points = 0;
      const ys = shown.map((s) => {
        const m = bySplit.get(s);
        return xsSorted.map((x) => {
          const y = m.get(x);
          if (y === undefined) return null;
          points += 1;
          return y;
        });
      });
      const labels = shown.map((s) => (splitCol ? `${col} · ${s}` : col));
      let note = splitCol ? `by ${splitCol}` : '';
      if (allSplits.length > shown.length) {
        note += `${note ? ' · ' : ''}${shown.length} of ${allSplits.length} series shown`;
      }
      if (timeCol) note += `${note ? ' · ' : ''}x: ${timeCol}`;
      return { column: col, note, labels, data: [xsSorted, ...ys], points };
    });
  }

  // ---------------------------------------------------------------- charts

  function watchedRange() {
    if (!state.watch) return null;
    const f = parseTime(state.watch.from);
    const t = parseTime(state.watch.to);
    return f != null && t != null && t > f ? [f, t] : null;
  }

  /** x axis ticks in UTC, 24-hour: "05-05", or "05-05 / 13:00" at midnight and "13:00" otherwise. */
  function timeTicks(_u, splits, _axisIdx, _space, incr) {
    return splits.map((s, i) => {
      if (s == null) return '';
      const iso = new Date(s * 1000).toISOString();
      const date = iso.slice(5, 10);
      const time = iso.slice(11, 16);
      if (incr >= 86400) return i === 0 ? `${date}\n${iso.slice(0, 4)}` : date;
      return time === '00:00' || i === 0 ? `${time}\n${date}` : time;
    });
  }

  function xRange(_u, min, max) {
    let lo = min;
    let hi = max;
    const w = watchedRange();
    if (w) {
      lo = lo == null ? w[0] : Math.min(lo, w[0]);
      hi = hi == null ? w[1] : Math.max(hi, w[1]);
    }
    if (lo == null || hi == null) return [0, 1];
    if (lo === hi) { lo -= 1800; hi += 1800; }
    return [lo, hi];
  }

  function markReady() {
    let any = false;
    for (const c of state.charts.values()) if (c.card.dataset.ready === 'true') any = true;
    els.charts.dataset.ready = any ? 'true' : 'false';
  }

  function makeChart(entry, model) {
    const fg = cssVar('--fg-muted', '#475569');
    const grid = cssVar('--grid', '#e2e8f0');
    const axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
    const opts = {
      width: Math.max(280, entry.plot.clientWidth || els.charts.clientWidth || 600),
      height: CHART_HEIGHT,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), 'Etc/UTC'),
      cursor: { sync: { key: 'scholia' } },
      legend: { live: true },
      scales: { x: { time: true, range: xRange } },
      axes: [
        Object.assign({}, axis, { size: 44, values: timeTicks }),
        Object.assign({}, axis, { size: 64, values: (u, splits) => splits.map(fmtNumber) }),
      ],
      series: [
        { label: 'time (UTC)', value: (u, v) => fmtUtc(v) },
        ...model.labels.map((label, i) => ({
          label,
          stroke: PALETTE[i % PALETTE.length],
          width: 1.75,
          spanGaps: true,
          points: { size: 6 },
          value: (u, v) => fmtNumber(v),
        })),
      ],
      hooks: {
        draw: [() => {
          entry.card.dataset.ready = Number(entry.card.dataset.points) > 0 ? 'true' : 'false';
          markReady();
        }],
      },
    };
    entry.plot.replaceChildren();
    entry.u = new uPlot(opts, model.data, entry.plot);
  }

  function destroyCharts() {
    for (const c of state.charts.values()) {
      if (c.u) c.u.destroy();
      c.card.remove();
    }
    state.charts.clear();
    els.charts.replaceChildren();
    els.charts.dataset.ready = 'false';
    els.chartSummary.textContent = '';
  }

  /** Draws one chart per numeric column; returns whether any has a point. */
  function renderCharts() {
    if (typeof uPlot !== 'function') throw new Error('the chart library did not load');
    const models = buildModels();
    const wanted = new Set(models.map((m) => m.column));
    for (const [col, c] of state.charts) {
      if (!wanted.has(col)) {
        if (c.u) c.u.destroy();
        c.card.remove();
        state.charts.delete(col);
      }
    }
    let anyPoints = false;
    let prev = null;
    for (const model of models) {
      let entry = state.charts.get(model.column);
      if (!entry) {
        const card = el('figure', 'chart');
        card.dataset.column = model.column;
        card.dataset.ready = 'false';
        const cap = el('figcaption');
        const title = el('span', 'chart-title', model.column);
        const note = el('span', 'chart-note');
        cap.append(title, note);
        const plot = el('div', 'chart-plot');
        card.append(cap, plot);
        entry = { card, plot, note, u: null, labelsKey: null };
        state.charts.set(model.column, entry);
      }
      // keep the DOM order of the columns
      const expectedNext = prev ? prev.card.nextSibling : els.charts.firstChild;
      if (expectedNext !== entry.card) els.charts.insertBefore(entry.card, expectedNext);
      prev = entry;

      entry.note.textContent = model.note;
      entry.card.dataset.points = String(model.points);
      entry.card.dataset.series = String(model.labels.length);
      if (model.points > 0) anyPoints = true;
      const labelsKey = JSON.stringify(model.labels);
      if (entry.u && entry.labelsKey === labelsKey) {
        entry.u.setData(model.data);
      } else {
        if (entry.u) entry.u.destroy();
        entry.labelsKey = labelsKey;
        makeChart(entry, model);
      }
    }
    if (!models.length) els.charts.dataset.ready = 'false';
    else markReady();
    els.chartSummary.textContent = models.length
      ? `${models.length} chart${models.length === 1 ? '' : 's'}${state.version != null ? ` · analysis v${state.version}` : ''}`
      : '';
    return anyPoints;
  }

  function resizeCharts() {
    for (const c of state.charts.values()) {
      if (!c.u) continue;
      const width = Math.max(280, c.plot.clientWidth);
      if (Math.abs(width - c.u.width) > 1) c.u.setSize({ width, height: CHART_HEIGHT });
    }
  }

  // ---------------------------------------------------------------- start

  function init() {
    const q = new URLSearchParams(location.search);
    setToken(q.get('token') || storedToken('localStorage', TOKEN_KEY));
    els.token.value = state.token;

    const def = lastDays(7);
    setDateInput(els.from, q.get('from') || def.from);
    setDateInput(els.to, q.get('to') || def.to);
    state.wantedAnalysis = (q.get('analysis') || '').trim();
    fillAnalyses(state.token ? 'loading analyses…' : 'enter a token to list analyses');

    els.form.addEventListener('submit', onSubmit);
    els.analysis.addEventListener('change', onFieldChange);
    for (const input of [els.from, els.to]) {
      input.addEventListener('input', () => { delete input.dataset.exact; });
      input.addEventListener('change', onFieldChange);
    }
    els.token.addEventListener('change', () => {
      if (setToken(els.token.value)) {
        loadAnalyses();
        if (state.watch) connect();
      }
    });
    els.invalidate.addEventListener('click', invalidateVisibleRange);
    els.messageClose.addEventListener('click', clearMessage);

    if (typeof ResizeObserver === 'function') {
      new ResizeObserver(() => resizeCharts()).observe(els.charts);
    } else {
      window.addEventListener('resize', resizeCharts);
    }
    setInterval(renderLastUpdate, 1000);

    loadAnalyses();
    const w = readForm();
    if (typeof uPlot !== 'function') {
      showMessage('error', 'The chart library did not load (assets/uPlot.iife.min.js).');
    }
    if (state.token && w.analysis && !validate(w)) {
      startWatch(w, true);
    } else {
      if (q.has('token')) updateUrl();
      render();
    }
  }

  init();
})();
