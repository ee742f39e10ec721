// Browser test of the operators' console (`/admin`), driven by playwright-core with
// Debian's chromium. `tests/e2e/console.rs` starts the real binary, prepares the data of
// each scenario, runs this script, then checks the service's own answers.
//
// Environment:
//   SCHOLIA_URL     base URL of a running server (required)
//   SCHOLIA_TOKEN   an admin token (required)
//   SCENARIO        map | progress | candidate (required)
//   FROM, TO        the range the console shows, YYYY-MM-DD (required)
//   ARTIFACTS       where screenshots go (default ./ci-artifacts)
//   PREFIX          file name prefix of the screenshots (default console)
//   CHROMIUM        browser executable (default /usr/bin/chromium)
//   DEADLINE_MS     how long one wait may take (default 60000)
//   and per scenario: ANALYSIS, FAILED_ANALYSIS, FAILED_PARTITION, EXPECT_ERROR, FIX_RECORD,
//   INVALIDATION, CANDIDATE_SQL, OTHER_CANDIDATE_SQL, KIND (see each scenario below).
//
// Every wait polls the page with a deadline (no fixed sleeps decide anything). It prints
// one JSON line (the summary) and exits non-zero on failure, after a screenshot of the
// page as it was.
//
// Run: cd tests/browser && npm ci && SCENARIO=map … node console.test.mjs

import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const env = process.env;
const missing = ['SCHOLIA_URL', 'SCHOLIA_TOKEN', 'SCENARIO', 'FROM', 'TO'].filter((k) => !env[k]);
if (missing.length) {
  console.log(JSON.stringify({ test: 'console', ok: false, error: `missing environment: ${missing.join(', ')}` }));
  process.exit(2);
}

const base = env.SCHOLIA_URL.replace(/\/+$/, '');
const token = env.SCHOLIA_TOKEN;
const scenario = env.SCENARIO;
const from = env.FROM;
const to = env.TO;
const artifacts = resolve(env.ARTIFACTS || 'ci-artifacts');
const prefix = env.PREFIX || 'console';
const deadlineMs = Number(env.DEADLINE_MS || 60000);
const executablePath = env.CHROMIUM || '/usr/bin/chromium';

const summary = {
  test: 'console',
  scenario,
  ok: false,
  steps: [],            // what was done and seen, in order
  screenshots: [],
  page_errors: [],
  console_errors: [],
  external_requests: [],
  error: null,
  elapsed_ms: 0,
};

function step(name, detail) {
  summary.steps.push(detail === undefined ? { step: name } : { step: name, ...detail });
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

// ---------------------------------------------------------------- the API, for checks and setup

async function api(method, path, body) {
  const resp = await fetch(`${base}${path}`, {
    method,
    headers: Object.assign(
      { Authorization: `Bearer ${token}`, Accept: 'application/json' },
      body === undefined ? {} : { 'Content-Type': 'application/json' },
    ),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  return { status: resp.status, body: json, text };
}

async function ingest(lines) {
  const resp = await fetch(`${base}/v1/events`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/x-ndjson' },
    body: lines.map((l) => JSON.stringify(l)).join('\n'),
  });
  const body = await resp.json();
  check(resp.status === 200 && body.accepted === lines.length, `ingesting ${lines.length} records answered ${resp.status} ${JSON.stringify(body)}`);
}

/** The service's statuses of `[from, to)` of an analysis, by partition. */
async function serverStatuses(analysis) {
  const r = await api('GET', `/v1/annotations/${encodeURIComponent(analysis)}?from=${from}&to=${to}`);
  check(r.status === 200, `GET annotations of ${analysis}: ${r.status} ${r.text}`);
  const out = {};
  for (const p of r.body.partitions) {
    const shown = p.status === 'stale' && (p.rebuild === 'queued' || p.rebuild === 'running') ? p.rebuild : p.status;
    out[p.partition] = { status: shown, generation: p.generation == null ? '' : String(p.generation) };
  }
  return out;
}

// ---------------------------------------------------------------- the page

/** Runs before the console's script: records every status each cell and every value each progress bar had. */
function installRecorder() {
  const seen = {};
  const progress = {};
  window.__console = { seen, progress };
  const note = (node) => {
    if (node.nodeType !== 1) return;
    if (node.matches('.cell[data-partition][data-status]') && node.closest('#map')) {
      const k = `${node.dataset.analysis}|${node.dataset.partition}`;
      (seen[k] = seen[k] || []).includes(node.dataset.status) || seen[k].push(node.dataset.status);
    }
    if (node.matches('.bar[data-progress]')) {
      const li = node.closest('li[data-id]');
      if (li) {
        const list = (progress[li.dataset.id] = progress[li.dataset.id] || []);
        const v = Number(node.dataset.progress);
        if (list[list.length - 1] !== v) list.push(v);
      }
    }
  };
  const observer = new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === 'attributes') note(r.target);
      else for (const n of r.addedNodes) {
        note(n);
        if (n.nodeType === 1) for (const c of n.querySelectorAll('.cell[data-status], .bar[data-progress]')) note(c);
      }
    }
  });
  const start = () => observer.observe(document.documentElement, {
    subtree: true, childList: true, attributes: true, attributeFilter: ['data-status', 'data-progress'],
  });
  if (document.documentElement) start();
  else document.addEventListener('DOMContentLoaded', start);
}

