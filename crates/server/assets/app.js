// flashmoe chat page: talks to this server's OpenAI-compatible API (/v1/models and streamed
// /v1/chat/completions) and keeps conversations in localStorage. Model output is only ever
// put into the page as text (textContent), never as HTML.
'use strict';

const $ = (id) => document.getElementById(id);

const store = {
  get(key, fallback) {
    try {
      const v = localStorage.getItem('flashmoe.' + key);
      return v === null ? fallback : JSON.parse(v);
    } catch (e) {
      return fallback;
    }
  },
  set(key, value) {
    localStorage.setItem('flashmoe.' + key, JSON.stringify(value));
  },
  remove(key) {
    localStorage.removeItem('flashmoe.' + key);
  },
};

// Conversations: [{id, title, messages, used}], newest first; messages in OpenAI's shape plus
// a few fields of the page's own (tokens, tps, finish, thinkOpen) that are not sent back.
let convs = store.get('convs', []);
let current = store.get('current', null);
const settings = Object.assign(
  { system: '', tools: '', toolChoice: '', maxTokens: '', thinking: true },
  store.get('settings', {}),
);
let model = null; // {id, ctx} from /v1/models
let running = null; // {ctl: AbortController, conv, msg, node} while an answer streams
let lastError = '';

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function save() {
  store.set('convs', convs);
  store.set('current', current);
}

function conv() {
  return convs.find((c) => c.id === current) || null;
}

function newConv() {
  const c = {
    id: Date.now().toString(36) + Math.random().toString(36).slice(2, 7),
    title: 'New chat',
    messages: [],
    used: 0,
  };
  convs.unshift(c);
  current = c.id;
  save();
  return c;
}

// ---- the API ----

function headers() {
  const h = { 'Content-Type': 'application/json' };
  const key = store.get('key', '');
  if (key) h.Authorization = 'Bearer ' + key;
  return h;
}

// Asks for the key once for all requests that were refused at the same time.
let keyPrompt = null;
function askKey(refused) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    const dlg = $('key-dialog');
    $('key-why').textContent = refused
      ? 'The server refused this API key. Enter the key it was started with (serve --api-key).'
      : 'This server needs an API key (serve --api-key).';
    $('key-input').value = '';
    const finish = (ok) => {
      dlg.close();
      keyPrompt = null;
      resolve(ok);
    };
    $('key-form').onsubmit = (ev) => {
      ev.preventDefault();
      const key = $('key-input').value.trim();
      if (!key) return;
      store.set('key', key);
      finish(true);
    };
    $('key-cancel').onclick = () => finish(false);
    dlg.oncancel = (ev) => {
      ev.preventDefault();
      finish(false);
    };
    dlg.showModal();
    $('key-input').focus();
  });
  return keyPrompt;
}

// fetch, asking for the API key (and retrying) while the server answers 401.
async function api(path, opts = {}) {
  for (;;) {
    const hadKey = !!store.get('key', '');
    const r = await fetch(path, { ...opts, headers: headers() });
    if (r.status !== 401) return r;
    if (!(await askKey(hadKey))) throw new Error('this server needs an API key');
  }
}

async function errorText(r) {
  const text = await r.text();
  try {
    const j = JSON.parse(text);
    return (j.error && (j.error.message || j.error)) || text;
  } catch (e) {
    return `HTTP ${r.status}: ${text}`;
  }
}

async function loadModel() {
  try {
    const r = await api('/v1/models');
    if (!r.ok) throw new Error(await errorText(r));
    const m = (await r.json()).data[0];
    model = { id: m.id, ctx: m.context_length || m.max_model_len || 0 };
    $('model').textContent = m.id;
  } catch (e) {
    $('model').textContent = 'model unknown';
    lastError = 'Could not read /v1/models: ' + e.message;
  }
  render();
}

// Calls onChunk with each `data:` payload of an SSE response, until [DONE].
async function readSse(resp, onChunk) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, '');
      buf = buf.slice(nl + 1);
      if (!line.startsWith('data:')) continue;
      const data = line.slice(5).trim();
      if (data === '[DONE]') return;
      onChunk(JSON.parse(data));
    }
  }
}

function requestBody(c) {
  const messages = [];
  if (settings.system.trim()) messages.push({ role: 'system', content: settings.system });
  for (const m of c.messages) {
    const o = { role: m.role, content: m.content || '' };
    if (m.reasoning_content) o.reasoning_content = m.reasoning_content;
    if (m.tool_calls && m.tool_calls.length) o.tool_calls = m.tool_calls;
    if (m.tool_call_id) o.tool_call_id = m.tool_call_id;
    if (m.role === 'tool' && m.name) o.name = m.name;
    messages.push(o);
  }
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (model) body.model = model.id;
  if (settings.maxTokens) body.max_tokens = Number(settings.maxTokens);
  body.chat_template_kwargs = { enable_thinking: !!settings.thinking };
  if (settings.tools.trim()) {
    let tools;
    try {
      tools = JSON.parse(settings.tools);
    } catch (e) {
      throw new Error('Settings: the tools are not valid JSON (' + e.message + ')');
    }
    body.tools = tools;
    const choice = settings.toolChoice.trim();
    if (['auto', 'none', 'required'].includes(choice)) body.tool_choice = choice;
    else if (choice) body.tool_choice = { type: 'function', function: { name: choice } };
  }
  return body;
}

