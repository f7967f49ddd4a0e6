// The eagercache status page. Everything shown comes from the JSON endpoints under ./status and from
// ./watch (EventSource); all of it is set with textContent (queries, data and errors are user-controlled).
// No library, no network beyond this server: the Content-Security-Policy allows 'self' only.
'use strict';

(() => {
  const POLL_MS = 2000;
  const ENTRIES_POLL_MS = 3000;
  const CHART_SECONDS = 300;
  const MAX_EVENTS_SHOWN = 200;
  const TOKEN_KEY = 'eagercache.adminToken';
  const SVG = 'http://www.w3.org/2000/svg';

  // Relative to the page, so the page works when the app is mounted under a path.
  const base = new URL('.', window.location.href);
  const url = (path) => new URL(path, base).toString();
  const $ = (id) => document.getElementById(id);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    adminApi: false,
    lastEventId: 0,
    fetchers: [],
    entries: {fetcher: '', q: '', cursor: '', next: null, history: []},
    watch: null,
  };

  // -- small helpers -------------------------------------------------------------------------------

  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child);
    return node;
  };
  const setText = (node, text) => {
    if (node.textContent !== text) node.textContent = text;
  };
  const seconds = (s) => {
    if (s === null || s === undefined) return '–';
    const a = Math.abs(s);
    if (a < 1) return `${Math.round(s * 1000)} ms`;
    if (a < 120) return `${s.toFixed(1)} s`;
    if (a < 7200) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  };
  const rate = (r) => (r === null || r === undefined ? '–' : r < 10 ? r.toFixed(2) : r.toFixed(0));
  const clock = (ms) => (ms ? new Date(ms).toLocaleTimeString() : '–');
  const dateTime = (ms) => (ms ? new Date(ms).toLocaleString() : '–');
  const count = (n) => (n === null || n === undefined ? '–' : n.toLocaleString());

  class HttpError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
      this.status = status;
    }
  }

  async function api(path, options = {}) {
    const headers = {Accept: 'application/json', ...(options.headers || {})};
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    const response = await fetch(url(path), {...options, headers, cache: 'no-store'});
    if (!response.ok) {
      let problem = null;
      try {
        problem = await response.json();
      } catch (_) {
        problem = null;
      }
      throw new HttpError(response.status, problem);
    }
    if (response.status === 204) return null;
    return response.json();
  }

  // The status endpoints refuse a token that is not the admin one: forget it, say so, carry on read-only.
  function tokenRefused(error) {
    if (error instanceof HttpError && error.status === 403 && state.token) {
      setToken(null);
      setText($('admin-status'), 'The admin token is no longer valid; it was forgotten. The page is read-only.');
      return true;
    }
    return false;
  }

  // Poll `work` every `ms`, one call at a time, skipping while the tab is hidden.
  function every(ms, work) {
    const run = async () => {
      if (!document.hidden) {
        try {
          await work();
        } catch (error) {
          if (!tokenRefused(error)) setText($('summary'), `Cannot reach the server: ${error.message}`);
        }
      }
      window.setTimeout(run, ms);
    };
    run();
  }

  // Update a tbody in place, row per key: a row keeps its elements (and a button its focus) across updates.
  function syncRows(tbody, items, key, build, update) {
    const existing = new Map([...tbody.rows].map((row) => [row.dataset.key, row]));
    const wanted = items.map((item) => {
      const k = key(item);
      let row = existing.get(k);
      if (!row) {
        row = build(item);
        row.dataset.key = k;
      }
      existing.delete(k);
      update(row, item);
      return row;
    });
    for (const row of existing.values()) row.remove();
    wanted.forEach((row, i) => {
      if (tbody.rows[i] !== row) tbody.insertBefore(row, tbody.rows[i] || null);
    });
  }

  function cells(row, n) {
    while (row.cells.length < n) row.append(el('td'));
    return [...row.cells];
  }

  // -- service and fetchers ------------------------------------------------------------------------

  function renderService(service) {
    setText($('version'), `${service.version}`);
    const store = service.store;
    const facts = [
      ['Readiness', service.ready ? 'ready' : `not ready: ${service.not_ready_because.join('; ')}`],
      ['Store', `${store.url} (${store.topology})`],
      ['Primaries', store.primaries.length ? store.primaries.join(', ') : 'in this process'],
      ['Buckets', `${store.buckets}`],
      ['Refresh mode', service.refresh_mode === 'events+schedule'
        ? 'expiry events + the schedule' : 'the schedule alone (no expiry events)'],
      ['Uptime', seconds(service.uptime_s)],
      ['Processes', `pid ${service.processes.pid}; ${service.processes.workers} serving (${service.processes.note})`],
      ['Fetches in flight', `${service.fetches_in_flight}`],
      ['Watchers', `${service.watchers}`],
      ['Failovers seen', `${store.failovers}`],
      ['Admin API', service.admin_api ? 'on' : 'off'],
    ];
    const dl = $('service');
    if (dl.children.length !== facts.length) {
      dl.replaceChildren(...facts.map(([k]) => el('div', {}, el('dt', {text: k}), el('dd'))));
    }
    facts.forEach(([, v], i) => setText(dl.children[i].lastChild, v));
    dl.children[0].lastChild.className = service.ready ? 'ok' : 'bad';
  }

  function options(o) {
    const parts = [`ttl ${o.ttl} s`, `jitter ${o.jitter} s`, `timeout ${o.timeout} s`,
      `max_stale ${o.max_stale === null ? 'none' : `${o.max_stale} s`}`, `max_idle ${o.max_idle} s`,
      `max_entries ${count(o.max_entries)}`];
    if (o.max_rate !== null && o.max_rate !== undefined) parts.push(`max_rate ${o.max_rate}/s`);
    if (o.indexed && o.indexed.length) parts.push(`indexed ${o.indexed.join(', ')}`);
    return parts.join(' · ');
  }

  function renderFetchers(fetchers) {
    syncRows($('fetchers').tBodies[0], fetchers, (f) => f.name, () => el('tr'), (row, f) => {
      if (!row.cells.length) {
        row.append(el('th', {scope: 'row'}));
        for (let i = 0; i < 8; i += 1) row.append(el('td'));
        [...row.cells].slice(2).forEach((c) => c.classList.add('num'));
        row.cells[1].classList.add('options');
      }
      const stale = f.stale_entries === null ? '–'
        : f.stale_checked < f.entries ? `${count(f.stale_entries)} of ${count(f.stale_checked)} checked`
          : count(f.stale_entries);
      const values = [f.name, options(f.options), count(f.entries), stale, rate(f.refreshes_per_s),
        rate(f.errors_per_s), rate(f.changes_per_s),
        `${seconds(f.refresh_lag_s.p50)} / ${seconds(f.refresh_lag_s.p99)}`,
        `${seconds(f.fetch_s.p50)} / ${seconds(f.fetch_s.p99)}`];
      values.forEach((v, i) => setText(row.cells[i], v));
      row.cells[5].classList.toggle('bad', Boolean(f.errors_per_s));
      row.cells[3].classList.toggle('bad', Boolean(f.stale_entries));
    });
    const names = fetchers.map((f) => f.name);
    if (names.join('\n') !== state.fetchers.join('\n')) {
      state.fetchers = names;
      for (const select of [$('search-fetcher'), $('chart-fetcher')]) {
        const chosen = select.value;
        select.replaceChildren(select.options[0], ...names.map((n) => el('option', {value: n, text: n})));
        select.value = names.includes(chosen) ? chosen : '';
      }
    }
  }

  async function pollStatus() {
    const doc = await api('status');
    renderService(doc.service);
    renderFetchers(doc.fetchers);
    state.adminApi = doc.service.admin_api;
    renderAdmin();
    const entries = doc.fetchers.reduce((n, f) => n + f.entries, 0);
    const ready = doc.service.ready ? 'Ready' : 'Not ready';
    setText($('summary'), `${ready} · ${doc.fetchers.length} fetchers · ${count(entries)} entries`);
    $('summary').className = doc.service.ready ? 'ok' : 'bad';
  }

  // -- charts (inline SVG, drawn here) -------------------------------------------------------------

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const magnitude = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * magnitude) return step * magnitude;
    return 10 * magnitude;
  }

  function drawChart(svg, points, series, format) {
    const width = 600;
    const height = 160;
    const left = 48;
    const bottom = 18;
    const top = 8;
    const now = points.length ? points[points.length - 1].at_ms : Date.now();
    const start = now - CHART_SECONDS * 1000;
    let max = 0;
    for (const p of points) for (const s of series) if (p[s.key] !== null) max = Math.max(max, p[s.key]);
    max = niceMax(max);
    const x = (ms) => left + ((ms - start) / (CHART_SECONDS * 1000)) * (width - left - 4);
    const y = (v) => top + (1 - v / max) * (height - top - bottom);
    const nodes = [];
    const line = (x1, y1, x2, y2) => {
      const n = document.createElementNS(SVG, 'line');
      Object.entries({x1, y1, x2, y2, class: 'axis'}).forEach(([k, v]) => n.setAttribute(k, v));
      return n;
    };
    const label = (tx, ty, text, anchor) => {
      const n = document.createElementNS(SVG, 'text');
      Object.entries({x: tx, y: ty, class: 'label', 'text-anchor': anchor}).forEach(([k, v]) => n.setAttribute(k, v));
      n.textContent = text;
      return n;
    };
    nodes.push(line(left, top, left, height - bottom), line(left, height - bottom, width, height - bottom));
    nodes.push(line(left, y(max / 2), width, y(max / 2)));
    nodes.push(label(left - 4, top + 8, format(max), 'end'), label(left - 4, y(max / 2) + 4, format(max / 2), 'end'));
    nodes.push(label(left - 4, height - bottom, '0', 'end'));
    nodes.push(label(left, height - 3, `${CHART_SECONDS / 60} min ago`, 'start'), label(width - 4, height - 3, 'now', 'end'));
    for (const s of series) {
      const path = document.createElementNS(SVG, 'polyline');
      const coords = points.filter((p) => p[s.key] !== null).map((p) => `${x(p.at_ms).toFixed(1)},${y(p[s.key]).toFixed(1)}`);
      path.setAttribute('points', coords.join(' '));
      path.setAttribute('class', s.class);
      nodes.push(path);
    }
    svg.replaceChildren(...nodes);
  }

  async function pollHistory() {
    const fetcher = $('chart-fetcher').value;
    const doc = await api(`status/history?seconds=${CHART_SECONDS}${fetcher ? `&fetcher=${encodeURIComponent(fetcher)}` : ''}`);
    const points = doc.points;
    drawChart($('rate-chart'), points, [{key: 'refreshes', class: 'series-a'}, {key: 'errors', class: 'series-b'}], (v) => rate(v));
    drawChart($('lag-chart'), points, [{key: 'lag_p50_s', class: 'series-a'}, {key: 'lag_p99_s', class: 'series-c'}], seconds);
    const last = points[points.length - 1];
    const sum = (k) => points.reduce((n, p) => n + (p[k] || 0), 0);
    const span = Math.max(1, points.length);
    setText($('rate-text'), last
      ? `Over ${Math.round(span / 60 * 10) / 10} min: ${rate(sum('refreshes') / span)} refreshes/s, ${rate(sum('errors') / span)} errors/s on average.`
      : 'No samples yet.');
    const lags = points.filter((p) => p.lag_p99_s !== null);
    setText($('lag-text'), lags.length
      ? `Latest p50 ${seconds(lags[lags.length - 1].lag_p50_s)}, p99 ${seconds(lags[lags.length - 1].lag_p99_s)}.`
      : 'No refreshes in this window.');
  }

  // -- entries -------------------------------------------------------------------------------------

  const entryKey = (e) => `${e.fetcher}?${e.query}`;

  function buildEntry(entry) {
    const row = el('tr');
    const link = el('a', {href: url(`data/${encodeURIComponent(entry.fetcher)}?${entry.query}`)});
    link.textContent = entry.query || '(no parameters)';
    const query = el('td', {class: 'query mono'}, link);
    const watch = el('button', {type: 'button', 'data-action': 'watch', text: 'Watch'});
    watch.setAttribute('aria-label', `Watch the data of ${entry.fetcher}?${entry.query}`);
    const refresh = el('button', {type: 'button', 'data-action': 'refresh', text: 'Refresh now', class: 'admin'});
    refresh.setAttribute('aria-label', `Refresh ${entry.fetcher}?${entry.query} now`);
    const invalidate = el('button', {type: 'button', 'data-action': 'invalidate', text: 'Invalidate', class: 'admin'});
    invalidate.setAttribute('aria-label', `Invalidate ${entry.fetcher}?${entry.query}`);
    watch.addEventListener('click', () => startWatch(entry.fetcher, entry.query));
    refresh.addEventListener('click', () => adminAction('refresh', entry));
    invalidate.addEventListener('click', () => adminAction('invalidate', entry));
    row.append(el('td', {text: entry.fetcher}), query);
    for (let i = 0; i < 5; i += 1) row.append(el('td'));
    row.cells[2].className = 'num';
    row.cells[4].className = 'num';
    row.cells[6].className = 'error';
    row.append(el('td', {class: 'actions'}, watch, refresh, invalidate));
    return row;
  }

  function updateEntry(row, entry) {
    const [, , age, modified, next, stateCell, error] = cells(row, 8);
    if (row.dataset.modified && row.dataset.modified !== `${entry.last_modified_ms}`) {
      modified.classList.remove('flash');
      void modified.offsetWidth; // restart the animation
      modified.classList.add('flash');
    }
    row.dataset.modified = `${entry.last_modified_ms}`;
    setText(age, seconds(entry.age_s));
    setText(modified, dateTime(entry.last_modified_ms));
    setText(next, entry.next_refresh_in_s === null ? 'not scheduled' : `in ${seconds(entry.next_refresh_in_s)}`);
    setText(stateCell, entry.state);
    stateCell.className = `state-${entry.state}`;
    const failures = entry.failures ? `${entry.failures} failed refresh${entry.failures > 1 ? 'es' : ''}` : '';
    const text = entry.last_error !== null ? entry.last_error
      : failures ? `${failures} (the admin token shows the error)` : '';
    setText(error, text);
    for (const button of row.querySelectorAll('button.admin')) button.hidden = !state.token;
  }

  async function pollEntries() {
    const {fetcher, q, cursor} = state.entries;
    const params = new URLSearchParams({limit: '50'});
    if (fetcher) params.set('fetcher', fetcher);
    if (q) params.set('q', q);
    if (cursor) params.set('cursor', cursor);
    const doc = await api(`status/entries?${params}`);
    syncRows($('entries').tBodies[0], doc.entries, entryKey, buildEntry, updateEntry);
    state.entries.next = doc.next_cursor;
    $('entries-next').disabled = !doc.next_cursor;
    $('entries-first').disabled = !cursor;
    const shown = doc.entries.length;
    const more = doc.next_cursor ? '; more on the next page' : '';
    const searched = q ? ` matching “${q}” (${count(doc.scanned)} looked at)` : '';
    setText($('entries-status'), `${shown} ${shown === 1 ? 'entry' : 'entries'}${searched}${more}.`);
  }

  async function reloadEntries() {
    try {
      await pollEntries();
    } catch (error) {
      if (!tokenRefused(error)) setText($('entries-status'), `Could not list the entries: ${error.message}`);
    }
  }

  // -- the live view of one entry (/watch) ---------------------------------------------------------

  const unescapePointer = (s) => s.replace(/~1/g, '/').replace(/~0/g, '~');
  const pointer = (p) => (p === '' ? [] : p.slice(1).split('/').map(unescapePointer));
  const indexOf = (array, key, adding) => {
    if (adding && key === '-') return array.length;
    const i = Number(key);
    if (!/^(0|[1-9][0-9]*)$/.test(key) || i > array.length || (!adding && i === array.length)) {
      throw new Error(`bad array index ${key}`);
    }
    return i;
  };
  const walk = (doc, path) => path.reduce((node, key) => {
    if (Array.isArray(node)) return node[indexOf(node, key, false)];
    if (node !== null && typeof node === 'object' && Object.hasOwn(node, key)) return node[key];
    throw new Error(`no ${key} on the way`);
  }, doc);

  // RFC 6902, section 4: each operation on the result of the previous one.
  function applyOperation(doc, op) {
    const path = pointer(op.path);
    if (op.op === 'test') {
      if (JSON.stringify(walk(doc, path)) !== JSON.stringify(op.value)) throw new Error(`test failed at ${op.path}`);
      return doc;
    }
    if (op.op === 'move' || op.op === 'copy') {
      const value = structuredClone(walk(doc, pointer(op.from)));
      const removed = op.op === 'move' ? applyOperation(doc, {op: 'remove', path: op.from}) : doc;
      return applyOperation(removed, {op: 'add', path: op.path, value});
    }
    if (path.length === 0) {
      if (op.op === 'remove') throw new Error('remove of the whole document');
      return structuredClone(op.value);
    }
    const parent = walk(doc, path.slice(0, -1));
    const key = path[path.length - 1];
    if (Array.isArray(parent)) {
      const i = indexOf(parent, key, op.op === 'add');
      if (op.op === 'add') parent.splice(i, 0, structuredClone(op.value));
      else if (op.op === 'remove') parent.splice(i, 1);
      else if (op.op === 'replace') parent[i] = structuredClone(op.value);
      else throw new Error(`unknown op ${op.op}`);
    } else {
      if (op.op !== 'add' && !Object.hasOwn(parent, key)) throw new Error(`${op.op} of a missing ${op.path}`);
      if (op.op === 'add' || op.op === 'replace') parent[key] = structuredClone(op.value);
      else if (op.op === 'remove') delete parent[key];
      else throw new Error(`unknown op ${op.op}`);
    }
    return doc;
  }

  function showWatched(watch, how) {
    const pre = $('watch-data');
    pre.textContent = JSON.stringify(watch.doc, null, 2);
    pre.dataset.version = watch.id;
    const stale = watch.stale ? ' — STALE: its refreshes are failing' : '';
    setText($('watch-state'), `${how} at ${clock(Date.now())}, version ${watch.id}${stale}`);
  }

  function startWatch(fetcher, query) {
    stopWatch();
    const source = new EventSource(url(`watch/${encodeURIComponent(fetcher)}?${query}`));
    const watch = {source, doc: null, id: null, stale: false, fetcher, query};
    state.watch = watch;
    $('watch').hidden = false;
    setText($('watch-entry'), `${fetcher}?${query}`);
    setText($('watch-state'), 'Connecting…');
    $('watch-data').textContent = '';
    source.addEventListener('snapshot', (e) => {
      // The first is the entry as it is; a later one is a change sent whole (smaller than its patch).
      const changed = watch.doc !== null && e.lastEventId !== watch.id;
      watch.doc = JSON.parse(e.data);
      watch.id = e.lastEventId;
      showWatched(watch, changed ? 'Changed' : 'Snapshot');
    });
    source.addEventListener('patch', (e) => {
      const {base: from, patch} = JSON.parse(e.data);
      if (watch.doc === null || from !== watch.id) {
        startWatch(fetcher, query); // out of step: start again, with a snapshot
        return;
      }
      watch.doc = patch.reduce(applyOperation, structuredClone(watch.doc));
      watch.id = e.lastEventId;
      showWatched(watch, 'Changed');
    });
    source.addEventListener('status', (e) => {
      watch.stale = JSON.parse(e.data).state === 'stale';
      if (watch.doc !== null) showWatched(watch, watch.stale ? 'Turned stale' : 'Fresh again');
    });
    source.addEventListener('error', () => {
      if (source.readyState === EventSource.CLOSED) setText($('watch-state'), 'The stream ended (the entry may be gone).');
      else if (watch.doc !== null) setText($('watch-state'), 'Reconnecting…');
    });
    $('watch').scrollIntoView({block: 'nearest'});
  }

  function stopWatch() {
    if (state.watch) state.watch.source.close();
    state.watch = null;
    $('watch').hidden = true;
  }

  // -- recent events -------------------------------------------------------------------------------

  async function pollEvents() {
    const doc = await api(`status/events?after=${state.lastEventId}`);
    if (doc.last_id < state.lastEventId) { // the server restarted: its events are new ones
      state.lastEventId = 0;
      $('events').replaceChildren();
      return;
    }
    const list = $('events');
    for (const event of doc.events) {
      const item = el('li', {'data-kind': event.kind},
        el('time', {datetime: new Date(event.at_ms).toISOString(), text: clock(event.at_ms)}),
        el('span', {class: `kind ${['stale', 'failing', 'not-ready', 'failover'].includes(event.kind) ? 'bad' : ''}`, text: event.kind}),
        el('span', {text: event.detail}));
      if (event.entry) item.append(' ', el('code', {text: event.entry}));
      if (event.error) item.append(el('span', {class: 'error', text: event.error}));
      list.prepend(item);
    }
    while (list.children.length > MAX_EVENTS_SHOWN) list.lastChild.remove();
    state.lastEventId = doc.last_id;
    $('events-empty').hidden = list.children.length > 0;
  }

  // -- the admin token and actions -----------------------------------------------------------------

  function setToken(token) {
    state.token = token;
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    renderAdmin();
  }

  function renderAdmin() {
    $('admin-off').hidden = state.adminApi;
    $('token-form').hidden = !state.adminApi;
    $('token-forget').hidden = !state.token;
    document.body.classList.toggle('with-token', Boolean(state.token));
    for (const button of document.querySelectorAll('#entries button.admin')) button.hidden = !state.token;
  }

  async function useToken(event) {
    event.preventDefault();
    const given = $('token').value.trim();
    if (!given) return;
    try {
      // The status endpoint checks a token it is sent: a wrong one is refused (403) and not kept.
      const response = await fetch(url('status'), {headers: {Authorization: `Bearer ${given}`, Accept: 'application/json'}});
      if (!response.ok) {
        setText($('admin-status'), response.status === 403 ? 'That token is not valid; the page stays read-only.'
          : `The server answered ${response.status}.`);
        return;
      }
    } catch (error) {
      setText($('admin-status'), `Cannot reach the server: ${error.message}`);
      return;
    }
    $('token').value = '';
    setToken(given);
    setText($('admin-status'), 'Token accepted: refresh now and invalidate are available, and error texts are shown.');
    reloadEntries();
  }

  async function adminAction(action, entry) {
    const what = `${entry.fetcher}?${entry.query}`;
    const path = action === 'refresh' ? 'refresh' : 'entry';
    const method = action === 'refresh' ? 'POST' : 'DELETE';
    setText($('admin-status'), `${action === 'refresh' ? 'Refreshing' : 'Invalidating'} ${what}…`);
    try {
      await api(`admin/fetchers/${encodeURIComponent(entry.fetcher)}/${path}?${entry.query}`, {method});
      setText($('admin-status'), action === 'refresh' ? `Refreshed ${what}.` : `Invalidated ${what}: the next read fetches it again.`);
    } catch (error) {
      const why = error instanceof HttpError && (error.status === 401 || error.status === 403)
        ? 'the admin token was refused' : error.message;
      setText($('admin-status'), `Could not ${action} ${what}: ${why}.`);
    }
    reloadEntries();
  }

  // -- wiring --------------------------------------------------------------------------------------

  function start() {
    $('search').addEventListener('submit', (event) => {
      event.preventDefault();
      state.entries = {...state.entries, fetcher: $('search-fetcher').value, q: $('search-query').value, cursor: '', history: []};
      reloadEntries();
    });
    $('entries-next').addEventListener('click', () => {
      state.entries.history.push(state.entries.cursor);
      state.entries.cursor = state.entries.next;
      reloadEntries();
    });
    $('entries-first').addEventListener('click', () => {
      state.entries.cursor = '';
      state.entries.history = [];
      reloadEntries();
    });
    $('chart-fetcher').addEventListener('change', () => pollHistory().catch(() => {}));
    $('watch-stop').addEventListener('click', stopWatch);
    $('token-form').addEventListener('submit', useToken);
    $('token-forget').addEventListener('click', () => {
      setToken(null);
      setText($('admin-status'), 'Token forgotten: the page is read-only.');
      reloadEntries();
    });
    every(POLL_MS, pollStatus);
    every(POLL_MS, pollEvents);
    every(POLL_MS, pollHistory);
    every(ENTRIES_POLL_MS, pollEntries);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
