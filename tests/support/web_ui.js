// The browser side of tests/tests/web_ui.rs: drives the daemon's web view in real headless
// Chromium (Debian's /usr/bin/chromium) through playwright-core.
//
//   node web_ui.js BASE URL_WITH_TOKEN SCREENSHOT_DIR PROFILE_DIR
//
// It talks with the Rust test in lines: it prints `step NAME JSON` on stdout as it goes,
// and waits for a line on stdin where the test must act first (`agent ID`: an agent was
// started; `go`: the agent was told to do something refused; `forged`: the test's forged
// requests are done; `ask ID`: an agent whose calls are held was started; `sig JSON`: the
// signature over the text the page showed). Any failure prints `fail MESSAGE` and exits 1; the browser and its
// profile directory are always removed (the browser here, the directory by the test).
'use strict';

const fs = require('fs');
const path = require('path');
const readline = require('readline');
const { chromium } = require('playwright-core');

// PROFILE_DIR: a new empty directory for Chromium's profile (the test removes it).
const [base, url, shots, profile] = process.argv.slice(2);
const TIMEOUT = 15000;

const input = readline.createInterface({ input: process.stdin });
const lines = [];
const waiting = [];
input.on('line', (l) => (waiting.length ? waiting.shift()(l) : lines.push(l)));
const nextLine = () => new Promise((resolve) => (lines.length ? resolve(lines.shift()) : waiting.push(resolve)));

function step(name, data) {
  process.stdout.write(`step ${name} ${JSON.stringify(data || {})}\n`);
}

function check(ok, what) {
  if (!ok) throw new Error(what);
}