function mergeToolCall(msg, tc) {
  const i = tc.index !== undefined ? tc.index : msg.tool_calls.length;
  if (!msg.tool_calls[i]) {
    msg.tool_calls[i] = { id: '', type: 'function', function: { name: '', arguments: '' } };
  }
  const cur = msg.tool_calls[i];
  if (tc.id) cur.id = tc.id;
  if (tc.function && tc.function.name) cur.function.name = tc.function.name;
  if (tc.function && tc.function.arguments) cur.function.arguments += tc.function.arguments;
}

// Streams the model's answer to conversation c into a new assistant message.
async function complete(c) {
  lastError = '';
  let body;
  try {
    body = JSON.stringify(requestBody(c));
  } catch (e) {
    lastError = e.message;
    render();
    return;
  }
  const msg = { role: 'assistant', content: '', reasoning_content: '', tool_calls: [] };
  c.messages.push(msg);
  running = { ctl: new AbortController(), conv: c, msg, node: null };
  render();
  let first = 0;
  try {
    const r = await api('/v1/chat/completions', {
      method: 'POST', body, signal: running.ctl.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    await readSse(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      const choice = chunk.choices && chunk.choices[0];
      if (choice) {
        const d = choice.delta || {};
        if (d.content) msg.content += d.content;
        if (d.reasoning_content) msg.reasoning_content += d.reasoning_content;
        for (const tc of d.tool_calls || []) mergeToolCall(msg, tc);
        if (choice.finish_reason) msg.finish = choice.finish_reason;
        if (!first && (d.content || d.reasoning_content || d.tool_calls)) first = performance.now();
      }
      if (chunk.usage) {
        c.used = chunk.usage.total_tokens;
        msg.tokens = chunk.usage.completion_tokens;
      }
      if (chunk.timings) msg.tps = chunk.timings.decode_tokens_per_second;
      updateRunning();
    });
  } catch (e) {
    if (e.name === 'AbortError') msg.finish = 'stopped';
    else lastError = e.message;
  }
  if (!msg.tps && msg.tokens > 1 && first) {
    msg.tps = (msg.tokens - 1) / ((performance.now() - first) / 1000);
  }
  if (!msg.tool_calls.length) delete msg.tool_calls;
  if (!msg.reasoning_content) delete msg.reasoning_content;
  if (lastError && !msg.content && !msg.reasoning_content && !msg.tool_calls) {
    c.messages.pop(); // the request failed: regenerate starts from the question again
  }
  running = null;
  save();
  render();
}

// ---- rendering ----

// Splits a leading <think>...</think> out of content (a model or template that leaves the
// tags in the text instead of the server's reasoning_content).
function splitThink(content) {
  const m = /^\s*<think>([\s\S]*?)(?:<\/think>|$)([\s\S]*)$/.exec(content);
  return m ? [m[1].trim(), m[2].trimStart()] : ['', content];
}

function pretty(args) {
  try {
    return JSON.stringify(JSON.parse(args), null, 2);
  } catch (e) {
    return args;
  }
}

function messageNode(c, m) {
  const live = running && running.msg === m;
  const d = el('div', 'msg ' + m.role);
  if (m.role === 'tool') {
    d.append(el('div', 'label', 'Result of ' + (m.name || 'a tool call')), el('pre', null, m.content));
    return d;
  }
  d.append(el('div', 'label', m.role === 'user' ? 'You' : (model && model.id) || 'assistant'));
  let [thought, content] = splitThink((m.content || '').trimEnd());
  thought = [m.reasoning_content || '', thought].filter(Boolean).join('\n');
  if (thought) {
    const det = el('details', 'think');
    det.open = !!m.thinkOpen;
    det.addEventListener('toggle', () => { m.thinkOpen = det.open; });
    det.append(el('summary', null, live && !content && !m.tool_calls.length ? 'Thinking…' : 'Thinking'),
      el('div', 'body', thought));
    d.append(det);
  }
  if (content) d.append(el('div', 'body', content));
  for (const tc of m.tool_calls || []) d.append(toolCallNode(c, m, tc));
  if (live && !thought && !content && !m.tool_calls.length) d.append(el('div', 'meta', '…'));
  const meta = [];
  if (m.tokens) meta.push(m.tokens + ' tokens');
  if (m.tps) meta.push(m.tps.toFixed(1) + ' tok/s');
  if (m.finish === 'stopped') meta.push('stopped');
  if (m.finish === 'length') meta.push('cut off at the token limit');
  if (meta.length) d.append(el('div', 'meta', meta.join(' · ')));
  return d;
}

function toolCallNode(c, m, tc) {
  const d = el('div', 'toolcall');
  d.append(el('div', 'label', 'Tool call: ' + tc.function.name), el('pre', 'args', pretty(tc.function.arguments)));
  const answered = c.messages.some((x) => x.role === 'tool' && x.tool_call_id === tc.id);
  const isLast = c.messages.slice(c.messages.indexOf(m) + 1).every((x) => x.role === 'tool');
  if (!answered && isLast && !running) {
    const form = el('form', 'tool-result');
    const input = el('textarea');
    input.rows = 2;
    input.placeholder = 'Result of ' + tc.function.name + ' (sent back to the model)';
    form.append(input, el('button', null, 'Send result'));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      c.messages.push({ role: 'tool', tool_call_id: tc.id, name: tc.function.name, content: input.value });
      save();
      const open = m.tool_calls.filter((t) => !c.messages.some((x) => x.tool_call_id === t.id));
      if (open.length) render();
      else complete(c);
    });
    d.append(form);
  }
  return d;
}

