// lightning_rnnviz explorer: the views over one probe set (hidden states, select, match, gradients,
// attention). One ES module, plain JavaScript, no imports: TensorBoard's plugin tab loads it from the
// plugin's routes, the HTML export inlines it. Styles are set through the CSSOM (a constructed style
// sheet, element.style), never as style="" text, so TensorBoard's content-security policy allows them.
// The blob format is lightning_rnnviz/payload.py's; the header's fields are docs/explorer.md's.

const MAGIC = 'RNNVIZP1';
const SVGNS = 'http://www.w3.org/2000/svg';
const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
  '#bcbd22', '#17becf'];

// ---------------------------------------------------------------------------------------------- data
export function decodePayload(arrayBuffer) {
  const bytes = new Uint8Array(arrayBuffer);
  const magic = String.fromCharCode(...bytes.subarray(0, 8));
  if (bytes.length < 12 || magic !== MAGIC) throw new Error('not a probe set of lightning_rnnviz (no RNNVIZP1 magic)');
  const length = new DataView(arrayBuffer).getUint32(8, true);
  if (12 + length > bytes.length) throw new Error('the probe set\'s header runs past its end');
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(12, 12 + length)));
  if (header.format !== 'rnnviz-probe-set' || header.version !== 1) {
    throw new Error(`a probe set of format ${header.format} version ${header.version}; this explorer reads version 1`);
  }
  const start = Math.ceil((12 + length) / 4) * 4;
  const shape = (ref) => ref.shape.slice();
  const array = (ref) => {
    const count = ref.shape.reduce((a, b) => a * b, 1);
    if (ref.offset < 0 || ref.offset % 4 || start + ref.offset + 4 * count > bytes.length) {
      throw new Error('an array reference lies outside the probe set');
    }
    return new Float32Array(arrayBuffer, start + ref.offset, count);  // little-endian hosts: every browser
  };
  return {header, array, shape};
}

// A source over the data the HTML export embeds: {"runs": ..., "blobs": {"run\0tag\0step": base64}}.
export function embeddedSource(data) {
  return {
    runs: async () => data.runs,
    probeSet: async (run, tag, step) => {
      const text = data.blobs[`${run}\u0000${tag}\u0000${step}`];
      if (text === undefined) throw new Error(`no probe set for ${run} ${tag} step ${step} in this page`);
      const binary = atob(text);
      const out = new Uint8Array(binary.length);
      for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
      return out.buffer;
    },
  };
}

// ------------------------------------------------------------------------------------------- helpers
const RULES = `
.rnnviz { font: 13px/1.35 system-ui, sans-serif; color: #222; padding: 8px; }
.rnnviz h2 { font-size: 15px; margin: 14px 0 4px; }
.rnnviz .bar { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; margin-bottom: 6px; }
.rnnviz label { white-space: nowrap; }
.rnnviz select, .rnnviz input { font: inherit; margin-left: 4px; }
.rnnviz .msg { color: #7a4a00; background: #fff6e0; padding: 4px 8px; margin: 4px 0; }
.rnnviz .help { color: #555; margin: 2px 0 6px; max-width: 1100px; }
.rnnviz .notes li { color: #7a4a00; }
.rnnviz .row { display: flex; gap: 18px; align-items: flex-start; flex-wrap: wrap; }
.rnnviz .side { min-width: 260px; max-width: 420px; }
.rnnviz .side ul { max-height: 300px; overflow: auto; padding-left: 18px; margin: 4px 0; }
.rnnviz .tip { position: fixed; pointer-events: none; background: #fff; border: 1px solid #888;
  padding: 3px 6px; font: 12px monospace; white-space: pre; z-index: 10; }
.rnnviz .tok { font-family: monospace; }
.rnnviz .hit { background: #ffe08a; font-weight: bold; }
.rnnviz .heads { display: flex; flex-wrap: wrap; gap: 12px; }
.rnnviz canvas { cursor: crosshair; }
.rnnviz .legend { display: flex; align-items: center; gap: 6px; margin: 4px 0; }
`;

function installStyles(element) {
  const doc = element.ownerDocument;
  if (doc.rnnvizStyled) return;
  doc.rnnvizStyled = true;
  try {
    const sheet = new CSSStyleSheet();
    sheet.replaceSync(RULES);
    doc.adoptedStyleSheets = [...doc.adoptedStyleSheets, sheet];
  } catch (e) {  // no constructed sheets: an empty <style> filled through the CSSOM
    const style = doc.createElement('style');
    doc.head.appendChild(style);
    for (const rule of RULES.split('\n}').map((r) => r.trim()).filter(Boolean)) style.sheet.insertRule(`${rule}}`);
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'text') node.textContent = v;
    else if (k === 'class') node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function options(select, items, value) {  // items: [[value, label]]
  select.replaceChildren(...items.map(([v, label]) => el('option', {value: String(v), text: label})));
  if (items.some(([v]) => String(v) === String(value))) select.value = String(value);
  return select.value;
}

function message(text) { return el('p', {class: 'msg', text}); }

function diverging(v, max) {  // [r, g, b]: blue (negative) - white (0) - red (positive)
  const x = Math.max(-1, Math.min(1, max > 0 ? v / max : 0));
  const a = Math.abs(x);
  return x >= 0 ? [255, 255 - 200 * a, 255 - 215 * a] : [255 - 215 * a, 255 - 170 * a, 255];
}

// A grid of rows x cols cells of cw x ch pixels at (x0, y0), one putImageData (fillRect per cell is slow).
function blit(g, x0, y0, rows, cols, cw, ch, colour) {
  if (!rows || !cols) return;
  const width = cols * cw;
  const image = g.createImageData(width, rows * ch);
  const d = image.data;
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const [R, G, B] = colour(r, c);
      for (let y = r * ch; y < (r + 1) * ch; y++) {
        for (let i = (y * width + c * cw) * 4, x = 0; x < cw; x++, i += 4) {
          d[i] = R; d[i + 1] = G; d[i + 2] = B; d[i + 3] = 255;
        }
      }
    }
  }
  g.putImageData(image, x0, y0);
}

