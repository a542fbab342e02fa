// One attribution graph in circuit-tracer's frontend (same-origin iframe under /ct/), whose
// hover tooltip shows each node's label (its clerp: the feature's explanation). The frame keeps
// the clicked node in its URL (clickedId); watching it, this page names the clicked CLT feature
// and links to its feature page.
'use strict';

(async function () {
  const slug = decodeURIComponent(location.pathname.split('/')[2]);
  startPage('Graph');
  const main = document.getElementById('main');
  const {ok, data} = await getJSON('/api/graphs?limit=500');
  if (!ok) { main.innerHTML = problemHTML(data); return; }
  const g = data.items.find(x => x.slug === slug) || {slug};
  main.innerHTML = `<h1>Graph: ${esc(g.prompt || slug)}</h1>
    <p class="label">replacement ${fmt(g.replacement)} · completeness ${fmt(g.completeness)} ·
      ${fmt(g.nodes)} nodes · ${fmt(g.edges)} edges · <a href="/graphs">all graphs</a></p>
    <div class="graphbar" id="graphbar">click a feature node (●) to open its feature page</div>
    <iframe class="graph" id="graph-frame" src="/ct/index.html?slug=${encodeURIComponent(slug)}"></iframe>`;
  const frame = document.getElementById('graph-frame');
  let last = null;
  setInterval(async () => {
    let id = null, shown = slug;  // the frame's own graph menu can switch graphs
    try {
      const params = new URLSearchParams(frame.contentWindow.location.search);
      id = params.get('clickedId');
      shown = params.get('slug') || slug;
    } catch (e) { return; }
    if (!id || id === 'undefined' || id === 'null' || `${shown}/${id}` === last) return;
    last = `${shown}/${id}`;
    const node = await getJSON(`/api/graph/${encodeURIComponent(shown)}/node/${encodeURIComponent(id)}`);
    const bar = document.getElementById('graphbar');
    if (!node.ok) { bar.innerHTML = problemHTML(node.data); return; }
    const n = node.data;
    if (n.layer === undefined || n.layer === null) {
      bar.innerHTML = `<span class="label">${esc(n.feature_type)} node ${esc(n.node_id)} ${esc(n.clerp || '')}</span>`;
      return;
    }
    const f = await getJSON(`/api/feature/${n.layer}/${n.feature}`);
    // the run's explanation, else the graph's own label (graphs labelled from another run)
    const text = (f.ok && f.data.explanation && f.data.explanation.explanation) || n.clerp;
    bar.innerHTML = `Feature L${n.layer} / ${n.feature} at position ${n.ctx_idx}${text ? ': <b>' + esc(text) + '</b>' : ''} —
      <a class="open-feature" href="/feature/${n.layer}/${n.feature}">open feature page →</a>`;
  }, 250);
})();