async function waitUntil(page, what, fn, arg, timeout = deadlineMs) {
  try {
    return await page.waitForFunction(fn, arg, { timeout, polling: 100 });
  } catch (e) {
    throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
  }
}

function cellSelector(analysis, partition) {
  return `#map .band[data-analysis="${analysis}"] .cell[data-partition="${partition}"]`;
}

async function cellState(page, analysis, partition) {
  return page.$eval(cellSelector(analysis, partition), (e) => ({ status: e.dataset.status, generation: e.dataset.generation || '' }));
}

async function waitCell(page, analysis, partition, status, generation) {
  await waitUntil(page, `${analysis} ${partition} to show ${status}${generation != null ? ` (generation ${generation})` : ''}`,
    ([sel, s, g]) => {
      const e = document.querySelector(sel);
      return !!e && e.dataset.status === s && (g == null || e.dataset.generation === g);
    }, [cellSelector(analysis, partition), status, generation == null ? null : String(generation)]);
}

/** The whole map equals what the service says (statuses and generations), within the deadline. */
async function mapMatchesServer(page, analyses, what) {
  const started = Date.now();
  let last = null;
  while (Date.now() - started < deadlineMs) {
    const mismatches = [];
    for (const a of analyses) {
      const server = await serverStatuses(a);
      const shown = await page.$$eval(`#map .band[data-analysis="${a}"] .cell[data-partition]`,
        (cells) => Object.fromEntries(cells.map((c) => [c.dataset.partition, { status: c.dataset.status, generation: c.dataset.generation || '' }])));
      for (const [k, v] of Object.entries(server)) {
        const s = shown[k];
        if (!s || s.status !== v.status || s.generation !== v.generation) mismatches.push({ analysis: a, partition: k, server: v, shown: s || null });
      }
    }
    if (!mismatches.length) {
      step(`map matches the service: ${what}`, { analyses });
      return;
    }
    last = mismatches;
    await page.waitForTimeout(200);
  }
  throw new Error(`the map does not match the service (${what}): ${JSON.stringify(last.slice(0, 6))}`);
}

async function shot(page, name, options = {}) {
  mkdirSync(artifacts, { recursive: true });
  const path = join(artifacts, `${prefix}-${name}.png`);
  if (options.selector) await (await page.$(options.selector)).screenshot({ path });
  else await page.screenshot({ path, fullPage: options.fullPage !== false });
  summary.screenshots.push(path);
  return path;
}

async function hoverText(page, analysis, partition) {
  // Hovering scrolls the cell into view, and a scroll hides the tooltip: when that
  // scroll lands after the hover, the tooltip is gone under a still mouse. Move away
  // and hover again until it shows.
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    await page.mouse.move(0, 0);
    await page.hover(cellSelector(analysis, partition));
    try {
      await waitUntil(page, `the tooltip of ${analysis} ${partition}`,
        ([a, p]) => {
          const t = document.getElementById('tooltip');
          return t && !t.hidden && t.dataset.analysis === a && t.dataset.partition === p;
        }, [analysis, partition], 2000);
      break;
    } catch (e) {
      if (Date.now() > deadline) throw new Error(`timed out after ${deadlineMs} ms waiting for the tooltip of ${analysis} ${partition}`);
    }
  }
  return page.$eval('#tooltip', (t) => t.innerText);
}

