"""The page served at ``GET /``: every field of a sampling request as a control (class
by name, images, sampler, steps, both guidance scales, η, epsilon scaling, seed), the
images with their class names, where they came from (version, MLflow run, dataset
digest) and a download of the grid. One self-contained HTML document (no external
scripts, styles or fonts); it calls ``v1/model`` and ``v1/samples`` relative to where
it is served. Open it with ``?autorun=1`` to sample once on load (handy for
screenshots). When the endpoint requires a token, paste it into the token field; it is
sent as a bearer header and kept only in this tab (sessionStorage)."""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ldm sampling</title>
<style>
  body { font: 15px system-ui, sans-serif; margin: 2rem auto; max-width: 48rem; color: #222; }
  h1 { font-size: 1.3rem; margin-bottom: .2rem; }
  #model, #lineage { color: #666; margin-bottom: .6rem; overflow-wrap: anywhere; }
  form { display: grid; grid-template-columns: 13rem 1fr; gap: .5rem 1rem; align-items: center; }
  input[type=number], select { width: 9rem; }
  .row { display: flex; gap: .6rem; align-items: center; }
  button { padding: .35rem .8rem; }
  button:disabled { opacity: .6; cursor: progress; }
  #status { margin: 1rem 0; min-height: 1.2rem; white-space: pre-wrap; }
  #status.error, #cost.error { color: #b00020; }
  #cost, .hint { color: #666; font-size: .9em; }
  #images { display: flex; flex-wrap: wrap; gap: 8px; }
  figure { margin: 0; text-align: center; }
  figure img { width: 96px; height: 96px; image-rendering: pixelated; background: #000;
    display: block; }
  figcaption { font-size: .85em; color: #444; }
  #download { display: none; margin: .8rem 0; }
</style>
</head>
<body>
<h1>Latent diffusion sampling</h1>
<div id="model">loading model…</div>
<form id="form" novalidate>
  <label for="class">class</label><select id="class"></select>
  <label for="count">images</label><input id="count" type="number" min="1" value="8">
  <label for="sampler">sampler</label>
  <select id="sampler"><option value="ddim">DDIM</option>
  <option value="dpmpp_2m">DPM-Solver++ 2M (fewer steps)</option>
  <option value="ddpm">DDPM</option></select>
  <label for="steps">steps</label><input id="steps" type="number" min="1" value="50">
  <label for="guidance">classifier-free guidance w</label>
  <div class="row"><input id="guidance" type="range" min="0" max="10" step="0.5" value="3">
  <span id="guidance-value">3</span></div>
  <label for="classifier">classifier guidance s</label>
  <div class="row"><input id="classifier" type="range" min="0" max="10" step="0.5" value="0">
  <span id="classifier-value">0</span></div>
  <label for="eta">η (DDIM noise, 0–1)</label>
  <input id="eta" type="number" min="0" max="1" step="0.1" value="0">
  <label for="eps-scaling">epsilon scaling b, k</label>
  <div class="row"><input id="eps-scaling" type="number" min="0.5" max="2" step="0.001"
  placeholder="version's"><input id="eps-slope" type="number" min="-1" max="1" step="0.001"
  placeholder="0"><span class="hint">ε̂ / (b + k·t/T); b = 1 is off</span></div>
  <label for="seed">seed (empty: random)</label><input id="seed" type="number" min="0">
  <label for="token">API token (if required)</label>
  <input id="token" type="password" autocomplete="off">
  <span></span><span id="cost"></span>
  <span></span><div class="row"><button id="go" type="submit">Sample</button></div>
</form>
<div id="status"></div>
<div id="lineage"></div>
<div id="images"></div>
<a id="download" href="#" download="samples.png">download the grid (PNG)</a>
<script>
const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const $ = (id) => document.getElementById(id);
function show(text, isError) {
  $("status").textContent = text; $("status").className = isError ? "error" : "";
}
let budget = null;
function headers() {
  const token = $("token").value.trim();
  sessionStorage.setItem("ldm-token", token);
  return token ? { "Authorization": "Bearer " + token } : {};
}
// Any answer as {detail}: JSON or not (a proxy's HTML page, plain text, nothing).
async function readBody(response) {
  const text = await response.text();
  try { return JSON.parse(text); } catch (e) {
    return { detail: text.trim().slice(0, 300) || response.statusText || "no details" };
  }
}
// passes per image and step, as the endpoint counts them (serving.admission)
function passes() {
  return 1 + (Number($("guidance").value) > 0) + 2 * (Number($("classifier").value) > 0);
}
function showCost() {
  if (budget === null) return;
  const cost = Number($("count").value) * Number($("steps").value) * passes();
  $("cost").textContent = `cost ${cost} of ${budget} network evaluations per request`;
  $("cost").className = cost > budget ? "error" : "";
}
for (const id of ["guidance", "classifier"]) {
  $(id).oninput = () => { $(id + "-value").textContent = $(id).value; showCost(); };
}
$("count").oninput = showCost; $("steps").oninput = showCost;
$("sampler").onchange = () => { $("eta").disabled = $("sampler").value !== "ddim"; };
$("token").value = sessionStorage.getItem("ldm-token") || "";
let classNames = [];
async function loadModel() {
  const response = await fetch(base + "v1/model", { headers: headers() });
  const info = await readBody(response);
  if (!response.ok) {
    show(`${response.status}: ${info.detail} (enter the token, then sample)`, true);
    return false;
  }
  $("model").textContent = `${info.name} version ${info.version}` +
    (info.alias ? ` (@${info.alias})` : "") + `, ${info.image_size}×${info.image_size} images`;
  classNames = info.class_names;
  $("class").replaceChildren(...classNames.map((name, id) => new Option(name, id)));
  $("count").max = info.limits.max_images_per_request;
  $("steps").max = info.limits.max_steps;
  $("steps").value = info.limits.default_steps;
  $("guidance").max = Math.min(info.limits.max_guidance_scale, 20);
  $("classifier").max = Math.min(info.limits.max_classifier_scale, 20);
  budget = info.limits.max_evaluations_per_request;
  showCost();
  return true;
}
function request() {
  const body = { label: Number($("class").value), num_samples: Number($("count").value),
    sampler: $("sampler").value, steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value), classifier_scale: Number($("classifier").value),
    format: "json" };
  // empty: the b searched for this version, sampler and steps (or 1), and k = 0
  if ($("eps-scaling").value !== "") body.eps_scaling = Number($("eps-scaling").value);
  if ($("eps-slope").value !== "") body.eps_scaling_slope = Number($("eps-slope").value);
  if (body.sampler === "ddim") body.eta = Number($("eta").value);
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}
function showImages(result) {
  $("images").replaceChildren(...result.images.map((png, i) => {
    const figure = document.createElement("figure");
    const img = new Image(); img.src = "data:image/png;base64," + png;
    img.alt = `sample of class ${result.class_names[i]}`;
    const caption = document.createElement("figcaption");
    caption.textContent = result.class_names[i];
    figure.append(img, caption);
    return figure;
  }));
  const m = result.model;
  $("lineage").textContent = `${m.name} v${m.version}` +
    (m.run_id ? `, MLflow run ${m.run_id}` : "") +
    (m.dataset_digest ? `, dataset sha256 ${m.dataset_digest.slice(0, 16)}…` : "");
  $("download").dataset.name = `${m.name}-v${m.version}-seed${result.seed}.png`;
}
// The images in one PNG laid out as the endpoint's png format lays them out (a
// near-square grid, 2 px of black between), drawn from the decoded samples.
async function downloadGrid(event) {
  event.preventDefault();
  const images = [...document.querySelectorAll("#images img")];
  await Promise.all(images.map((img) => img.decode()));
  const w = images[0].naturalWidth, h = images[0].naturalHeight, pad = 2;
  const cols = Math.ceil(Math.sqrt(images.length)), rows = Math.ceil(images.length / cols);
  const canvas = document.createElement("canvas");
  canvas.width = cols * (w + pad) + pad; canvas.height = rows * (h + pad) + pad;
  const context = canvas.getContext("2d");
  context.fillStyle = "#000"; context.fillRect(0, 0, canvas.width, canvas.height);
  images.forEach((img, i) => context.drawImage(img,
    pad + (i % cols) * (w + pad), pad + Math.floor(i / cols) * (h + pad)));
  const link = document.createElement("a");
  link.href = canvas.toDataURL("image/png"); link.download = $("download").dataset.name;
  link.click();
}
$("download").onclick = downloadGrid;
async function sample(event) {
  if (event) event.preventDefault();
  $("go").disabled = true;
  delete document.body.dataset.done;
  show("sampling…", false);
  try {
    if (budget === null && !(await loadModel())) return;
    const response = await fetch(base + "v1/samples", { method: "POST",
      headers: { "Content-Type": "application/json", ...headers() },
      body: JSON.stringify(request()) });
    const result = await readBody(response);
    if (!response.ok) { show(`${response.status}: ${result.detail}`, true); return; }
    showImages(result);
    $("download").style.display = "inline-block";
      const scaled = result.batch.eps_scaling !== 1 ? `, ε̂ / ${result.batch.eps_scaling}` : "";
    show(`${result.images.length} images, seed ${result.seed}${scaled}, ` +
         `${result.elapsed_s.toFixed(2)} s`, false);
  } catch (error) {
    show("the request failed: " + error, true);
  } finally {
    $("go").disabled = false;
    document.body.dataset.done = "1";
  }
}
$("form").onsubmit = sample;
loadModel().then(() => { if (new URLSearchParams(location.search).has("autorun")) sample(); })
  .catch((error) => show("cannot load the model: " + error, true));
</script>
</body>
</html>
"""
