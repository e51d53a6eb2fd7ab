// The cost report (GET /v1/cost) drawn as an SVG: mult-adds per layer, each separable pair
// against the standard convolution it replaces, the ratio next to 1/N + 1/Dk², and the measured
// time per layer once profiled.

import { clip, fmtCompact, fmtMicros, integer, svg, tooltip } from "/static/format.js";

const KIND_NAMES = {
  standard: "Standard conv",
  depthwise: "Depthwise",
  pointwise: "Pointwise 1×1",
  grouped: "Grouped conv",
  fully_connected: "Fully connected",
  matmul: "MatMul",
};

/** One row per separable pair (depthwise + pointwise) and one per other layer, in graph order. */
function chartRows(report) {
  const byName = new Map(report.layers.map((layer) => [layer.name, layer]));
  const pairOf = new Map(report.separable_pairs.map((pair) => [pair.depthwise, pair]));
  const paired = new Set(report.separable_pairs.map((pair) => pair.pointwise));
  const rows = [];
  for (const layer of report.layers) {
    const pair = pairOf.get(layer.name);
    if (pair && byName.has(pair.pointwise)) {
      rows.push({ pair, layers: [layer, byName.get(pair.pointwise)] });
    } else if (!paired.has(layer.name)) {
      rows.push({ pair: null, layers: [layer] });
    }
  }
  // A pointwise conv listed before its depthwise one would be skipped above; never lose a layer.
  const drawn = new Set(rows.flatMap((row) => row.layers.map((l) => l.name)));
  for (const layer of report.layers) {
    if (!drawn.has(layer.name)) rows.push({ pair: null, layers: [layer] });
  }
  return rows;
}

function commonName(a, b) {
  let i = 0;
  while (i < a.length && a[i] === b[i]) i++;
  return a.slice(0, i).replace(/[._/:-]+$/, "") || a;
}

function rowText(row) {
  if (row.pair) {
    const p = row.pair;
    const stride = p.stride_h === p.stride_w ? p.stride_h : `${p.stride_h}×${p.stride_w}`;
    return {
      name: commonName(row.layers[0].name, row.layers[1].name),
      sub:
        `dw ${p.kernel_h}×${p.kernel_w} s${stride} + pw · ${p.input_channels}→` +
        `${p.output_channels} · ${p.output_h}×${p.output_w}`,
    };
  }
  const l = row.layers[0];
  const spatial = l.output_h ? ` · ${l.output_h}×${l.output_w}` : "";
  return { name: l.name, sub: `${l.label} · ${l.input_channels}→${l.output_channels}${spatial}` };
}

/** "0.119 = 1/128 + 1/9": the counted ratio beside the formula (k(...) for a multiplier k). */
function ratioText(p) {
  const square = p.kernel_h === p.kernel_w;
  const k2 = square ? `${p.kernel_h * p.kernel_w}` : `(${p.kernel_h}·${p.kernel_w})`;
  const sum = `1/${p.output_channels} + 1/${k2}`;
  const formula = p.multiplier === 1 ? sum : `${p.multiplier}(${sum})`;
  return `${p.ratio.toFixed(3)} ${p.agrees ? "=" : "≠"} ${formula}`;
}

function niceStep(max, count) {
  const raw = max / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  return step || raw;
}

/** Columns, row geometry and the two scales (mult-adds, measured time). */
function layout(report, rows) {
  const profile = report.profile;
  const timeOf = new Map((profile ? profile.layers : []).map((t) => [t.name, t]));
  const rowTime = (row) =>
    row.layers.reduce((sum, l) => sum + (timeOf.get(l.name)?.time_us || 0), 0);
  const W = 1000;
  const gap = 16;
  const labelW = 210;
  const valueW = 92; // "257K of 1.85M" after the longest bar
  const ratioW = 150;
  const timeW = profile ? 170 : 0;
  const barX = labelW + gap;
  const barW = W - barX - valueW - gap - ratioW - (profile ? timeW + gap : 0);
  const ratioX = barX + barW + valueW + gap;
  const top = 64;
  const rowH = 34;
  const maxMacs = Math.max(
    1,
    ...rows.map((r) => (r.pair ? r.pair.standard_mult_adds : r.layers[0].mult_adds)),
  );
  const maxTime = Math.max(1e-9, ...rows.map(rowTime));
  return {
    W,
    H: top + rows.length * rowH + 8,
    top,
    rowH,
    barH: 14,
    barX,
    ratioX,
    timeX: ratioX + ratioW + gap,
    maxMacs,
    xMacs: (v) => (v / maxMacs) * barW,
    xTime: (v) => (v / maxTime) * (timeW - 64),
    timeOf,
    rowTime,
  };
}

function legend(report) {
  const g = svg("g", { class: "legend", transform: "translate(0, 12)" });
  let x = 0;
  for (const kind of new Set(report.layers.map((l) => l.kind))) {
    const name = KIND_NAMES[kind] || kind;
    g.append(svg("rect", { x, y: -9, width: 12, height: 12, rx: 2, class: `k-${kind}` }));
    g.append(svg("text", { x: x + 18, y: 1 }, name));
    x += 34 + name.length * 7;
  }
  if (report.separable_pairs.length) {
    g.append(svg("rect", { x, y: -9, width: 22, height: 12, class: "ghost" }));
    g.append(svg("text", { x: x + 28, y: 1 }, "standard conv the pair replaces"));
  }
  return g;
}

