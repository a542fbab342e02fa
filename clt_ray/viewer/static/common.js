// clt-ray viewer: helpers shared by every page (no build step, no libraries).
'use strict';

const NAV = `<nav class="top"><a href="/">clt-ray viewer</a><a href="/features">features</a>
  <a href="/graphs">graphs</a><a href="/training">training</a></nav>`;

function esc(s) {
  return String(s ?? '').replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;',
    '"': '&quot;', "'": '&#39;'}[c]));
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return '–';
  if (typeof x !== 'number') return esc(x);
  if (Number.isInteger(x)) return x.toLocaleString('en');
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(2) : x.toFixed(digits);
}

// GET a JSON endpoint: {ok, status, data}. A missing output or bad request comes back as data
// with an `error` (and, for missing outputs, `missing` and `command`).
async function getJSON(url) {
  const res = await fetch(url);
  let data;
  try { data = await res.json(); } catch (e) { data = {error: `${res.status} ${res.statusText}`}; }
  return {ok: res.ok, status: res.status, data};
}

function problemHTML(data) {
  if (data && data.command) {
    return `<div class="missing"><p>${esc(data.what)} is missing: <code>${esc(data.missing)}</code></p>
      <p>Make it with:</p><pre>${esc(data.command)}</pre></div>`;
  }
  return `<div class="error">${esc(data && data.error || 'error')}</div>`;
}

function startPage(title) {
  document.body.insertAdjacentHTML('afterbegin', NAV);
  if (title) document.title = `${title} · clt-ray`;
}

// Token highlighting: opacity of the orange background = activation / scale.
function tokenSpans(tokens, acts, scale, peakPos) {
  return tokens.map((t, i) => {
    const a = acts[i] || 0;
    const alpha = scale > 0 ? Math.max(0, Math.min(1, a / scale)) : 0;
    const style = a > 0 ? ` style="background-color: rgba(232, 89, 12, ${alpha.toFixed(3)})"` : '';
    const cls = 'tok' + (a > 0 ? ' active' : '') + (i === peakPos ? ' hot' : '');
    return `<span class="${cls}" data-act="${a}" title="${esc(t)}: ${fmt(a)}"${style}>${esc(t)}</span>`;
  }).join('');
}

// --- tiny SVG charts ---------------------------------------------------------------------------

const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
  '#7f7f7f', '#bcbd22', '#17becf'];

function extent(values) {
  const v = values.filter(x => x !== null && x !== undefined && Number.isFinite(x));
  if (!v.length) return [0, 1];
  let lo = Math.min(...v), hi = Math.max(...v);
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  return [lo, hi];
}

function ticks(lo, hi, n = 4) {
  return Array.from({length: n + 1}, (_, i) => lo + (hi - lo) * i / n);
}

// series: [{name, xs, ys}] → an SVG line chart (with a log y axis if logY).
function lineChart({title, series, width = 420, height = 220, logY = false, xLabel = 'step'}) {
  const m = {l: 52, r: 10, t: 22, b: 30};
  const W = width - m.l - m.r, H = height - m.t - m.b;
  const ty = y => (logY ? (y > 0 ? Math.log10(y) : null) : y);
  const xs = series.flatMap(s => s.xs), ys = series.flatMap(s => s.ys.map(ty));
  const [x0, x1] = extent(xs), [y0, y1] = extent(ys);
  const sx = x => m.l + (x - x0) / (x1 - x0) * W, sy = y => m.t + H - (y - y0) / (y1 - y0) * H;
  let out = `<svg class="chart" width="${width}" height="${height}" data-title="${esc(title)}">`;
  out += `<text x="${m.l}" y="14" font-weight="600">${esc(title)}</text>`;
  out += `<line class="axis" x1="${m.l}" y1="${m.t + H}" x2="${m.l + W}" y2="${m.t + H}"/>`;
  out += `<line class="axis" x1="${m.l}" y1="${m.t}" x2="${m.l}" y2="${m.t + H}"/>`;
  const digits = Math.max(0, Math.min(6, Math.ceil(-Math.log10((y1 - y0) / 4)) + 1));
  for (const y of ticks(y0, y1)) {
    const label = logY ? fmt(10 ** y, 2) : y.toFixed(digits);
    out += `<text x="${m.l - 4}" y="${sy(y) + 4}" text-anchor="end">${label}</text>`;
  }
  for (const x of ticks(x0, x1)) {
    out += `<text x="${sx(x)}" y="${m.t + H + 14}" text-anchor="middle">${fmt(Math.round(x))}</text>`;
  }
  out += `<text x="${m.l + W}" y="${height - 2}" text-anchor="end">${esc(xLabel)}</text>`;
  series.forEach((s, i) => {
    const pts = s.xs.map((x, j) => [x, ty(s.ys[j])]).filter(([, y]) => y !== null && Number.isFinite(y));
    if (!pts.length) return;
    const d = pts.map(([x, y], j) => `${j ? 'L' : 'M'}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join('');
    out += `<path class="line" d="${d}" fill="none" stroke="${PALETTE[i % PALETTE.length]}" stroke-width="1.6"><title>${esc(s.name)}</title></path>`;
    if (pts.length === 1) out += `<circle cx="${sx(pts[0][0])}" cy="${sy(pts[0][1])}" r="3" fill="${PALETTE[i % PALETTE.length]}"/>`;
  });
  out += '</svg>';
  if (series.length > 1) {
    out += '<div class="legend">' + series.map((s, i) =>
      `<span style="color:${PALETTE[i % PALETTE.length]}">■ ${esc(s.name)}</span>`).join('') + '</div>';
  }
  return `<div class="chartbox">${out}</div>`;
}

// bars: [{label, value}] → an SVG bar chart.
function barChart({title, bars, width = 420, height = 200, color = '#e8590c', xLabel = ''}) {
  const m = {l: 48, r: 10, t: 22, b: 34};
  const W = width - m.l - m.r, H = height - m.t - m.b;
  const hi = Math.max(1e-12, ...bars.map(b => b.value || 0));
  const bw = W / Math.max(1, bars.length);
  let out = `<svg class="chart" width="${width}" height="${height}" data-title="${esc(title)}">`;
  out += `<text x="${m.l}" y="14" font-weight="600">${esc(title)}</text>`;
  out += `<line class="axis" x1="${m.l}" y1="${m.t + H}" x2="${m.l + W}" y2="${m.t + H}"/>`;
  out += `<text x="${m.l - 4}" y="${m.t + 8}" text-anchor="end">${fmt(hi, 2)}</text>`;
  out += `<text x="${m.l - 4}" y="${m.t + H}" text-anchor="end">0</text>`;
  const every = Math.ceil(bars.length / 8);
  bars.forEach((b, i) => {
    const h = (b.value || 0) / hi * H;
    out += `<rect class="bar" x="${(m.l + i * bw + 0.5).toFixed(1)}" y="${(m.t + H - h).toFixed(1)}" width="${Math.max(1, bw - 1).toFixed(1)}" height="${h.toFixed(1)}" fill="${color}"><title>${esc(b.label)}: ${fmt(b.value)}</title></rect>`;
    if (i % every === 0) out += `<text x="${m.l + i * bw + bw / 2}" y="${m.t + H + 13}" text-anchor="middle">${esc(b.label)}</text>`;
  });
  if (xLabel) out += `<text x="${m.l + W}" y="${height - 2}" text-anchor="end">${esc(xLabel)}</text>`;
  return out + '</svg>';
}