function renderList() {
  const ul = $('conversations');
  ul.replaceChildren();
  for (const c of convs) {
    const li = el('li', c.id === current ? 'current' : '');
    const title = el('button', 'title', c.title);
    title.type = 'button';
    title.onclick = () => {
      if (running) return;
      current = c.id;
      save();
      render();
    };
    const del = el('button', 'delete', '×');
    del.type = 'button';
    del.title = 'Delete this conversation';
    del.onclick = () => {
      if (running && running.conv === c) running.ctl.abort();
      convs = convs.filter((x) => x !== c);
      if (current === c.id) current = convs.length ? convs[0].id : null;
      save();
      render();
    };
    li.append(title, del);
    ul.append(li);
  }
}

function renderStats() {
  const c = conv();
  const used = c ? c.used || 0 : 0;
  if (model && model.ctx) {
    $('ctx').textContent = `context ${used} / ${model.ctx}`;
    $('ctx-bar').value = Math.min(1, used / model.ctx);
  }
  const last = c && [...c.messages].reverse().find((m) => m.role === 'assistant' && m.tps);
  $('speed').textContent = last ? last.tps.toFixed(1) + ' tok/s' : '';
  $('send').hidden = !!running;
  $('stop').hidden = !running;
  $('regen').disabled = !!running || !c || !c.messages.length;
}

function atBottom(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 40;
}

function render() {
  renderList();
  const box = $('messages');
  const c = conv();
  box.replaceChildren();
  if (!c || !c.messages.length) {
    box.append(el('div', 'empty', 'Ask something. Conversations are kept in this browser.'));
  } else {
    for (const m of c.messages) {
      const node = messageNode(c, m);
      if (running && running.msg === m) running.node = node;
      box.append(node);
    }
  }
  if (lastError) box.append(el('div', 'msg error', lastError));
  renderStats();
  box.scrollTop = box.scrollHeight;
}

// Redraws only the streaming message (cheap, and keeps the user's scroll position).
function updateRunning() {
  if (!running || !running.node || conv() !== running.conv) return;
  const box = $('messages');
  const stick = atBottom(box);
  const node = messageNode(running.conv, running.msg);
  running.node.replaceWith(node);
  running.node = node;
  renderStats();
  if (stick) box.scrollTop = box.scrollHeight;
}

// ---- controls ----

function send() {
  const text = $('input').value;
  if (running || !text.trim()) return;
  const c = conv() || newConv();
  c.messages.push({ role: 'user', content: text });
  if (c.title === 'New chat') c.title = text.trim().slice(0, 40);
  $('input').value = '';
  save();
  complete(c);
}

function regenerate() {
  const c = conv();
  if (running || !c) return;
  while (c.messages.length && c.messages[c.messages.length - 1].role === 'assistant') c.messages.pop();
  if (c.messages.length) complete(c);
}

function bindSettings() {
  const fields = [
    ['set-system', 'system'], ['set-tools', 'tools'],
    ['set-tool-choice', 'toolChoice'], ['set-max-tokens', 'maxTokens'],
  ];
  for (const [id, key] of fields) {
    $(id).value = settings[key];
    $(id).addEventListener('input', () => {
      settings[key] = $(id).value;
      store.set('settings', settings);
    });
  }
  $('set-thinking').checked = !!settings.thinking;
  $('set-thinking').addEventListener('change', () => {
    settings.thinking = $('set-thinking').checked;
    store.set('settings', settings);
  });
}

function init() {
  bindSettings();
  $('composer').addEventListener('submit', (ev) => {
    ev.preventDefault();
    send();
  });
  $('input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    }
  });
  $('stop').onclick = () => running && running.ctl.abort();
  $('regen').onclick = regenerate;
  $('new-chat').onclick = () => {
    if (running) return;
    const c = conv();
    if (!c || c.messages.length) newConv();
    lastError = '';
    render();
    $('input').focus();
  };
  $('settings-btn').onclick = () => { $('settings').hidden = !$('settings').hidden; };
  $('forget-key').onclick = () => store.remove('key');
  render();
  loadModel();
}

init();
