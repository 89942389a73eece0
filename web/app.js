// contact-bulk web page: jobs with live progress, export and delete by filter.
'use strict';

const $ = (sel) => document.querySelector(sel);
const el = (tag, props = {}, ...kids) => {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...kids.filter((k) => k != null));
  return e;
};
const list = (s) => s.split(',').map((x) => x.trim()).filter(Boolean);
const ACTIVE = ['pending', 'processing'];
const RANK = { pending: 0, processing: 1, completed: 2, failed: 2, cancelled: 2 };

let token = '';
let authFailed = false;
const jobs = new Map(); // jobId -> { snap, row, rate, last }

// ---------- HTTP ----------

class ApiError extends Error {
  constructor(status, body) {
    const b = body && typeof body.error === 'object' ? body.error : body || {};
    const field = b.field || null;
    let msg = b.message || (typeof b.error === 'string' ? b.error : '') || b.code || `HTTP ${status}`;
    if (status === 401) msg = `401 Unauthorized: ${msg}. Paste a valid, unexpired token.`;
    else if (status === 403) msg = `403 Forbidden: ${msg}`;
    super(msg);
    this.status = status;
    this.field = field;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token}`, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await res.json(); } catch { /* empty or non-JSON body */ }
  if (!res.ok) {
    if (res.status === 401) { authFailed = true; showMsg('#token-msg', new ApiError(401, data)); }
    throw new ApiError(res.status, data);
  }
  return data;
}

// Shows a message (or an error, with its field highlighted) in a .msg paragraph.
function showMsg(sel, msg) {
  const p = $(sel);
  document.querySelectorAll('[aria-invalid="true"]').forEach((i) => i.removeAttribute('aria-invalid'));
  if (msg instanceof Error) {
    p.className = 'msg error';
    p.textContent = msg.message + (msg.field && !msg.message.includes(msg.field) ? ` (field: ${msg.field})` : '');
    const input = msg.field && fieldInput(msg.field);
    if (input) input.setAttribute('aria-invalid', 'true');
  } else {
    p.className = 'msg';
    p.textContent = msg || '';
  }
}

function fieldInput(field) {
  const key = field.replace(/^(filter|advancedParams)\./, '').split(/[.[]/)[0];
  const ids = {
    stageIds: 'f-stage-ids', orgWide: 'f-org-wide', pipelineType: 'f-pipeline-type', ownerFilter: 'f-owner-filter',
    createdAfter: 'f-created-after', createdBefore: 'f-created-before', tags: 'f-tags', anyTags: 'f-any-tags',
    format: 'export-format', gzip: 'export-gzip', fields: 'export-fields', filename: 'export-filename', limit: 'export-limit',
  };
  return ids[key] ? document.getElementById(ids[key]) : null;
}

// ---------- token ----------

function decodeJwt(t) {
  try {
    const b64 = t.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const bin = atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, '='));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0))));
  } catch {
    return null;
  }
}

function useToken(t) {
  token = t.trim();
  authFailed = false;
  sessionStorage.setItem('contact-bulk.token', token);
  $('#token-input').value = token;
  const claims = decodeJwt(token);
  if (!claims) {
    $('#org-label').textContent = 'invalid token';
    $('#scopes').textContent = '';
    showMsg('#token-msg', new Error('This is not a JWT (expected three base64url parts).'));
  } else {
    $('#org-label').textContent = `org ${claims.org || '?'}`;
    $('#scopes').textContent = `scopes: ${claims.scope || 'none'}`;
    const expired = claims.exp && claims.exp * 1000 < Date.now();
    showMsg('#token-msg', expired ? new Error(`Token expired at ${new Date(claims.exp * 1000).toLocaleString()}.`)
      : `User ${claims.sub || '?'}${claims.exp ? `, valid until ${new Date(claims.exp * 1000).toLocaleString()}` : ''}.`);
  }
  jobs.clear();
  $('#jobs').replaceChildren();
  loadJobs();
  loadPipelines();
  connectWs();
}

// ---------- jobs table ----------

async function loadJobs() {
  try {
    const data = await api('GET', '/api/jobs?limit=50');
    (data.jobs || []).forEach((j) => upsert(j));
    showMsg('#jobs-msg', '');
  } catch (e) {
    showMsg('#jobs-msg', e);
  }
  $('#jobs-empty').hidden = jobs.size > 0;
}

function upsert(snap) {
  if (!snap || !snap.jobId) return;
  let entry = jobs.get(snap.jobId);
  if (entry) {
    const old = entry.snap;
    // Ignore stale snapshots (frames may overtake HTTP replies and vice versa).
    if (RANK[snap.status] < RANK[old.status]) return;
    if (RANK[snap.status] === RANK[old.status] && (snap.processed || 0) < (old.processed || 0)) return;
  } else {
    entry = { row: el('tr'), rate: null, last: null };
    entry.row.dataset.jobId = snap.jobId;
    const tbody = $('#jobs');
    const before = [...tbody.children].find((r) => jobs.get(r.dataset.jobId).snap.createdAt < snap.createdAt);
    tbody.insertBefore(entry.row, before || null);
    jobs.set(snap.jobId, entry);
    $('#jobs-empty').hidden = true;
  }
  measureRate(entry, snap);
  entry.snap = snap;
  renderRow(entry);
}

// Smoothed rows/s from successive snapshots (samples at least 0.5 s apart).
function measureRate(entry, snap) {
  const now = performance.now();
  const p = snap.processed || 0;
  if (snap.status !== 'processing') { entry.last = null; return; }
  if (!entry.last) { entry.last = { t: now, p }; return; }
  const dt = (now - entry.last.t) / 1000;
  if (dt < 0.5) return;
  const inst = (p - entry.last.p) / dt;
  entry.rate = entry.rate == null ? inst : 0.3 * inst + 0.7 * entry.rate;
  entry.last = { t: now, p };
}

function percent(s) {
  if (s.status === 'completed') return 100;
  if (!s.total) return ACTIVE.includes(s.status) ? null : 0;
  return Math.min(100, Math.floor((100 * (s.processed || 0)) / s.total));
}

const fmtDuration = (sec) => {
  if (!isFinite(sec) || sec < 0) return '';
  if (sec < 60) return `${Math.ceil(sec)} s`;
  if (sec < 3600) return `${Math.floor(sec / 60)} min ${Math.round(sec % 60)} s`;
  return `${Math.floor(sec / 3600)} h ${Math.round((sec % 3600) / 60)} min`;
};
const fmtBytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`);
const fmtTime = (iso) => el('time', { dateTime: iso || '', textContent: iso ? new Date(iso).toLocaleString() : '' });