async function main(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const consoleErrors = [];
  // (Chromium asks for a favicon of the refused pages too, on its own time.)
  page.on('console', (m) => m.type() === 'error' && !/favicon/.test(m.location().url)
    && consoleErrors.push(`${m.text()} (${m.location().url})`));
  page.on('pageerror', (e) => consoleErrors.push(String(e)));

  // Without the token: refused, and told what to run.
  let r = await page.goto(`${base}/`);
  const refusedText = await page.textContent('body');
  check(r.status() === 401, `without a token: status ${r.status()}`);
  check(refusedText.includes('agentd ui-url'), `without a token: ${refusedText}`);
  await page.screenshot({ path: path.join(shots, '00-refused.png') });
  r = await page.goto(`${base}/?token=${'0'.repeat(64)}`);
  check(r.status() === 401, `a made-up token: status ${r.status()}`);
  step('refused', { status: 401 });

  // With it: the token becomes a cookie scripts cannot read, and leaves the address bar.
  // (The refusals above are errors in the console: only what follows counts.)
  consoleErrors.length = 0;
  r = await page.goto(url);
  check(r.status() === 200, `with the token: status ${r.status()}`);
  check(page.url() === `${base}/`, `the token stays in the address bar: ${page.url()}`);
  check((await page.evaluate(() => document.cookie)) === '', 'the cookie is readable by scripts');
  const cookies = await context.cookies();
  const cookie = cookies.find((c) => c.name.startsWith('agentd_ui_'));
  check(cookie && cookie.httpOnly && cookie.sameSite === 'Strict', `cookie: ${JSON.stringify(cookies)}`);
  await page.waitForSelector('#conn.live');
  await page.waitForSelector('#me:has-text("acting as uid")');
  await page.screenshot({ path: path.join(shots, '01-loaded.png'), fullPage: true });
  step('loaded', { me: await page.textContent('#me') });

  // An agent the test starts appears in the list, running.
  const agent = (await nextLine()).replace(/^agent /, '');
  const row = `#agents tr[data-agent="${agent}"]`;
  await page.waitForSelector(`${row}[data-state="running"]`);
  step('listed', { row: (await page.textContent(row)).trim() });

  // Its detail: the profile as compiled.
  await page.click(`${row} a.agent`);
  await page.waitForSelector('#detail-policy:has-text("landlock")');
  const policy = await page.textContent('#detail-policy');
  step('detail', { policy: policy.split('\n')[0] });

  // It does something refused: the denial arrives on the open page, highlighted.
  await nextLine();
  const denial = `#events li.deny.fresh[data-agent="${agent}"][data-kind="file_write"][data-verdict="deny"]`;
  await page.waitForSelector(denial);
  const color = await page.$eval(denial, (e) => getComputedStyle(e).backgroundColor);
  check(color !== 'rgba(0, 0, 0, 0)' && color !== 'rgb(255, 255, 255)', `the denial does not stand out: ${color}`);
  const allowed = await page.$$eval(`#events li[data-agent="${agent}"]:not(.deny):not(.trip)`, (l) => l.length);
  await page.waitForSelector(`${row} td.denials.some`);
  await page.screenshot({ path: path.join(shots, '02-denial.png'), fullPage: true });
  step('denial', { text: (await page.textContent(denial)).trim(), background: color, others: allowed });

  // The test forges requests meanwhile (another Host, another Origin): wait for them.
  await nextLine();

  // The kill switch: two clicks (the first arms it).
  const kill = `${row} button.kill`;
  await page.click(kill);
  await page.waitForSelector(`${kill}.armed`);
  await page.click(kill);
  await page.waitForSelector('#toast:has-text("killed")');
  await page.waitForSelector(`${row}[data-state="tripped"], ${row}[data-state="exited"]`);
  await page.waitForSelector(`#events li.trip[data-agent="${agent}"][data-kind="breaker"]`);
  await page.screenshot({ path: path.join(shots, '03-killed.png'), fullPage: true });
  step('killed', { toast: await page.textContent('#toast'), state: await page.getAttribute(row, 'data-state') });

  // A held call of another agent, whose profile wants signed approvals: the open page is
  // the one the daemon asks. Unsigned, the approval is refused; signed (by the test, over
  // the text the card shows), it lets the call through; the next one is denied.
  const asker = (await nextLine()).replace(/^ask /, '');
  const card = `#approvals .card[data-agent="${asker}"]`;
  await page.waitForSelector(`${card} .message:has-text("agentd-approval v1")`);
  const held = await page.getAttribute(card, 'data-request');
  const message = await page.textContent(`${card} .message`);
  const command = await page.textContent(`${card} .command`);
  await page.screenshot({ path: path.join(shots, '04-approval.png'), fullPage: true });
  await page.click(`${card} button.allow`);
  await page.waitForSelector('#toast.error:has-text("needs a signed approval")');
  step('held', { id: held, message, command });
  const signature = JSON.parse((await nextLine()).replace(/^sig /, ''));
  const first = `#approvals .card[data-request="${held}"]`;
  await page.fill(`${first} textarea`, signature);
  await page.click(`${first} button.allow`);
  await page.waitForSelector(first, { state: 'detached' });
  await page.waitForSelector('#toast:not(.error):has-text("allowed once")');
  step('approved', { toast: await page.textContent('#toast') });
  const next = `${card}:not([data-request="${held}"])`;
  await page.waitForSelector(next);
  const second = await page.getAttribute(next, 'data-request');
  await page.fill(`${next} input[type=text]`, 'not from the web view');
  await page.click(`${next} button.deny`);
  await page.waitForSelector(`#approvals .card[data-request="${second}"]`, { state: 'detached' });
  await page.waitForSelector('#toast:not(.error):has-text("denied")');
  step('denied', { id: second });

  // (The unsigned approval's refusal is an error in the console too.)
  const unexpected = consoleErrors.filter((e) => !e.endsWith(`/api/approvals/${held})`));
  check(unexpected.length === 0, `errors in the page: ${unexpected.join('; ')}`);
}

(async () => {
  let context;
  let code = 0;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: '/usr/bin/chromium',
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      viewport: { width: 1400, height: 900 },
    });
    await main(context);
  } catch (e) {
    process.stdout.write(`fail ${String(e && e.stack || e).replace(/\n/g, ' | ')}\n`);
    code = 1;
  } finally {
    if (context) await context.close().catch(() => {});
    input.close();
  }
  process.exit(code);
})();