async function openCell(page, analysis, partition) {
  await page.click(cellSelector(analysis, partition));
  await waitUntil(page, `the builds of ${analysis} ${partition}`,
    ([a, p]) => {
      const d = document.getElementById('details-section');
      const b = document.getElementById('builds');
      return !d.hidden && d.dataset.analysis === a && d.dataset.partition === p && b.dataset.loaded !== 'false';
    }, [analysis, partition]);
  return page.evaluate(() => ({
    loaded: document.getElementById('builds').dataset.loaded,
    builds: [...document.querySelectorAll('#builds tbody tr[data-outcome]')].map((tr) => ({
      outcome: tr.dataset.outcome,
      text: tr.innerText,
    })),
    message: document.querySelector('#builds tbody td')?.innerText || '',
    rows: [...document.querySelectorAll('#rows tbody tr:not(.empty)')].map((tr) => [...tr.children].map((td) => td.innerText)),
    rowHeader: [...document.querySelectorAll('#rows thead th')].map((th) => th.innerText),
  }));
}

/** Fills the rewind form, asks for the dry run, and returns what the plan shows. */
async function planInvalidation(page, { analysis, rebuild, cascade, reason }) {
  await page.selectOption('#inv-analysis', analysis);
  await page.fill('#inv-from', from);
  await page.fill('#inv-to', to);
  await page.fill('#inv-reason', reason || 'from the console test');
  await page.check(`input[name="inv-rebuild"][value="${rebuild}"]`);
  if (cascade) await page.check('#inv-cascade');
  else await page.uncheck('#inv-cascade');
  await page.click('#inv-plan');
  await waitUntil(page, `the dry run of ${analysis}`, () => {
    const p = document.getElementById('plan');
    const m = document.getElementById('message');
    return (!p.hidden && p.dataset.ready === 'true') || (!m.hidden && m.dataset.kind === 'error');
  });
  const planned = await page.evaluate(() => ({
    shown: !document.getElementById('plan').hidden,
    error: document.getElementById('message').hidden ? null : document.getElementById('message-text').innerText,
    partitions: Number(document.getElementById('plan').dataset.partitions || 0),
    summary: document.getElementById('plan-summary').innerText,
    confirm: document.getElementById('plan-confirm').innerText,
    rows: [...document.querySelectorAll('#plan-table tbody tr[data-analysis]')].map((tr) => ({
      analysis: tr.dataset.analysis, partitions: Number(tr.dataset.partitions), text: tr.innerText,
    })),
  }));
  check(planned.shown, `the dry run was refused: ${planned.error}`);
  return planned;
}

/** Confirms the plan on screen; returns the id of the invalidation it made. */
async function confirmPlan(page) {
  const before = await page.$$eval('#invalidations li[data-id]', (lis) => lis.map((li) => li.dataset.id));
  await page.click('#plan-confirm');
  const handle = await waitUntil(page, 'the confirmed invalidation in the list', (known) => {
    const li = [...document.querySelectorAll('#invalidations li[data-id]')].find((x) => !known.includes(x.dataset.id));
    return li ? li.dataset.id : null;
  }, before);
  return handle.jsonValue();
}

async function invalidationShown(page, id) {
  return page.$eval(`#invalidations li[data-id="${id}"]`, (li) => ({
    state: li.dataset.state,
    progress: Number(li.querySelector('.bar').dataset.progress),
    text: li.innerText,
  }));
}

async function waitInvalidation(page, id, state) {
  await waitUntil(page, `invalidation ${id} to be ${state} at ${state === 'done' ? '100%' : 'its end'}`, ([i, s]) => {
    const li = document.querySelector(`#invalidations li[data-id="${i}"]`);
    if (!li || li.dataset.state !== s) return false;
    return s !== 'done' || li.querySelector('.bar').dataset.progress === '100';
  }, [id, state]);
  return invalidationShown(page, id);
}