function renderRow(entry) {
  const s = entry.snap;
  const pct = percent(s);
  const bar = el('progress', { max: 100, className: 'bar' });
  bar.setAttribute('aria-label', `${s.kind} progress`);
  if (pct != null) { bar.value = pct; bar.setAttribute('aria-valuenow', pct); }
  let speed = '';
  // A job waiting out an outage (snapshot `waiting`: "nats", "mongodb") shows it, not a rate.
  const waiting = ACTIVE.includes(s.status) && s.waiting ? `waiting for ${s.waiting}` : '';
  if (waiting) {
    speed = '';
  } else if (s.status === 'processing' && entry.rate != null) {
    const eta = s.total ? (s.total - s.processed) / entry.rate : NaN;
    speed = `${Math.round(entry.rate)} rows/s${entry.rate > 0 && isFinite(eta) ? ` · ETA ${fmtDuration(eta)}` : ''}`;
  } else if (s.status === 'completed' && s.startedAt && s.finishedAt) {
    const sec = (Date.parse(s.finishedAt) - Date.parse(s.startedAt)) / 1000;
    if (sec > 0) speed = `${Math.round(s.processed / sec)} rows/s avg · took ${fmtDuration(sec)}`;
  }
  const progress = el('td', { className: 'progress' }, bar,
    el('div', { className: 'nums' },
      el('span', { className: 'processed', textContent: String(s.processed ?? 0) }), ' / ',
      el('span', { className: 'total', textContent: s.total == null ? '?' : String(s.total) }),
      pct != null ? ` (${pct}%)` : '', speed ? el('span', { className: 'rate muted', textContent: ` · ${speed}` }) : null),
    s.error ? el('div', { className: 'error', textContent: s.error }) : null);
  const c = s.counts || {};
  let counts = s.kind !== 'export'
    ? `${c.contacts || 0} contacts, ${c.conversations || 0} conversations, ${c.messages || 0} messages`
    : s.result ? `${s.result.rows} rows, ${fmtBytes(s.result.bytes || 0)}, ${s.result.format}${s.result.gzip ? '.gz' : ''}` : '';
  if (s.kind === 'restore' && s.result) counts += `; ${s.result.skipped} skipped (exist again)`;
  if (s.kind === 'delete' && s.hardDelete) counts += ' (hard delete)';
  const cells = [
    el('td', { className: 'kind', textContent: s.kind }),
    el('td', {}, el('span', { className: `status badge ${s.status}`, textContent: s.status }),
      waiting ? el('span', { className: 'waiting badge', textContent: waiting, title: 'the job resumes by itself when the server is back' }) : null),
    progress,
    el('td', { className: 'counts', textContent: counts }),
    el('td', { className: 'created' }, fmtTime(s.createdAt)),
  ];
  // Keep the action buttons (and their focus) unless the set of actions changes.
  const restorable = s.kind === 'delete' && !ACTIVE.includes(s.status) && !s.hardDelete
    && s.restorableUntil && Date.parse(s.restorableUntil) > Date.now();
  const actions = [ACTIVE.includes(s.status) && 'cancel', s.kind === 'export' && s.status === 'completed' && 'download',
    restorable && 'restore']
    .filter(Boolean).join(' ');
  let act = entry.row.querySelector('td.actions');
  if (!act || act.dataset.actions !== actions) {
    act = el('td', { className: 'actions' });
    act.dataset.actions = actions;
    if (actions.includes('cancel')) act.append(button('Cancel', 'cancel', () => cancelJob(s.jobId)));
    if (actions.includes('download')) act.append(button('Download', 'download', () => download(s.jobId)));
    if (actions.includes('restore')) act.append(button('Restore', 'restore', () => previewRestore(s.jobId)));
  }
  entry.row.dataset.status = s.status;
  entry.row.replaceChildren(...cells, act);
}

