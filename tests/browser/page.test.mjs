// Browser test of the visualizer page, driven by playwright-core with Debian's chromium.
//
// Environment:
//   SCHOLIA_URL       base URL of a running server (required), e.g. http://127.0.0.1:7070
//   SCHOLIA_TOKEN     a read or admin token (required)
//   SCHOLIA_ANALYSIS  the analysis to watch (required)
//   SCHOLIA_FROM      first day, YYYY-MM-DD (default: 6 days ago, UTC)
//   SCHOLIA_TO        end day, exclusive (default: tomorrow, UTC)
//   SCREENSHOT        output PNG path (default: scholia-page.png)
//   CHROMIUM          browser executable (default: /usr/bin/chromium)
//   DEADLINE_MS       how long to wait for a drawn chart (default: 60000)
//
// It opens `${SCHOLIA_URL}/?token=…&analysis=…&from=…&to=…`, records whether the page
// showed partitions waiting/queued/running or went straight to charts, waits (polling,
// with a deadline) until a chart is drawn with at least one point, saves a screenshot,
// prints one JSON line and exits non-zero on failure.
//
// Run: cd tests/browser && npm ci && node page.test.mjs

import { mkdirSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const CHART_SELECTOR = '#charts[data-ready="true"] .chart[data-ready="true"] canvas';
const PENDING_STATES = ['waiting', 'queued', 'running'];

function day(offsetDays) {
  const now = new Date();
  const t = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate()) + offsetDays * 864e5;
  return new Date(t).toISOString().slice(0, 10);
}

const env = process.env;
const missing = ['SCHOLIA_URL', 'SCHOLIA_TOKEN', 'SCHOLIA_ANALYSIS'].filter((k) => !env[k]);
if (missing.length) {
  console.log(JSON.stringify({ test: 'visualizer-page', ok: false, error: `missing environment: ${missing.join(', ')}` }));
  process.exit(2);
}

const base = env.SCHOLIA_URL.replace(/\/+$/, '');
const token = env.SCHOLIA_TOKEN;
const analysis = env.SCHOLIA_ANALYSIS;
const from = env.SCHOLIA_FROM || day(-6);
const to = env.SCHOLIA_TO || day(1);
const screenshot = resolve(env.SCREENSHOT || 'scholia-page.png');
const deadlineMs = Number(env.DEADLINE_MS || 60000);
const executablePath = env.CHROMIUM || '/usr/bin/chromium';

const query = new URLSearchParams({ token, analysis, from, to });
const pageUrl = `${base}/?${query}`;
const shownUrl = pageUrl.replace(encodeURIComponent(token), '***');

const summary = {
  test: 'visualizer-page',
  ok: false,
  url: shownUrl,
  analysis,
  from,
  to,
  saw: null,               // "pending-then-charts" | "straight-to-charts" (| "pending-no-charts" | "no-charts")
  states_seen: [],         // every data-status a partition cell had in the DOM
  pending_states_seen: [], // the subset among waiting/queued/running
  overlay_texts: [],       // texts the "waiting" overlay showed
  ws_messages: {},         // server websocket messages by type
  charts: 0,
  ready_charts: 0,
  partitions: {},          // final status of each partition cell
  failures: [],            // failed partitions with their error
  page_errors: [],
  console_errors: [],
  external_requests: [],
  screenshot,
  elapsed_ms: 0,
  error: null,
};

/** Runs in the page before its scripts: records every status a partition cell ever had. */
function installRecorder() {
  const seen = new Set();
  const overlay = new Set();
  window.__scholiaTest = { seen, overlay };
  const noteCell = (node) => {
    if (node.nodeType !== 1) return;
    const cells = node.matches('.cell[data-status]') ? [node] : node.querySelectorAll('.cell[data-status]');
    for (const c of cells) seen.add(c.dataset.status);
  };
  const noteOverlay = () => {
    const o = document.getElementById('overlay');
    if (o && !o.hidden) overlay.add(document.getElementById('overlay-text')?.textContent || '');
  };
  const observer = new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === 'attributes') {
        if (r.attributeName === 'data-status') {
          if (r.oldValue) seen.add(r.oldValue);
          noteCell(r.target);
        }
      } else {
        for (const n of r.addedNodes) noteCell(n);
      }
    }
    noteOverlay();
  });
  const start = () => observer.observe(document.documentElement, {
    subtree: true,
    childList: true,
    characterData: true,
    attributes: true,
    attributeOldValue: true,
    attributeFilter: ['data-status', 'hidden'],
  });
  if (document.documentElement) start();
  else document.addEventListener('DOMContentLoaded', start);
}

