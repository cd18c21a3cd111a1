// The lance-mlx web page: one form per task, live progress from the job's SSE events, results and history.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { task: "t2i", job: null, abort: null, presets: null };
const FIELDS = ["steps", "guidance_scale", "image_guidance_scale", "timestep_shift", "seed", "n", "num_frames", "fps",
  "max_tokens", "temperature"];
const PROMPT_LABEL = { image_edit: "Instruction", video_edit: "Instruction", ask: "Question (empty: describe it)" };
const FILE_LABEL = { i2v: "First frame (image)", image_edit: "Image to edit", video_edit: "Video to edit",
  ask: "Image or video" };
const FILE_ACCEPT = { i2v: "image/*", image_edit: "image/*", video_edit: "video/*,image/gif", ask: "image/*,video/*" };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const r = await fetch(path, opts);
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { const body = await r.json(); msg = body.error.message || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

async function blobUrl(path) {
  const r = await api(path);
  return URL.createObjectURL(await r.blob());
}

// ------------------------------------------------------------------------------------------ server-sent events
async function readSSE(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) onData(data);
    }
  }
}

// ---------------------------------------------------------------------------------------------------- form
function selectTask(task) {
  state.task = task;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.task === task));
  document.querySelectorAll("[data-for]").forEach((el) => {
    el.hidden = !el.dataset.for.split(" ").includes(task);
  });
  $("prompt-label").textContent = PROMPT_LABEL[task] || "Prompt";
  $("file-label").textContent = FILE_LABEL[task] || "Input";
  $("file").accept = FILE_ACCEPT[task] || "";
  $("generate").textContent = task === "ask" ? "Ask" : "Generate";
  fillPresets();
  if (task === "t2v" && +$("width").value === 768 && +$("height").value === 768) setAspect("16:9", "640");
  if (task === "t2i" && +$("width").value === 848 && +$("height").value === 480) setAspect("1:1", "768");
}

function fillPresets() {
  if (!state.presets) return;
  const want = state.task === "ask" ? "" : state.task.startsWith("video") ? "video" : "image";
  const sel = $("preset");
  const keep = sel.value;
  sel.innerHTML = "";
  state.presets.presets.filter((p) => p.startsWith(want)).forEach((p) => sel.add(new Option(p, p)));
  if (state.task === "ask") sel.add(new Option("(default)", ""), 0);
  if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  else if (state.task === "image_edit") sel.value = "image_768res";
  else if (state.task === "video_edit") sel.value = "video_480p";
  else sel.value = "";
}

function setAspect(aspect, resolution) {
  $("aspect").value = aspect;
  $("resolution").value = resolution;
  applyAspect();
}

function applyAspect() {
  if (!state.presets) return;
  const b = state.presets.buckets[$("resolution").value][$("aspect").value];
  $("width").value = b.width;
  $("height").value = b.height;
}

function formBody() {
  const task = state.task;
  const fd = new FormData();
  fd.append("task", task);
  fd.append("prompt", $("prompt").value);
  const visible = (id) => !$(id).closest("[hidden]");
  FIELDS.filter((f) => f !== "n" || task === "t2i").forEach((f) => {
    if (visible(f) && $(f).value !== "" && !["max_tokens", "temperature"].includes(f)) fd.append(f, $(f).value);
  });
  if (task === "t2i" || task === "t2v") fd.append("size", $("width").value + "x" + $("height").value);
  if (task === "i2v") fd.append("resolution", $("i2v_resolution").value);
  if (task === "image_edit" || task === "video_edit") fd.append("preset", $("preset").value);
  if (visible("negative_prompt") && $("negative_prompt").value.trim()) fd.append("negative_prompt", $("negative_prompt").value);
  if (visible("enhance_prompt") && $("enhance_prompt").checked) fd.append("enhance_prompt", "true");
  const file = $("file").files[0];
  if (file) fd.append({ i2v: "input_reference", image_edit: "image", video_edit: "video" }[task], file);
  fd.append("preview", "true");
  return fd;
}

// ----------------------------------------------------------------------------------------------------- runs
function setStatus(text, progress) {
  $("status").textContent = text;
  if (progress !== undefined) $("progress").value = progress;
}