function exact(v) { return String(v); }  // a float32 widened to a double: String() writes it exactly
function short(v) { return Number(v).toPrecision(6); }

// The token of step t of sequence k: the module's own (`tokens`: a decoder runs over the output's) where the
// probe set gives them, else the sequence's.
function tokenOf(header, k, t, module) {
  const own = module && module.tokens;
  const tokens = own ? own[k] : header.tokens && header.tokens[k];
  return tokens && tokens[t] !== undefined ? String(tokens[t]) : '';
}

// An attention map's axis label: the module's query or key tokens where the probe set gives them (a
// cross-attention's queries are output steps, its keys input steps), else the sequence's for self-attention.
function axisToken(header, m, k, t, isQuery) {
  const own = m[isQuery ? 'query_tokens' : 'key_tokens'];
  if (own) return own[k] && own[k][t] !== undefined ? String(own[k][t]) : '';
  return m.tokens_are_steps ? tokenOf(header, k, t) : '';
}

function clamp(x, lo, hi) { return Math.max(lo, Math.min(hi, x)); }

// -------------------------------------------------------------------------------------------- mount
export function mount(element, source) {
  installStyles(element);
  const ui = {
    run: el('select', {id: 'rnnviz-run'}), tag: el('select', {id: 'rnnviz-tag'}),
    step: el('input', {id: 'rnnviz-step', type: 'range', min: '0', max: '0', value: '0'}),
    stepLabel: el('span', {id: 'rnnviz-step-label'}),
    module: el('select', {id: 'rnnviz-module'}), layer: el('select', {id: 'rnnviz-layer'}),
    sequence: el('select', {id: 'rnnviz-sequence'}), quantity: el('select', {id: 'rnnviz-quantity'}),
    sort: el('select', {id: 'rnnviz-sort'}),
    threshold: el('input', {id: 'rnnviz-threshold', type: 'number', step: '0.05', value: '0.5'}),
    reload: el('button', {id: 'rnnviz-reload', text: 'reload'}),
    status: el('p', {id: 'rnnviz-status', class: 'help'}), notes: el('ul', {id: 'rnnviz-notes', class: 'notes'}),
    heat: el('div', {id: 'rnnviz-hidden-view'}), canvas: el('canvas', {id: 'rnnviz-heatmap'}),
    legend: el('div', {class: 'legend'}), tip: el('div', {id: 'rnnviz-tooltip', class: 'tip'}),
    selectInfo: el('p', {id: 'rnnviz-selection', class: 'help'}),
    selected: el('ul', {id: 'rnnviz-selected'}), matches: el('ol', {id: 'rnnviz-matches'}),
    matchInfo: el('p', {class: 'help'}),
    grad: el('div', {id: 'rnnviz-gradient-view'}), attention: el('div', {id: 'rnnviz-attention'}),
  };
  options(ui.sort, [['index', 'unit index'], ['variance', 'variance'], ['activity', 'activity in the selection']]);
  ui.tip.hidden = true;
  const lab = (text, node) => el('label', {}, text, node);
  element.replaceChildren(el('div', {class: 'rnnviz'},
    el('div', {class: 'bar'}, lab('run', ui.run), lab('tag', ui.tag), lab('step', ui.step), ui.stepLabel, ui.reload),
    el('div', {class: 'bar'}, lab('module', ui.module), lab('layer', ui.layer), lab('sequence', ui.sequence),
      lab('show', ui.quantity), lab('sort units by', ui.sort), lab('threshold', ui.threshold)),
    ui.status, ui.notes,
    el('h2', {text: 'Hidden states'}),
    el('p', {class: 'help', text: 'Units (rows) x steps (columns) of one sequence; colour: the value, blue below 0, ' +
      'red above. Hover a cell for its value; drag across steps to select a range.'}),
    el('div', {class: 'row'}, ui.heat,
      el('div', {class: 'side'},
        el('h2', {text: 'Select'}), ui.selectInfo, ui.selected,
        el('h2', {text: 'Match'}), ui.matchInfo, ui.matches)),
    el('h2', {text: 'Gradients ||dL/dh_t||'}), ui.grad,
    el('h2', {text: 'Attention'}), ui.attention, ui.tip));

  const st = {follow: true, runs: [], cache: new Map(), data: null, grads: null, selection: null, focus: null, units: [],
    runsText: ''};

  const fail = (where, err) => { ui.status.textContent = `${where}: ${err && err.message ? err.message : err}`; };

  async function loadRuns() {
    const runs = await source.runs();
    const text = JSON.stringify(runs);
    if (text === st.runsText) return false;
    st.runsText = text;
    st.runs = runs.runs || [];
    return true;
  }

  function currentRun() { return st.runs.find((r) => r.run === ui.run.value); }
  function stepsOf(run, tag) { return (run && run.tags[tag] && run.tags[tag].steps) || []; }

  function fillRunTag() {
    options(ui.run, st.runs.map((r) => [r.run, r.run]), ui.run.value);
    const run = currentRun();
    const tags = run ? Object.keys(run.tags).sort() : [];
    const label = (t) => t.endsWith('/train') ? `${t} (training)` : t.endsWith('/val') ? `${t} (validation)` : t;
    options(ui.tag, tags.map((t) => [t, label(t)]), ui.tag.value);
    const steps = stepsOf(run, ui.tag.value);
    ui.step.max = String(Math.max(0, steps.length - 1));
    if (st.follow) ui.step.value = ui.step.max;  // the newest step stays the one shown as training goes on
    ui.step.dataset.steps = JSON.stringify(steps);
    ui.step.disabled = steps.length < 2;
  }

  async function probeSet(run, tag, step) {
    const key = `${run}\u0000${tag}\u0000${step}`;
    if (!st.cache.has(key)) st.cache.set(key, source.probeSet(run, tag, step).then(decodePayload));
    return st.cache.get(key);
  }

  async function load() {
    const run = currentRun();
    const steps = stepsOf(run, ui.tag.value);
    if (!run || !steps.length) {
      st.data = null;
      ui.status.textContent = 'No probe sets of lightning_rnnviz here yet (the callback writes them at recordings).';
      draw();
      return;
    }
    const step = steps[clamp(Number(ui.step.value), 0, steps.length - 1)];
    ui.step.dataset.step = String(step);
    ui.stepLabel.textContent = `step ${step} (${Number(ui.step.value) + 1} of ${steps.length})`;
    st.data = await probeSet(run.run, ui.tag.value, step);
    st.grads = null;
    if (ui.tag.value.endsWith('/val')) {  // validation has no gradients: the nearest training recording's
      const train = ui.tag.value.replace(/\/val$/, '/train');
      const tsteps = stepsOf(run, train);
      if (tsteps.length) {
        const near = tsteps.reduce((a, b) => (Math.abs(b - step) < Math.abs(a - step) ? b : a));
        st.grads = {data: await probeSet(run.run, train, near), step: near, tag: train};
      }
    } else {
      st.grads = {data: st.data, step, tag: ui.tag.value};
    }
    fillModule();
    draw();
  }

  function fillModule() {
    const h = st.data.header;
    options(ui.module, h.modules.map((m, i) => [i, `${m.name || '(model)'} (${m.kind})`]), ui.module.value);
    const m = h.modules[Number(ui.module.value)];
    if (m && m.type === 'rnn') {
      options(ui.layer, m.layers.map((l, i) => [i, l.label || m.name || 'the only layer']),
        ui.layer.value);
      const l = m.layers[Number(ui.layer.value)];
      options(ui.quantity, [['hidden', 'hidden state h_t'], ...Object.keys(l.gates).map((g) => [g, `${g} gate`])],
        ui.quantity.value);
    } else {
      options(ui.layer, []);
      options(ui.quantity, [['hidden', 'hidden state h_t']]);
    }
    options(ui.sequence, h.rows.map((r, k) => [k, `#${k} (row ${r}, ${h.lengths[k]} steps)`]), ui.sequence.value);
  }

  // The rnn layer shown and its array [K, T, U] of the chosen quantity.
  function layerView() {
    if (!st.data) return null;
    const h = st.data.header;
    const m = h.modules[Number(ui.module.value)];
    if (!m || m.type !== 'rnn') return null;
    const l = m.layers[Number(ui.layer.value)];
    const q = ui.quantity.value;
    const ref = q === 'hidden' ? l.hidden : l.gates[q];
    const [K, T, U] = ref.shape;
    const units = q === 'hidden' ? l.units : l.gate_units;
    return {h, m, l, q, K, T, U, units, values: st.data.array(ref), k: Number(ui.sequence.value)};
  }

  const at = (v, k, t, u) => v.values[(k * v.T + t) * v.U + u];

  // ---------------------------------------------------------------------------------------- drawing
  function draw() {
    drawNotes();
    drawSelection();
    drawHeatmap();
    drawGradients();
    drawAttention();
    document.body.dataset.rnnvizReady = '1';
  }

  function drawNotes() {
    const items = [];
    if (st.data) {
      const h = st.data.header;
      items.push(...h.notes);
      for (const m of h.modules) {
        if (!m.exact) items.push(`${m.name || '(model)'}: not exact (the replay could not reproduce training bit for bit)`);
      }
      ui.status.textContent = `${h.source} recording at step ${h.step}: ${h.rows.length} sequences of up to ${h.steps} steps.`;
    }
    ui.notes.replaceChildren(...[...new Set(items)].map((n) => el('li', {text: n})));
  }

  function unitOrder(v) {
    const order = Array.from({length: v.U}, (_, i) => i);
    const mode = ui.sort.value;
    if (mode === 'index') return order.sort((a, b) => v.units[a] - v.units[b]);
    const score = new Float64Array(v.U);
    if (mode === 'variance') {  // over every valid step of every sequence of the probe set
      for (let u = 0; u < v.U; u++) {
        let n = 0, s = 0, s2 = 0;
        for (let k = 0; k < v.K; k++) {
          for (let t = 0; t < v.h.lengths[k]; t++) { const x = at(v, k, t, u); n++; s += x; s2 += x * x; }
        }
        score[u] = n ? s2 / n - (s / n) ** 2 : 0;
      }
    } else {  // activity: mean value over the selected range (the shown sequence without a selection)
      const valid = st.selection && st.selection.k < v.K && st.selection.end < v.h.lengths[st.selection.k];
      const sel = valid ? st.selection : {k: v.k, start: 0, end: v.h.lengths[v.k] - 1};
      for (let u = 0; u < v.U; u++) {
        let s = 0;
        for (let t = sel.start; t <= sel.end; t++) s += at(v, sel.k, t, u);
        score[u] = s / (sel.end - sel.start + 1);
      }
    }
    return order.sort((a, b) => score[b] - score[a] || v.units[a] - v.units[b]);
  }

  let geom = null;  // where the heatmap's cells are, for hover and drag

  function drawHeatmap() {
    hideTip();  // a redraw moves the cells: the tip would describe one no longer under the pointer
    const v = layerView();
    if (!v) {
      const m = st.data && st.data.header.modules[Number(ui.module.value)];
      ui.heat.replaceChildren(message(!st.data ? 'No probe set loaded.' : m && m.type === 'attention'
        ? `${m.name} is an attention module: its weights are in the Attention view below.`
        : 'No recurrent module in this probe set.'));
      geom = null;
      return;
    }
    const T = v.h.lengths[v.k];
    const order = unitOrder(v);
    let max = 0;
    for (const x of v.values) max = Math.max(max, Math.abs(x));
    const cw = clamp(Math.floor(880 / Math.max(T, 1)), 2, 32);
    const ch = clamp(Math.floor(520 / Math.max(v.U, 1)), 2, 20);
    const left = 56, top = 8, bottom = 70;
    const c = ui.canvas;
    c.width = left + cw * T + 8;
    c.height = top + ch * v.U + bottom;
    c.style.width = `${c.width}px`;
    c.style.height = `${c.height}px`;
    Object.assign(c.dataset, {units: String(v.U), steps: String(T), cellWidth: String(cw), cellHeight: String(ch),
      left: String(left), top: String(top), order: JSON.stringify(order.map((u) => v.units[u]))});
    geom = {v, T, order, cw, ch, left, top};
    const g = c.getContext('2d');
    g.fillStyle = '#fff';
    g.fillRect(0, 0, c.width, c.height);
    blit(g, left, top, v.U, T, cw, ch, (r, t) => diverging(at(v, v.k, t, order[r]), max));
    g.fillStyle = '#333';
    g.font = '11px sans-serif';
    g.textAlign = 'right';
    g.textBaseline = 'middle';
    const every = Math.ceil(12 / ch);
    for (let r = 0; r < v.U; r += every) g.fillText(String(v.units[order[r]]), left - 12, top + r * ch + ch / 2);
    g.save();
    g.textAlign = 'right';
    const tevery = Math.ceil(13 / cw);
    for (let t = 0; t < T; t += tevery) {
      const label = tokenOf(v.h, v.k, t, v.m) || String(t);
      g.save();
      g.translate(left + t * cw + cw / 2, top + v.U * ch + 6);
      g.rotate(-Math.PI / 3);
      g.fillText(label.length > 10 ? `${label.slice(0, 9)}…` : label, 0, 0);
      g.restore();
    }
    g.restore();
    const sel = st.selection, focus = st.focus;
    g.lineWidth = 2;
    if (sel && sel.k === v.k) {  // the selected range: black; a match clicked in the list: orange, dashed
      g.strokeStyle = '#000';
      g.strokeRect(left + sel.start * cw, top, (sel.end - sel.start + 1) * cw, v.U * ch);
    }
    if (focus && focus.k === v.k) {
      g.strokeStyle = '#f08000';
      g.setLineDash([5, 3]);
      g.strokeRect(left + focus.start * cw, top, (focus.end - focus.start + 1) * cw, v.U * ch);
      g.setLineDash([]);
    }
    g.fillStyle = '#f0a000';  // the selected units, marked left of their rows
    for (let r = 0; r < v.U; r++) if (st.units.includes(v.units[order[r]])) g.fillRect(left - 9, top + r * ch, 7, ch);
    const legend = el('canvas', {width: '200', height: '12'});
    const lg = legend.getContext('2d');
    blit(lg, 0, 0, 1, 200, 1, 12, (r, x) => diverging((x / 199 * 2 - 1) * max, max));
    ui.legend.replaceChildren(el('span', {text: short(-max)}), legend, el('span', {text: `${short(max)}   (0: white)`}));
    const title = `${[v.m.name || '(model)', v.l.label].filter(Boolean).join(' ')} · ${v.q === 'hidden' ? 'h_t' : `${v.q} gate`} · sequence #${v.k}` +
      ` · ${v.U} units x ${T} steps`;
    const absent = Object.keys(v.l.gates).length ? [] : [message(`${v.m.kind}: no gates to show (a vanilla RNN has none); ` +
      'the heatmap shows h_t.')];
    ui.heat.replaceChildren(el('div', {class: 'help', text: title}), ...absent, c, ui.legend);
  }

  function cellAt(event) {
    if (!geom) return null;
    const box = ui.canvas.getBoundingClientRect();
    const t = Math.floor((event.clientX - box.left - geom.left) / geom.cw);
    const r = Math.floor((event.clientY - box.top - geom.top) / geom.ch);
    return {t: clamp(t, 0, geom.T - 1), r, inside: t >= 0 && t < geom.T && r >= 0 && r < geom.v.U};
  }

  let drag = null;
  ui.canvas.addEventListener('mousemove', (event) => {
    const cell = cellAt(event);
    if (drag && cell) { drag.end = cell.t; showDrag(); }
    if (!cell || !cell.inside) { hideTip(); return; }
    const v = geom.v;
    const u = geom.order[cell.r];
    const value = at(v, v.k, cell.t, u);
    const token = tokenOf(v.h, v.k, cell.t, v.m);
    Object.assign(ui.tip.dataset, {unit: String(v.units[u]), step: String(cell.t), token, value: exact(value)});
    ui.tip.textContent = `unit ${v.units[u]}\nstep ${cell.t}${token ? `  token ${JSON.stringify(token)}` : ''}\n` +
      `value ${short(value)}`;
    ui.tip.hidden = false;
    ui.tip.style.left = `${event.clientX + 14}px`;
    ui.tip.style.top = `${event.clientY + 14}px`;
  });
  ui.canvas.addEventListener('mouseleave', hideTip);
  ui.canvas.addEventListener('mousedown', (event) => {
    const cell = cellAt(event);
    if (cell && cell.inside) { drag = {start: cell.t, end: cell.t}; event.preventDefault(); }
  });
  window.addEventListener('mouseup', () => {
    if (!drag || !geom) return;
    st.focus = null;
    st.selection = {k: geom.v.k, start: Math.min(drag.start, drag.end), end: Math.max(drag.start, drag.end)};
    drag = null;
    drawSelection();
    drawHeatmap();
  });

  function showDrag() {
    const g = ui.canvas.getContext('2d');
    const a = Math.min(drag.start, drag.end), b = Math.max(drag.start, drag.end);
    g.strokeStyle = '#555';
    g.setLineDash([4, 3]);
    g.strokeRect(geom.left + a * geom.cw, geom.top, (b - a + 1) * geom.cw, geom.v.U * geom.ch);
    g.setLineDash([]);
  }

  function hideTip() {
    ui.tip.hidden = true;
    for (const k of ['unit', 'step', 'token', 'value']) delete ui.tip.dataset[k];
  }

  // -------------------------------------------------------------------------------- select and match
  function tokenContext(v, k, start, end, pad = 3) {
    const span = el('span', {class: 'tok'});
    const a = Math.max(0, start - pad), b = Math.min(v.h.lengths[k] - 1, end + pad);
    if (a > 0) span.append('… ');
    for (let t = a; t <= b; t++) {
      const word = tokenOf(v.h, k, t, v.m) || String(t);
      span.append(t >= start && t <= end ? el('span', {class: 'hit', text: word}) : word, t < b ? ' ' : '');
    }
    if (b < v.h.lengths[k] - 1) span.append(' …');
    return span;
  }

  function drawSelection() {
    const v = layerView();
    const thr = Number(ui.threshold.value);
    const sel = st.selection;
    st.units = [];
    ui.selected.replaceChildren();
    ui.matches.replaceChildren();
    ui.matches.dataset.count = '0';
    if (!v || !sel || sel.k >= v.K || sel.end >= v.h.lengths[sel.k] || !Number.isFinite(thr)) {
      ui.selectInfo.textContent = v ? 'Drag over a range of steps in the heatmap: the units on (above the threshold) ' +
        'at every step of the range and off (at or below it) at the step before are selected.' : '';
      ui.matchInfo.textContent = '';
      return;
    }
    const picked = [];
    for (let u = 0; u < v.U; u++) {
      let on = true;
      for (let t = sel.start; t <= sel.end && on; t++) on = at(v, sel.k, t, u) > thr;
      if (on && sel.start > 0) on = at(v, sel.k, sel.start - 1, u) <= thr;
      if (on) picked.push(u);
    }
    picked.sort((a, b) => v.units[a] - v.units[b]);
    st.units = picked.map((u) => v.units[u]);
    const range = sel.start === sel.end ? `Step ${sel.start}` : `Steps ${sel.start}-${sel.end}`;
    ui.selectInfo.replaceChildren(`${range} of sequence #${sel.k} `, tokenContext(v, sel.k, sel.start, sel.end, 0),
      `: ${picked.length} unit${picked.length === 1 ? '' : 's'} above ${thr} at every step` +
      (sel.start > 0 ? ` and at or below it at step ${sel.start - 1}.` : ' (the range starts the sequence).'));
    ui.selected.replaceChildren(...picked.map((u) => el('li', {'data-unit': String(v.units[u]),
      text: `unit ${v.units[u]}  (mean ${short(mean(v, sel.k, sel.start, sel.end, [u]))})`})));
    if (!picked.length) { ui.matchInfo.textContent = 'No unit set to match.'; return; }
    const want = sel.end - sel.start + 1;
    const found = [];
    for (let k = 0; k < v.K; k++) {
      let start = -1;
      for (let t = 0; t <= v.h.lengths[k]; t++) {
        const on = t < v.h.lengths[k] && picked.every((u) => at(v, k, t, u) > thr);
        if (on && start < 0) start = t;
        if (!on && start >= 0) {
          found.push({k, start, end: t - 1, gap: Math.abs(t - start - want), score: mean(v, k, start, t - 1, picked)});
          start = -1;
        }
      }
    }
    found.sort((a, b) => a.gap - b.gap || b.score - a.score || a.k - b.k || a.start - b.start);
    ui.matches.dataset.count = String(found.length);
    ui.matchInfo.textContent = `${found.length} place${found.length === 1 ? '' : 's'} in the probe set where ` +
      `${picked.length === 1 ? 'the selected unit is' : `${picked.length} selected units are`} above ${thr} together (maximal runs of steps), closest in length to the ` +
      'selection first, then by their mean value. Click one to show it.';
    if (found.length > 200) ui.matchInfo.textContent += ` The first 200 of ${found.length} are listed.`;
    ui.matches.replaceChildren(...found.slice(0, 200).map((f) => {
      const li = el('li', {'data-sequence': String(f.k), 'data-start': String(f.start), 'data-end': String(f.end),
        'data-score': exact(f.score)}, `#${f.k} ${f.start === f.end ? `step ${f.start}` : `steps ${f.start}-${f.end}`} (mean ${short(f.score)}): `,
      tokenContext(v, f.k, f.start, f.end));
      li.addEventListener('click', () => { st.focus = f; ui.sequence.value = String(f.k); draw(); });
      return li;
    }));
  }

  function mean(v, k, start, end, us) {
    let s = 0;
    for (let t = start; t <= end; t++) for (const u of us) s += at(v, k, t, u);
    return s / ((end - start + 1) * us.length);
  }

  // -------------------------------------------------------------------------------------- gradients
  function drawGradients() {
    const intro = el('p', {class: 'help'});
    const say = (text) => ui.grad.replaceChildren(intro, message(text));
    if (!st.data) { ui.grad.replaceChildren(); return; }
    const m = st.data.header.modules[Number(ui.module.value)];
    if (!m || m.type !== 'rnn') { say('Gradients are drawn for recurrent modules; choose one above.'); return; }
    if (!st.grads) {
      say('No gradients: validation runs without them, and this run has no training probe set to take them from.');
      return;
    }
    const g = st.grads;
    intro.textContent = g.data === st.data
      ? `||dL/dh_t|| per sequence of this training recording (step ${g.step}), log scale; the dashed lines mark ` +
        'each sequence\'s horizon (where the gradient, followed back from where it enters, falls below 1 % of its peak).'
      : `Validation has no gradients: these are from the training recording nearest this step (${g.tag} step ${g.step}), ` +
        'whose sequences are the recorded training batch\'s rows, not the validation rows above.';
    const gm = g.data.header.modules.find((x) => x.type === 'rnn' && x.name === m.name);
    const gl = gm && gm.layers[Number(ui.layer.value)];
    if (!gl || !gl.grad_norm) {
      say(`No gradients in this ${g.data.header.source} recording for ${m.name || '(model)'}` +
        (g.data.header.source === 'validation' ? ': validation runs without them.' : ' (no backward reached it).'));
      return;
    }
    const [K, T] = gl.grad_norm.shape;
    const values = g.data.array(gl.grad_norm);
    const lengths = g.data.header.lengths;
    let lo = Infinity, hi = 0;
    for (let k = 0; k < K; k++) for (let t = 0; t < lengths[k]; t++) {
      const x = values[k * T + t];
      if (x > 0) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
    }
    if (!(hi > 0)) { say('Every gradient norm in this recording is zero.'); return; }
    const e0 = Math.floor(Math.log10(lo)), e1 = Math.max(Math.ceil(Math.log10(hi)), e0 + 1);
    const W = 900, H = 300, L = 64, R = 16, Tp = 10, B = 36;
    const x = (t) => L + (T > 1 ? t / (T - 1) : 0.5) * (W - L - R);
    const y = (val) => Tp + (e1 - Math.log10(val)) / (e1 - e0) * (H - Tp - B);
    const root = svg('svg', {id: 'rnnviz-gradients', width: String(W), height: String(H), 'data-scale': 'log',
      'data-sequences': String(K)});
    root.append(svg('rect', {x: '0', y: '0', width: String(W), height: String(H), fill: '#fff'}));
    for (let e = e0; e <= e1; e++) {
      for (let m = 1; m < (e < e1 ? 10 : 2); m++) {  // a line at each 1..9 x 10^e; labels at 1 (and 2, 5 when few decades)
        const at = y(m * 10 ** e);
        root.append(svg('line', {x1: String(L), x2: String(W - R), y1: String(at), y2: String(at), stroke: m === 1 ? '#ccc' : '#eee'}));
        if (m === 1 || (e1 - e0 <= 2 && (m === 2 || m === 5))) {
          const label = svg('text', {x: String(L - 6), y: String(at + 4), 'text-anchor': 'end', 'font-size': '11',
            class: m === 1 ? 'rnnviz-tick' : 'rnnviz-minor'});
          label.textContent = m === 1 ? `1e${e}` : `${m}e${e}`;
          root.append(label);
        }
      }
    }
    const tstep = Math.max(1, Math.ceil(T / 15));
    for (let t = 0; t < T; t += tstep) {
      const label = svg('text', {x: String(x(t)), y: String(H - B + 16), 'text-anchor': 'middle', 'font-size': '11'});
      label.textContent = String(t);
      root.append(label);
    }
    const axis = svg('text', {x: String((L + W) / 2), y: String(H - 4), 'text-anchor': 'middle', 'font-size': '11'});
    axis.textContent = 'step';
    root.append(axis, svg('line', {x1: String(L), x2: String(L), y1: String(Tp), y2: String(H - B), stroke: '#888'}));
    for (let k = 0; k < K; k++) {
      let d = '', pen = 'M';
      for (let t = 0; t < lengths[k]; t++) {
        const val = values[k * T + t];
        if (val > 0) { d += `${pen}${x(t).toFixed(1)},${y(val).toFixed(1)}`; pen = 'L'; } else pen = 'M';
      }
      const colour = PALETTE[k % PALETTE.length];
      root.append(svg('path', {d, fill: 'none', stroke: colour, 'stroke-width': '1.5', 'data-sequence': String(k)}));
      const hz = gl.horizon && gl.horizon[k];
      if (hz !== null && hz !== undefined) {
        root.append(svg('line', {x1: String(x(hz)), x2: String(x(hz)), y1: String(Tp), y2: String(H - B), stroke: colour,
          'stroke-dasharray': '4 3', 'data-horizon': String(hz), 'data-sequence': String(k)}));
      }
    }
    const cursor = svg('line', {y1: String(Tp), y2: String(H - B), stroke: '#000', visibility: 'hidden'});
    root.append(cursor);
    const readout = el('div', {id: 'rnnviz-gradient-readout', class: 'help', text: 'Hover the chart for the values.'});
    root.addEventListener('mousemove', (event) => {
      const box = root.getBoundingClientRect();
      const t = clamp(Math.round((event.clientX - box.left - L) / (W - L - R) * (T - 1)), 0, T - 1);
      cursor.setAttribute('x1', String(x(t)));
      cursor.setAttribute('x2', String(x(t)));
      cursor.setAttribute('visibility', 'visible');
      readout.dataset.step = String(t);
      readout.dataset.values = JSON.stringify(Array.from({length: K}, (_, k) => (t < lengths[k] ? values[k * T + t] : null)));
      readout.textContent = `step ${t}: ` + Array.from({length: K}, (_, k) => t < lengths[k]
        ? `#${k} ${short(values[k * T + t])}` : `#${k} -`).join('   ');
    });
    const keys = el('div', {class: 'help'}, ...Array.from({length: K}, (_, k) => {
      const swatch = el('span', {text: '■ '});
      swatch.style.color = PALETTE[k % PALETTE.length];
      return el('span', {}, swatch, `#${k}  `);
    }));
    ui.grad.replaceChildren(intro, keys, root, readout);
  }

  // -------------------------------------------------------------------------------------- attention
  function drawAttention() {
    if (!st.data) { ui.attention.replaceChildren(); return; }
    const h = st.data.header;
    const mods = h.modules.filter((m) => m.type === 'attention');
    if (!mods.length) { ui.attention.replaceChildren(message('No attention module in this probe set.')); return; }
    const k = Number(ui.sequence.value);
    const parts = [el('p', {class: 'help', text: `Sequence #${k}: per head, queries (rows) x keys (columns), white is 0, ` +
      'the darkest blue the head\'s largest weight in this sequence. Hover a query (a row) to highlight its keys.'})];
    for (const m of mods) {
      const [K, H, Tq, Tk] = m.weights.shape;
      const w = st.data.array(m.weights);
      const nq = m.query_lengths[k], nk = m.key_lengths[k];
      const label = (t, isQuery) => axisToken(h, m, k, t, isQuery) || `${isQuery ? 'q' : 'k'}${t}`;
      const readout = el('div', {class: 'help', text: ' '});
      const heads = el('div', {class: 'heads'});
      const c = clamp(Math.floor(300 / Math.max(nq, nk, 1)), 1, 18);
      const pad = 56;
      for (let head = 0; head < H; head++) {
        const canvas = el('canvas', {'data-head': String(head), 'data-module': m.name, 'data-queries': String(nq),
          'data-keys': String(nk), width: String(pad + c * nk + 4), height: String(pad + c * nq + 20)});
        canvas.style.width = `${canvas.width}px`;
        canvas.style.height = `${canvas.height}px`;
        const cell = (q, key) => w[((k * H + head) * Tq + q) * Tk + key];
        let top = 0;  // the colour scale: 0 to the head's largest weight in this sequence
        for (let q = 0; q < nq; q++) for (let key = 0; key < nk; key++) top = Math.max(top, cell(q, key));
        const rowMax = (q) => Math.max(...Array.from({length: nk}, (_, key) => cell(q, key)));
        const paint = (hover) => {
          const hoverMax = hover === null ? 0 : rowMax(hover);
          const g = canvas.getContext('2d');
          g.fillStyle = '#fff';
          g.fillRect(0, 0, canvas.width, canvas.height);
          blit(g, pad, pad, nq, nk, c, c, (q, key) => {  // white to blue; other queries grey and faint on hover
            const level = 225 * (top > 0 ? clamp(cell(q, key) / top, 0, 1) : 0);
            if (hover === null || q === hover) return [255 - level, 255 - level, 255];
            return [255 - 0.35 * level, 255 - 0.35 * level, 255 - 0.35 * level];
          });
          g.font = '10px sans-serif';
          g.fillStyle = '#333';
          g.textAlign = 'right';
          g.textBaseline = 'middle';
          const every = Math.ceil(11 / c);
          for (let q = 0; q < nq; q += every) g.fillText(label(q, true).slice(0, 8), pad - 3, pad + q * c + c / 2);
          for (let key = 0; key < nk; key += every) {
            g.save();
            g.translate(pad + key * c + c / 2, pad - 3);
            g.rotate(-Math.PI / 3);
            g.textAlign = 'left';
            const strong = hover !== null && cell(hover, key) >= 0.5 * hoverMax;
            g.fillStyle = strong ? '#c00' : '#333';
            g.font = strong ? 'bold 11px sans-serif' : '10px sans-serif';
            g.fillText(label(key, false).slice(0, 8), 0, 0);
            g.restore();
          }
          if (hover !== null) {
            g.strokeStyle = '#c00';
            g.strokeRect(pad, pad + hover * c, nk * c, c);
            g.fillStyle = '#c00';  // each key's weight for the hovered query, as a bar under the grid
            for (let key = 0; key < nk; key++) {
              const bar = 14 * cell(hover, key) / (hoverMax || 1);
              g.fillRect(pad + key * c + 1, pad + nq * c + 2, c - 2, bar);
            }
          }
          g.fillStyle = '#000';
          g.textAlign = 'left';
          g.fillText(`head ${head}`, 2, 8);
          g.fillText(`darkest ${short(top)}`, 2, 20);
        };
        paint(null);
        canvas.addEventListener('mousemove', (event) => {
          const box = canvas.getBoundingClientRect();
          const q = Math.floor((event.clientY - box.top - pad) / c);
          if (q < 0 || q >= nq) { paint(null); return; }
          paint(q);
          canvas.dataset.query = String(q);
          const best = Array.from({length: nk}, (_, key) => key).sort((a, b) => cell(q, b) - cell(q, a)).slice(0, 5);
          readout.textContent = `${m.name} head ${head}, query ${q} ${JSON.stringify(label(q, true))}: ` +
            best.map((key) => `${JSON.stringify(label(key, false))} ${short(cell(q, key))}`).join(', ');
        });
        canvas.addEventListener('mouseleave', () => { paint(null); delete canvas.dataset.query; });
        heads.append(canvas);
      }
      parts.push(el('div', {class: 'help', text: `${m.name || '(model)'} (${m.kind}), ${H} heads` +
        (m.exact ? '' : ', not exact') + (m.tokens_are_steps ? '' : '; queries and keys are not the sequence\'s steps')}),
      heads, readout);
    }
    ui.attention.replaceChildren(...parts);
  }

  // --------------------------------------------------------------------------------------- controls
  const run = (fn) => () => Promise.resolve().then(fn).catch((err) => fail('could not load the probe set', err));
  ui.run.addEventListener('change', run(() => { st.follow = true; st.selection = st.focus = null; fillRunTag(); return load(); }));
  ui.tag.addEventListener('change', run(() => { st.follow = true; fillRunTag(); st.selection = st.focus = null; return load(); }));
  ui.step.addEventListener('input', run(() => { st.follow = ui.step.value === ui.step.max; return load(); }));
  ui.module.addEventListener('change', run(() => { st.selection = st.focus = null; ui.layer.value = '0'; fillModule(); draw(); }));
  ui.layer.addEventListener('change', run(() => { st.selection = st.focus = null; fillModule(); draw(); }));
  ui.quantity.addEventListener('change', run(draw));
  ui.sequence.addEventListener('change', run(draw));
  ui.sort.addEventListener('change', run(drawHeatmap));
  ui.threshold.addEventListener('input', run(() => { drawSelection(); drawHeatmap(); }));
  const refresh = run(async () => { if (await loadRuns()) { fillRunTag(); await load(); } });
  ui.reload.addEventListener('click', refresh);

  const ready = run(async () => {
    await loadRuns();
    fillRunTag();
    await load();
  });
  const timer = setInterval(() => { if (element.isConnected) refresh(); else clearInterval(timer); }, 30000);
  // resolves once the first probe set is drawn; `refresh()` reads the runs again and shows what is new
  return Object.assign(ready(), {refresh});
}
