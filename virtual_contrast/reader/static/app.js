// The reading page: one case at a time in three synchronised NiiVue viewers (the post-contrast image being read,
// the pre-contrast T1, the FLAIR); lines drawn with NiiVue's measurement tool, two per lesion (long axis, then
// short axis); an image-quality grade; "Done" sends the read to the server, which writes the results files.
// The page knows each case by its case id only.
"use strict";

const { Niivue, SLICE_TYPE, DRAG_MODE } = window.niivue;

const SERIES = ["post", "t1", "flair"];
const VIEWS = { axial: SLICE_TYPE.AXIAL, coronal: SLICE_TYPE.CORONAL, sagittal: SLICE_TYPE.SAGITTAL };
// The slider moves along the axis perpendicular to the view (NiiVue fractions are in RAS order).
const VIEW_AXIS = { axial: 2, coronal: 1, sagittal: 0 };
const MIN_LINE_MM = 0.5; // a click without a drag is not a line

const state = {
  session: null,
  caseId: null,
  lines: [], // NiiVue measurements of this case, in drawing order: lesion k = lines 2k and 2k+1
  shownAt: null, // performance.now() when the case was first displayed
  view: "axial",
  tool: "measure",
  dirty: false,
};
const viewers = {};
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

// ------------------------------------------------------------------------------------------------ viewers
function mouseConfig(series) {
  const left = state.tool === "window" ? DRAG_MODE.windowing
    : state.tool === "measure" && series === "post" ? DRAG_MODE.measurement
    : DRAG_MODE.crosshair;
  return {
    leftButton: { primary: left, withCtrl: DRAG_MODE.crosshair },
    rightButton: DRAG_MODE.windowing,
    centerButton: DRAG_MODE.pan,
  };
}

async function makeViewers() {
  for (const series of SERIES) {
    const nv = new Niivue({
      backColor: [0, 0, 0, 1],
      isRadiologicalConvention: true,
      dragAndDropEnabled: false,
      isColorbar: false,
      show3Dcrosshair: false,
      crosshairColor: [1, 0.75, 0, 0.6],
      crosshairWidth: 1,
      crosshairWidthUnit: "mm",
      crosshairGap: 12,
      measureLineColor: [0.2, 1, 0.35, 1],
      measureTextColor: [0.2, 1, 0.35, 1],
      measureTextJustify: "end", // lengths at the lines' ends: the two axes of a lesion cross at their middles
      loadingText: "",
      logLevel: "warn",
    });
    await nv.attachToCanvas($(`canvas-${series}`));
    nv.setSliceType(VIEWS[state.view]);
    nv.setMouseEventConfig(mouseConfig(series));
    nv.onLocationChange = (location) => onLocation(series, location);
    nv.onMouseUp = () => showWindow(series);
    nv.onIntensityChange = () => showWindow(series);
    viewers[series] = nv;
  }
  viewers.post.onMeasurementCompleted = onLine;
}

function loaded(series) {
  return viewers[series].volumes.length > 0;
}

// Keep every viewer on the same world position (NiiVue's own broadcast needs the canvas to have focus).
let syncing = false;
function syncFrom(series) {
  if (syncing || !loaded(series)) return;
  syncing = true;
  const source = viewers[series];
  const mm = source.frac2mm(source.scene.crosshairPos);
  for (const other of SERIES) {
    if (other === series || !loaded(other)) continue;
    const nv = viewers[other];
    nv.scene.crosshairPos = nv.mm2frac(mm);
    nv.scene.pan2Dxyzmm = [...source.scene.pan2Dxyzmm];
    nv.drawScene();
  }
  syncing = false;
}

function onLocation(series, location) {
  syncFrom(series);
  const mm = location.mm;
  const value = location.values && location.values.length ? location.values[0].value : NaN;
  const where = $("location");
  where.dataset.mm = `${mm[0]},${mm[1]},${mm[2]}`;
  where.textContent = `x ${mm[0].toFixed(1)}  y ${mm[1].toFixed(1)}  z ${mm[2].toFixed(1)} mm` +
    (Number.isFinite(value) ? `   value ${value.toPrecision(3)}` : "");
  showSlice();
}