// The picture forming (the job's `preview` events) shown in place of the progress bar until the job ends.
function showPreview(url) {
  $("preview").hidden = !url;
  $("progress").hidden = !!url;
  if (url) $("preview").src = url;
  else $("preview").removeAttribute("src");
}

function busy(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
}

async function generate(ev) {
  ev.preventDefault();
  $("result").innerHTML = "";
  busy(true);
  try {
    if (state.task === "ask") await ask();
    else await runJob();
  } catch (e) {
    setStatus("Error: " + e.message);
  } finally {
    if (!$("result").children.length) showPreview(null);
    busy(false);
    state.job = null;
    state.abort = null;
    loadHistory();
    refreshModels().catch(() => {});
  }
}

async function runJob() {
  setStatus("Submitting…", 0);
  const job = await (await api("/v1/jobs", { method: "POST", body: formBody() })).json();
  state.job = job.id;
  setStatus("Queued (position " + (job.queue_position || 1) + ")", 0);
  const events = await api("/v1/jobs/" + job.id + "/events");
  let last = null;
  showPreview(null);
  await readSSE(events, (data) => {
    const e = JSON.parse(data);
    if (e.type === "queued") setStatus("Queued (position " + e.position + ")");
    else if (e.type === "loading") setStatus("Loading the " + e.checkpoint + " checkpoint…");
    else if (e.type === "enhance") setStatus("Enhancing the prompt…");
    else if (e.type === "enhanced") showRevised(e.revised_prompt, $("result"));
    else if (e.type === "prepare") setStatus("Encoding inputs…");
    else if (e.type === "step") setStatus("Step " + e.step + " / " + e.total, e.progress);
    else if (e.type === "preview") showPreview(e.image);
    else if (e.type === "decode") setStatus("Decoding…");
    else if (e.type === "done") last = e;
  });
  if (!last) throw new Error("the event stream ended early");
  if (last.status !== "completed") {
    setStatus(last.status === "cancelled" ? "Cancelled." : "Failed: " + (last.error ? last.error.message : "?"),
      last.progress);
    return;
  }
  setStatus("Done.", 100);
  await showOutputs(last.job, $("result"));
  showPreview(null); // the final result replaces the forming picture
}

async function ask() {
  const file = $("file").files[0];
  if (!file) throw new Error("choose an image or video to ask about");
  const url = await new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(new Error("cannot read the file"));
    r.readAsDataURL(file);
  });
  const part = file.type.startsWith("video/") ? { type: "video_url", video_url: { url } }
    : { type: "image_url", image_url: { url } };
  const content = [part];
  if ($("prompt").value.trim()) content.unshift({ type: "text", text: $("prompt").value });
  const body = { messages: [{ role: "user", content }], stream: true, max_tokens: +$("max_tokens").value,
    temperature: +$("temperature").value };
  if ($("preset").value) body.preset = $("preset").value;
  state.abort = new AbortController();
  setStatus("Thinking…", 0);
  const out = document.createElement("pre");
  out.className = "answer";
  $("result").appendChild(out);
  const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" }, signal: state.abort.signal });
  try {
    await readSSE(r, (data) => {
      if (data === "[DONE]") return;
      const c = JSON.parse(data);
      if (c.error) throw new Error(c.error.message);
      state.job = c.id;
      const d = c.choices && c.choices[0] ? c.choices[0].delta : null;
      if (d && d.content) out.textContent += d.content;
    });
    setStatus("Done.", 100);
  } catch (e) {
    if (e.name === "AbortError") setStatus("Cancelled.");
    else throw e;
  }
}

async function cancel() {
  if (state.abort) state.abort.abort();
  if (state.job) {
    try { await api("/v1/jobs/" + state.job + "/cancel", { method: "POST" }); } catch (e) { /* already over */ }
  }
}

function showRevised(text, into) {
  const el = document.createElement("div");
  el.className = "revised";
  el.textContent = "Enhanced prompt: " + text;
  into.appendChild(el);
}

