// agentd's live web view. Everything comes from the daemon's own origin: the state and
// events over one server-sent event stream (/api/events), actions as JSON POSTs. Text the
// agents chose (paths, command lines) is only ever set as textContent, never as HTML.
'use strict';

const MAX_EVENTS = 1000;
const KILL_ARMED_MS = 4000;
const SIGN_KEY = '~/.ssh/id_ed25519';

const $ = (id) => document.getElementById(id);
const rows = new Map(); // agent id -> <tr>
const cards = new Map(); // request id -> card element
let selected = null; // the agent whose detail is open

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function toast(text, isError) {
  const t = $('toast');
  t.textContent = text;
  t.className = isError ? 'error' : '';
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, isError ? 8000 : 4000);
}

async function api(method, path, body) {
  const opts = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const json = (r.headers.get('content-type') || '').includes('application/json');
  const data = json ? await r.json() : await r.text();
  if (!r.ok) {
    throw new Error(typeof data === 'string' ? data.trim() : (data.error || r.statusText));
  }
  return data;
}

// Control and format characters (bidirectional overrides, zero-width characters, tags)
// as \u{…}, as the daemon escapes the text the agents chose: a tooltip reads as what it
// holds. Line breaks stay.
const HIDDEN = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu;
function printable(text) {
  return String(text).replace(HIDDEN, (c) => (c === '\n' ? c : `\\u{${c.codePointAt(0).toString(16)}}`));
}

// One argument as a shell would need it: bare when it is plainly one word, else in single
// quotes, so that `a b` and `a` `b` read differently.
function shellWord(word) {
  const w = String(word);
  return /^[A-Za-z0-9_@%+=:,.\/-]+$/.test(w) ? w : `'${w.replace(/'/g, "'\\''")}'`;
}

