// The feature browser: explanation search, layer / density / score filters, paginated table.
'use strict';
const PAGE = 50;

(async function () {
  startPage('Features');
  const main = document.getElementById('main');
  const params = new URLSearchParams(location.search);
  const layers = await getJSON('/api/layers');
  if (!layers.ok) { main.innerHTML = problemHTML(layers.data); return; }
  const opt = layers.data.layers.map(l => `<option value="${l}">${l}</option>`).join('');
  main.innerHTML = `<h1>Features</h1>
    <form class="filters" id="filters">
      <label>explanation contains<input name="q" id="q" size="28" placeholder="word or phrase"></label>
      <label>layer<select name="layer" id="layer"><option value="">all</option>${opt}</select></label>
      <label>min density<input name="min_density" id="min_density" size="8" placeholder="0.001"></label>
      <label>max density<input name="max_density" id="max_density" size="8" placeholder="0.1"></label>
      <label>min score (AUC)<input name="min_score" id="min_score" size="6" placeholder="0.7"></label>
      <label>sort by<select name="sort" id="sort"><option value="">layer, feature</option>
        <option value="density">density ↓</option><option value="max_activation">max activation ↓</option>
        <option value="fired">times fired ↓</option></select></label>
      <button type="submit" id="search">search</button>
    </form><div id="results"></div>`;
  const form = document.getElementById('filters');
  for (const [k, v] of params) if (form.elements[k]) form.elements[k].value = v;
  form.addEventListener('submit', ev => {
    ev.preventDefault();
    const p = new URLSearchParams();
    for (const el of form.elements) if (el.name && el.value.trim()) p.set(el.name, el.value.trim());
    history.replaceState(null, '', '?' + p.toString());
    load(p, 0);
  });
  load(params, Number(params.get('offset') || 0));
})();

async function load(params, offset) {
  const box = document.getElementById('results');
  const p = new URLSearchParams(params);
  p.set('offset', offset); p.set('limit', PAGE);
  const {ok, data} = await getJSON('/api/features?' + p.toString());
  if (!ok) { box.innerHTML = problemHTML(data); return; }
  const rows = data.items.map(r => `<tr class="feature-row" data-layer="${r.layer}" data-feature="${r.feature}">
      <td><a href="/feature/${r.layer}/${r.feature}">L${r.layer} / ${r.feature}</a></td>
      <td class="explanation-cell">${r.explanation ? esc(r.explanation) : '<span class="label">–</span>'}</td>
      <td class="num">${fmt(r.frequency, 4)}</td><td class="num">${fmt(r.fired)}</td>
      <td class="num">${fmt(r.max_activation)}</td><td class="num">${fmt(r.score)}</td></tr>`).join('');
  const last = Math.min(data.total, offset + data.items.length);
  box.innerHTML = `<div class="pager"><span id="count">${data.total.toLocaleString('en')} features</span>
      <span>${data.total ? offset + 1 : 0}–${last}</span>
      <button id="prev" ${offset ? '' : 'disabled'}>← prev</button>
      <button id="next" ${last < data.total ? '' : 'disabled'}>next →</button></div>
    <table><tr><th>feature</th><th>explanation</th><th>density</th><th>fired</th><th>max act</th><th>score</th></tr>${rows}</table>`;
  document.getElementById('prev').onclick = () => load(params, Math.max(0, offset - PAGE));
  document.getElementById('next').onclick = () => load(params, offset + PAGE);
}
