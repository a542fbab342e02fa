// The list of attribution graphs with their replacement and completeness scores.
'use strict';
const PAGE = 50;

(async function () {
  startPage('Graphs');
  document.getElementById('main').innerHTML = '<h1>Attribution graphs</h1><div id="results"></div>';
  load(0);
})();

async function load(offset) {
  const box = document.getElementById('results');
  const {ok, data} = await getJSON(`/api/graphs?offset=${offset}&limit=${PAGE}`);
  if (!ok) { box.innerHTML = problemHTML(data); return; }
  const rows = data.items.map(g => `<tr class="graph-row"><td><a href="/graph/${encodeURIComponent(g.slug)}">${esc(g.prompt || g.slug)}</a></td>
    <td class="num">${fmt(g.replacement)}</td><td class="num">${fmt(g.completeness)}</td>
    <td class="num">${fmt(g.tokens)}</td><td class="num">${fmt(g.nodes)}</td><td class="num">${fmt(g.edges)}</td></tr>`).join('');
  const last = offset + data.items.length;
  box.innerHTML = `<div class="pager"><span>${data.total} graphs</span>
    <button id="prev" ${offset ? '' : 'disabled'}>← prev</button><button id="next" ${last < data.total ? '' : 'disabled'}>next →</button></div>
    <table><tr><th>prompt</th><th>replacement</th><th>completeness</th><th>tokens</th><th>nodes</th><th>edges</th></tr>${rows}</table>`;
  document.getElementById('prev').onclick = () => load(Math.max(0, offset - PAGE));
  document.getElementById('next').onclick = () => load(offset + PAGE);
}