function duration(s) {
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

function setConn(cls, text) {
  const c = $('conn');
  c.className = `conn ${cls}`;
  c.textContent = text;
}

// ---- agents ---------------------------------------------------------------------------

function agentLink(id) {
  const a = el('a', 'agent', id);
  a.href = '#';
  a.addEventListener('click', (e) => { e.preventDefault(); openDetail(id); });
  return a;
}

function newRow(r) {
  const tr = el('tr');
  tr.dataset.agent = r.id;
  const cell = (cls) => { const td = el('td', cls); tr.append(td); return td; };
  cell('id').append(agentLink(r.id));
  cell('profile');
  cell('state-cell').append(el('span', 'state'));
  cell('pid num');
  cell('uptime num');
  cell('events num');
  cell('denials num');
  cell('lost num');
  cell('owner num');
  const kill = el('button', 'kill', 'Kill');
  kill.title = 'the kill switch: every process of the agent, now';
  kill.addEventListener('click', () => onKill(r.id, kill));
  cell('actions').append(kill);
  return tr;
}

function setText(node, text) {
  const t = String(text);
  if (node.textContent !== t) node.textContent = t;
}

function updateRow(tr, r) {
  const q = (cls) => tr.querySelector(`td.${cls}`);
  setText(q('profile'), r.profile);
  const st = tr.querySelector('.state');
  setText(st, r.state);
  st.className = `state ${r.state}`;
  tr.dataset.state = r.state;
  setText(q('pid'), r.pid || '–');
  setText(q('uptime'), duration(r.uptime_s));
  setText(q('events'), r.events);
  setText(q('denials'), r.denials);
  q('denials').classList.toggle('some', r.denials > 0);
  setText(q('lost'), r.lost);
  setText(q('owner'), r.owner_uid);
  const live = r.state === 'running' || r.state === 'starting';
  const kill = tr.querySelector('button.kill');
  kill.disabled = !live;
  if (!live) disarm(kill);
}

function renderAgents(list) {
  const body = document.querySelector('#agents tbody');
  const seen = new Set();
  // Running agents first, newest first; then those that ended.
  const order = (r) => (r.state === 'running' || r.state === 'starting' ? 0 : 1);
  list.sort((a, b) => order(a) - order(b) || a.uptime_s - b.uptime_s);
  list.forEach((r, i) => {
    seen.add(r.id);
    let tr = rows.get(r.id);
    if (!tr) {
      tr = newRow(r);
      rows.set(r.id, tr);
    }
    updateRow(tr, r);
    if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
  });
  for (const [id, tr] of rows) {
    if (!seen.has(id)) { tr.remove(); rows.delete(id); }
  }
  const running = list.filter((r) => order(r) === 0).length;
  $('agents-count').textContent = list.length ? `${running} running, ${list.length - running} ended` : '';
  $('no-agents').hidden = list.length > 0;
  if (selected) {
    const r = list.find((x) => x.id === selected);
    if (r) fillRow(r);
  }
}

function disarm(button) {
  clearTimeout(button.timer);
  button.classList.remove('armed');
  button.textContent = 'Kill';
}

// The kill switch takes two clicks: the first arms it for a few seconds.
async function onKill(id, button) {
  if (!button.classList.contains('armed')) {
    button.classList.add('armed');
    button.textContent = 'Confirm kill';
    button.timer = setTimeout(() => disarm(button), KILL_ARMED_MS);
    return;
  }
  disarm(button);
  button.disabled = true;
  try {
    const r = await api('POST', `/api/agents/${encodeURIComponent(id)}/kill`);
    toast(r.ok);
  } catch (e) {
    toast(`kill ${id}: ${e.message}`, true);
    button.disabled = false;
  }
}

// ---- events ---------------------------------------------------------------------------

function verdictWord(v) {
  return { allow: 'allow', deny: 'DENY', killed: 'KILLED', none: '–' }[v] || v;
}

function eventItem(v, fresh) {
  const e = v.event;
  const li = el('li');
  if (v.trip) li.classList.add('trip');
  else if (v.stands_out) li.classList.add('deny');
  if (fresh && (v.trip || v.stands_out)) li.classList.add('fresh');
  li.dataset.agent = e.agent;
  li.dataset.kind = v.kind;
  li.dataset.verdict = e.verdict;
  const time = el('time', null, (e.ts || '').slice(11, 23));
  time.dateTime = e.ts || '';
  li.append(time, el('span', 'verdict', verdictWord(e.verdict)), el('span', 'kind', v.kind),
    el('span', 'target', v.target));
  const errno = e.errno ? ` errno ${e.errno}` : '';
  li.append(el('span', 'where', `${v.comm}[${e.pid}] · ${v.layer}${errno}`));
  const who = el('span', 'who');
  who.append(agentLink(e.agent));
  li.append(who);
  li.title = printable(JSON.stringify(e, null, 1));
  return li;
}

function push(list, li) {
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

function addEvent(v, fresh) {
  push($('events'), eventItem(v, fresh));
  if (selected && v.event.agent === selected) push($('detail-events'), eventItem(v, fresh));
}

// ---- approvals ------------------------------------------------------------------------

function scopeOf(select) {
  return select.value;
}

function answerOf(scope, reason) {
  if (scope === 'deny') return reason ? { answer: 'deny', reason } : { answer: 'deny' };
  if (scope === 'once' || scope === 'session') return { answer: 'allow', scope };
  return { answer: 'allow', scope: { for: Number(scope) } };
}

async function showMessage(card, req) {
  const scope = scopeOf(card.querySelector('select'));
  try {
    const text = await api('GET',
      `/api/approvals/${encodeURIComponent(req.id)}/message?scope=${encodeURIComponent(scope)}`);
    card.querySelector('.message').textContent = text;
    card.querySelector('.command').textContent =
      `ssh-keygen -q -Y sign -n agentd-approval -f ${SIGN_KEY} <<'AGENTD_MESSAGE'\n${text}AGENTD_MESSAGE`;
  } catch (e) {
    card.querySelector('.message').textContent = e.message;
  }
}

function newCard(req) {
  const card = el('div', 'card');
  card.dataset.request = req.id;
  card.dataset.agent = req.agent;
  card.append(el('div', 'what', req.what));
  const caller = req.chain && req.chain[0] ? ` by pid ${req.chain[0].pid} \`${req.chain[0].cmdline}\`` : '';
  const meta = el('div', 'meta');
  meta.append(agentLink(req.agent), ` (${req.profile})${caller}; since ${req.since}, waits ${req.timeout_s} s; `,
    el('code', null, req.id));
  card.append(meta);
  if (req.argv && req.argv.length) card.append(el('div', 'meta', `argv: ${req.argv.map(shellWord).join(' ')}`));

  const select = el('select');
  for (const [value, label] of [['once', 'this call only'], ['600', 'for 10 minutes'],
    ['3600', 'for 1 hour'], ['session', 'until the agent ends']]) {
    const o = el('option', null, label);
    o.value = value;
    select.append(o);
  }
  const allow = el('button', 'allow', 'Allow');
  const deny = el('button', 'deny', 'Deny');
  const reason = el('input');
  reason.type = 'text';
  reason.placeholder = 'reason (for a denial)';
  const row = el('div', 'row');
  row.append(select, allow, deny, reason);
  card.append(row);

  let signature = null;
  if (req.require_signature) {
    card.append(el('div', 'needs', 'Needs a signed approval: sign this text with a key of the daemon\'s allowed signers'));
    card.append(el('pre', 'message'));
    card.append(el('div', 'meta', 'for example:'));
    card.append(el('pre', 'command'));
    signature = el('textarea');
    signature.placeholder = '-----BEGIN SSH SIGNATURE-----\n…\n-----END SSH SIGNATURE-----';
    card.append(signature);
    select.addEventListener('change', () => showMessage(card, req));
    showMessage(card, req);
  }

  const send = async (scope) => {
    allow.disabled = true;
    deny.disabled = true;
    const body = { answer: answerOf(scope, reason.value.trim()) };
    if (signature && scope !== 'deny' && signature.value.trim()) body.signature = signature.value;
    try {
      const r = await api('POST', `/api/approvals/${encodeURIComponent(req.id)}`, body);
      toast(r.ok);
      dropCard(req.id);
    } catch (e) {
      toast(`${req.id}: ${e.message}`, true);
      allow.disabled = false;
      deny.disabled = false;
    }
  };
  allow.addEventListener('click', () => send(scopeOf(select)));
  deny.addEventListener('click', () => send('deny'));
  return card;
}

function addCard(req) {
  if (cards.has(req.id)) return;
  const card = newCard(req);
  cards.set(req.id, card);
  $('approvals').append(card);
  countCards();
}

function dropCard(id) {
  const card = cards.get(id);
  if (card) card.remove();
  cards.delete(id);
  countCards();
}

function countCards() {
  $('approvals-count').textContent = cards.size ? String(cards.size) : '';
  $('no-approvals').hidden = cards.size > 0;
}

function renderApprovals(list) {
  const ids = new Set(list.map((r) => r.id));
  for (const id of [...cards.keys()]) if (!ids.has(id)) dropCard(id);
  list.forEach(addCard);
}

// ---- an agent's detail ----------------------------------------------------------------

function fillRow(r) {
  const dl = $('detail-row');
  dl.textContent = '';
  for (const [k, v] of [['profile', r.profile], ['state', r.state], ['pid', r.pid],
    ['uptime', duration(r.uptime_s)], ['events', r.events], ['denials', r.denials],
    ['lost', r.lost], ['owner uid', r.owner_uid], ['cgroup', r.cgroup]]) {
    dl.append(el('dt', null, k), el('dd', null, v));
  }
}

async function openDetail(id) {
  selected = id;
  for (const [rid, tr] of rows) tr.classList.toggle('selected', rid === id);
  $('detail-section').hidden = false;
  $('detail-id').textContent = id;
  $('detail-events').textContent = '';
  $('detail-policy').textContent = 'loading…';
  try {
    const d = await api('GET', `/api/agents/${encodeURIComponent(id)}`);
    if (selected !== id) return;
    fillRow(d.row);
    $('detail-policy').textContent = d.policy ||
      'not kept: the daemon keeps an agent\'s compiled profile while it runs';
    for (const v of d.events) push($('detail-events'), eventItem(v, false));
  } catch (e) {
    $('detail-policy').textContent = e.message;
  }
}

function closeDetail() {
  selected = null;
  $('detail-section').hidden = true;
  for (const tr of rows.values()) tr.classList.remove('selected');
}

// ---- the stream -----------------------------------------------------------------------

function connect() {
  const es = new EventSource('/api/events');
  let backlog = true;
  es.addEventListener('hello', (m) => {
    const me = JSON.parse(m.data);
    $('me').textContent = `acting as uid ${me.uid} · session until ${me.expires.replace('T', ' ')}`;
    // A reconnection sends the recent events again.
    $('events').textContent = '';
    backlog = true;
    setConn('live', 'live');
  });
  es.addEventListener('state', (m) => {
    const s = JSON.parse(m.data);
    renderAgents(s.agents);
    renderApprovals(s.approvals);
    // The first state follows the backlog of recent events: what comes after is live.
    backlog = false;
  });
  es.addEventListener('ev', (m) => addEvent(JSON.parse(m.data), !backlog));
  es.addEventListener('held', (m) => addCard(JSON.parse(m.data)));
  es.addEventListener('settled', (m) => dropCard(JSON.parse(m.data).id));
  es.addEventListener('lost', (m) => {
    const li = el('li', 'lost', `… ${JSON.parse(m.data).count} events missed (this page fell behind)`);
    $('events').prepend(li);
  });
  es.addEventListener('expired', (m) => {
    es.close();
    setConn('gone', 'session expired');
    toast(JSON.parse(m.data).why, true);
  });
  es.onopen = () => setConn('live', 'live');
  es.onerror = async () => {
    if (es.readyState !== EventSource.CLOSED) {
      setConn('wait', 'reconnecting…');
      return;
    }
    try {
      await api('GET', '/api/me');
      setConn('wait', 'reconnecting…');
      setTimeout(connect, 2000);
    } catch (e) {
      setConn('gone', 'signed out');
      toast(e.message, true);
    }
  };
}

function init() {
  $('only-refusals').addEventListener('change', (e) => {
    $('events').classList.toggle('only-out', e.target.checked);
    $('detail-events').classList.toggle('only-out', e.target.checked);
  });
  $('detail-close').addEventListener('click', closeDetail);
  countCards();
  connect();
}

init();