function button(text, cls, onClick) {
  const b = el('button', { type: 'button', className: cls, textContent: text });
  b.dataset.testid = cls;
  b.addEventListener('click', async () => {
    b.disabled = true;
    try { await onClick(); } catch (e) { showMsg('#jobs-msg', e); } finally { b.disabled = false; }
  });
  return b;
}

async function cancelJob(jobId) {
  upsert(await api('POST', `/api/contacts/bulk-job/${encodeURIComponent(jobId)}/cancel`));
  showMsg('#jobs-msg', '');
}

async function download(jobId) {
  const snap = await api('GET', `/api/exports/${encodeURIComponent(jobId)}`);
  upsert(snap);
  const url = snap.result && snap.result.downloadUrl;
  if (!url) throw new Error('This export has no download link.');
  const a = el('a', { href: url, download: snap.result.fileName || '' });
  document.body.append(a);
  a.click();
  a.remove();
  showMsg('#jobs-msg', '');
}

// ---------- WebSocket ----------

const ws = { sock: null, timer: null, ping: null, attempt: 0, opened: false };

function setWsState(text) {
  $('#ws-state').textContent = text;
  $('#ws-state').className = `ws ${text}`;
}

function connectWs() {
  clearTimeout(ws.timer);
  clearInterval(ws.ping);
  if (ws.sock) { ws.sock.onclose = null; ws.sock.close(); ws.sock = null; }
  if (!token) { setWsState('offline'); return; }
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const sock = new WebSocket(`${proto}//${location.host}/ws?token=${encodeURIComponent(token)}`);
  ws.sock = sock;
  if (!ws.opened) setWsState('connecting');
  sock.onopen = () => {
    sock.send(JSON.stringify({ op: 'subscribe', topic: 'jobs' }));
    ws.ping = setInterval(() => sock.readyState === WebSocket.OPEN && sock.send('{"op":"ping"}'), 20000);
    if (ws.attempt > 0) loadJobs(); // catch up on what happened while disconnected
    ws.attempt = 0;
    ws.opened = true;
    setWsState('live');
  };
  sock.onmessage = (ev) => {
    let m;
    try { m = JSON.parse(ev.data); } catch { return; }
    if (m.job && ['job.progress', 'job.status', 'snapshot'].includes(m.type)) upsert(m.job);
    else if (m.type === 'error') showMsg('#jobs-msg', new Error(`Live updates: ${m.message || m.code}`));
  };
  sock.onclose = () => {
    clearInterval(ws.ping);
    if (ws.sock !== sock) return;
    ws.sock = null;
    if (authFailed) { setWsState('offline'); return; }
    setWsState('reconnecting');
    const delay = Math.min(30000, 500 * 2 ** ws.attempt) * (0.75 + Math.random() / 2);
    ws.attempt += 1;
    ws.timer = setTimeout(connectWs, delay);
  };
}

// ---------- filter ----------

