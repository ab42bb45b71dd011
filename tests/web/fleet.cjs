// Headless Chromium against a running controller (driven by tests/it/web.rs):
// log in with a token, see the fleet's nodes, start a rolling deploy from the
// app page and watch the deployment page show each node's steps without a
// reload, then see the refused buttons of a read-only token and the app's
// environment (names and layers, no value). Screenshots go
// to $SCREENSHOTS. Prints one JSON line of what it saw; exits 1 on failure.
'use strict';
const path = require('path');
const { chromium } = require(path.join(process.env.PLAYWRIGHT_MODULES, 'playwright-core'));

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const BASE = env('BASE');
const SHOTS = env('SCREENSHOTS');
const NODES = env('NODES').split(',');
// Every wait is bounded.
const WAIT_MS = 120000;

function check(cond, what) {
  if (!cond) throw new Error(what);
}

async function login(browser, token, viewport) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  await page.goto(BASE + '/');
  check(new URL(page.url()).pathname === '/login', `not sent to /login but ${page.url()}`);
  await page.fill('#token', token);
  await Promise.all([page.waitForURL(BASE + '/'), page.click('button[type=submit]')]);
  return { context, page };
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    // launch() gives each run a fresh temporary profile (user-data-dir).
  });
  const seen = {};
  try {
    // 1. Log in with a deploy token; the fleet shows the three nodes online.
    const { context, page } = await login(browser, env('DEPLOY_TOKEN'), { width: 1280, height: 900 });
    const rows = await page.$$eval('#nodes tr[data-node]', (trs) =>
      trs.map((tr) => ({ name: tr.dataset.node, state: tr.querySelector('.st').textContent })));
    seen.fleet = rows;
    for (const n of NODES) {
      check(rows.some((r) => r.name === n && r.state === 'online'), `node ${n} not online on the fleet page: ${JSON.stringify(rows)}`);
    }
    const matrix = await page.$$eval('#matrix td', (tds) => tds.map((td) => td.textContent));
    check(matrix.filter((t) => t.includes('v1')).length === NODES.length, `matrix: ${matrix}`);
    await page.screenshot({ path: path.join(SHOTS, 'fleet.png'), fullPage: true });

    // 2. A rolling deploy from the app page, through the confirmation step.
    await page.goto(BASE + '/apps/web');
    await page.fill('input[name=artifact_url]', env('ARTIFACT_URL'));
    await page.fill('input[name=sha256]', env('SHA256'));
    await page.fill('input[name=release_id]', 'v2');
    await page.selectOption('select[name=strategy]', 'rolling');
    await page.fill('input[name=max_parallel]', '1');
    await Promise.all([page.waitForURL(BASE + '/apps/web/deploy'), page.click('text=Deploy…')]);
    check((await page.textContent('h1')).includes('Confirm'), 'no confirmation page');
    await page.screenshot({ path: path.join(SHOTS, 'confirm.png') });
    await Promise.all([page.waitForURL(/\/deployments\/d-[0-9a-f]{16}$/), page.click('#confirm')]);
    seen.deployment = page.url();
    // A reload would lose this marker.
    await page.evaluate(() => { window.__noReload = true; });
    // Each node's steps appear while it runs, one batch after the other.
    const timeline = [];
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const state = await page.$$eval('#nodes tr[data-node-id]', (trs) => trs.map((tr) => ({
        node: tr.cells[0].textContent,
        outcome: tr.querySelector('[data-cell=outcome]').textContent,
        steps: tr.querySelectorAll('[data-cell=steps] li').length,
      })));
      const status = await page.textContent('#status');
      const key = JSON.stringify(state.map((s) => [s.node, s.outcome, s.steps > 0]));
      if (!timeline.length || timeline[timeline.length - 1].key !== key) timeline.push({ key, state, status });
      if (timeline.length === 3) await page.screenshot({ path: path.join(SHOTS, 'deployment-running.png'), fullPage: true });
      if (status !== 'running') break;
      check(Date.now() < deadline, `the deployment did not finish: ${JSON.stringify(timeline)}`);
      await page.waitForTimeout(100);
    }
    seen.timeline = timeline.map((t) => t.state.map((s) => `${s.node}:${s.outcome}:${s.steps}`).join(' '));
    check(await page.evaluate(() => window.__noReload === true), 'the page reloaded');
    check((await page.textContent('#status')) === 'succeeded',
      `status ${await page.textContent('#status')}: ${await page.textContent('#nodes')} ${JSON.stringify(seen.timeline)}`);
    const final = timeline[timeline.length - 1].state;
    for (const s of final) {
      check(s.outcome === 'succeeded' && s.steps > 0, `node ${s.node}: ${JSON.stringify(s)}`);
    }
    // Rolling, one node a batch: some moment showed a node done while another had not started.
    check(timeline.some((t) => t.state.some((s) => s.outcome === 'succeeded') && t.state.some((s) => s.outcome === 'pending')),
      `never one batch after another: ${JSON.stringify(seen.timeline)}`);
    const batches = await page.$$eval('#batches li', (lis) => lis.map((li) => li.textContent));
    check(batches.length === NODES.length, `batches: ${batches}`);
    seen.batches = batches;
    await page.screenshot({ path: path.join(SHOTS, 'deployment.png'), fullPage: true });

    // The audit log, filtered by kind and app, from its form.
    await page.goto(BASE + '/audit');
    await page.fill('input[name=kind]', 'DEPLOY_COMPLETED');
    await page.fill('input[name=app]', 'web');
    await Promise.all([page.waitForURL(/\/audit\?/), page.click('text=Filter')]);
    const kinds = await page.$$eval('#audit tr td:nth-child(2)', (tds) => tds.map((td) => td.textContent));
    check(kinds.length === 2 && kinds.every((k) => k === 'DEPLOY_COMPLETED'), `audit filter: ${kinds}`);
    seen.audit = kinds;
    const bad = await page.goto(BASE + '/audit?kind=%3Cscript%3E');
    check(bad.status() === 400 && (await bad.text()).includes('"field":"kind"'), `bad kind answered ${bad.status()}`);

    // A phone-sized fleet page.
    const phone = await context.newPage();
    await phone.setViewportSize({ width: 390, height: 844 });
    await phone.goto(BASE + '/');
    await phone.screenshot({ path: path.join(SHOTS, 'fleet-phone.png'), fullPage: true });
    await context.close();

    // 3. A read token: the buttons are refused, and a forged POST too.
    const reader = await login(browser, env('READ_TOKEN'), { width: 1280, height: 900 });
    await reader.page.goto(BASE + '/apps/web');
    const disabled = await reader.page.$$eval('form.act button', (bs) => bs.map((b) => b.disabled));
    check(disabled.length === 3 && disabled.every((d) => d), `buttons not disabled: ${disabled}`);
    // The app's environment: names with their layer, never a value.
    const envNames = await reader.page.$$eval('#env-names tr', (trs) =>
      trs.slice(1).map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent.trim())));
    seen.env = envNames;
    check(envNames.some((r) => r[0] === env('ENV_NAME') && r[1] === env('ENV_LAYER')),
      `env names on the app page: ${JSON.stringify(envNames)}`);
    check(!(await reader.page.content()).includes(env('ENV_VALUE')), 'the app page shows an env value');
    const refused = await reader.page.textContent('.refused');
    check(refused.includes('may not deploy web'), `refusal text: ${refused}`);
    seen.refused = refused;
    const status = await reader.page.evaluate(async () => {
      const csrf = document.querySelector('input[name=_csrf]').value;
      const r = await fetch('/apps/web/restart', { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: `_csrf=${csrf}&confirm=yes` });
      return r.status;
    });
    check(status === 403, `a read token's restart answered ${status}`);
    // Without the CSRF token the same session's POST is refused too.
    const noCsrf = await reader.page.evaluate(async () => (await fetch('/apps/web/restart', { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: 'confirm=yes' })).status);
    check(noCsrf === 403, `a POST without CSRF token answered ${noCsrf}`);
    await reader.page.screenshot({ path: path.join(SHOTS, 'app-read-only.png'), fullPage: true });
    await reader.context.close();
    console.log(JSON.stringify({ ok: true, seen }));
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.log(JSON.stringify({ ok: false, error: String(e && e.stack || e) }));
  process.exit(1);
});