async function showOutputs(job, into) {
  for (const path of job.outputs) {
    const src = await blobUrl(path);
    const el = document.createElement(job.object === "video" ? "video" : "img");
    el.src = src;
    if (job.object === "video") { el.controls = true; el.loop = true; }
    el.className = "output";
    into.appendChild(el);
  }
}

// -------------------------------------------------------------------------------------------------- history
async function loadHistory() {
  let list;
  try { list = await (await api("/v1/jobs?limit=50")).json(); } catch (e) {
    $("history").textContent = "History unavailable: " + e.message;
    return;
  }
  const box = $("history");
  box.innerHTML = "";
  for (const job of list.data) {
    const card = document.createElement("div");
    card.className = "card " + job.status;
    card.dataset.id = job.id;
    const media = document.createElement("div");
    media.className = "media";
    card.appendChild(media);
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = job.task + " · " + job.status;
    card.appendChild(title);
    const prompt = document.createElement("div");
    prompt.className = "prompt";
    prompt.textContent = job.prompt || job.settings.question || "(describe)";
    card.appendChild(prompt);
    if (job.revised_prompt) showRevised(job.revised_prompt, card);
    if (job.answer) {
      const ans = document.createElement("div");
      ans.className = "answer";
      ans.textContent = job.answer;
      card.appendChild(ans);
    }
    if (job.error) {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = job.error.message;
      card.appendChild(err);
    }
    const details = document.createElement("details");
    details.innerHTML = "<summary>Settings</summary>";
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(job.settings, null, 1);
    details.appendChild(pre);
    card.appendChild(details);
    if (job.task !== "x2t_image" && job.task !== "x2t_video") {
      const reuse = document.createElement("button");
      reuse.type = "button";
      reuse.className = "small reuse";
      reuse.textContent = "Reuse settings";
      reuse.onclick = () => reuseSettings(job.settings);
      card.appendChild(reuse);
    }
    box.appendChild(card);
    if (job.status === "completed" && job.outputs.length) showOutputs(job, media).catch(() => {});
  }
}

function reuseSettings(s) {
  selectTask(s.task);
  $("prompt").value = s.prompt || "";
  $("negative_prompt").value = s.negative_prompt || "";
  $("enhance_prompt").checked = !!s.enhance_prompt;
  FIELDS.forEach((f) => { if (s[f] !== undefined && s[f] !== null) $(f).value = s[f]; });
  if (s.size) {
    const [w, h] = s.size.split("x");
    $("width").value = w;
    $("height").value = h;
  }
  if (s.resolution) $("i2v_resolution").value = s.resolution;
  if (s.preset) $("preset").value = s.preset;
  setStatus("Settings of an earlier run loaded" + (s.input ? " (choose the input file again: " + s.input + ")" : "")
    + ".");
  window.scrollTo(0, 0);
}

// ----------------------------------------------------------------------------------------------------- start
async function start() {
  $("api-key").value = localStorage.getItem("lance-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("lance-api-key", $("api-key").value.trim());
    init();
  });
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => selectTask(b.dataset.task)));
  $("aspect").addEventListener("change", applyAspect);
  $("resolution").addEventListener("change", applyAspect);
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("refresh").addEventListener("click", loadHistory);
  selectTask("t2i");
  await init();
}

async function refreshModels() {
  const models = await (await api("/v1/models")).json();
  const resident = models.data.filter((m) => m.resident).map((m) => m.id);
  $("model-status").textContent = "in memory: " + (resident.length ? resident.join(", ") : "none yet");
}

async function init() {
  try {
    state.presets = await (await api("/v1/presets")).json();
    await refreshModels();
  } catch (e) {
    $("model-status").textContent = e.message;
    return;
  }
  $("aspect").innerHTML = "";
  state.presets.aspect_ratios.forEach((a) => $("aspect").add(new Option(a, a)));
  $("resolution").innerHTML = "";
  Object.keys(state.presets.buckets).forEach((r) => $("resolution").add(new Option(r + "²", r)));
  $("steps").max = state.presets.limits.max_steps;
  $("n").max = state.presets.limits.max_images;
  $("aspect").value = state.task === "t2v" ? "16:9" : "1:1";
  $("resolution").value = state.task === "t2v" ? "640" : "768";
  fillPresets();
  loadHistory();
}

start();