function setView(view) {
  state.view = view;
  for (const nv of Object.values(viewers)) nv.setSliceType(VIEWS[view]);
  document.querySelectorAll("[data-view]").forEach((b) => b.classList.toggle("on", b.dataset.view === view));
  showSlice();
}

function setTool(tool) {
  state.tool = tool;
  for (const series of SERIES) viewers[series].setMouseEventConfig(mouseConfig(series));
  document.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("on", b.dataset.tool === tool));
}

function sliceCount() {
  const dims = viewers.post.volumes[0].dimsRAS;
  return dims[VIEW_AXIS[state.view] + 1];
}

function showSlice() {
  if (!loaded("post")) return;
  const n = sliceCount();
  const frac = viewers.post.scene.crosshairPos[VIEW_AXIS[state.view]];
  const index = Math.min(n - 1, Math.max(0, Math.floor(frac * n)));
  const slider = $("slice");
  slider.max = String(n - 1);
  slider.value = String(index);
  $("slice-number").textContent = `${index + 1} / ${n}`;
}

function goToSlice(index) {
  const nv = viewers.post;
  const pos = [...nv.scene.crosshairPos];
  pos[VIEW_AXIS[state.view]] = (index + 0.5) / sliceCount();
  nv.scene.crosshairPos = pos;
  nv.drawScene();
  nv.createOnLocationChange();
}

// Arrow keys move the slice of all three views (the page's hint says so; NiiVue's own keys do not): up and right
// one slice forward, down and left one back. Not while typing in a field (the slider and the window boxes
// handle their own arrows).
const SLICE_KEYS = { ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 5, PageDown: -5 };
function onKey(event) {
  const step = SLICE_KEYS[event.key];
  if (step === undefined || event.altKey || event.ctrlKey || event.metaKey || !loaded("post")) return;
  if (["INPUT", "TEXTAREA", "SELECT"].includes(event.target.tagName)) return;
  event.preventDefault();
  const index = Number($("slice").value) + step;
  goToSlice(Math.min(sliceCount() - 1, Math.max(0, index)));
}

function showWindow(series) {
  if (!loaded(series)) return;
  const vol = viewers[series].volumes[0];
  const box = document.querySelector(`.wl[data-series="${series}"]`);
  box.querySelector(".w").value = (vol.cal_max - vol.cal_min).toPrecision(4);
  box.querySelector(".l").value = ((vol.cal_max + vol.cal_min) / 2).toPrecision(4);
}

function setWindow(series, width, level) {
  if (!loaded(series) || !(width > 0) || !Number.isFinite(level)) return;
  const nv = viewers[series];
  nv.volumes[0].cal_min = level - width / 2;
  nv.volumes[0].cal_max = level + width / 2;
  nv.updateGLVolume();
  showWindow(series);
}

// ------------------------------------------------------------------------------------------------- lines
function onLine(measurement) {
  const doc = viewers.post.document;
  if (measurement.distance < MIN_LINE_MM) {
    doc.completedMeasurements.splice(doc.completedMeasurements.indexOf(measurement), 1);
    viewers.post.drawScene();
    return;
  }
  state.lines.push(measurement);
  state.dirty = true;
  showLesions();
}

function removeLines(lines) {
  const doc = viewers.post.document;
  for (const line of lines) {
    const at = doc.completedMeasurements.indexOf(line);
    if (at >= 0) doc.completedMeasurements.splice(at, 1);
    state.lines.splice(state.lines.indexOf(line), 1);
  }
  state.dirty = true;
  viewers.post.drawScene();
  showLesions();
}

function lesionPairs() {
  const pairs = [];
  for (let k = 0; k + 1 < state.lines.length; k += 2) {
    const [a, b] = [state.lines[k], state.lines[k + 1]];
    pairs.push(a.distance >= b.distance ? [a, b] : [b, a]);
  }
  return pairs;
}