/** Clicks a two-step button twice: once to arm it, once to act. */
async function clickTwice(page, selector) {
  await page.click(selector);
  await waitUntil(page, `${selector} to ask for confirmation`, (sel) => document.querySelector(sel)?.classList.contains('armed'), selector);
  await page.click(selector);
}

// ---------------------------------------------------------------- scenarios

/**
 * A failed build and rewinds. Prepared: FAILED_ANALYSIS (SQL) failed for FAILED_PARTITION
 * with an error containing EXPECT_ERROR, by invalidation INVALIDATION; ANALYSIS
 * (daily_avg) built over the range; a quarantined record and a schedule.
 */
async function mapScenario(page) {
  const failedAnalysis = env.FAILED_ANALYSIS;
  const failed = env.FAILED_PARTITION;
  const analysis = env.ANALYSIS;
  const firstInvalidation = env.INVALIDATION;
  const days = [];
  for (let t = Date.parse(from); t < Date.parse(to); t += 864e5) days.push(new Date(t).toISOString().slice(0, 10));

  // The failed build: its cell, its error on hover, its builds on click.
  await waitCell(page, failedAnalysis, failed, 'failed');
  await mapMatchesServer(page, [failedAnalysis, analysis], 'after the failed build');
  const tip = await hoverText(page, failedAnalysis, failed);
  check(tip.includes(env.EXPECT_ERROR), `the tooltip of the failed cell shows its error: ${tip}`);
  step('hovered the failed cell', { tooltip: tip });
  const okDay = days.find((d) => d !== failed);
  const okTip = await hoverText(page, failedAnalysis, okDay);
  check(/ready · generation 1/.test(okTip), `the tooltip of a ready cell shows its generation: ${okTip}`);
  await shot(page, 'map-failed');
  const details = await openCell(page, failedAnalysis, failed);
  step('opened the failed cell', details);
  check(details.loaded === 'true', `the builds of the failed partition were read: ${details.message}`);
  const failedBuild = details.builds.find((b) => b.outcome === 'failed');
  check(failedBuild && failedBuild.text.includes(env.EXPECT_ERROR), `the failed build is listed with its error: ${JSON.stringify(details.builds)}`);
  await shot(page, 'builds-of-failed', { selector: '#details-section' });

  // The invalidation that failed offers a retry of what failed, and only after the fix
  // does the retry make the partition ready.
  const first = await invalidationShown(page, firstInvalidation);
  step('the first invalidation', first);
  check(first.state === 'failed', `the invalidation with a failed partition is failed: ${first.text}`);
  await ingest([JSON.parse(env.FIX_RECORD)]);
  step('ingested the fix');
  const stillFailed = await serverStatuses(failedAnalysis);
  check(stillFailed[failed].status === 'failed', 'a failed partition is not rebuilt by new records alone');
  await waitCell(page, failedAnalysis, failed, 'failed');
  const retrySel = `#invalidations li[data-id="${firstInvalidation}"] button[data-action="retry"]`;
  const before = await page.$$eval('#invalidations li[data-id]', (lis) => lis.map((li) => li.dataset.id));
  await clickTwice(page, retrySel);
  const retryId = await (await waitUntil(page, 'the retry in the list', (known) => {
    const li = [...document.querySelectorAll('#invalidations li[data-id]')].find((x) => !known.includes(x.dataset.id));
    return li ? li.dataset.id : null;
  }, before)).jsonValue();
  const retried = await waitInvalidation(page, retryId, 'done');
  step('the retry', { id: retryId, ...retried });
  check(/retry of/.test(retried.text), `the retry says what it retries: ${retried.text}`);
  await waitCell(page, failedAnalysis, failed, 'ready');
  await mapMatchesServer(page, [failedAnalysis], 'after the retry');

  // A lazy rewind: the cells turn stale and stay so.
  const lazyPlan = await planInvalidation(page, { analysis, rebuild: 'lazy', cascade: true, reason: 'lazy rewind from the console test' });
  step('lazy plan', lazyPlan);
  check(lazyPlan.partitions === days.length, `the lazy plan covers the ${days.length} days: ${lazyPlan.summary}`);
  await shot(page, 'plan-lazy', { selector: '#new-invalidation-section' });
  const lazyId = await confirmPlan(page);
  for (const d of days) await waitCell(page, analysis, d, 'stale');
  await mapMatchesServer(page, [analysis], 'after the lazy rewind');
  await shot(page, 'map-stale');

  // An eager rewind: the cells go through the queue and come back with generation 2.
  const eagerPlan = await planInvalidation(page, { analysis, rebuild: 'eager', cascade: true, reason: 'eager rewind from the console test' });
  step('eager plan', eagerPlan);
  check(eagerPlan.partitions === days.length, `the eager plan covers the ${days.length} days: ${eagerPlan.summary}`);
  const eagerId = await confirmPlan(page);
  for (const d of days) await waitCell(page, analysis, d, 'ready', 2);
  const eager = await waitInvalidation(page, eagerId, 'done');
  step('the eager rewind', { id: eagerId, lazy_id: lazyId, ...eager });
  await mapMatchesServer(page, [analysis, failedAnalysis], 'after the eager rewind');
  const seen = await page.evaluate(() => window.__console.seen);
  const passed = days.map((d) => seen[`${analysis}|${d}`] || []);
  step('statuses each rewound cell showed', { statuses: passed });
  check(passed.every((s) => s.includes('stale') && s.includes('ready')), `every rewound cell showed stale, then ready: ${JSON.stringify(passed)}`);
  check(passed.some((s) => s.includes('queued') || s.includes('running')), `some rewound cell showed queued or running: ${JSON.stringify(passed)}`);
  await shot(page, 'map-rewound');

  // Quarantine (newest first, raw text and error) and schedules (the next firing).
  const q = await page.$$eval('#quarantine li[data-id]', (lis) => lis.map((li) => ({
    id: Number(li.dataset.id),
    error: li.querySelector('.q-error')?.innerText,
    raw: li.querySelector('.q-raw')?.innerText,
  })));
  step('quarantine', { records: q });
  check(q.length >= 2 && q.every((r) => r.error && r.raw), `the quarantine lists records with raw text and error: ${JSON.stringify(q)}`);
  check(q.every((r, i) => i === 0 || q[i - 1].id > r.id), 'the quarantine is newest first');
  const schedules = await page.$$eval('#schedules tr[data-schedule]', (trs) => trs.map((tr) => ({ name: tr.dataset.schedule, next: tr.dataset.next, text: tr.innerText })));
  step('schedules', { schedules });
  check(schedules.length >= 1 && schedules.every((s) => s.next), `schedules show their next firing: ${JSON.stringify(schedules)}`);
  await shot(page, 'full');

  // A narrow window: the map scrolls inside its panel, the rest stacks.
  await page.setViewportSize({ width: 420, height: 900 });
  await page.waitForTimeout(300); // layout settles (ResizeObserver)
  const narrow = await page.evaluate(() => ({
    page_overflows: document.documentElement.scrollWidth > document.documentElement.clientWidth + 1,
    map_narrow: document.getElementById('map').classList.contains('narrow'),
  }));
  step('narrow window', narrow);
  check(!narrow.page_overflows, 'in a narrow window the page does not scroll sideways');
  await shot(page, 'narrow');
}

