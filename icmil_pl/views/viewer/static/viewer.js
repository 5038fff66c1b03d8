// The zoomable slide viewer (python -m icmil_pl view): OpenSeadragon over the server's Deep Zoom tiles, a heatmap as a
// second image (attention percentile in the slide, or a class probability on the same 0-1 scale for every slide),
// outlines drawn on a canvas above both, and a patch's scores on click.
"use strict";

const state = {
  viewer: null, // OpenSeadragon.Viewer
  slide: null, // /api/slide/<name> of the open slide
  heatmap: null, // the heatmap's TiledImage
  scale: "percentile", // the heatmap's scale: "percentile" or "p<k>" (the server's /overlay/<scale>/)
  cells: new Map(), // "column,row" of the patch grid -> patch index
  selected: -1, // the clicked patch
  tiles: [], // {image, level} of every tile drawn, for tests
};
window.icmilViewer = state;

const $ = (id) => document.getElementById(id);
const quoted = (name) => name.split("/").map(encodeURIComponent).join("/");
const text = (value) => document.createTextNode(value == null ? "" : String(value));

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

function cell(row, value, className) {
  const td = row.insertCell();
  td.appendChild(text(value));
  if (className) td.className = className;
  return td;
}

const SPLITS = ["train", "val", "test"];

async function listSlides() {
  const slides = await getJSON("api/slides");
  const body = $("slides").tBodies[0];
  for (const s of slides) {
    const row = body.insertRow();
    row.dataset.name = s.name;
    row.dataset.split = s.split ?? "";
    cell(row, s.slide_id).title = s.slide_id;
    cell(row, s.split ?? "", "split");
    cell(row, s.label ?? "");
    cell(row, s.predicted, s.label != null && s.label !== s.predicted ? "wrong" : "");
    cell(row, s.probability.toFixed(3), "p");
    if (s.viewable) row.addEventListener("click", () => { location.hash = `slide=${encodeURIComponent(s.name)}`; });
    else { row.classList.add("unviewable"); row.title = "slide file not found (view --slides <folder>)"; }
  }
  const splits = SPLITS.filter((split) => slides.some((s) => s.split === split));
  $("slides").classList.toggle("no-splits", splits.length === 0);
  $("split-control").hidden = splits.length === 0;
  for (const split of splits) $("split-filter").add(new Option(split, split));
  $("split-filter").addEventListener("change", () => {
    const wanted = $("split-filter").value;
    for (const row of body.rows) row.hidden = wanted !== "" && row.dataset.split !== wanted;
  });
  $("truth-control").hidden = !slides.some((s) => s.truth); // a cohort without annotations: no toggle
  return slides;
}

function wantedSlide(slides) {
  const match = /slide=([^&]*)/.exec(location.hash);
  const name = match ? decodeURIComponent(match[1]) : null;
  return slides.find((s) => s.name === name && s.viewable) || slides.find((s) => s.viewable);
}

async function openSlide(name) {
  const slide = await getJSON(`api/slide/${quoted(name)}`);
  state.slide = slide;
  state.selected = -1;
  state.heatmap = null;
  state.cells = new Map();
  const side = slide.patch_side;
  for (let k = 0; k < slide.scores.length; k++) {
    const col = Math.round((slide.coords[2 * k] - slide.overlay.x) / side);
    const row = Math.round((slide.coords[2 * k + 1] - slide.overlay.y) / side);
    state.cells.set(`${col},${row}`, k);
  }
  for (const row of $("slides").tBodies[0].rows) row.classList.toggle("current", row.dataset.name === name);
  const call = slide.label == null ? "" : slide.label === slide.predicted ? " (right)" : " (wrong)";
  $("title").textContent = `${slide.slide_id}: label ${slide.label ?? "unknown"}, called ${slide.predicted} ` +
    `(p = ${Math.max(...slide.slide_probs).toFixed(3)})${call}`;
  const hasTruth = slide.truth != null;
  $("show-truth").disabled = !hasTruth;
  $("truth-control").classList.toggle("disabled", !hasTruth);
  $("info").textContent = "Click a patch for its scores.";
  const select = $("scale");
  select.replaceChildren(...slide.scales.map((s) => new Option(s.label, s.key)));
  select.value = state.scale = slide.default_scale;
  showColourBar();
  state.viewer.open(`dz/${quoted(name)}.dzi`);
}

function showColourBar() {
  const slide = state.slide;
  const scale = slide.scales.find((s) => s.key === state.scale);
  $("bar").style.background = `linear-gradient(to right, ${slide.colours.join(", ")})`;
  $("bar-low").textContent = scale.absolute ? "0" : "low";
  $("bar-high").textContent = scale.absolute ? "1" : "high";
  $("bar-title").textContent = scale.absolute ? `${scale.label}: the same scale on every slide` : scale.label;
}

function changeScale() {
  state.scale = $("scale").value;
  showColourBar();
  if (state.heatmap) state.viewer.world.removeItem(state.heatmap);
  state.heatmap = null;
  addHeatmap();
}

function addHeatmap() {
  const slide = state.slide;
  const width = slide.dimensions[0];
  state.viewer.addSimpleImage({
    url: `overlay/${state.scale}/${quoted(slide.name)}.png`,
    x: slide.overlay.x / width,
    y: slide.overlay.y / width,
    width: slide.overlay.width / width,
    opacity: heatmapOpacity(),
    success: (event) => { state.heatmap = event.item; },
  });
}

function heatmapOpacity() {
  return $("show-heatmap").checked ? Number($("opacity").value) : 0;
}

function slideImage() {
  return state.viewer.world.getItemAt(0);
}