function buildFilter() {
  const f = {};
  if ($('#f-org-wide').checked) f.orgWide = true;
  else {
    const ids = list($('#f-stage-ids').value);
    if (ids.length) f.stageIds = ids;
  }
  f.pipelineType = $('#f-pipeline-type').value;
  if ($('#f-owner-filter').value) f.ownerFilter = $('#f-owner-filter').value;
  const adv = {};
  if ($('#f-created-after').value) adv.createdAfter = `${$('#f-created-after').value}T00:00:00.000Z`;
  if ($('#f-created-before').value) adv.createdBefore = `${$('#f-created-before').value}T00:00:00.000Z`;
  const tags = list($('#f-tags').value);
  const anyTags = list($('#f-any-tags').value);
  if (tags.length) adv.tags = tags;
  if (anyTags.length) adv.anyTags = anyTags;
  if (Object.keys(adv).length) f.advancedParams = adv;
  return f;
}

async function loadPipelines() {
  const box = $('#pipelines');
  try {
    const { pipelines = [] } = await api('GET', '/api/pipelines');
    box.replaceChildren(...pipelines.map((p) => el('fieldset', {},
      el('legend', { textContent: p.name || p.id }),
      ...p.stages.map((st) => {
        const cb = el('input', { type: 'checkbox', value: st.id });
        cb.dataset.stageId = st.id;
        return el('label', { className: 'check', title: st.id }, cb, ` ${st.name || st.id}`);
      }))));
    syncStageBoxes();
  } catch (e) {
    box.replaceChildren(el('p', { className: 'muted', textContent: `Pipelines unavailable: ${e.message}` }));
  }
}

function syncStageBoxes() {
  const ids = new Set(list($('#f-stage-ids').value));
  document.querySelectorAll('#pipelines input[data-stage-id]').forEach((cb) => { cb.checked = ids.has(cb.value); });
}

function onStageBox(cb) {
  const ids = list($('#f-stage-ids').value).filter((id) => id !== cb.value);
  if (cb.checked) ids.push(cb.value);
  $('#f-stage-ids').value = ids.join(', ');
}

// Any change of the filter invalidates the count and the delete preview.
function invalidate() {
  const orgWide = $('#f-org-wide').checked;
  $('#f-stage-ids').disabled = orgWide;
  document.querySelectorAll('#pipelines fieldset').forEach((fs) => { fs.disabled = orgWide; });
  resetExport();
  resetDelete();
}

function resetExport() {
  exportState = null;
  $('#export-count').textContent = '';
  $('#export-count-unit').textContent = '';
  $('#export-start').disabled = true;
  $('#export-start').textContent = 'Start export';
}

function resetDelete() {
  deleteState = null;
  $('#delete-impact').textContent = '';
  ['contacts', 'conversations', 'messages'].forEach((k) => delete $('#delete-impact').dataset[k]);
  $('#delete-confirm-input').value = '';
  $('#delete-confirm-input').disabled = true;
  $('#delete-confirm-label').textContent = 'Type the number of contacts or DELETE to confirm';
  $('#delete-start').disabled = true;
}

// ---------- export ----------

let exportState = null; // { filter, count }

async function countForExport() {
  const filter = buildFilter();
  showMsg('#export-msg', 'Counting…');
  try {
    const { count } = await api('POST', '/api/contacts/query-count', filter);
    exportState = { filter, count };
    $('#export-count').textContent = String(count);
    $('#export-count-unit').textContent = count === 1 ? 'matching contact' : 'matching contacts';
    $('#export-start').textContent = `Start export (${count} contacts)`;
    $('#export-start').disabled = false;
    showMsg('#export-msg', '');
  } catch (e) {
    showMsg('#export-msg', e);
  }
}

async function startExport() {
  if (!exportState) return;
  const filter = { ...exportState.filter };
  const limit = parseInt($('#export-limit').value, 10);
  if (limit > 0) filter.limit = limit;
  const body = { filter, format: $('#export-format').value, gzip: $('#export-gzip').checked };
  const fields = list($('#export-fields').value);
  if (fields.length) body.fields = fields;
  if ($('#export-filename').value.trim()) body.filename = $('#export-filename').value.trim();
  const btn = $('#export-start');
  btn.disabled = true;
  try {
    const snap = await api('POST', '/api/exports', body);
    upsert(snap);
    showMsg('#export-msg', `Export started (job ${snap.jobId}).`);
  } catch (e) {
    showMsg('#export-msg', e);
  } finally {
    btn.disabled = !exportState;
  }
}

// ---------- delete ----------

let deleteState = null; // { filter, counts }

