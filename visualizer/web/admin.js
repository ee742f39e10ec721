/*
 * Scholia operators' console (`GET /admin`).
 *
 * Everything here goes through the public API with an admin token (SPEC §5), sent as
 * `Authorization: Bearer`, and the websocket (SPEC §6) with `?token=`:
 *   - analyses, their versions, inputs and candidates        GET /v1/analyses
 *   - a partitions × analyses status map over a range        GET /v1/annotations/{a}?from=&to=
 *     kept live by one subscription per analysis (and per chunk of at most 2,000
 *     partitions), clicking a cell shows its builds         GET /v1/analyses/{a}/builds?partition=
 *   - invalidations with progress, cancel and retry          GET|DELETE /v1/invalidations[/{id}],
 *                                                             POST /v1/invalidations/{id}/retry
 *   - a new invalidation: the dry-run plan, then confirm     POST /v1/invalidations (dry_run)
 *   - a candidate: build, diff, promote, discard             /v1/analyses/{a}/candidate…
 *   - quarantine and schedules                               GET /v1/quarantine, /v1/schedules
 * Errors the API answers are shown as their `detail`, word for word. common.js
 * (`window.Scholia`) has what the console shares with the analysts' page.
 *
 * The map has one band per analysis and one cell per UTC day, weeks as columns and
 * weekdays as rows, so a year is 53 × 7 cells per analysis. An hourly analysis also gets
 * one cell per day: coloured by its worst hour and filled from the bottom by the share of
 * its hours that are ready; clicking it shows its 24 hours.
 *
 * DOM hooks that tests rely on:
 *   body[data-console="open"]                                 the token was accepted
 *   #map[data-loaded="true"]                                  every band has been read once
 *   #map .band[data-analysis] .cell[data-partition][data-status][data-generation]
 *   #tooltip                                                  the hover text of a cell
 *   #details-section[data-analysis][data-partition]           the clicked cell
 *   #builds[data-loaded="true"] tbody tr[data-outcome]        its builds
 *   #rows tbody tr                                            its current rows
 *   #invalidations li[data-id][data-state] .bar[data-progress] (0–100, done / total)
 *   #plan[data-ready="true"], #plan-confirm                   the dry run, and confirming it
 *   #analyses tr[data-analysis][data-version][data-candidate]
 *   #diff[data-ready="true"] tr[data-change]                  added | removed | changed rows
 *   #quarantine li[data-id], #schedules tr[data-schedule]
 *   #conn[data-state]                                         idle | connecting | live | down
 *   #message[data-kind] #message-text                         API errors and notices
 */