function onClick(event) {
  if (!event.quick || !state.slide) return;
  const slide = state.slide;
  const p = slideImage().viewerElementToImageCoordinates(event.position);
  const side = slide.patch_side;
  const key = `${Math.floor((p.x - slide.overlay.x) / side)},${Math.floor((p.y - slide.overlay.y) / side)}`;
  state.selected = state.cells.has(key) ? state.cells.get(key) : -1;
  showPatch(state.selected, p);
  drawVectors();
}

function showPatch(k, point) {
  const info = $("info");
  info.replaceChildren();
  info.dataset.index = String(k);
  const slide = state.slide;
  if (k < 0) {
    info.appendChild(text(`No patch at (${Math.round(point.x)}, ${Math.round(point.y)}): outside the tiled tissue.`));
    return;
  }
  const x = slide.coords[2 * k], y = slide.coords[2 * k + 1];
  const rank = slide.scores.filter((v) => v < slide.scores[k]).length / Math.max(1, slide.scores.length - 1);
  info.dataset.score = String(slide.scores[k]);
  const rows = [
    ["patch", `#${k} of ${slide.scores.length}, level-0 (x, y) = (${x}, ${y}), side ${patchSide(slide)} px`],
    [slide.kind, `${slide.scores[k].toPrecision(4)} (percentile ${(100 * rank).toFixed(1)} in slide)`],
  ];
  if (slide.probs) {
    rows.push(["patch alone", slide.classes.map((c, j) => `p(${c}) = ${slide.probs[k][j].toFixed(4)}`).join(", ")]);
  }
  const table = document.createElement("table");
  for (const [name, value] of rows) {
    const row = table.insertRow();
    cell(row, name).style.fontWeight = "600";
    cell(row, value);
  }
  info.appendChild(table);
}

function patchSide(slide) {
  return Number.isInteger(slide.patch_side) ? slide.patch_side : slide.patch_side.toFixed(1);
}

// -- outlines: a canvas above the viewer, redrawn whenever the view moves ------------------------------------------
function vectorCanvas() {
  let canvas = $("vectors");
  if (!canvas) {
    canvas = document.createElement("canvas");
    canvas.id = "vectors";
    $("view").appendChild(canvas);
  }
  const ratio = window.devicePixelRatio || 1;
  const { clientWidth: w, clientHeight: h } = $("view");
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    canvas.style.width = `${w}px`;
    canvas.style.height = `${h}px`;
  }
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, w, h);
  return context;
}

function tracePolygons(context, geometry, image) {
  const polygons = geometry.type === "Polygon" ? [geometry.coordinates] : geometry.coordinates;
  context.beginPath();
  for (const polygon of polygons) {
    for (const ring of polygon) {
      ring.forEach(([x, y], i) => {
        const p = image.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
        if (i === 0) context.moveTo(p.x, p.y); else context.lineTo(p.x, p.y);
      });
      context.closePath();
    }
  }
  context.stroke();
}

function drawVectors() {
  const context = vectorCanvas();
  const slide = state.slide, image = slideImage();
  if (!slide || !image) return;
  if ($("show-tissue").checked && slide.tissue) {
    context.strokeStyle = "#000";
    context.lineWidth = 1.2;
    context.setLineDash([]);
    tracePolygons(context, slide.tissue, image);
  }
  if ($("show-truth").checked && slide.truth) {
    context.strokeStyle = "#ffb000";
    context.lineWidth = 2;
    context.setLineDash([6, 4]);
    tracePolygons(context, slide.truth, image);
  }
  if (state.selected >= 0) {
    const k = state.selected, s = slide.patch_side;
    const a = image.imageToViewerElementCoordinates(new OpenSeadragon.Point(slide.coords[2 * k], slide.coords[2 * k + 1]));
    const b = image.imageToViewerElementCoordinates(
      new OpenSeadragon.Point(slide.coords[2 * k] + s, slide.coords[2 * k + 1] + s));
    context.strokeStyle = "#00e5ff";
    context.lineWidth = 2.5;
    context.setLineDash([]);
    context.strokeRect(a.x, a.y, b.x - a.x, b.y - a.y);
  }
}

async function main() {
  state.viewer = OpenSeadragon({
    id: "view",
    prefixUrl: "osd/images/",
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 4,
    timeout: 120000,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
  });
  state.viewer.addHandler("open", addHeatmap);
  state.viewer.addHandler("tile-loaded", (event) => {
    state.tiles.push({ image: state.viewer.world.getIndexOfItem(event.tiledImage), level: event.tile.level });
  });
  state.viewer.addHandler("canvas-click", onClick);
  state.viewer.addHandler("update-viewport", drawVectors);
  $("opacity").addEventListener("input", () => state.heatmap && state.heatmap.setOpacity(heatmapOpacity()));
  $("show-heatmap").addEventListener("change", () => state.heatmap && state.heatmap.setOpacity(heatmapOpacity()));
  for (const id of ["show-tissue", "show-truth"]) $(id).addEventListener("change", drawVectors);
  $("scale").addEventListener("change", changeScale);
  const slides = await listSlides();
  $("run").textContent = `${slides.length} slide(s)`;
  window.addEventListener("hashchange", () => {
    const wanted = wantedSlide(slides);
    if (wanted && (!state.slide || wanted.name !== state.slide.name)) openSlide(wanted.name);
  });
  const first = wantedSlide(slides);
  if (first) await openSlide(first.name);
  else $("title").textContent = "no slide files found: give view --slides <folder>";
}

main().catch((error) => { $("title").textContent = `error: ${error.message}`; throw error; });