function showLesions() {
  const list = $("lesions");
  list.replaceChildren();
  for (const [long, short] of lesionPairs()) {
    const item = document.createElement("li");
    item.textContent = `${long.distance.toFixed(1)} × ${short.distance.toFixed(1)} mm`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "delete";
    remove.title = "delete this lesion's two lines";
    remove.addEventListener("click", () => removeLines([long, short]));
    item.append(remove);
    list.append(item);
  }
  const odd = state.lines.length % 2 === 1;
  $("pending").textContent = odd
    ? `Lesion ${lesionPairs().length + 1}: ${state.lines.at(-1).distance.toFixed(1)} mm drawn; now draw its short axis.`
    : "";
  $("undo").disabled = state.lines.length === 0;
  updateDone();
}

function lineJson(m) {
  return {
    start_mm: Array.from(m.startMM),
    end_mm: Array.from(m.endMM),
    view: { sliceIndex: m.sliceIndex, sliceType: m.sliceType, slicePosition: m.slicePosition },
  };
}

function restoreLine(saved) {
  const m = {
    startMM: Float32Array.from(saved.start_mm),
    endMM: Float32Array.from(saved.end_mm),
    distance: Math.hypot(...saved.end_mm.map((v, i) => v - saved.start_mm[i])),
    sliceIndex: saved.view.sliceIndex,
    sliceType: saved.view.sliceType,
    slicePosition: saved.view.slicePosition,
  };
  viewers.post.document.completedMeasurements.push(m);
  state.lines.push(m);
}

// --------------------------------------------------------------------------------------------- the case
function quality() {
  const checked = document.querySelector('input[name="quality"]:checked');
  return checked ? Number(checked.value) : null;
}

function updateDone() {
  const ready = state.shownAt !== null && quality() !== null && state.lines.length % 2 === 0;
  $("done").disabled = !ready || state.session.closed;
}

async function openCase(caseId) {
  if (state.dirty && state.caseId !== caseId &&
      !window.confirm("Leave this case? Its lines and grade are not saved yet.")) return;
  document.body.dataset.state = "loading";
  state.caseId = caseId;
  state.shownAt = null;
  state.dirty = false;
  $("message").textContent = "";
  $("case-controls").hidden = false;
  $("all-read").hidden = true;
  const { record } = await api(`api/case/${caseId}`);
  const position = state.session.cases.findIndex((c) => c.case_id === caseId) + 1;
  $("case-title").textContent = `${caseId} (${position} of ${state.session.cases.length})`;
  document.querySelectorAll('input[name="quality"]').forEach((r) => {
    r.checked = record !== null && Number(r.value) === record.quality;
  });
  await Promise.all(SERIES.map(async (series) => {
    const box = $(`viewer-${series}`);
    const nv = viewers[series];
    nv.clearMeasurements();
    try {
      const volumes = [{ url: `image/${caseId}/${series}.nii`, name: `${series}.nii` }];
      // A review session (a closed phase, never a blinded reading): the uncertainty map over the image.
      if (series === "post" && state.session.review) {
        const overlay = `image/${caseId}/uncertainty.nii`;
        if ((await fetch(overlay, { method: "HEAD" })).ok) {
          volumes.push({ url: overlay, name: "uncertainty.nii", colormap: "warm", opacity: 0.45 });
        }
      }
      await nv.loadVolumes(volumes);
      box.querySelector(".absent")?.setAttribute("hidden", "");
      showWindow(series);
    } catch (error) {
      if (series === "post") throw error;
      nv.volumes = [];
      box.querySelector(".absent")?.removeAttribute("hidden");
    }
  }));
  state.lines = [];
  if (record !== null) {
    for (const lesion of record.lesions) {
      restoreLine(lesion.long);
      restoreLine(lesion.short);
    }
  }
  setView(state.view);
  syncFrom("post");
  viewers.post.drawScene();
  showLesions();
  showCases();
  viewers.post.createOnLocationChange();
  await new Promise((resolve) => requestAnimationFrame(resolve));
  state.shownAt = performance.now();
  document.body.dataset.case = caseId;
  document.body.dataset.state = "ready";
  updateDone();
}