/**
 * Progress and cancel. Prepared: ANALYSIS built over the range (a year) by an earlier
 * rewind, so the plan has history; one worker.
 */
async function progressScenario(page) {
  const analysis = env.ANALYSIS;
  await waitUntil(page, 'every cell of the year to be ready', (a) => {
    const cells = document.querySelectorAll(`#map .band[data-analysis="${a}"] .cell`);
    return cells.length > 300 && [...cells].every((c) => c.dataset.status === 'ready');
  }, analysis);
  await shot(page, 'year');

  const plan = await planInvalidation(page, { analysis, rebuild: 'eager', cascade: true, reason: 'a year, from the console test' });
  step('plan', plan);
  const total = Number(env.PARTITIONS);
  check(plan.partitions === total, `the plan covers ${total} partitions: ${plan.summary}`);
  check(/about \d/.test(plan.summary), `the plan estimates a duration: ${plan.summary}`);
  await shot(page, 'plan', { selector: '#new-invalidation-section' });
  const id = await confirmPlan(page);
  step('confirmed', { id });

  // Mid-way, if the page catches it there.
  try {
    await waitUntil(page, 'the bar mid-way', (i) => {
      const b = document.querySelector(`#invalidations li[data-id="${i}"] .bar`);
      const v = b ? Number(b.dataset.progress) : 0;
      return v > 5 && v < 80;
    }, id, 15000);
    await shot(page, 'progress-midway');
  } catch (_) {
    step('the bar was never caught mid-way');
  }
  const done = await waitInvalidation(page, id, 'done');
  const values = await page.evaluate((i) => window.__console.progress[i] || [], id);
  step('done', { ...done, progress_values: values });
  check(values[values.length - 1] === 100, `the bar ends at 100%: ${values}`);
  check(values.some((v) => v > 0 && v < 100), `the bar moved as partitions completed: ${values}`);
  const server = await api('GET', `/v1/invalidations/${id}`);
  check(server.body.state === 'done' && server.body.partitions_done === total, `the service agrees: ${server.text}`);
  await shot(page, 'progress-done');

  // Cancel: a bigger rewind, cancelled at once.
  const all = await planInvalidation(page, { analysis: '*', rebuild: 'eager', cascade: true, reason: 'to be cancelled' });
  step('plan of every analysis', all);
  const big = await confirmPlan(page);
  await clickTwice(page, `#invalidations li[data-id="${big}"] button[data-action="cancel"]`);
  const cancelled = await waitInvalidation(page, big, 'cancelled');
  step('cancelled', { id: big, ...cancelled });
  const serverCancelled = await api('GET', `/v1/invalidations/${big}`);
  check(serverCancelled.body.state === 'cancelled' && serverCancelled.body.partitions_cancelled > 0,
    `the service has it cancelled before the end: ${serverCancelled.text}`);
  check(!(await page.$(`#invalidations li[data-id="${big}"] button[data-action="cancel"]`)), 'a cancelled invalidation offers no cancel');
  await shot(page, 'cancelled', { selector: '#invalidations-section' });
}