function axes(box, profile) {
  const g = svg("g", { class: "axes" });
  const y = box.top - 10;
  g.append(svg("text", { x: 0, y, class: "col-head" }, "Layer"));
  g.append(svg("text", { x: box.ratioX, y, class: "col-head" }, "Separable / standard"));
  if (profile) g.append(svg("text", { x: box.timeX, y, class: "col-head" }, "Measured time"));
  const step = niceStep(box.maxMacs, 4);
  for (let v = 0; v <= box.maxMacs * 1.0001; v += step) {
    const x = box.barX + box.xMacs(v);
    g.append(svg("line", { x1: x, x2: x, y1: box.top - 4, y2: box.H - 8, class: "grid" }));
    const anchor = v === 0 ? "start" : "middle";
    g.append(svg("text", { x, y, class: "tick", "text-anchor": anchor }, fmtCompact(v)));
  }
  return g;
}

function drawRow(row, i, box) {
  const g = svg("g", { class: "row" });
  const y = box.top + i * box.rowH;
  const by = y + (box.rowH - box.barH) / 2; // bar top
  const ty = by + 11; // text baseline beside a bar
  if (i % 2 === 0) {
    g.append(svg("rect", { x: 0, y, width: box.W, height: box.rowH, class: "zebra" }));
  }
  const text = rowText(row);
  const name = svg("text", { x: 6, y: y + 15, class: "row-name" }, clip(text.name, 28));
  g.append(tooltip(name, text.name));
  g.append(svg("text", { x: 6, y: y + 28, class: "row-sub" }, clip(text.sub, 36)));

  const p = row.pair;
  if (p) {
    const width = box.xMacs(p.standard_mult_adds);
    const ghost = svg("rect", { x: box.barX, y: by - 3, width, height: box.barH + 6 });
    ghost.setAttribute("class", "ghost");
    g.append(
      tooltip(
        ghost,
        `A standard ${p.kernel_h}×${p.kernel_w} conv ${p.input_channels}→${p.output_channels}: ` +
          `${integer.format(p.standard_mult_adds)} mult-adds, ` +
          `${integer.format(p.standard_params)} params`,
      ),
    );
  }
  let x = box.barX;
  for (const layer of row.layers) {
    const width = Math.max(1, box.xMacs(layer.mult_adds));
    const bar = svg("rect", { x, y: by, width, height: box.barH, "data-layer": layer.name });
    bar.setAttribute("class", `bar k-${layer.kind}`);
    g.append(
      tooltip(
        bar,
        `${layer.name} (${layer.label}): ${integer.format(layer.mult_adds)} mult-adds, ` +
          `${integer.format(layer.params)} params`,
      ),
    );
    x += width;
  }
  const solid = row.layers.reduce((sum, l) => sum + l.mult_adds, 0);
  const valueX = p ? Math.max(x, box.barX + box.xMacs(p.standard_mult_adds)) : x;
  const value = p
    ? `${fmtCompact(solid)} of ${fmtCompact(p.standard_mult_adds)}`
    : fmtCompact(solid);
  g.append(svg("text", { x: valueX + 6, y: ty, class: "value" }, value));

  if (p) {
    const ratio = svg("text", { x: box.ratioX, y: ty }, ratioText(p));
    ratio.setAttribute("class", p.agrees ? "ratio" : "ratio bad");
    g.append(tooltip(ratio, `exactly ${p.ratio_exact}; formula ${p.formula_exact}`));
  }
  if (box.timeOf.size) g.append(timeBars(row, box, by, ty));
  return g;
}

function timeBars(row, box, by, ty) {
  const g = svg("g", { class: "times" });
  let x = box.timeX;
  for (const layer of row.layers) {
    const timing = box.timeOf.get(layer.name);
    if (!timing) continue;
    const width = Math.max(1, box.xTime(timing.time_us));
    const bar = svg("rect", { x, y: by, width, height: box.barH, "data-time": layer.name });
    bar.setAttribute("class", `time k-${layer.kind}`);
    g.append(
      tooltip(
        bar,
        `${layer.name}: ${fmtMicros(timing.time_us)} median, ` +
          `${timing.gmacs_per_s.toFixed(2)} G mult-adds/s`,
      ),
    );
    x += width;
  }
  const total = box.rowTime(row);
  g.append(
    svg("text", { x: x + 6, y: ty, class: "value" }, total ? fmtMicros(total) : "not measured"),
  );
  return g;
}

/** The whole chart: one row per separable pair or other layer, one bar per layer. */
export function costChart(report) {
  const rows = chartRows(report);
  const box = layout(report, rows);
  const root = svg("svg", {
    viewBox: `0 0 ${box.W} ${box.H}`,
    class: "cost-svg",
    role: "img",
    "aria-labelledby": "cost-svg-title",
  });
  const title =
    `Mult-adds per layer of ${report.model.name || "the model"}: ` +
    `${report.layers.length} layers in ${rows.length} rows`;
  root.append(svg("title", { id: "cost-svg-title" }, title));
  root.append(legend(report), axes(box, report.profile));
  rows.forEach((row, i) => root.append(drawRow(row, i, box)));
  return root;
}