async function done() {
  const elapsed = (performance.now() - state.shownAt) / 1000;
  const lesions = lesionPairs().map(([long, short]) => ({ long: lineJson(long), short: lineJson(short) }));
  document.body.dataset.state = "saving";
  $("done").disabled = true;
  try {
    state.session = await api(`api/case/${state.caseId}`, { lesions, quality: quality(), elapsed_s: elapsed });
  } catch (error) {
    $("message").textContent = `Not saved: ${error.message}`;
    document.body.dataset.state = "ready";
    updateDone();
    return;
  }
  state.dirty = false;
  await next();
}

async function next() {
  const unread = state.session.cases.find((c) => !c.read);
  if (unread) {
    await openCase(unread.case_id);
    return;
  }
  // Nothing left to read: the last case stays on screen, but a change needs it opened again from the list.
  state.caseId = null;
  state.shownAt = null;
  showCases();
  $("case-title").textContent = "All cases read";
  $("case-controls").hidden = true;
  $("all-read").hidden = false;
  $("message").textContent = "";
  document.body.dataset.state = "all-read";
}

function showCases() {
  const list = $("cases");
  list.replaceChildren();
  const firstUnread = state.session.cases.find((c) => !c.read);
  for (const c of state.session.cases) {
    const item = document.createElement("li");
    item.classList.toggle("read", c.read);
    item.classList.toggle("current", c.case_id === state.caseId);
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = c.case_id;
    open.dataset.case = c.case_id;
    // Cases are read in the list's order; a finished case can be opened again to review or correct it.
    open.disabled = !(c.read || c === firstUnread) || state.session.closed;
    open.addEventListener("click", () => openCase(c.case_id));
    item.append(open);
    list.append(item);
  }
  const readCount = state.session.cases.filter((c) => c.read).length;
  $("progress").textContent = `${readCount} of ${state.session.cases.length} cases read`;
}

function showFinished(summary) {
  $("reading").hidden = true;
  $("finished").hidden = false;
  $("finished-count").textContent =
    `${summary.n_read} of ${summary.cases.length} cases were read in this session.`;
  $("progress").textContent = "";
  $("location").textContent = "";
  document.body.dataset.state = "closed";
}

async function closeSession() {
  if (!window.confirm("Close the session? Its reads can no longer be changed here.")) return;
  showFinished(await api("api/close", {}));
}

// ------------------------------------------------------------------------------------------------- start
async function start() {
  state.session = await api("api/session");
  const s = state.session;
  $("title").textContent = `Reader ${s.reader} · phase ${s.phase}`;
  $("post-label").textContent = s.post_label;
  if (s.closed) {
    showFinished(s);
    return;
  }
  $("reading").hidden = false;
  await makeViewers();
  document.querySelectorAll("[data-view]").forEach((b) => b.addEventListener("click", () => setView(b.dataset.view)));
  document.querySelectorAll("[data-tool]").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  document.querySelectorAll(".wl").forEach((box) => {
    const series = box.dataset.series;
    const apply = () => {
      const [w, l] = [box.querySelector(".w").value, box.querySelector(".l").value];
      if (w.trim() !== "" && l.trim() !== "") setWindow(series, Number(w), Number(l));
    };
    box.querySelector(".w").addEventListener("change", apply);
    box.querySelector(".l").addEventListener("change", apply);
    box.querySelector(".auto").addEventListener("click", () => {
      const vol = viewers[series].volumes[0];
      if (vol) setWindow(series, vol.robust_max - vol.robust_min, (vol.robust_max + vol.robust_min) / 2);
    });
  });
  $("slice").addEventListener("input", (e) => goToSlice(Number(e.target.value)));
  document.addEventListener("keydown", onKey);
  $("undo").addEventListener("click", () => state.lines.length && removeLines([state.lines.at(-1)]));
  document.querySelectorAll('input[name="quality"]').forEach((r) => r.addEventListener("change", () => {
    state.dirty = true;
    updateDone();
  }));
  $("done").addEventListener("click", done);
  $("close").addEventListener("click", closeSession);
  await next();
}

start().catch((error) => {
  document.body.dataset.state = "error";
  $("progress").textContent = `Error: ${error.message}`;
});
