// The run's overview: which outputs exist, links to each page, the command for each missing one.
'use strict';
const PAGES = {metrics: ['/training', 'Training curves (loss, EV, L0 per layer)'],
  features: ['/features', 'Feature browser and dashboards'],
  explanations: ['/features', 'Explanations (search)'], scores: ['/features', 'Explanation scores'],
  graphs: ['/graphs', 'Attribution graphs']};

(async function () {
  startPage('Run');
  const main = document.getElementById('main');
  const {ok, data} = await getJSON('/api/run');
  if (!ok) { main.innerHTML = problemHTML(data); return; }
  let html = `<h1>Run <code>${esc(data.run)}</code></h1><table><tr><th>output</th><th>status</th></tr>`;
  for (const [kind, missing] of Object.entries(data.outputs)) {
    const [href, label] = PAGES[kind];
    html += `<tr class="output" data-kind="${kind}"><td>${missing ? esc(label) : `<a href="${href}">${esc(label)}</a>`}</td><td>` +
      (missing ? `missing: <code>${esc(missing.missing)}</code><br>make it with <code>${esc(missing.command)}</code>` : 'ready') + '</td></tr>';
  }
  html += '</table>';
  if (data.summary) {
    html += '<h2>Final held-out evaluation (summary.json)</h2><table id="summary">' +
      Object.entries(data.summary).map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${
        Array.isArray(v) ? v.map(x => fmt(x)).join(', ') : fmt(v)}</td></tr>`).join('') + '</table>';
  }
  main.innerHTML = html;
})();
