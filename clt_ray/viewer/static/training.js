// Training curves from metrics.jsonl: loss, explained variance and L0 per layer over steps.
'use strict';

(async function () {
  startPage('Training');
  const main = document.getElementById('main');
  const {ok, data} = await getJSON('/api/metrics');
  if (!ok) { main.innerHTML = problemHTML(data); return; }
  const train = data.train, ev = data.eval;
  let html = '<h1>Training curves</h1><div class="charts">';
  if (train) {
    html += chart('loss', train, ['loss', 'mse'], true);
    html += perLayer('explained variance per layer (train)', train, 'ev');
    html += perLayer('L0 per layer (train)', train, 'l0');
  }
  if (ev) {
    html += perLayer('explained variance per layer (held-out eval)', ev, 'explained_variance');
    html += perLayer('L0 per layer (held-out eval)', ev, 'l0');
    html += chart('dead fraction (eval)', ev, ['dead_fraction']);
    html += chart('attribution graph scores (eval)', ev, ['graph_replacement', 'graph_completeness']);
  }
  if (!train && !ev) html += '<p class="label">metrics.jsonl has no train or eval lines yet</p>';
  main.innerHTML = html + '</div>';
})();

function chart(title, cols, names, logY = false) {
  const series = names.filter(n => cols[n]).map(n => ({name: n, xs: cols.step, ys: cols[n]}));
  return series.length ? lineChart({title, series, logY}) : '';
}

function perLayer(title, cols, name) {
  const values = cols[name];
  if (!values) return '';
  const L = Math.max(...values.map(v => (Array.isArray(v) ? v.length : 0)));
  const series = Array.from({length: L}, (_, l) => ({name: `layer ${l}`, xs: cols.step,
    ys: values.map(v => (Array.isArray(v) ? v[l] : null))}));
  return lineChart({title, series});
}
