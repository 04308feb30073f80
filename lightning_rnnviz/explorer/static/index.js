// The rnnviz tab's entry point. TensorBoard (2.21) opens the tab as an iframe on
// /data/plugin_entry.html?name=rnnviz, whose page has <base href="plugin/rnnviz/"> and runs
// `import("./index.js").then((m) => m.render())`: this module, served from /data/plugin/rnnviz/index.js.
// Its URLs below are resolved against the module's own URL, so they reach /data/plugin/rnnviz/... under
// any path prefix TensorBoard is served at.
import {mount} from './explorer.js';

const ROUTES = new URL('./', import.meta.url);

async function answer(response, what) {
  if (response.ok) return response;
  const text = (await response.text()).trim();
  throw new Error(`${what}: HTTP ${response.status}${text ? `: ${text}` : ''}`);
}

// The explorer's source of data (see the explorer's contract): the plugin's /runs and /probe_set routes.
export function fetchSource(base = ROUTES) {
  return {
    async runs() {
      const response = await answer(await fetch(new URL('runs', base)), 'runs');
      return response.json();
    },
    async probeSet(run, tag, step) {
      const url = new URL('probe_set', base);
      url.search = new URLSearchParams({run, tag, step: String(step)}).toString();
      const response = await answer(await fetch(url), `probe set ${run} ${tag} ${step}`);
      return response.arrayBuffer();
    },
  };
}

// TensorBoard tells its iframed plugins about reloads (its 30 s auto-reload and its reload button) over a
// MessageChannel that the iframe offers by posting "experimental.bootstrap" to the parent window with a
// port; each message is JSON {type, id, payload, error, isReply} and expects a reply with the same id.
function onTensorBoardReload(callback) {
  if (window.parent === window) return;
  const channel = new MessageChannel();
  channel.port1.addEventListener('message', (event) => {
    let message;
    try { message = JSON.parse(event.data); } catch (error) { return; }
    if (!message || message.isReply) return;
    if (message.type === 'experimental.DataReloaded') callback();
    channel.port1.postMessage(JSON.stringify(
        {type: message.type, id: message.id, payload: null, error: null, isReply: true}));
  });
  channel.port1.start();
  window.parent.postMessage('experimental.bootstrap', '*', [channel.port2]);
}

export function render() {
  document.body.style.margin = '0';
  const done = mount(document.body, fetchSource());
  // The explorer reads the runs again every 30 s and on its reload button; it does so on TensorBoard's
  // reloads too, so a running training's new steps appear when TensorBoard says it has them.
  onTensorBoardReload(done.refresh);
  return done;
}