async function main() {
  const started = Date.now();
  const origin = new URL(base).origin;
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    page = await context.newPage();
    page.on('pageerror', (e) => summary.page_errors.push(String(e && e.message ? e.message : e)));
    page.on('console', (m) => {
      if (m.type() === 'error') summary.console_errors.push(m.text().slice(0, 300));
    });
    page.on('request', (r) => {
      const u = r.url();
      if (!u.startsWith('data:') && !u.startsWith('blob:') && new URL(u).origin !== origin) {
        const wsOrigin = origin.replace(/^http/, 'ws');
        if (new URL(u).origin !== wsOrigin) summary.external_requests.push(u);
      }
    });
    page.on('websocket', (ws) => {
      ws.on('framereceived', (f) => {
        try {
          const m = JSON.parse(typeof f.payload === 'string' ? f.payload : f.payload.toString('utf8'));
          const t = (m && m.type) || 'unknown';
          summary.ws_messages[t] = (summary.ws_messages[t] || 0) + 1;
        } catch (_) {
          summary.ws_messages.unparsable = (summary.ws_messages.unparsable || 0) + 1;
        }
      });
    });
    await page.addInitScript(installRecorder);

    const response = await page.goto(pageUrl, { waitUntil: 'load', timeout: deadlineMs });
    if (!response || !response.ok()) {
      throw new Error(`GET / answered ${response ? response.status() : 'nothing'}`);
    }

    // Poll (no fixed sleeps) until a chart is drawn with at least one point.
    const remaining = Math.max(1000, deadlineMs - (Date.now() - started));
    try {
      await page.waitForSelector(CHART_SELECTOR, { state: 'attached', timeout: remaining });
    } catch (e) {
      throw new Error(`no chart drawn within ${deadlineMs} ms`);
    }
    summary.ok = true;
  } catch (e) {
    summary.error = String(e && e.message ? e.message : e);
  } finally {
    if (page) {
      try {
        const seen = await page.evaluate(() => {
          const rec = window.__scholiaTest || { seen: new Set(), overlay: new Set() };
          const strip = document.getElementById('status-strip');
          for (const s of (strip?.dataset.seenStates || '').split(' ')) if (s) rec.seen.add(s);
          const partitions = {};
          const failures = [];
          for (const c of document.querySelectorAll('#status-strip .cell[data-partition]')) {
            partitions[c.dataset.partition] = c.dataset.status;
            if (c.dataset.status === 'failed') {
              failures.push({ partition: c.dataset.partition, error: c.querySelector('.cell-error')?.textContent || '' });
            }
          }
          return {
            seen: [...rec.seen].sort(),
            overlay: [...rec.overlay],
            partitions,
            failures,
            charts: document.querySelectorAll('#charts .chart').length,
            readyCharts: document.querySelectorAll('#charts .chart[data-ready="true"] canvas').length,
            message: document.getElementById('message')?.hidden ? null : document.getElementById('message-text')?.textContent,
          };
        });
        summary.states_seen = seen.seen;
        summary.pending_states_seen = seen.seen.filter((s) => PENDING_STATES.includes(s));
        summary.overlay_texts = seen.overlay.slice(0, 10);
        summary.partitions = seen.partitions;
        summary.failures = seen.failures;
        summary.charts = seen.charts;
        summary.ready_charts = seen.readyCharts;
        if (seen.message) summary.message = seen.message;
      } catch (e) {
        summary.error = summary.error || `could not read the page: ${e.message}`;
      }
      try {
        mkdirSync(dirname(screenshot), { recursive: true });
        await page.screenshot({ path: screenshot, fullPage: true });
      } catch (e) {
        summary.screenshot = null;
        summary.error = summary.error || `screenshot failed: ${e.message}`;
      }
    }
    await browser.close();
  }

  const pending = summary.pending_states_seen.length > 0;
  summary.saw = summary.ok
    ? (pending ? 'pending-then-charts' : 'straight-to-charts')
    : (pending ? 'pending-no-charts' : 'no-charts');
  if (summary.ok && summary.page_errors.length) {
    summary.ok = false;
    summary.error = `uncaught errors in the page: ${summary.page_errors[0]}`;
  }
  if (summary.ok && summary.external_requests.length) {
    summary.ok = false;
    summary.error = `the page loaded something from another origin: ${summary.external_requests[0]}`;
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