(function () {
  'use strict';

  const { $, DAY, el, pad2, dayKey, lastDays, replaceQuery, storedToken, storeToken, showMessage, clearMessage, setConn, request, LiveSocket } = window.Scholia;

  // ---------------------------------------------------------------- constants

  const TOKEN_KEY = 'scholia.console.token';
  /** The widest range the map shows: two years (and so 17,544 hours of an hourly analysis). */
  const MAX_DAYS = 731;
  /** Partitions per read and per subscription: the hub takes at most 2,000 per subscription. */
  const CHUNK_PARTITIONS = 2000;
  /** A socket holds at most 64 subscriptions. */
  const MAX_SUBSCRIPTIONS = 60;
  const STATUSES = ['ready', 'stale', 'missing', 'queued', 'running', 'failed'];
  /** Which status a day of an hourly analysis shows: its worst hour's. */
  const PRIORITY = { loading: 0, ready: 1, missing: 2, stale: 3, queued: 4, running: 5, failed: 6 };
  const ACTIVE_INVALIDATION = new Set(['pending', 'running']);
  const MAX_ROWS_SHOWN = 50;
  const MAX_DIFF_ROWS = 100;
  const WEEKDAYS = ['Mon', '', 'Wed', '', 'Fri', '', ''];
  const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

  // ---------------------------------------------------------------- elements

  const els = {
    gate: $('token-gate'),
    tokenForm: $('token-form'),
    token: $('token'),
    tokenError: $('token-error'),
    tokenChange: $('token-change'),
    console: $('console'),
    conn: $('conn'),
    messageClose: $('message-close'),
    rangeForm: $('range-form'),
    rangeFrom: $('range-from'),
    rangeTo: $('range-to'),
    live: $('live'),
    legend: $('legend'),
    map: $('map'),
    mapSummary: $('map-summary'),
    tooltip: $('tooltip'),
    details: $('details-section'),
    detailsName: $('details-name'),
    detailsClose: $('details-close'),
    detailsHours: $('details-hours'),
    detailsFacts: $('details-facts'),
    detailsError: $('details-error'),
    builds: $('builds'),
    buildsNote: $('builds-note'),
    rows: $('rows'),
    rowsNote: $('rows-note'),
    invalidations: $('invalidations'),
    invalidationsSummary: $('invalidations-summary'),
    invalidationsRefresh: $('invalidations-refresh'),
    invForm: $('inv-form'),
    invAnalysis: $('inv-analysis'),
    invFrom: $('inv-from'),
    invTo: $('inv-to'),
    invReason: $('inv-reason'),
    invCascade: $('inv-cascade'),
    invPlan: $('inv-plan'),
    plan: $('plan'),
    planSummary: $('plan-summary'),
    planTable: $('plan-table'),
    planNote: $('plan-note'),
    planConfirm: $('plan-confirm'),
    planDiscard: $('plan-discard'),
    analyses: $('analyses'),
    analysesSummary: $('analyses-summary'),
    analysesRefresh: $('analyses-refresh'),
    candidate: $('candidate-section'),
    candidateName: $('candidate-name'),
    candidateClose: $('candidate-close'),
    candidateDefinition: $('candidate-definition'),
    candidateBuildForm: $('candidate-build-form'),
    candFrom: $('cand-from'),
    candTo: $('cand-to'),
    candSample: $('cand-sample'),
    candBuildSample: $('cand-build-sample'),
    candDiff: $('cand-diff'),
    candPromote: $('cand-promote'),
    candDiscard: $('cand-discard'),
    diff: $('diff'),
    diffSummary: $('diff-summary'),
    diffBody: $('diff-body'),
    quarantine: $('quarantine'),
    quarantineSummary: $('quarantine-summary'),
    quarantineRefresh: $('quarantine-refresh'),
    quarantineMore: $('quarantine-more'),
    schedules: $('schedules'),
    schedulesSummary: $('schedules-summary'),
    schedulesRefresh: $('schedules-refresh'),
  };

  // ---------------------------------------------------------------- state

  const state = {
    token: '',
    analyses: [],            // GET /v1/analyses
    range: null,             // {from, to} of the map, 'YYYY-MM-DD'
    live: true,
    bands: new Map(),        // analysis -> Band
    chunks: [],              // [{analysis, from, to, loaded, subId}]
    mapGen: 0,               // bumps whenever the map is rebuilt: late answers are dropped
    layout: null,            // {first, days, weeks}
    everOpened: false,
    subSeq: 0,
    subs: new Map(),         // subscription id -> chunk
    selected: null,          // {analysis, day, hour}
    invalidations: [],
    invTimer: null,
    invListAt: 0,
    plan: null,              // {body, answer}
    candidate: null,         // {analysis, data}
    quarantineBefore: null,
    pollTimer: null,
    dirty: { legend: false, details: false, invalidations: false },
    dirtyTimer: null,
  };

  // ---------------------------------------------------------------- small utilities

  /** 'YYYY-MM-DD' → UTC ms, or null. */
  function dayMs(s) {
    const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(String(s || ''));
    if (!m) return null;
    const t = Date.UTC(+m[1], +m[2] - 1, +m[3]);
    return Number.isNaN(t) ? null : t;
  }

  function fmtNumber(v) {
    if (typeof v !== 'number' || !Number.isFinite(v)) return v == null ? '—' : String(v);
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e12 || a < 1e-4)) return v.toExponential(3);
    return v.toLocaleString('en-US', { maximumFractionDigits: a >= 100 ? 2 : 6 });
  }

  function fmtInt(v) {
    return typeof v === 'number' && Number.isFinite(v) ? Math.round(v).toLocaleString('en-US') : '—';
  }

  /** An RFC 3339 time as 'YYYY-MM-DD HH:MM:SS' (UTC), or a date alone at midnight. */
  function fmtTime(s) {
    if (s == null || s === '') return '—';
    const t = Date.parse(s);
    if (Number.isNaN(t)) return String(s);
    const iso = new Date(t).toISOString();
    if (iso.endsWith('T00:00:00.000Z')) return iso.slice(0, 10);
    return iso.slice(0, 19).replace('T', ' ');
  }

  function fmtDuration(ms) {
    if (typeof ms !== 'number' || !Number.isFinite(ms)) return '—';
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
    const h = Math.floor(m / 60);
    return `${h} h ${m - h * 60} min`;
  }

  function fmtSeconds(s) {
    return typeof s === 'number' && Number.isFinite(s) ? fmtDuration(s * 1000) : '—';
  }

  /** "in 3 h 20 min" / "5 min ago". */
  function fmtRelative(s) {
    const t = Date.parse(s);
    if (Number.isNaN(t)) return '';
    const d = t - Date.now();
    const text = fmtDuration(Math.abs(Math.round(d / 60000) * 60000)).replace(/ 0 s$/, '');
    if (Math.abs(d) < 60000) return d >= 0 ? 'in under a minute' : 'just now';
    return d >= 0 ? `in ${text}` : `${text} ago`;
  }

  function plural(n, word, many) {
    return `${fmtInt(n)} ${n === 1 ? word : (many || `${word}s`)}`;
  }

  function shortId(id) { return String(id || '').slice(0, 8); }

  function cellValue(v) {
    if (v == null) return '—';
    if (typeof v === 'number') return fmtNumber(v);
    if (typeof v === 'object') return JSON.stringify(v);
    return String(v);
  }

  function sameValue(a, b) {
    if (typeof a === 'number' && typeof b === 'number') return a === b || (Number.isNaN(a) && Number.isNaN(b));
    return JSON.stringify(a) === JSON.stringify(b);
  }

  /** A table from a header and rows of cells (strings or nodes). */
  function fillTable(table, header, rows) {
    const thead = el('thead');
    const tr = el('tr');
    for (const h of header) tr.append(typeof h === 'string' ? el('th', null, h) : h);
    thead.append(tr);
    const tbody = el('tbody');
    for (const r of rows) tbody.append(r);
    table.replaceChildren(thead, tbody);
  }

  function row(cells, attrs) {
    const tr = el('tr');
    for (const c of cells) {
      if (c instanceof Node) {
        if (c.tagName === 'TD' || c.tagName === 'TH') tr.append(c);
        else { const td = el('td'); td.append(c); tr.append(td); }
      } else {
        tr.append(el('td', null, c == null ? '—' : String(c)));
      }
    }
    if (attrs) for (const [k, v] of Object.entries(attrs)) tr.dataset[k] = v;
    return tr;
  }

  function emptyRow(table, colspan, text) {
    const tbody = table.tBodies[0] || table.appendChild(el('tbody'));
    const tr = el('tr', 'empty');
    const td = el('td', 'muted', text);
    td.colSpan = colspan;
    tr.append(td);
    tbody.append(tr);
  }

  function chip(status, text) {
    const c = el('span', 'chip', text || status);
    c.dataset.status = status;
    return c;
  }

  // ---------------------------------------------------------------- HTTP API

  // Messages (showMessage) give an API error's text as its `detail`, as the service wrote it.
  const API_TEXTS = {
    network: () => 'The service did not answer; check that it is running and reachable.',
    refusal: (json, text, resp) => (json && (json.detail || json.title)) || text.trim().slice(0, 500)
      || `The service answered ${resp.status} ${resp.statusText}.`,
  };

  /** Calls the API; a refusal throws with the problem's `detail` as its message. */
  async function api(method, path, body) {
    try {
      return await request(state.token, method, path, body, API_TEXTS);
    } catch (e) {
      if (e.status === 401) askForToken(e.message);
      throw e;
    }
  }

  function enc(s) { return encodeURIComponent(s); }

  // ---------------------------------------------------------------- token

  function askForToken(why) {
    els.gate.hidden = false;
    els.console.hidden = true;
    document.body.dataset.console = 'locked';
    els.tokenError.hidden = !why;
    els.tokenError.textContent = why || '';
    els.token.value = state.token;
    els.token.focus();
    closeSocket();
  }

  /** Checks the token against an admin-only endpoint, then opens the console. */
  async function tryToken(token) {
    state.token = token.trim();
    if (!state.token) {
      askForToken('Enter an admin token.');
      return;
    }
    els.tokenError.hidden = true;
    try {
      await api('GET', 'v1/invalidations');
    } catch (e) {
      if (e.status !== 401) askForToken(e.message);
      return;
    }
    storeToken('sessionStorage', TOKEN_KEY, state.token);
    els.gate.hidden = true;
    els.console.hidden = false;
    document.body.dataset.console = 'open';
    await openConsole();
  }

  // ---------------------------------------------------------------- the console

  let opened = false;

  async function openConsole() {
    if (!opened) {
      opened = true;
      // Four times a second: a rewind of a year of small days can finish within a second,
      // and its bar should still move. Only running invalidations are read between full reads.
      setInterval(tickInvalidations, 250);
      setInterval(() => { if (!state.live) reloadMap(); }, 10000);
      setInterval(renderScheduleTimes, 30000);
    }
    connect();
    await loadAnalyses();
    buildMap();
    loadInvalidations();
    loadQuarantine(false);
    loadSchedules();
  }

  // ---------------------------------------------------------------- analyses

  async function loadAnalyses() {
    try {
      const j = await api('GET', 'v1/analyses');
      state.analyses = (j && Array.isArray(j.analyses) ? j.analyses : []).filter((a) => a && a.name);
      state.analyses.sort((a, b) => a.name.localeCompare(b.name));
    } catch (e) {
      showMessage('error', 'Listing analyses', e.message);
      state.analyses = [];
    }
    renderAnalyses();
    fillInvalidationAnalyses();
  }

  function inputText(i) {
    if (!i || typeof i !== 'object') return String(i);
    const what = i.kind != null ? `kind ${i.kind}` : i.analysis != null ? `analysis ${i.analysis}` : JSON.stringify(i);
    return i.lookback ? `${what} (lookback ${i.lookback})` : what;
  }

  function candidateText(c) {
    if (!c) return null;
    const bits = [];
    if (c.version != null) bits.push(`v${c.version}`);
    if (typeof c.built === 'number') bits.push(`${plural(c.built, 'partition')} built`);
    else if (Array.isArray(c.built)) bits.push(`${plural(c.built.length, 'partition')} built`);
    else if (c.built === true) bits.push('built');
    else if (c.built === false) bits.push('not built yet');
    return bits.join(' · ') || 'registered';
  }

  function renderAnalyses() {
    const rows = state.analyses.map((a) => {
      const name = el('div');
      name.append(el('span', 'mono strong', a.name));
      if (a.description) name.append(el('div', 'muted small', a.description));
      const inputs = el('div');
      for (const i of Array.isArray(a.inputs) ? a.inputs : []) inputs.append(el('div', 'small', inputText(i)));
      const cand = el('div');
      if (a.candidate) {
        cand.append(el('span', 'badge', candidateText(a.candidate)));
        const b = el('button', 'small', 'Review…');
        b.type = 'button';
        b.dataset.action = 'candidate';
        b.dataset.analysis = a.name;
        cand.append(b);
      } else {
        cand.append(el('span', 'muted', '—'));
      }
      return row([
        name,
        a.version != null ? `v${a.version}` : '—',
        a.partition || '—',
        inputs,
        Array.isArray(a.downstream) && a.downstream.length ? a.downstream.join(', ') : '—',
        a.language || '—',
        cand,
      ], {
        analysis: a.name,
        version: String(a.version),
        candidate: a.candidate ? String(a.candidate.version != null ? a.candidate.version : 'yes') : '',
      });
    });
    fillTable(els.analyses, ['Analysis', 'Version', 'Partition', 'Inputs', 'Downstream', 'Language', 'Candidate'], rows);
    if (!rows.length) emptyRow(els.analyses, 7, 'No analyses are registered.');
    const candidates = state.analyses.filter((a) => a.candidate).length;
    els.analysesSummary.textContent = `${plural(state.analyses.length, 'analysis', 'analyses')}`
      + (candidates ? ` · ${plural(candidates, 'candidate')}` : '');
  }

  function fillInvalidationAnalyses() {
    const keep = els.invAnalysis.value;
    const options = [['*', '* (every analysis)']].concat(state.analyses.map((a) => [a.name, `${a.name} (${a.partition || '?'})`]));
    els.invAnalysis.replaceChildren(...options.map(([v, t]) => {
      const o = el('option', null, t);
      o.value = v;
      return o;
    }));
    if (keep && options.some(([v]) => v === keep)) els.invAnalysis.value = keep;
    else if (state.analyses.length) els.invAnalysis.value = state.analyses[0].name;
  }

  // ---------------------------------------------------------------- range

  function readRange() {
    const from = els.rangeFrom.value;
    const to = els.rangeTo.value;
    const f = dayMs(from);
    const t = dayMs(to);
    if (f == null || t == null) return { error: 'Give both dates of the range.' };
    if (t <= f) return { error: 'The range is empty: "to" must come after "from".' };
    const days = Math.round((t - f) / DAY);
    if (days > MAX_DAYS) return { error: `The map shows at most ${MAX_DAYS} days (two years); this range has ${fmtInt(days)}.` };
    return { from, to };
  }

  function setRange(r) {
    els.rangeFrom.value = r.from;
    els.rangeTo.value = r.to;
  }

  function updateUrl() {
    const q = new URLSearchParams(location.search);
    q.delete('token'); // never left in the address bar or history
    if (state.range) {
      q.set('from', state.range.from);
      q.set('to', state.range.to);
    }
    if (!state.live) q.set('live', '0');
    else q.delete('live');
    replaceQuery(q);
  }

  // ---------------------------------------------------------------- the status map: model

  /** One analysis' band: its cells by partition key. */
  function newBand(meta) {
    return {
      meta,
      hourly: meta.partition === '1h',
      cells: new Map(),      // partition key -> Cell
      dayEls: new Map(),     // day key -> cell element
      labelCounts: null,
      versionEl: null,
      loadedChunks: 0,
      chunkCount: 0,
      error: null,
    };
  }

  /** What a cell shows: a stale partition being rebuilt shows the rebuild. */
  function shownStatus(cell) {
    if (!cell) return 'loading';
    if (cell.status === 'stale' && (cell.rebuild === 'queued' || cell.rebuild === 'running')) return cell.rebuild;
    return STATUSES.includes(cell.status) ? cell.status : 'missing';
  }

  function hoursOf(day) {
    const out = [];
    for (let h = 0; h < 24; h += 1) out.push(`${day}T${pad2(h)}`);
    return out;
  }

  /** The status, counts and ready share of one day of a band. */
  function dayView(band, day) {
    if (!band.hourly) {
      const c = band.cells.get(day);
      const s = shownStatus(c);
      return { status: s, cell: c, counts: null, readyShare: s === 'ready' ? 1 : 0 };
    }
    const counts = {};
    let worst = 'loading';
    let ready = 0;
    let known = 0;
    let firstError = null;
    for (const key of hoursOf(day)) {
      const c = band.cells.get(key);
      const s = shownStatus(c);
      if (c) known += 1;
      counts[s] = (counts[s] || 0) + 1;
      if (s === 'ready') ready += 1;
      if (PRIORITY[s] > PRIORITY[worst]) worst = s;
      if (!firstError && c && c.error) firstError = { hour: key, error: c.error };
    }
    if (known === 0) worst = 'loading';
    return { status: worst, cell: null, counts, readyShare: ready / 24, firstError };
  }

  function applyPartition(band, p) {
    if (!p || typeof p.partition !== 'string') return;
    const old = band.cells.get(p.partition);
    const cell = {
      status: String(p.status || 'missing'),
      rebuild: p.rebuild || null,
      generation: p.generation != null ? p.generation : null,
      version: p.version != null ? p.version : null,
      computed_at: p.computed_at || null,
      error: p.error || null,
      rows: Array.isArray(p.rows) ? p.rows : (old ? old.rows : null),
    };
    // A failure's text stays readable while the partition is tried again.
    if (!cell.error && old && old.error && cell.status !== 'ready') cell.error = old.error;
    band.cells.set(p.partition, cell);
  }

  // ---------------------------------------------------------------- the status map: layout

  function buildMap() {
    const r = readRange();
    if (r.error) {
      showMessage('error', 'Status map', r.error);
      return;
    }
    state.range = r;
    state.live = els.live.checked;
    updateUrl();
    state.mapGen += 1;
    unsubscribeAll();
    state.bands = new Map();
    state.chunks = [];
    const first = dayMs(r.from);
    const days = Math.round((dayMs(r.to) - first) / DAY);
    const firstMonday = first - ((new Date(first).getUTCDay() + 6) % 7) * DAY;
    const weeks = Math.floor((first + (days - 1) * DAY - firstMonday) / (7 * DAY)) + 1;
    state.layout = { first, days, firstMonday, weeks };

    const frag = document.createDocumentFragment();
    frag.append(monthHeader());
    for (const a of state.analyses) {
      const band = newBand(a);
      state.bands.set(a.name, band);
      frag.append(bandElement(band));
      const perChunk = band.hourly ? Math.floor(CHUNK_PARTITIONS / 24) : CHUNK_PARTITIONS;
      for (let d = 0; d < days; d += perChunk) {
        state.chunks.push({
          analysis: a.name,
          from: dayKey(first + d * DAY),
          to: dayKey(first + Math.min(days, d + perChunk) * DAY),
          loaded: false,
          subId: null,
        });
        band.chunkCount += 1;
      }
    }
    if (!state.analyses.length) frag.append(el('p', 'muted', 'No analyses are registered.'));
    els.map.replaceChildren(frag);
    els.map.dataset.loaded = 'false';
    els.map.dataset.days = String(days);
    els.map.dataset.weeks = String(weeks);
    sizeMap();
    renderLegend();
    loadChunks(state.mapGen, state.chunks);
    if (state.selected && !state.bands.has(state.selected.analysis)) closeDetails();
  }

  /** Month names over the week columns where a month starts. */
  function monthHeader() {
    const { first, days, firstMonday } = state.layout;
    const head = el('div', 'map-head');
    head.append(el('div', 'band-label'), el('div'));
    const grid = el('div', 'months');
    let lastCol = -10;
    let lastYear = null;
    for (let d = 0; d < days; d += 1) {
      const ms = first + d * DAY;
      const date = new Date(ms);
      if (d !== 0 && date.getUTCDate() !== 1) continue;
      const col = Math.floor((ms - firstMonday) / (7 * DAY));
      if (col - lastCol < 3 && d !== 0) continue;
      const year = date.getUTCFullYear();
      const label = el('span', 'month', MONTHS[date.getUTCMonth()] + (year !== lastYear ? ` ${year}` : ''));
      label.style.gridColumn = `${col + 1} / span 4`;
      grid.append(label);
      lastCol = col;
      lastYear = year;
    }
    head.append(grid);
    return head;
  }

  function bandElement(band) {
    const { first, days, firstMonday } = state.layout;
    const wrap = el('div', 'band');
    wrap.dataset.analysis = band.meta.name;
    wrap.dataset.partition = band.meta.partition || '1d';
    const label = el('div', 'band-label');
    const name = el('button', 'band-name mono', band.meta.name);
    name.type = 'button';
    name.title = 'Rewind a range of this analysis…';
    name.dataset.action = 'rewind-analysis';
    name.dataset.analysis = band.meta.name;
    const meta = el('span', 'band-meta muted');
    band.versionEl = el('span', null, `v${band.meta.version}`);
    meta.append(band.versionEl, document.createTextNode(band.hourly ? ' · hourly, per day' : ' · daily'));
    if (band.meta.candidate) meta.append(el('span', 'badge small', 'candidate'));
    band.labelCounts = el('span', 'band-counts small', 'reading…');
    label.append(name, meta, band.labelCounts);
    const weekdays = el('div', 'weekdays');
    for (const w of WEEKDAYS) weekdays.append(el('span', null, w));
    const grid = el('div', 'cells');
    for (let d = 0; d < days; d += 1) {
      const ms = first + d * DAY;
      const key = dayKey(ms);
      const cell = el('button', 'cell');
      cell.type = 'button';
      cell.dataset.analysis = band.meta.name;
      cell.dataset.partition = key;
      cell.dataset.status = 'loading';
      cell.style.gridColumn = String(Math.floor((ms - firstMonday) / (7 * DAY)) + 1);
      cell.style.gridRow = String(((new Date(ms).getUTCDay() + 6) % 7) + 1);
      band.dayEls.set(key, cell);
      grid.append(cell);
    }
    wrap.append(label, weekdays, grid);
    return wrap;
  }

  /** Cells as large as the width allows (up to 22 px), never under 8 px (the map scrolls). */
  function sizeMap() {
    if (!state.layout) return;
    const width = els.map.clientWidth || 800;
    const narrow = width < 720;
    els.map.classList.toggle('narrow', narrow);
    const label = narrow ? 0 : 210;
    const gap = state.layout.weeks > 30 ? 2 : 3;
    const size = Math.max(8, Math.min(22, Math.floor((width - label - 34) / state.layout.weeks) - gap));
    els.map.style.setProperty('--cell', `${size}px`);
    els.map.style.setProperty('--gap', `${gap}px`);
    els.map.style.setProperty('--weeks', String(state.layout.weeks));
    els.map.classList.toggle('numbered', size >= 20 && state.layout.days <= 62);
  }

  // ---------------------------------------------------------------- the status map: reading

  /** Reads the chunks two at a time; each is subscribed once read (when live). */
  async function loadChunks(gen, chunks) {
    const queue = chunks.slice();
    const worker = async () => {
      while (queue.length && gen === state.mapGen) {
        const chunk = queue.shift();
        await loadChunk(gen, chunk);
      }
    };
    await Promise.all([worker(), worker()]);
    if (gen === state.mapGen) {
      els.map.dataset.loaded = 'true';
      renderMapSummary();
    }
  }

  async function loadChunk(gen, chunk) {
    const band = state.bands.get(chunk.analysis);
    if (!band) return;
    try {
      const j = await api('GET', `v1/annotations/${enc(chunk.analysis)}?from=${chunk.from}&to=${chunk.to}`);
      if (gen !== state.mapGen) return;
      if (j && j.version != null && j.version !== band.meta.version) {
        band.meta.version = j.version;
        band.versionEl.textContent = `v${j.version}`;
      }
      for (const p of (j && Array.isArray(j.partitions) ? j.partitions : [])) applyPartition(band, p);
      band.error = null;
    } catch (e) {
      if (gen !== state.mapGen) return;
      band.error = e.message;
    }
    chunk.loaded = true;
    band.loadedChunks += 1;
    renderChunk(band, chunk);
    if (state.live) subscribe(chunk);
  }

  /** Reads the whole map again, keeping its cells (after a reconnection, or when not live). */
  function reloadMap() {
    if (!state.layout || !state.chunks.length) return;
    const gen = state.mapGen;
    for (const c of state.chunks) c.loaded = false;
    loadChunks(gen, state.chunks.filter(() => true));
  }

  // ---------------------------------------------------------------- the status map: drawing

  function renderChunk(band, chunk) {
    const f = dayMs(chunk.from);
    const t = dayMs(chunk.to);
    for (let ms = f; ms < t; ms += DAY) renderDay(band, dayKey(ms));
    renderBandCounts(band);
    markDirty('legend');
  }

  function renderDay(band, day) {
    const e = band.dayEls.get(day);
    if (!e) return;
    const v = dayView(band, day);
    e.dataset.status = v.status;
    if (band.hourly) {
      e.dataset.hoursReady = String(Math.round(v.readyShare * 24));
      const mixed = v.status !== 'ready' && v.readyShare > 0;
      e.classList.toggle('mixed', mixed);
      e.style.setProperty('--share', `${Math.round(v.readyShare * 100)}%`);
      e.dataset.generation = '';
    } else {
      e.dataset.generation = v.cell && v.cell.generation != null ? String(v.cell.generation) : '';
    }
    e.textContent = '';
    const num = el('span', 'num', String(new Date(dayMs(day)).getUTCDate()));
    e.append(num);
    e.setAttribute('aria-label', `${band.meta.name} ${day}: ${v.status}`);
  }

  function renderBandCounts(band) {
    const counts = {};
    for (const day of band.dayEls.keys()) {
      const s = dayView(band, day).status;
      counts[s] = (counts[s] || 0) + 1;
    }
    const parts = [];
    for (const s of ['failed', 'running', 'queued', 'stale', 'missing', 'ready']) {
      if (counts[s]) parts.push(`${fmtInt(counts[s])} ${s}`);
    }
    if (band.error) {
      band.labelCounts.textContent = band.error;
      band.labelCounts.classList.add('error-text');
      band.labelCounts.title = band.error;
    } else {
      band.labelCounts.classList.remove('error-text');
      band.labelCounts.textContent = band.loadedChunks < band.chunkCount
        ? 'reading…' : (parts.join(' · ') || '—');
      band.labelCounts.title = band.hourly ? 'days, each counted by its worst hour' : 'days';
    }
  }

  function renderLegend() {
    const totals = {};
    for (const band of state.bands.values()) {
      for (const c of band.cells.values()) {
        const s = shownStatus(c);
        totals[s] = (totals[s] || 0) + 1;
      }
    }
    const items = STATUSES.map((s) => {
      const item = el('span', 'legend-item');
      item.dataset.status = s;
      const sw = el('span', 'swatch');
      sw.dataset.status = s;
      item.append(sw, el('span', null, s), el('span', 'muted', fmtInt(totals[s] || 0)));
      return item;
    });
    const mixed = el('span', 'legend-item');
    const sw = el('span', 'swatch mixed');
    sw.dataset.status = 'queued';
    mixed.append(sw, el('span', null, 'hourly day, partly ready'));
    items.push(mixed);
    els.legend.replaceChildren(...items);
    els.legend.title = 'Counts are partitions (an hourly analysis counts hours).';
  }

  function renderMapSummary() {
    if (!state.range) return;
    const days = state.layout ? state.layout.days : 0;
    els.mapSummary.textContent = `${state.range.from} to ${state.range.to} (exclusive) · ${plural(days, 'day')} × `
      + `${plural(state.bands.size, 'analysis', 'analyses')}`
      + (state.live ? ' · live' : ' · read every 10 s');
  }

  // ---------------------------------------------------------------- tooltip

  function tooltipText(band, day) {
    const v = dayView(band, day);
    const lines = [];
    if (!band.hourly) {
      const c = v.cell;
      lines.push(`${band.meta.name} · ${day}`);
      let line = v.status;
      if (c && c.status === 'stale' && v.status !== 'stale') line += ' (stale, rebuild under way)';
      if (c && c.generation != null) line += ` · generation ${c.generation}`;
      if (c && c.version != null) line += ` · built by v${c.version}`;
      lines.push(line);
      if (c && c.computed_at) lines.push(`computed ${fmtTime(c.computed_at)}`);
      if (c && Array.isArray(c.rows) && c.status !== 'missing') lines.push(plural(c.rows.length, 'row'));
      if (c && c.error) lines.push({ error: `${v.status === 'failed' ? 'Error' : 'Last error'}: ${c.error}` });
      lines.push({ hint: 'Click for its builds.' });
    } else {
      lines.push(`${band.meta.name} · ${day} · 24 hours`);
      const parts = [];
      for (const s of ['failed', 'running', 'queued', 'stale', 'missing', 'ready', 'loading']) {
        if (v.counts[s]) parts.push(`${v.counts[s]} ${s}`);
      }
      lines.push(parts.join(' · '));
      if (v.firstError) lines.push({ error: `${v.firstError.hour}: ${v.firstError.error}` });
      lines.push({ hint: 'Click for its hours and their builds.' });
    }
    return lines;
  }

  function showTooltip(target, x, y) {
    const band = state.bands.get(target.dataset.analysis);
    if (!band) return;
    const lines = tooltipText(band, target.dataset.partition);
    const nodes = lines.map((l, i) => {
      if (typeof l === 'string') return el('div', i === 0 ? 'tip-title' : null, l);
      if (l.error) return el('div', 'tip-error', l.error);
      return el('div', 'tip-hint', l.hint);
    });
    els.tooltip.replaceChildren(...nodes);
    els.tooltip.dataset.analysis = band.meta.name;
    els.tooltip.dataset.partition = target.dataset.partition;
    els.tooltip.hidden = false;
    const r = els.tooltip.getBoundingClientRect();
    const vw = document.documentElement.clientWidth;
    const vh = document.documentElement.clientHeight;
    let left = x + 14;
    let top = y + 16;
    if (left + r.width > vw - 8) left = Math.max(8, x - r.width - 14);
    if (top + r.height > vh - 8) top = Math.max(8, y - r.height - 16);
    els.tooltip.style.left = `${left}px`;
    els.tooltip.style.top = `${top}px`;
  }

  function hideTooltip() { els.tooltip.hidden = true; }

  // ---------------------------------------------------------------- details of a partition

  function selectCell(analysis, day, hour) {
    const band = state.bands.get(analysis);
    if (!band) return;
    if (band.hourly && !hour) {
      const v = dayView(band, day);
      hour = v.firstError ? v.firstError.hour : null;
    }
    state.selected = { analysis, day, hour: hour || null };
    for (const e of els.map.querySelectorAll('.cell.selected')) e.classList.remove('selected');
    const e = band.dayEls.get(day);
    if (e) e.classList.add('selected');
    renderDetails(true);
    els.details.hidden = false;
    els.details.scrollIntoView({ block: 'nearest' });
  }

  function closeDetails() {
    state.selected = null;
    els.details.hidden = true;
    for (const e of els.map.querySelectorAll('.cell.selected')) e.classList.remove('selected');
  }

  function renderDetails(fetchBuilds) {
    const sel = state.selected;
    if (!sel) return;
    const band = state.bands.get(sel.analysis);
    if (!band) return;
    const key = band.hourly ? sel.hour : sel.day;
    els.details.dataset.analysis = sel.analysis;
    els.details.dataset.partition = key || sel.day;
    els.detailsName.textContent = `${sel.analysis} · ${key || `${sel.day} (choose an hour)`}`;

    // The hours of an hourly day.
    if (band.hourly) {
      const hours = hoursOf(sel.day).map((h) => {
        const c = band.cells.get(h);
        const b = el('button', 'cell hour', h.slice(11));
        b.type = 'button';
        b.dataset.analysis = sel.analysis;
        b.dataset.partition = h;
        b.dataset.status = shownStatus(c);
        b.dataset.generation = c && c.generation != null ? String(c.generation) : '';
        b.dataset.action = 'hour';
        b.title = `${h}: ${shownStatus(c)}${c && c.generation != null ? ` · generation ${c.generation}` : ''}${c && c.error ? `\n${c.error}` : ''}`;
        if (h === sel.hour) b.classList.add('selected');
        return b;
      });
      els.detailsHours.replaceChildren(...hours);
      els.detailsHours.hidden = false;
    } else {
      els.detailsHours.hidden = true;
    }

    const cell = key ? band.cells.get(key) : null;
    const facts = [];
    if (key) {
      const status = shownStatus(cell);
      const st = el('dd');
      st.append(chip(status));
      if (cell && cell.status === 'stale' && status !== 'stale') st.append(el('span', 'muted', ' stale, rebuild under way'));
      facts.push(['Status', st]);
      facts.push(['Generation', cell && cell.generation != null ? String(cell.generation) : '—']);
      facts.push(['Built by', cell && cell.version != null ? `v${cell.version}` : '—']);
      facts.push(['Analysis is', `v${band.meta.version}`]);
      facts.push(['Computed', cell ? fmtTime(cell.computed_at) : '—']);
    }
    const dl = [];
    for (const [k, v] of facts) {
      dl.push(el('dt', null, k));
      dl.push(v instanceof Node ? v : el('dd', null, v));
    }
    const actions = el('dd', 'facts-actions');
    const rewind = el('button', 'small', 'Rewind this partition…');
    rewind.type = 'button';
    rewind.dataset.action = 'rewind-partition';
    actions.append(rewind);
    dl.push(el('dt', null, ''), actions);
    els.detailsFacts.replaceChildren(...dl);

    const error = cell && cell.error;
    els.detailsError.hidden = !error;
    els.detailsError.textContent = error ? `${shownStatus(cell) === 'failed' ? 'Error' : 'Last error'}: ${error}` : '';

    renderRows(cell);
    if (fetchBuilds) loadBuilds(sel.analysis, key);
  }

  function renderRows(cell) {
    const rows = cell && Array.isArray(cell.rows) ? cell.rows : [];
    const cols = [];
    for (const r of rows.slice(0, MAX_ROWS_SHOWN)) {
      if (r && typeof r === 'object') for (const k of Object.keys(r)) if (!cols.includes(k)) cols.push(k);
    }
    const trs = rows.slice(0, MAX_ROWS_SHOWN).map((r) => row(cols.map((c) => cellValue(r ? r[c] : null))));
    fillTable(els.rows, cols.length ? cols : ['rows'], trs);
    if (!trs.length) emptyRow(els.rows, Math.max(1, cols.length), cell && cell.status === 'ready' ? 'No rows.' : 'Nothing built yet.');
    els.rowsNote.textContent = rows.length > MAX_ROWS_SHOWN
      ? `first ${MAX_ROWS_SHOWN} of ${fmtInt(rows.length)}` : (rows.length ? plural(rows.length, 'row') : '');
  }

  let buildsSeq = 0;

  async function loadBuilds(analysis, key) {
    const seq = ++buildsSeq;
    els.builds.dataset.loaded = 'false';
    if (!key) {
      fillTable(els.builds, ['Builds'], []);
      emptyRow(els.builds, 1, 'Choose an hour above for its builds.');
      els.buildsNote.textContent = '';
      els.builds.dataset.loaded = 'true';
      return;
    }
    let builds;
    try {
      const j = await api('GET', `v1/analyses/${enc(analysis)}/builds?partition=${enc(key)}`);
      builds = j && Array.isArray(j.builds) ? j.builds : [];
    } catch (e) {
      if (seq !== buildsSeq) return;
      fillTable(els.builds, ['Builds'], []);
      emptyRow(els.builds, 1, e.message);
      els.builds.querySelector('td').classList.add('error-text');
      els.buildsNote.textContent = '';
      els.builds.dataset.loaded = 'error';
      return;
    }
    if (seq !== buildsSeq) return;
    const trs = builds.map((b) => {
      const outcome = String(b.outcome || (b.error ? 'failed' : 'built'));
      const err = el('div', 'build-error', b.error || '');
      const rowsText = `${fmtInt(b.rows_read)} → ${fmtInt(b.rows_written)}`;
      return row([
        fmtTime(b.finished_at || b.started_at),
        chip(outcome === 'failed' ? 'failed' : outcome === 'built' || outcome === 'ok' || outcome === 'succeeded' ? 'ready' : 'queued', outcome),
        b.version != null ? `v${b.version}` : '—',
        b.generation != null ? String(b.generation) : '—',
        b.attempt != null ? String(b.attempt) : '—',
        rowsText,
        fmtDuration(b.duration_ms),
        b.worker || '—',
        err,
      ], { outcome, id: String(b.id != null ? b.id : '') });
    });
    fillTable(els.builds, ['Finished', 'Outcome', 'Version', 'Generation', 'Attempt', 'Rows read → written', 'Duration', 'Worker', 'Error'], trs);
    if (!trs.length) emptyRow(els.builds, 9, 'No builds recorded for this partition.');
    els.buildsNote.textContent = trs.length ? `newest first · ${plural(trs.length, 'build')}` : '';
    els.builds.dataset.loaded = 'true';
  }

  // ---------------------------------------------------------------- websocket

  const socket = new LiveSocket({
    open() {
      setConn('live', state.live ? 'live' : 'connected (not live)');
      const again = state.everOpened;
      state.everOpened = true;
      if (again) {
        reloadMap(); // what changed while the socket was down; each chunk subscribes once read
      } else {
        for (const c of state.chunks) if (c.loaded && state.live) subscribe(c);
      }
    },
    message: onMessage,
    closed: forgetSubscriptions,
    retry: connect,
  });

  function send(obj) { return socket.send(obj); }

  /** The socket's subscriptions are gone (it closed, or they were ended). */
  function forgetSubscriptions() {
    state.subs.clear();
    for (const c of state.chunks) c.subId = null;
  }

  function closeSocket() {
    socket.close('closing');
    forgetSubscriptions();
    setConn('idle', 'not connected');
  }

  function connect() {
    closeSocket();
    if (!state.token) return;
    socket.open(state.token);
  }

  function subscribe(chunk) {
    if (!state.live || chunk.subId || !socket.isOpen()) return;
    if (state.subs.size >= MAX_SUBSCRIPTIONS) {
      if (state.warnedGen !== state.mapGen) {
        state.warnedGen = state.mapGen;
        showMessage('info', 'Live updates', `One socket holds at most ${MAX_SUBSCRIPTIONS} subscriptions, so part of the map is not live; choose a shorter range for hourly analyses.`);
      }
      return;
    }
    const id = `m${state.mapGen}-${++state.subSeq}`;
    if (send({ op: 'subscribe', id, analysis: chunk.analysis, from: chunk.from, to: chunk.to })) {
      chunk.subId = id;
      state.subs.set(id, chunk);
    }
  }

  function unsubscribeAll() {
    for (const id of state.subs.keys()) send({ op: 'unsubscribe', id });
    forgetSubscriptions();
  }

  /** Sets the cells of `keys` (a message's partitions) for which `applies(cell)` to `next(cell)`. */
  function updateCells(band, keys, touched, applies, next) {
    for (const k of Array.isArray(keys) ? keys : []) {
      const key = String(k);
      const c = band.cells.get(key);
      if (applies(c)) {
        band.cells.set(key, next(c));
        touched.push(key);
      }
    }
  }

  function onMessage(msg) {
    const chunk = msg.sub != null ? state.subs.get(msg.sub) : null;
    if (msg.type === 'error') {
      showMessage('error', chunk ? `Live updates of ${chunk.analysis}` : 'Live updates', String(msg.message || 'The service refused a message.'));
      return;
    }
    if (!chunk) return; // an old subscription's late message
    const band = state.bands.get(chunk.analysis);
    if (!band) return;
    const touched = [];
    switch (msg.type) {
      case 'partition':
        applyPartition(band, {
          partition: String(msg.partition),
          status: msg.status || 'ready',
          generation: msg.generation,
          version: msg.version,
          computed_at: msg.computed_at,
          rows: Array.isArray(msg.rows) ? msg.rows : [],
          error: null,
        });
        touched.push(String(msg.partition));
        if (msg.version != null && msg.version > band.meta.version) {
          band.meta.version = msg.version;
          band.versionEl.textContent = `v${msg.version}`;
        }
        break;
      case 'status': {
        const key = String(msg.partition);
        const c = band.cells.get(key) || { status: 'missing', rows: null };
        const next = Object.assign({}, c, { status: String(msg.status), rebuild: null });
        if (msg.error) next.error = String(msg.error);
        band.cells.set(key, next);
        touched.push(key);
        break;
      }
      case 'waiting':
        // The server asked for these to be built: those that were missing or stale are queued.
        updateCells(band, msg.partitions, touched,
          (c) => !c || c.status === 'missing' || (c.status === 'stale' && !c.rebuild),
          (c) => Object.assign({ rows: null, generation: null, version: null, error: null }, c || {}, { status: 'queued', rebuild: null }));
        break;
      case 'invalidated':
        updateCells(band, msg.partitions, touched,
          (c) => c && c.status !== 'missing',
          (c) => Object.assign({}, c, { status: 'stale', rebuild: null }));
        break;
      case 'resync':
        // We missed updates: read this chunk again and subscribe anew.
        state.subs.delete(chunk.subId);
        send({ op: 'unsubscribe', id: chunk.subId });
        chunk.subId = null;
        loadChunk(state.mapGen, chunk);
        return;
      default:
        return; // 'ready', and types this console does not know
    }
    const days = new Set(touched.map((k) => k.slice(0, 10)));
    for (const day of days) renderDay(band, day);
    renderBandCounts(band);
    markDirty('legend');
    markDirty('invalidations');
    if (state.selected && state.selected.analysis === band.meta.name && days.has(state.selected.day)) markDirty('details');
    if (msg.type === 'partition' && state.candidate && state.candidate.analysis === band.meta.name) markDirty('analyses');
  }

  /** Coalesces redraws that many messages in a row ask for. */
  function markDirty(what) {
    state.dirty[what] = true;
    if (state.dirtyTimer) return;
    state.dirtyTimer = setTimeout(() => {
      state.dirtyTimer = null;
      const d = state.dirty;
      state.dirty = { legend: false, details: false, invalidations: false };
      if (d.legend) renderLegend();
      if (d.details) renderDetails(true);
      if (d.invalidations) refreshActiveInvalidations();
    }, 300);
  }

  // ---------------------------------------------------------------- invalidations

  async function loadInvalidations() {
    state.invListAt = Date.now();
    try {
      const j = await api('GET', 'v1/invalidations');
      state.invalidations = j && Array.isArray(j.invalidations) ? j.invalidations : [];
    } catch (e) {
      els.invalidations.replaceChildren(el('li', 'error-text', e.message));
      return;
    }
    renderInvalidations();
  }

  let refreshing = false;

  async function refreshActiveInvalidations() {
    if (refreshing) return;
    const active = state.invalidations.filter((i) => ACTIVE_INVALIDATION.has(i.state)).slice(0, 8);
    if (!active.length) return;
    refreshing = true;
    try {
      await Promise.all(active.map(async (inv) => {
        try {
          const p = await api('GET', `v1/invalidations/${enc(inv.id)}`);
          const at = state.invalidations.findIndex((x) => x.id === inv.id);
          if (at >= 0 && p) state.invalidations[at] = Object.assign({}, state.invalidations[at], p);
        } catch (_) { /* shown on the next full read */ }
      }));
    } finally {
      refreshing = false;
    }
    renderInvalidations();
  }

  /** Active invalidations every second; the whole list every 15 s. */
  function tickInvalidations() {
    if (document.body.dataset.console !== 'open') return;
    if (Date.now() - state.invListAt > 15000) loadInvalidations();
    else refreshActiveInvalidations();
  }

  function rangeText(from, to) {
    return `${fmtTime(from)} → ${fmtTime(to)}`;
  }

  function renderInvalidations() {
    const items = state.invalidations.map((inv) => {
      const li = el('li', 'inv');
      li.dataset.id = inv.id;
      li.dataset.state = inv.state;
      const total = Number(inv.partitions_total) || 0;
      const done = Number(inv.partitions_done) || 0;
      const failed = Number(inv.partitions_failed) || 0;
      const cancelled = Number(inv.partitions_cancelled) || 0;
      const pct = total > 0 ? Math.floor((done * 100) / total) : (inv.state === 'done' ? 100 : 0);

      const head = el('div', 'inv-head');
      head.append(chip(stateStatus(inv.state), inv.state), el('strong', 'mono', inv.analysis),
        el('span', null, rangeText(inv.from, inv.to)),
        el('span', 'muted', `${inv.rebuild || ''}${inv.actor ? ` · by ${inv.actor}` : ''}`),
        el('span', 'muted push mono small', shortId(inv.id)));
      li.append(head);
      if (inv.reason) li.append(el('div', 'inv-reason muted', inv.reason));
      if (inv.retry_of) li.append(el('div', 'muted small', `retry of ${shortId(inv.retry_of)}`));

      const bar = el('div', 'bar');
      bar.setAttribute('role', 'progressbar');
      bar.setAttribute('aria-valuemin', '0');
      bar.setAttribute('aria-valuemax', '100');
      bar.setAttribute('aria-valuenow', String(pct));
      bar.dataset.progress = String(pct);
      const seg = (cls, n) => {
        const s = el('span', cls);
        s.style.width = `${total > 0 ? (n * 100) / total : 0}%`;
        return s;
      };
      bar.append(seg('bar-done', done), seg('bar-failed', failed), seg('bar-cancelled', cancelled));
      li.append(bar);

      const foot = el('div', 'inv-foot');
      const parts = [`${fmtInt(done)} of ${plural(total, 'partition')} rebuilt (${pct}%)`];
      if (failed) parts.push(`${fmtInt(failed)} failed`);
      if (cancelled) parts.push(`${fmtInt(cancelled)} cancelled`);
      foot.append(el('span', 'inv-counts', parts.join(' · ')), el('span', 'muted small', fmtTime(inv.created_at)));
      const buttons = el('span', 'push row-actions');
      // A button already on the page is moved into the new row, not drawn anew: a click
      // that lands while progress redraws the list must reach the button it began on.
      const button = (action, cls, label) => {
        const old = [...els.invalidations.querySelectorAll(`button[data-action="${action}"]`)]
          .find((b) => b.dataset.id === inv.id);
        const b = old || el('button', cls, label);
        if (!old) {
          b.type = 'button';
          b.dataset.action = action;
          b.dataset.id = inv.id;
        } else if (!b.classList.contains('armed')) {
          b.textContent = label;
        }
        b.dataset.label = label;
        buttons.append(b);
      };
      if (ACTIVE_INVALIDATION.has(inv.state)) button('cancel', 'small danger', 'Cancel');
      if (failed > 0 && !ACTIVE_INVALIDATION.has(inv.state)) {
        button('retry', 'small', `Retry ${plural(failed, 'failed partition')}`);
      }
      foot.append(buttons);
      li.append(foot);
      return li;
    });
    els.invalidations.replaceChildren(...items);
    if (!items.length) els.invalidations.append(el('li', 'muted empty', 'No invalidations yet.'));
    for (const b of els.invalidations.querySelectorAll('button[data-action]')) {
      if (isArmed(`${b.dataset.action}:${b.dataset.id}`)) showArmed(b, invalidationLabel(b.dataset.action));
    }
    const active = state.invalidations.filter((i) => ACTIVE_INVALIDATION.has(i.state)).length;
    els.invalidationsSummary.textContent = `${plural(state.invalidations.length, 'recent invalidation')}`
      + (active ? ` · ${fmtInt(active)} active` : '');
  }

  function stateStatus(s) {
    switch (s) {
      case 'done': return 'ready';
      case 'running': return 'running';
      case 'pending': return 'queued';
      case 'failed': return 'failed';
      default: return 'missing';
    }
  }

  /**
   * Two steps for what cannot be undone: the first click arms the action (its button asks
   * to confirm), a second one within 6 s acts. Kept by key, so redraws keep it armed.
   */
  const armed = { key: null, until: 0, timer: null };

  function isArmed(key) { return armed.key === key && Date.now() < armed.until; }

  function showArmed(button, label) {
    if (!button.dataset.label) button.dataset.label = button.textContent;
    button.classList.add('armed');
    button.textContent = label;
  }

  function disarm(button) {
    button.classList.remove('armed');
    if (button.dataset.label) button.textContent = button.dataset.label;
  }

  /** True when `key` was armed: act. Otherwise arm it and say so on the button. */
  function confirmTwice(button, key, label) {
    if (isArmed(key)) {
      armed.key = null;
      disarm(button);
      return true;
    }
    for (const b of document.querySelectorAll('button.armed')) disarm(b);
    armed.key = key;
    armed.until = Date.now() + 6000;
    showArmed(button, label);
    clearTimeout(armed.timer);
    armed.timer = setTimeout(() => {
      armed.key = null;
      for (const b of document.querySelectorAll('button.armed')) disarm(b);
    }, 6000);
    return false;
  }

  function invalidationLabel(action) {
    return action === 'cancel' ? 'Really cancel? Click again' : 'Retry them? Click again';
  }

  async function onInvalidationAction(button) {
    const id = button.dataset.id;
    const key = `${button.dataset.action}:${id}`;
    if (!confirmTwice(button, key, invalidationLabel(button.dataset.action))) return;
    button.disabled = true;
    try {
      if (button.dataset.action === 'cancel') {
        const p = await api('DELETE', `v1/invalidations/${enc(id)}`);
        showMessage('info', 'Cancelled', `Invalidation ${shortId(id)} is ${p && p.state ? p.state : 'cancelled'}: no new build starts for it.`);
      } else {
        const r = await api('POST', `v1/invalidations/${enc(id)}/retry`);
        const n = r && (Array.isArray(r.partitions) ? r.partitions.length : r.partitions);
        showMessage('info', 'Retry', `Rebuilding ${n != null ? plural(Number(n), 'failed partition') : 'the failed partitions'} of ${shortId(id)} as invalidation ${shortId(r && r.id)}.`);
      }
    } catch (e) {
      showMessage('error', button.dataset.action === 'cancel' ? 'Cancelling' : 'Retrying', e.message);
    } finally {
      button.disabled = false;
    }
    await loadInvalidations();
  }

  // ---------------------------------------------------------------- new invalidation: plan, then confirm

  function invalidationBody() {
    const rebuild = (els.invForm.querySelector('input[name="inv-rebuild"]:checked') || {}).value || 'eager';
    const body = {
      analysis: els.invAnalysis.value,
      from: els.invFrom.value,
      to: els.invTo.value,
      rebuild,
      cascade: els.invCascade.checked,
    };
    const reason = els.invReason.value.trim();
    if (reason) body.reason = reason;
    return body;
  }

  function discardPlan() {
    state.plan = null;
    els.plan.hidden = true;
    els.plan.dataset.ready = 'false';
  }

  async function onPlan(ev) {
    ev.preventDefault();
    discardPlan();
    const body = invalidationBody();
    if (!body.analysis) { showMessage('error', 'Plan', 'Choose an analysis, or * for every analysis.'); return; }
    if (!body.from || !body.to) { showMessage('error', 'Plan', 'Give both dates of the range.'); return; }
    els.invPlan.disabled = true;
    try {
      const answer = await api('POST', 'v1/invalidations', Object.assign({}, body, { dry_run: true }));
      state.plan = { body, answer };
      renderPlan();
    } catch (e) {
      showMessage('error', 'Plan (dry run)', e.message);
    } finally {
      els.invPlan.disabled = false;
    }
  }

  function renderPlan() {
    const { body, answer } = state.plan;
    const list = Array.isArray(answer && answer.analyses) ? answer.analyses : [];
    const total = Number(answer && answer.partitions_total) || 0;
    const lazy = body.rebuild === 'lazy';
    els.planSummary.textContent = `${lazy ? 'Mark' : 'Rebuild'} ${plural(total, 'partition')} of `
      + `${plural(list.length, 'analysis', 'analyses')} from ${body.from} to ${body.to}`
      + `, reading ${plural(Number(answer.source_rows) || 0, 'source row')}`
      + (lazy ? ' when next read' : `; about ${fmtSeconds(answer.estimated_seconds)} with ${plural(Number(answer.workers) || 0, 'worker')}`)
      + '.';
    const trs = list.map((a) => row([
      el('span', 'mono', a.analysis),
      a.version != null ? `v${a.version}` : '—',
      fmtInt(a.partitions),
      Array.isArray(a.runs) ? runsText(a.runs) : fmtInt(a.runs),
      fmtInt(a.source_rows),
      fmtSeconds(a.estimated_seconds),
      fmtInt(a.already_queued),
      fmtInt(a.already_running),
      fmtInt(a.history_builds),
    ], { analysis: String(a.analysis), partitions: String(a.partitions) }));
    fillTable(els.planTable, ['Analysis', 'Version', 'Partitions', 'Runs', 'Source rows', 'Estimate', 'Already queued', 'Already running', 'Builds in history'], trs);
    if (!trs.length) emptyRow(els.planTable, 9, 'Nothing to rebuild in this range.');
    const guesses = list.filter((a) => !Number(a.history_builds)).map((a) => a.analysis);
    els.planNote.textContent = (guesses.length
      ? `No build history yet for ${guesses.join(', ')}: their estimate is a guess. ` : '')
      + (body.cascade ? 'Downstream analyses that read these partitions are included.' : 'Downstream analyses are left as they are (no cascade).');
    els.planConfirm.textContent = lazy
      ? `Confirm: mark ${plural(total, 'partition')} stale`
      : `Confirm: rebuild ${plural(total, 'partition')}`;
    els.planConfirm.disabled = false;
    els.plan.hidden = false;
    els.plan.dataset.ready = 'true';
    els.plan.dataset.partitions = String(total);
  }

  /** Runs as the API writes them: keys, or {first, last}. */
  function runsText(runs) {
    const shown = runs.slice(0, 3).map((r) => {
      if (r && typeof r === 'object') {
        const first = r.first || r.from || '?';
        const last = r.last || r.to || '?';
        return first === last ? String(first) : `${first} … ${last}`;
      }
      return String(r);
    });
    return shown.join(', ') + (runs.length > 3 ? ` (+${runs.length - 3} more)` : '');
  }

  async function onConfirmPlan() {
    if (!state.plan) return;
    const body = state.plan.body;
    els.planConfirm.disabled = true;
    try {
      const r = await api('POST', 'v1/invalidations', body);
      discardPlan();
      showMessage('info', 'Invalidation recorded', `${body.analysis === '*' ? 'Every analysis' : body.analysis}, ${body.from} to ${body.to}: ${body.rebuild === 'lazy' ? 'marked stale' : 'rebuilding'} (${shortId(r && r.id)}).`);
      if (r && r.id) {
        const at = state.invalidations.findIndex((x) => x.id === r.id);
        const entry = Object.assign({ state: 'pending', analysis: body.analysis, from: body.from, to: body.to, rebuild: body.rebuild }, r);
        if (at >= 0) state.invalidations[at] = entry;
        else state.invalidations.unshift(entry);
        renderInvalidations();
      }
      loadInvalidations();
    } catch (e) {
      els.planConfirm.disabled = false;
      showMessage('error', 'Invalidation', e.message);
    }
  }

  function prefillInvalidation(analysis, from, to) {
    if ([...els.invAnalysis.options].some((o) => o.value === analysis)) els.invAnalysis.value = analysis;
    els.invFrom.value = from;
    els.invTo.value = to;
    discardPlan();
    $('new-invalidation-section').scrollIntoView({ block: 'nearest' });
    els.invReason.focus();
  }

  // ---------------------------------------------------------------- candidates

  async function openCandidate(name) {
    state.candidate = { analysis: name, data: null };
    els.candidate.hidden = false;
    els.candidate.dataset.analysis = name;
    els.candidateName.textContent = name;
    els.diff.hidden = true;
    els.diff.dataset.ready = 'false';
    if (state.range) {
      els.candFrom.value = state.range.from;
      els.candTo.value = state.range.to;
    }
    armed.key = null;
    disarm(els.candPromote);
    disarm(els.candDiscard);
    await loadCandidate();
    els.candidate.scrollIntoView({ block: 'start' });
  }

  function closeCandidate() {
    state.candidate = null;
    els.candidate.hidden = true;
  }

  async function loadCandidate() {
    const c = state.candidate;
    if (!c) return;
    try {
      c.data = await api('GET', `v1/analyses/${enc(c.analysis)}/candidate`);
    } catch (e) {
      c.data = null;
      els.candidateDefinition.replaceChildren(el('p', 'error-text', e.message));
      els.candidate.dataset.loaded = 'error';
      return;
    }
    renderCandidate();
  }

  function renderCandidate() {
    const c = state.candidate;
    const d = c.data || {};
    const live = state.analyses.find((a) => a.name === c.analysis) || {};
    const box = el('div', 'definition-grid');
    const side = (title, def) => {
      const s = el('div', 'definition-side');
      s.append(el('h3', null, title));
      const facts = el('dl', 'facts');
      const add = (k, v) => { facts.append(el('dt', null, k), el('dd', null, v)); };
      add('Version', def.version != null ? `v${def.version}` : '—');
      add('Partition', def.partition || '—');
      add('Inputs', Array.isArray(def.inputs) ? def.inputs.map(inputText).join('; ') : '—');
      if (def.description) add('Description', def.description);
      s.append(facts);
      if (def.sql) s.append(el('pre', 'sql', def.sql));
      else if (def.language) s.append(el('p', 'muted', `${def.language} analysis`));
      return s;
    };
    box.append(side('Live', live), side('Candidate', d));
    const built = Number(d.built) || 0;
    const parts = [`Built: ${plural(built, 'partition')}`];
    const runs = Array.isArray(d.partitions) ? d.partitions : [];
    if (runs.length) parts[0] += ` (${runsText(runs)})`;
    if (Number(d.queued)) parts.push(`${fmtInt(Number(d.queued))} queued`);
    if (Number(d.running)) parts.push(`${fmtInt(Number(d.running))} running`);
    const failed = Array.isArray(d.failed) ? d.failed : [];
    const note = el('p', null, `${parts.join(' · ')}.`);
    const extra = [];
    if (failed.length) {
      const list = el('ul', 'error-text small');
      for (const f of failed.slice(0, 10)) {
        const text = f && typeof f === 'object' ? `${f.partition || '?'}: ${f.error || 'failed'}` : String(f);
        list.append(el('li', null, text));
      }
      extra.push(el('p', 'error-text', `${plural(failed.length, 'partition')} of the candidate failed:`), list);
    }
    els.candidateDefinition.replaceChildren(box, note, ...extra);
    els.candidate.dataset.loaded = 'true';
    els.candidate.dataset.built = String(built);
    els.candidate.dataset.pending = String((Number(d.queued) || 0) + (Number(d.running) || 0));
  }

  async function buildCandidate(body) {
    const c = state.candidate;
    if (!c) return;
    try {
      const r = await api('POST', `v1/analyses/${enc(c.analysis)}/candidate/builds`, body);
      const n = r && (Array.isArray(r.partitions) ? r.partitions.length : r.partitions);
      showMessage('info', 'Candidate', `Building ${c.analysis}'s candidate over ${n != null ? plural(Number(n), 'partition') : 'the partitions asked for'}; readers still see the live version.`);
    } catch (e) {
      showMessage('error', 'Building the candidate', e.message);
      return;
    }
    // Follow the build until nothing of it is queued or running (for two minutes at most).
    for (let i = 0; i < 240 && state.candidate === c; i += 1) {
      await new Promise((res) => setTimeout(res, 500));
      await loadCandidate();
      if (els.candidate.dataset.pending === '0') break;
    }
  }

  async function loadDiff() {
    const c = state.candidate;
    if (!c) return;
    const from = els.candFrom.value;
    const to = els.candTo.value;
    if (!from || !to) { showMessage('error', 'Diff', 'Give both dates of the range.'); return; }
    els.diff.dataset.ready = 'false';
    els.candDiff.disabled = true;
    let j;
    try {
      j = await api('GET', `v1/analyses/${enc(c.analysis)}/candidate/diff?from=${enc(from)}&to=${enc(to)}`);
    } catch (e) {
      els.diff.hidden = false;
      els.diffSummary.textContent = '';
      els.diffBody.replaceChildren(el('p', 'error-text', e.message));
      els.diff.dataset.ready = 'error';
      return;
    } finally {
      els.candDiff.disabled = false;
    }
    renderDiff(j && Array.isArray(j.partitions) ? j.partitions : []);
  }

  function renderDiff(parts) {
    const totals = { added: 0, removed: 0, changed: 0, compared: 0, notBuilt: 0 };
    const blocks = [];
    const identical = [];
    const notBuilt = [];
    for (const p of parts) {
      if (p.status === 'not_built') { totals.notBuilt += 1; notBuilt.push(p.partition); continue; }
      totals.compared += 1;
      const added = Number(p.added) || 0;
      const removed = Number(p.removed) || 0;
      const changed = Number(p.changed) || 0;
      totals.added += added;
      totals.removed += removed;
      totals.changed += changed;
      if (!added && !removed && !changed) { identical.push(p.partition); continue; }
      blocks.push(diffBlock(p, added, removed, changed));
    }
    const lines = [];
    if (identical.length) lines.push(el('p', 'muted', `Identical (${identical.length}): ${identical.join(', ')}`));
    if (notBuilt.length) lines.push(el('p', 'muted', `Not built by the candidate (${notBuilt.length}): ${notBuilt.join(', ')}`));
    if (!parts.length) lines.push(el('p', 'muted', 'No partitions in this range.'));
    els.diffBody.replaceChildren(...blocks, ...lines);
    els.diffSummary.textContent = `${plural(totals.compared, 'partition')} compared · ${fmtInt(totals.changed)} changed · `
      + `${fmtInt(totals.added)} added · ${fmtInt(totals.removed)} removed rows`
      + (totals.notBuilt ? ` · ${fmtInt(totals.notBuilt)} not built` : '');
    els.diff.hidden = false;
    els.diff.dataset.ready = 'true';
    els.diff.dataset.changed = String(totals.changed);
    els.diff.dataset.added = String(totals.added);
    els.diff.dataset.removed = String(totals.removed);
  }

  function diffBlock(p, added, removed, changed) {
    const block = el('div', 'diff-part');
    block.dataset.partition = p.partition;
    const head = el('div', 'diff-head');
    head.append(el('strong', 'mono', p.partition),
      el('span', null, `${fmtInt(changed)} changed · ${fmtInt(added)} added · ${fmtInt(removed)} removed`));
    const changedCols = Array.isArray(p.changed_columns) ? p.changed_columns : [];
    if (changedCols.length) head.append(el('span', 'muted', `columns: ${changedCols.join(', ')}`));
    block.append(head);
    const rows = p.rows || {};
    const changedRows = Array.isArray(rows.changed) ? rows.changed : [];
    const addedRows = Array.isArray(rows.added) ? rows.added : [];
    const removedRows = Array.isArray(rows.removed) ? rows.removed : [];

    // One table: key columns, then every other column as "live → candidate" where it differs.
    const keyCols = [];
    const valueCols = [];
    const noteCol = (list, name) => { if (!list.includes(name)) list.push(name); };
    for (const r of changedRows) {
      for (const k of Object.keys(r.key || {})) noteCol(keyCols, k);
      for (const k of Object.keys(r.live || {}).concat(Object.keys(r.candidate || {}))) if (!keyCols.includes(k)) noteCol(valueCols, k);
    }
    for (const r of addedRows.concat(removedRows)) {
      for (const k of Object.keys(r || {})) if (!keyCols.includes(k)) noteCol(valueCols, k);
    }
    // Changed columns first, so that the difference is in sight on narrow screens.
    valueCols.sort((a, b) => (changedCols.includes(b) ? 1 : 0) - (changedCols.includes(a) ? 1 : 0));
    const trs = [];
    const push = (kind, keyObj, live, cand) => {
      const cells = [chip(kind === 'changed' ? 'queued' : kind === 'added' ? 'ready' : 'failed', kind)];
      for (const k of keyCols) cells.push(el('span', 'mono', cellValue((keyObj || {})[k] !== undefined ? keyObj[k] : (cand || live || {})[k])));
      for (const k of valueCols) {
        const td = el('td');
        const a = live ? live[k] : undefined;
        const b = cand ? cand[k] : undefined;
        if (kind === 'changed' && !sameValue(a, b)) {
          td.classList.add('delta');
          td.dataset.column = k;
          td.append(el('span', 'old', cellValue(a)), document.createTextNode(' → '), el('span', 'new', cellValue(b)));
        } else {
          td.textContent = cellValue(b !== undefined ? b : a);
        }
        cells.push(td);
      }
      trs.push(row(cells, { change: kind }));
    };
    for (const r of changedRows.slice(0, MAX_DIFF_ROWS)) push('changed', r.key, r.live, r.candidate);
    for (const r of addedRows.slice(0, MAX_DIFF_ROWS)) push('added', r, null, r);
    for (const r of removedRows.slice(0, MAX_DIFF_ROWS)) push('removed', r, r, null);
    const table = el('table', 'table diff-table');
    fillTable(table, ['Change'].concat(keyCols.map((k) => `${k} (key)`), valueCols.map((k) => (changedCols.includes(k) ? `${k} · live → candidate` : k))), trs);
    const wrap = el('div', 'table-wrap');
    wrap.append(table);
    block.append(wrap);
    const hidden = Math.max(0, changedRows.length - MAX_DIFF_ROWS) + Math.max(0, addedRows.length - MAX_DIFF_ROWS) + Math.max(0, removedRows.length - MAX_DIFF_ROWS);
    const listed = changedRows.length + addedRows.length + removedRows.length;
    if (hidden || listed < added + removed + changed) {
      block.append(el('p', 'muted small', `Showing ${fmtInt(listed - hidden)} of ${fmtInt(added + removed + changed)} differing rows.`));
    }
    return block;
  }

  async function onCandidateDecision(button, promote) {
    const c = state.candidate;
    if (!c) return;
    const label = promote
      ? `Promote ${c.analysis}'s candidate to live? Click again`
      : `Discard ${c.analysis}'s candidate? Click again`;
    if (!confirmTwice(button, `${promote ? 'promote' : 'discard'}:${c.analysis}`, label)) return;
    button.disabled = true;
    try {
      if (promote) {
        const r = await api('POST', `v1/analyses/${enc(c.analysis)}/candidate/promote`);
        const version = r && r.analysis && r.analysis.version != null ? ` v${r.analysis.version}` : '';
        const n = r && typeof r.promoted === 'number' ? plural(r.promoted, 'partition') : 'the partitions';
        showMessage('info', 'Promoted', `${c.analysis}${version} is live: ${n} its candidate built became its annotations without a rebuild, and the rest are stale.`);
      } else {
        await api('DELETE', `v1/analyses/${enc(c.analysis)}/candidate`);
        showMessage('info', 'Discarded', `${c.analysis}'s candidate is discarded; the live version is unchanged.`);
      }
    } catch (e) {
      showMessage('error', promote ? 'Promoting' : 'Discarding', e.message);
      button.disabled = false;
      return;
    }
    button.disabled = false;
    closeCandidate();
    await loadAnalyses();
    if (promote) reloadBand(c.analysis);
    else refreshBandLabels();
  }

  /** Reads one analysis' band again (its version changed). */
  function reloadBand(name) {
    const band = state.bands.get(name);
    const meta = state.analyses.find((a) => a.name === name);
    if (!band || !meta) { buildMap(); return; }
    band.meta = meta;
    band.versionEl.textContent = `v${meta.version}`;
    refreshBandLabels();
    const chunks = state.chunks.filter((c) => c.analysis === name);
    for (const c of chunks) {
      if (c.subId) { send({ op: 'unsubscribe', id: c.subId }); state.subs.delete(c.subId); c.subId = null; }
      c.loaded = false;
    }
    band.loadedChunks = 0;
    loadChunks(state.mapGen, chunks);
    if (state.selected && state.selected.analysis === name) markDirty('details');
  }

  function refreshBandLabels() {
    for (const band of state.bands.values()) {
      const meta = state.analyses.find((a) => a.name === band.meta.name);
      if (!meta) continue;
      band.meta = meta;
      const badge = els.map.querySelector(`.band[data-analysis="${CSS.escape(meta.name)}"] .band-meta .badge`);
      if (meta.candidate && !badge) {
        const b = el('span', 'badge small', 'candidate');
        els.map.querySelector(`.band[data-analysis="${CSS.escape(meta.name)}"] .band-meta`).append(b);
      } else if (!meta.candidate && badge) {
        badge.remove();
      }
    }
  }

  // ---------------------------------------------------------------- quarantine

  async function loadQuarantine(more) {
    const before = more ? state.quarantineBefore : null;
    let j;
    try {
      j = await api('GET', `v1/quarantine?limit=50${before != null ? `&before=${before}` : ''}`);
    } catch (e) {
      els.quarantine.replaceChildren(el('li', 'error-text', e.message));
      els.quarantineMore.hidden = true;
      return;
    }
    const records = j && Array.isArray(j.records) ? j.records : [];
    const items = records.map((r) => {
      const li = el('li', 'q');
      li.dataset.id = String(r.id);
      const head = el('div', 'q-head');
      head.append(el('span', 'mono small', fmtTime(r.received_at)));
      if (r.kind) head.append(el('span', 'badge', r.kind));
      if (r.source) head.append(el('span', 'mono', r.source));
      head.append(el('span', 'muted small', `line ${r.line}`));
      if (r.actor) head.append(el('span', 'muted small', `from ${r.actor}`));
      head.append(el('span', 'muted small push', `#${r.id}`));
      const err = el('div', 'q-error', r.error);
      const raw = String(r.raw == null ? '' : r.raw);
      let rawNode;
      if (raw.length > 400) {
        rawNode = el('details', 'q-raw');
        rawNode.append(el('summary', null, `raw text (${fmtInt(raw.length)} characters): ${raw.slice(0, 120)}…`), el('pre', null, raw));
      } else {
        rawNode = el('pre', 'q-raw', raw || '(empty)');
      }
      li.append(head, err, rawNode);
      return li;
    });
    if (more) els.quarantine.append(...items);
    else els.quarantine.replaceChildren(...items);
    if (!more && !items.length) els.quarantine.append(el('li', 'muted empty', 'Nothing is quarantined.'));
    state.quarantineBefore = j && j.next_before != null ? j.next_before : null;
    els.quarantineMore.hidden = !(records.length === 50 && state.quarantineBefore != null);
    const shown = els.quarantine.querySelectorAll('li[data-id]').length;
    els.quarantineSummary.textContent = `newest first · ${plural(shown, 'record')} shown`;
  }

  // ---------------------------------------------------------------- schedules

  let scheduleList = [];

  async function loadSchedules() {
    try {
      const j = await api('GET', 'v1/schedules');
      scheduleList = j && Array.isArray(j.schedules) ? j.schedules : [];
    } catch (e) {
      fillTable(els.schedules, ['Schedules'], []);
      emptyRow(els.schedules, 1, e.message);
      return;
    }
    renderSchedules();
  }

  function renderSchedules() {
    const trs = scheduleList.map((s) => {
      const next = el('div');
      next.append(el('span', 'mono', fmtTime(s.next_firing)));
      if (s.next_firing) next.append(el('span', 'muted small rel', ` ${fmtRelative(s.next_firing)}`));
      return row([el('span', 'mono strong', s.name), el('span', 'mono', s.analysis), el('code', null, s.cron), s.window,
        fmtTime(s.last_fired), next], { schedule: s.name, next: s.next_firing || '' });
    });
    fillTable(els.schedules, ['Schedule', 'Analysis', 'Cron (UTC)', 'Window', 'Last fired', 'Next firing'], trs);
    if (!trs.length) emptyRow(els.schedules, 6, 'No schedules.');
    els.schedulesSummary.textContent = plural(trs.length, 'schedule');
  }

  function renderScheduleTimes() {
    if (scheduleList.length) renderSchedules();
  }

  // ---------------------------------------------------------------- events

  function onMapClick(ev) {
    const target = ev.target.closest('button');
    if (!target || !els.map.contains(target)) return;
    if (target.dataset.action === 'rewind-analysis') {
      prefillInvalidation(target.dataset.analysis, state.range.from, state.range.to);
      return;
    }
    if (target.classList.contains('cell')) selectCell(target.dataset.analysis, target.dataset.partition, null);
  }

  function onMapHover(ev) {
    const target = ev.target.closest('.cell');
    if (!target || !els.map.contains(target)) { hideTooltip(); return; }
    showTooltip(target, ev.clientX, ev.clientY);
  }

  function onMapFocus(ev) {
    const target = ev.target.closest('.cell');
    if (!target) return;
    const r = target.getBoundingClientRect();
    showTooltip(target, r.right, r.bottom);
  }

  function onDetailsClick(ev) {
    const b = ev.target.closest('button');
    if (!b || !state.selected) return;
    if (b.dataset.action === 'hour') {
      state.selected.hour = b.dataset.partition;
      renderDetails(true);
    } else if (b.dataset.action === 'rewind-partition') {
      const sel = state.selected;
      const band = state.bands.get(sel.analysis);
      if (band && band.hourly && sel.hour) {
        // The form takes days; an hour is rewound with its day.
        prefillInvalidation(sel.analysis, sel.day, dayKey(dayMs(sel.day) + DAY));
      } else {
        prefillInvalidation(sel.analysis, sel.day, dayKey(dayMs(sel.day) + DAY));
      }
    }
  }

  function init() {
    const q = new URLSearchParams(location.search);
    const def = lastDays(30);
    const from = q.get('from');
    const to = q.get('to');
    setRange({ from: dayMs(from) != null ? from : def.from, to: dayMs(to) != null ? to : def.to });
    els.live.checked = q.get('live') !== '0';
    state.live = els.live.checked;
    els.invFrom.value = els.rangeFrom.value;
    els.invTo.value = els.rangeTo.value;

    els.rangeForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      clearMessage();
      buildMap();
    });
    for (const b of els.rangeForm.querySelectorAll('button[data-preset]')) {
      b.addEventListener('click', () => {
        setRange(lastDays(Number(b.dataset.preset)));
        buildMap();
      });
    }
    els.live.addEventListener('change', () => {
      state.live = els.live.checked;
      setConn(els.conn.dataset.state, els.conn.dataset.state === 'live' ? (state.live ? 'live' : 'connected (not live)') : els.conn.textContent);
      if (state.live) {
        for (const c of state.chunks) if (c.loaded) subscribe(c);
      } else {
        unsubscribeAll();
      }
      renderMapSummary();
      updateUrl();
    });
    els.map.addEventListener('click', onMapClick);
    els.map.addEventListener('mousemove', onMapHover);
    els.map.addEventListener('mouseleave', hideTooltip);
    els.map.addEventListener('focusin', onMapFocus);
    els.map.addEventListener('focusout', hideTooltip);
    els.details.addEventListener('click', onDetailsClick);
    els.detailsClose.addEventListener('click', closeDetails);
    window.addEventListener('scroll', hideTooltip, { passive: true });
    if (typeof ResizeObserver === 'function') new ResizeObserver(sizeMap).observe(els.map);
    else window.addEventListener('resize', sizeMap);

    els.invalidations.addEventListener('click', (ev) => {
      const b = ev.target.closest('button[data-action]');
      if (b) onInvalidationAction(b);
    });
    els.invalidationsRefresh.addEventListener('click', loadInvalidations);
    els.invForm.addEventListener('submit', onPlan);
    els.invForm.addEventListener('input', () => { if (state.plan) discardPlan(); });
    els.invForm.addEventListener('change', () => { if (state.plan) discardPlan(); });
    els.planConfirm.addEventListener('click', onConfirmPlan);
    els.planDiscard.addEventListener('click', discardPlan);

    els.analyses.addEventListener('click', (ev) => {
      const b = ev.target.closest('button[data-action="candidate"]');
      if (b) openCandidate(b.dataset.analysis);
    });
    els.analysesRefresh.addEventListener('click', async () => { await loadAnalyses(); refreshBandLabels(); });
    els.candidateClose.addEventListener('click', closeCandidate);
    els.candidateBuildForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      if (!els.candFrom.value || !els.candTo.value) { showMessage('error', 'Candidate', 'Give both dates of the range.'); return; }
      buildCandidate({ from: els.candFrom.value, to: els.candTo.value });
    });
    els.candBuildSample.addEventListener('click', () => {
      const n = Number(els.candSample.value);
      if (!Number.isInteger(n) || n < 1) { showMessage('error', 'Candidate', 'Give the sample as a whole number of partitions.'); return; }
      buildCandidate({ sample: n });
    });
    els.candDiff.addEventListener('click', loadDiff);
    els.candPromote.addEventListener('click', () => onCandidateDecision(els.candPromote, true));
    els.candDiscard.addEventListener('click', () => onCandidateDecision(els.candDiscard, false));

    els.quarantineRefresh.addEventListener('click', () => loadQuarantine(false));
    els.quarantineMore.addEventListener('click', () => loadQuarantine(true));
    els.schedulesRefresh.addEventListener('click', loadSchedules);
    els.messageClose.addEventListener('click', clearMessage);
    els.tokenChange.addEventListener('click', () => askForToken(''));
    els.tokenForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      tryToken(els.token.value);
    });

    const token = q.get('token') || storedToken('sessionStorage', TOKEN_KEY);
    updateUrl(); // drops ?token= from the address bar at once
    if (token) tryToken(token);
    else askForToken('');
  }

  init();
})();
