"""The page served at ``GET /``: pick a class, a guidance scale and a sampler, see the
images. One self-contained HTML document (no external scripts, styles or fonts); it
calls ``v1/model`` and ``v1/samples`` relative to where it is served. Open it with
``?autorun=1`` to sample once on load (handy for screenshots). When the endpoint
requires a token, paste it into the token field; it is sent as a bearer header and
kept only in this tab (sessionStorage)."""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ldm sampling</title>
<style>
  body { font: 15px system-ui, sans-serif; margin: 2rem auto; max-width: 46rem; color: #222; }
  h1 { font-size: 1.3rem; margin-bottom: .2rem; }
  #model { color: #666; margin-bottom: 1rem; }
  form { display: grid; grid-template-columns: 11rem 1fr; gap: .5rem 1rem; align-items: center; }
  input[type=number], select { width: 8rem; }
  button { grid-column: 2; width: 8rem; padding: .35rem; }
  #status { margin: 1rem 0; min-height: 1.2rem; }
  #status.error, #cost.error { color: #b00020; }
  #cost { color: #666; font-size: .9em; }
  #images { display: flex; flex-wrap: wrap; gap: 6px; }
  #images img { width: 96px; height: 96px; image-rendering: pixelated; background: #000; }
</style>
</head>
<body>
<h1>Latent diffusion sampling</h1>
<div id="model">loading model…</div>
<form id="form">
  <label for="class">class</label><select id="class"></select>
  <label for="count">images</label><input id="count" type="number" min="1" value="8">
  <label for="guidance">guidance scale <span id="guidance-value">3</span></label>
  <input id="guidance" type="range" min="0" max="10" step="0.5" value="3">
  <label for="sampler">sampler</label>
  <select id="sampler"><option value="ddim">DDIM</option>
  <option value="dpmpp_2m">DPM-Solver++ (fewer steps)</option><option value="ddpm">DDPM</option>
  </select>
  <label for="steps">steps</label><input id="steps" type="number" min="1" value="50">
  <label for="seed">seed (empty: random)</label><input id="seed" type="number" min="0">
  <label for="token">API token (if required)</label>
  <input id="token" type="password" autocomplete="off">
  <span></span><span id="cost"></span>
  <button id="go" type="submit">Sample</button>
</form>
<div id="status"></div>
<div id="images"></div>
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
async function readJson(response) {
  try { return await response.json(); } catch (e) { return { detail: response.statusText }; }
}
function showCost() {
  if (budget === null) return;
  const cost = Number($("count").value) * Number($("steps").value) *
    (Number($("guidance").value) > 0 ? 2 : 1);
  $("cost").textContent = `cost ${cost} of ${budget} network evaluations per request`;
  $("cost").className = cost > budget ? "error" : "";
}
$("guidance").oninput = () => {
  $("guidance-value").textContent = $("guidance").value; showCost();
};
$("count").oninput = showCost; $("steps").oninput = showCost;
$("token").value = sessionStorage.getItem("ldm-token") || "";
async function loadModel() {
  const response = await fetch(base + "v1/model", { headers: headers() });
  const info = await readJson(response);
  if (!response.ok) {
    show(`${response.status}: ${info.detail} (enter the token, then sample)`, true); return;
  }
  $("model").textContent = `${info.name} version ${info.version}` +
    (info.alias ? ` (@${info.alias})` : "") + `, ${info.image_size}×${info.image_size} images`;
  info.class_names.forEach((name, id) => $("class").add(new Option(`${id}: ${name}`, id)));
  $("count").max = info.limits.max_images_per_request;
  $("steps").max = info.limits.max_steps;
  $("steps").value = info.limits.default_steps;
  $("guidance").max = Math.min(info.limits.max_guidance_scale, 20);
  budget = info.limits.max_evaluations_per_request;
  showCost();
}
async function sample(event) {
  if (event) event.preventDefault();
  const body = { label: Number($("class").value), num_samples: Number($("count").value),
    guidance_scale: Number($("guidance").value), sampler: $("sampler").value,
    steps: Number($("steps").value), format: "json" };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  show("sampling…", false);
  if (budget === null) await loadModel();
  const response = await fetch(base + "v1/samples", { method: "POST",
    headers: { "Content-Type": "application/json", ...headers() }, body: JSON.stringify(body) });
  const result = await readJson(response);
  if (!response.ok) { show(`${response.status}: ${result.detail}`, true); return; }
  $("images").replaceChildren(...result.images.map((png) => {
    const img = new Image(); img.src = "data:image/png;base64," + png; img.alt = "sample";
    return img;
  }));
  show(`${result.images.length} images from ${result.model.name} version ` +
       `${result.model.version}, seed ${result.seed}, ${result.elapsed_s.toFixed(2)} s`, false);
  document.body.dataset.done = "1";
}
$("form").onsubmit = sample;
loadModel().then(() => { if (new URLSearchParams(location.search).has("autorun")) sample(); })
  .catch((error) => show("cannot load the model: " + error, true));
</script>
</body>
</html>
"""