/**
 * A candidate. Prepared: ANALYSIS (live SQL) built over the range, and a candidate
 * registered (CANDIDATE_SQL: twice avg_mw, without station g2).
 */
async function candidateScenario(page, context) {
  const analysis = env.ANALYSIS;
  const days = [];
  for (let t = Date.parse(from); t < Date.parse(to); t += 864e5) days.push(new Date(t).toISOString().slice(0, 10));

  // The analysts' page, watching the live version beside the console.
  const analysts = await context.newPage();
  analysts.on('pageerror', (e) => summary.page_errors.push(`analysts' page: ${e.message}`));
  await analysts.goto(`${base}/?${new URLSearchParams({ token, analysis, from, to })}`);
  const chartSel = '#charts .chart[data-column="avg_mw"][data-ready="true"]';
  await analysts.waitForSelector(chartSel, { timeout: deadlineMs });
  const seriesBefore = await analysts.$eval(chartSel, (c) => Number(c.dataset.series));
  step('the analysts\' chart before', { series: seriesBefore });
  check(seriesBefore === 3, `the live chart has a series per station: ${seriesBefore}`);

  const row = `#analyses tr[data-analysis="${analysis}"]`;
  await waitUntil(page, 'the candidate in the analyses table', (sel) => document.querySelector(sel)?.dataset.candidate === '2', row);
  await page.click(`${row} button[data-action="candidate"]`);
  await waitUntil(page, 'the candidate panel', () => document.getElementById('candidate-section').dataset.loaded === 'true');
  await page.fill('#cand-from', from);
  await page.fill('#cand-to', to);
  await page.click('#cand-build');
  await waitUntil(page, 'the candidate to be built', (n) => document.getElementById('candidate-section').dataset.built === String(n), days.length);
  step('candidate built', { text: await page.$eval('#candidate-definition', (e) => e.innerText) });
  await page.click('#cand-diff');
  await waitUntil(page, 'the diff', () => document.getElementById('diff').dataset.ready === 'true');
  const diff = await page.evaluate(() => ({
    changed: Number(document.getElementById('diff').dataset.changed),
    removed: Number(document.getElementById('diff').dataset.removed),
    added: Number(document.getElementById('diff').dataset.added),
    summary: document.getElementById('diff-summary').innerText,
    rows: [...document.querySelectorAll('#diff tr[data-change]')].map((tr) => ({
      change: tr.dataset.change,
      partition: tr.closest('.diff-part').dataset.partition,
      cells: [...tr.children].map((td) => td.innerText),
      deltas: [...tr.querySelectorAll('td.delta')].map((td) => ({
        column: td.dataset.column,
        live: td.querySelector('.old').innerText,
        candidate: td.querySelector('.new').innerText,
      })),
    })),
  }));
  step('diff', diff);
  check(diff.changed === 2 * days.length && diff.removed === days.length && diff.added === 0, `two stations changed and one removed per day: ${diff.summary}`);
  const changedRows = diff.rows.filter((r) => r.change === 'changed');
  check(changedRows.length === 2 * days.length, `the diff lists every changed row: ${changedRows.length}`);
  for (const r of changedRows) {
    const d = r.deltas.find((x) => x.column === 'avg_mw');
    check(d, `a changed row shows avg_mw live → candidate: ${JSON.stringify(r)}`);
    const live = Number(d.live.replace(/,/g, ''));
    const cand = Number(d.candidate.replace(/,/g, ''));
    check(Math.abs(cand - 2 * live) < 1e-6 * Math.max(1, Math.abs(cand)), `the candidate is twice the live value: ${JSON.stringify(d)}`);
  }
  check(diff.rows.filter((r) => r.change === 'removed').every((r) => r.cells.some((c) => c === 'g2')), 'the removed rows are station g2');
  await shot(page, 'candidate-diff', { selector: '#candidate-section' });

  // Promote: the console's view and the analysts' chart show the candidate's rows.
  await clickTwice(page, '#cand-promote');
  await waitUntil(page, 'the promoted version in the analyses table', (sel) => {
    const tr = document.querySelector(sel);
    return tr && tr.dataset.version === '2' && tr.dataset.candidate === '';
  }, row);
  for (const d of days) await waitCell(page, analysis, d, 'ready');
  const day = days[1] || days[0];
  await waitUntil(page, `the console's band of ${analysis} to have read version 2`, ([a]) => {
    const tip = document.querySelector(`#map .band[data-analysis="${a}"] .band-meta`);
    return tip && tip.innerText.includes('v2');
  }, [analysis]);
  const opened = await openCell(page, analysis, day);
  step('the promoted partition in the console', opened);
  const sourceAt = opened.rowHeader.indexOf('source');
  const avgAt = opened.rowHeader.indexOf('avg_mw');
  check(sourceAt >= 0 && avgAt >= 0, `the rows show source and avg_mw: ${opened.rowHeader}`);
  const promotedRows = opened.rows.map((r) => [r[sourceAt], Number(r[avgAt].replace(/,/g, ''))]);
  const expected = diff.rows.filter((r) => r.change === 'changed' && r.partition === day)
    // cells[0] is the kind of change, then the key columns (source and n, in the
    // order the diff gives them), then the changed columns.
    .map((r) => [r.cells.find((c) => /^g\d+$/.test(c)), Number(r.deltas.find((x) => x.column === 'avg_mw').candidate.replace(/,/g, ''))]);
  step('expected rows', { expected, promoted: promotedRows });
  check(promotedRows.length === 2 && promotedRows.every(([s]) => s !== 'g2'), `the promoted partition has the candidate's two stations: ${JSON.stringify(promotedRows)}`);
  for (const [s, v] of promotedRows) {
    const e = expected.find(([es]) => es === s);
    check(e && Math.abs(e[1] - v) < 1e-6 * Math.max(1, Math.abs(v)), `the console shows the candidate's ${s}: ${v} vs ${JSON.stringify(expected)}`);
  }
  await waitUntil(analysts, 'the analysts\' chart to show the promoted version', (sel) => {
    const c = document.querySelector(sel);
    return c && c.dataset.series === '2' && /v2/.test(document.getElementById('chart-summary').innerText);
  }, chartSel);
  step('the analysts\' chart after', { series: 2, summary: await analysts.$eval('#chart-summary', (e) => e.innerText) });
  mkdirSync(artifacts, { recursive: true });
  const pagePath = join(artifacts, `${prefix}-analysts-page-promoted.png`);
  await analysts.screenshot({ path: pagePath, fullPage: true });
  summary.screenshots.push(pagePath);
  await shot(page, 'promoted');

  // Discard another candidate.
  const put = await api('PUT', `/v1/analyses/${analysis}?candidate=true`, { kind: env.KIND, sql: env.OTHER_CANDIDATE_SQL });
  check(put.status === 201, `registering another candidate: ${put.status} ${put.text}`);
  await page.click('#analyses-refresh');
  await waitUntil(page, 'the new candidate in the analyses table', (sel) => document.querySelector(sel)?.dataset.candidate === '3', row);
  await page.click(`${row} button[data-action="candidate"]`);
  await waitUntil(page, 'the candidate panel', () => document.getElementById('candidate-section').dataset.loaded === 'true');
  await clickTwice(page, '#cand-discard');
  await waitUntil(page, 'the candidate to be gone', (sel) => document.querySelector(sel)?.dataset.candidate === '', row);
  const gone = await api('GET', `/v1/analyses/${analysis}/candidate`);
  check(gone.status === 404, `the service has no candidate any more: ${gone.status}`);
  step('discarded');
}