async function previewDelete() {
  const filter = buildFilter();
  resetDelete();
  showMsg('#delete-msg', 'Computing impact…');
  try {
    const { counts } = await api('POST', '/api/contacts/query-delete-preview', filter);
    deleteState = { filter, counts };
    const impact = $('#delete-impact');
    Object.assign(impact.dataset, { contacts: counts.contacts, conversations: counts.conversations, messages: counts.messages });
    impact.textContent = counts.contacts > 0
      ? `This will delete ${counts.contacts} contacts, ${counts.conversations} conversations and ${counts.messages} messages (kept for a restore until the retention ends).`
      : 'No contacts match this filter: nothing to delete.';
    $('#delete-confirm-input').disabled = counts.contacts === 0;
    $('#delete-confirm-label').textContent = `Type ${counts.contacts} or DELETE to confirm`;
    showMsg('#delete-msg', '');
  } catch (e) {
    showMsg('#delete-msg', e);
  }
}

function confirmed() {
  const v = $('#delete-confirm-input').value.trim();
  return !!deleteState && deleteState.counts.contacts > 0 && (v === 'DELETE' || v === String(deleteState.counts.contacts));
}

async function startDelete() {
  if (!confirmed()) return;
  const { filter } = deleteState;
  $('#delete-start').disabled = true;
  try {
    const res = await api('DELETE', '/api/contacts/query-bulk-delete', filter);
    resetDelete();
    showMsg('#delete-msg', `${res.message || 'Bulk delete started'} (job ${res.jobId}).`);
    api('GET', `/api/contacts/bulk-job/${encodeURIComponent(res.jobId)}`).then(upsert).catch(() => {});
  } catch (e) {
    showMsg('#delete-msg', e);
    $('#delete-start').disabled = !confirmed();
  }
}

// ---------- restore ----------

let restoreState = null; // { jobId, counts }

function closeRestore() {
  restoreState = null;
  $('#restore-panel').hidden = true;
  $('#restore-confirm').disabled = true;
  $('#restore-impact').textContent = '';
  showMsg('#restore-msg', '');
}

// The impact first (the restore's dry run), then an explicit confirmation.
async function previewRestore(jobId) {
  closeRestore();
  $('#restore-panel').hidden = false;
  showMsg('#restore-msg', 'Computing what would come back…');
  try {
    const path = `/api/contacts/bulk-job/${encodeURIComponent(jobId)}/restore`;
    const { counts } = await api('POST', path, { dryRun: true });
    restoreState = { jobId, counts };
    const impact = $('#restore-impact');
    Object.assign(impact.dataset, { contacts: counts.contacts, conversations: counts.conversations, messages: counts.messages });
    impact.textContent = counts.contacts > 0
      ? `This will restore ${counts.contacts} contacts, ${counts.conversations} conversations and ${counts.messages} messages removed by delete ${jobId}. Contacts that exist again are left as they are.`
      : `Nothing of delete ${jobId} is missing: nothing to restore.`;
    $('#restore-confirm').disabled = counts.contacts === 0;
    showMsg('#restore-msg', '');
    $('#restore-panel').scrollIntoView({ block: 'nearest' });
  } catch (e) {
    showMsg('#restore-msg', e);
  }
}

async function startRestore() {
  if (!restoreState) return;
  const { jobId } = restoreState;
  $('#restore-confirm').disabled = true;
  try {
    const snap = await api('POST', `/api/contacts/bulk-job/${encodeURIComponent(jobId)}/restore`, {});
    closeRestore();
    upsert(snap);
    showMsg('#jobs-msg', '');
  } catch (e) {
    showMsg('#restore-msg', e);
    $('#restore-confirm').disabled = false;
  }
}

// ---------- wiring ----------

function init() {
  $('#token-form').addEventListener('submit', (e) => { e.preventDefault(); useToken($('#token-input').value); });
  $('#filter').addEventListener('input', invalidate);
  $('#filter').addEventListener('change', invalidate);
  $('#f-stage-ids').addEventListener('input', syncStageBoxes);
  $('#pipelines').addEventListener('change', (e) => { if (e.target.dataset.stageId) onStageBox(e.target); });
  $('#export-count-btn').addEventListener('click', countForExport);
  $('#export-start').addEventListener('click', startExport);
  $('#delete-preview-btn').addEventListener('click', previewDelete);
  $('#delete-confirm-input').addEventListener('input', () => { $('#delete-start').disabled = !confirmed(); });
  $('#delete-start').addEventListener('click', startDelete);
  $('#restore-confirm').addEventListener('click', startRestore);
  $('#restore-dismiss').addEventListener('click', closeRestore);

  const fromHash = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromHash) history.replaceState(null, '', location.pathname + location.search); // keep it out of the address bar
  const saved = fromHash || sessionStorage.getItem('contact-bulk.token');
  if (saved) useToken(saved);
  else showMsg('#token-msg', 'Paste a bearer token to begin.');
}

init();
