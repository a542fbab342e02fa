// One feature's dashboard: explanation and scores, statistics, top and quantile examples with
// token highlighting, activation histogram, decoder norms per target layer, logit effects.
'use strict';

(async function () {
  const [, , layer, feature] = location.pathname.split('/');
  startPage(`L${layer} / ${feature}`);
  const main = document.getElementById('main');
  const {ok, data} = await getJSON(`/api/feature/${layer}/${feature}`);
  if (!ok) { main.innerHTML = problemHTML(data); return; }
  main.innerHTML = `<h1>Feature L${data.layer} / ${data.feature}
      <span class="label">(index ${data.index})</span></h1>
    ${explanationHTML(data)}
    <div class="cards">
      ${card('density', fmt(data.frequency, 5))}${card('fired on', `${fmt(data.fired)} of ${fmt(data.n_tokens)} tokens`)}
      ${card('max activation', fmt(data.max_activation))}
    </div>
    ${scoresHTML(data)}
    <h2>Top activating examples</h2><div id="top-examples">${examplesHTML(data.top_examples, data.max_activation)}</div>
    <h2>Quantile samples</h2><div id="quantile-examples">${quantilesHTML(data)}</div>
    <div class="charts">
      <div><h2>Activation histogram</h2>${histogramHTML(data)}</div>
      <div><h2>Decoder norm per target layer</h2>${barChart({title: 'decoder norm',
        bars: data.decoder_norms.map((v, i) => ({label: `L${data.layer + i}`, value: v})),
        color: '#1f77b4', xLabel: 'target layer'})}</div>
    </div>
    <h2>Logit effects</h2><div class="logits">${logitsHTML('top', data.top_logits, data.top_logit_values, 'pos')}
      ${logitsHTML('bottom', data.bottom_logits, data.bottom_logit_values, 'neg')}</div>
    <h2>Quiet examples (never fired)</h2><div id="quiet-examples">${examplesHTML(data.quiet_examples, data.max_activation)}</div>`;
})();

function card(label, value) {
  return `<div class="card"><div class="label">${label}</div><div class="stat">${value}</div></div>`;
}

function explanationHTML(d) {
  if (d.explanation && d.explanation.ok) return `<p class="explanation" id="explanation">${esc(d.explanation.explanation)}</p>`;
  if (d.explanation) return `<div class="error" id="explanation">explanation failed: ${esc(d.explanation.error)}</div>`;
  if (d.missing.explanations) return problemHTML(d.missing.explanations);
  return '<p class="label" id="explanation">no explanation for this feature (it never fired, or it was not asked)</p>';
}

function scoresHTML(d) {
  if (!d.scores) return d.missing.scores ? problemHTML(d.missing.scores) : '';
  if (!d.scores.length) return '<p class="label">no scores for this feature</p>';
  return '<h2>Scores</h2><table id="scores"><tr><th>scorer</th><th>examples</th><th>accuracy</th><th>F1</th><th>AUC</th></tr>' +
    d.scores.map(s => s.ok ? `<tr><td>${esc(s.scorer)}</td><td class="num">${s.n_examples}</td><td class="num">${fmt(s.accuracy)}</td><td class="num">${fmt(s.f1)}</td><td class="num">${fmt(s.auc)}</td></tr>`
      : `<tr><td>${esc(s.scorer)}</td><td colspan="4" class="error">${esc(s.error)}</td></tr>`).join('') + '</table>';
}

const BEFORE = 24, AFTER = 8;  // tokens shown around the peak (a click shows the whole window)

function examplesHTML(examples, scale) {
  if (!examples || !examples.length) return '<p class="label">none</p>';
  return examples.map(e => {
    const peak = e.peak > 0 ? e.position : -1;
    const lo = Math.max(0, (peak >= 0 ? peak : 0) - BEFORE);
    const hi = Math.min(e.tokens.length, (peak >= 0 ? peak : BEFORE) + AFTER + 1);
    // word-level tokenizers decode tokens without their spaces: space them out
    const spaced = !e.tokens.some(t => /^\s/.test(t)) ? ' spaced' : '';
    const part = tokenSpans(e.tokens.slice(lo, hi), e.acts.slice(lo, hi), scale, peak - lo);
    const whole = tokenSpans(e.tokens, e.acts, scale, peak);
    return `<div class="example${spaced}" data-window="${e.window}" title="click: whole window"><span class="peak">${fmt(e.peak)}</span>` +
      `<span class="part">${lo > 0 ? '… ' : ''}${part}${hi < e.tokens.length ? ' …' : ''}</span><span class="whole" hidden>${whole}</span></div>`;
  }).join('');
}

document.addEventListener('click', ev => {
  const ex = ev.target.closest('.example');
  if (!ex) return;
  for (const el of ex.querySelectorAll('.part, .whole')) el.hidden = !el.hidden;
});

function quantilesHTML(d) {
  const groups = {};
  for (const e of d.quantile_examples || []) (groups[e.group] = groups[e.group] || []).push(e);
  const keys = Object.keys(groups).map(Number).sort((a, b) => a - b);
  if (!keys.length) return '<p class="label">none</p>';
  return keys.map(g => {
    const peaks = groups[g].map(e => e.peak);
    return `<h3 class="label">quantile ${g} of ${keys.length} (peaks ${fmt(Math.min(...peaks))}–${fmt(Math.max(...peaks))})</h3>${examplesHTML(groups[g], d.max_activation)}`;
  }).join('');
}

function histogramHTML(d) {
  const counts = d.histogram || [], edges = d.histogram_edges || [];
  let lo = counts.findIndex(c => c > 0), hi = counts.length - 1;
  while (hi >= 0 && !counts[hi]) hi--;
  if (lo < 0) return '<p class="label">never fired</p>';
  const bars = [];
  for (let i = lo; i <= hi; i++) bars.push({label: edges.length ? fmt(edges[i], 2) : String(i), value: counts[i]});
  return barChart({title: 'tokens per activation bin (log-spaced)', bars, xLabel: 'activation'});
}

function logitsHTML(name, tokens, values, cls) {
  if (!tokens || !tokens.length) return '';
  return `<table class="${name}-logits"><tr><th colspan="2">${name} logits</th></tr>` +
    tokens.map((t, i) => `<tr><td>${esc(JSON.stringify(t))}</td><td class="num ${cls}">${fmt(values[i])}</td></tr>`).join('') + '</table>';
}