const SCENARIOS = { map: mapScenario, progress: progressScenario, candidate: candidateScenario };

async function main() {
  const started = Date.now();
  const run = SCENARIOS[scenario];
  if (!run) throw new Error(`unknown SCENARIO ${scenario}`);
  const origin = new URL(base).origin;
  const wsOrigin = origin.replace(/^http/, 'ws');
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    page = await context.newPage();
    page.on('pageerror', (e) => summary.page_errors.push(String(e && e.message ? e.message : e)));
    page.on('console', (m) => { if (m.type() === 'error') summary.console_errors.push(m.text().slice(0, 300)); });
    context.on('request', (r) => {
      const u = r.url();
      if (u.startsWith('data:') || u.startsWith('blob:')) return;
      const o = new URL(u).origin;
      if (o !== origin && o !== wsOrigin) summary.external_requests.push(u);
    });
    await page.addInitScript(installRecorder);
    const response = await page.goto(`${base}/admin?${new URLSearchParams({ token, from, to })}`, { waitUntil: 'load' });
    check(response && response.ok(), `GET /admin answered ${response ? response.status() : 'nothing'}`);
    await waitUntil(page, 'the console to accept the token', () => document.body.dataset.console === 'open');
    const url = page.url();
    check(!url.includes(token), 'the token is dropped from the address bar');
    await waitUntil(page, 'the map to be read', () => document.getElementById('map').dataset.loaded === 'true');
    await waitUntil(page, 'the websocket', () => document.getElementById('conn').dataset.state === 'live');
    await run(page, context);
    check(!summary.page_errors.length, `uncaught errors in the page: ${summary.page_errors[0]}`);
    check(!summary.external_requests.length, `the console loaded something from another origin: ${summary.external_requests[0]}`);
    summary.ok = true;
  } catch (e) {
    summary.error = String(e && e.message ? e.message : e);
    if (page) {
      try {
        summary.message_shown = await page.evaluate(() => (document.getElementById('message').hidden ? null : document.getElementById('message-text').innerText));
        await page.setViewportSize({ width: 1280, height: 900 });
        await shot(page, `${scenario}-failure`);
      } catch (_) { /* the page is gone */ }
    }
  } finally {
    await browser.close();
  }
  summary.elapsed_ms = Date.now() - started;
  console.log(JSON.stringify(summary));
  return summary.ok;
}

main().then(
  (ok) => process.exit(ok ? 0 : 1),
  (e) => {
    summary.error = String(e && e.stack ? e.stack : e);
    console.log(JSON.stringify(summary));
    process.exit(1);
  },
);
