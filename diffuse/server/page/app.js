// The diffuse page: submit a job, follow it as server-sent events, keep a gallery.
// Every POST sends JSON with its Content-Type: the server refuses any other body.
"use strict";

const $ = (id) => document.getElementById(id);
let kind = "txt2img";
let maskPainted = false;
let promptBox = "prompt";  // where an add-on goes: the prompt box last focused, as in A1111

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function postJSON(url, body) {
  return getJSON(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

async function loadChoices() {
  const [samplers, schedulers, models, options] = await Promise.all([
    getJSON("/sdapi/v1/samplers"), getJSON("/sdapi/v1/schedulers"), getJSON("/sdapi/v1/sd-models"),
    getJSON("/sdapi/v1/options")]);
  for (const sampler of samplers) $("sampler_name").add(new Option(sampler.name, sampler.name));
  $("sampler_name").value = "Euler a";
  for (const schedule of schedulers) $("scheduler").add(new Option(schedule.label, schedule.label));
  $("scheduler").value = "Automatic";
  for (const model of models) $("model").add(new Option(model.title, model.title));
  for (const model of models) $("refiner_checkpoint").add(new Option(model.title, model.title));
  $("model").value = options.sd_model_checkpoint;
  $("model-line").textContent = options.sd_model_checkpoint;
  await loadModel();
}

let serverQuantize = null;  // how this server runs every model: "int8", or null when off

async function loadModel() {
  // A blank width or height draws at the model's own size; only an SDXL model takes a refiner.
  const model = await getJSON("/diffuse/v1/model");
  serverQuantize = model.quantize;
  for (const side of ["width", "height"]) $(side).placeholder = String(model.image_size);
  for (const label of document.querySelectorAll(".refiner")) label.hidden = !model.sdxl;
}

// A1111's extra-networks pattern (as diffuse/adapters/prompt_tags.py reads it): <kind:NAME:args>.
const TAG = /<(\w+):([^>]+)>/g;
const BOX_NAMES = {prompt: "prompt", negative_prompt: "negative prompt"};
let loras = [];    // the server's list, to tell which file a tag names
let toggles = [];  // one per add-on button: {button, spansIn(text), syntax()}

async function loadAddons() {
  // Names are file names: they go in as text only, never as markup.
  const [loraList, embeddings] = await Promise.all([getJSON("/sdapi/v1/loras"), getJSON("/sdapi/v1/embeddings")]);
  loras = loraList;
  toggles = [];
  const loraItems = loras.map((lora) => addonButton(
    lora.alias && lora.alias !== lora.name ? `${lora.name} (${lora.alias})` : lora.name,
    (text) => loraTags(text).filter((tag) => loraNamed(tag.name) === lora),
    () => loraSyntax(lora.name)));
  $("lora-list").replaceChildren(...(loraItems.length ? loraItems
    : [note("empty", "none (serve with --lora-dir FOLDER to list a folder's)")]));
  const embeddingItems = Object.entries(embeddings.loaded).map(([name, entry]) => addonButton(
    `${name} · ${entry.vectors} ${entry.vectors === 1 ? "vector" : "vectors"}`,
    (text) => wordSpans(text, name), () => name));
  const skipped = Object.entries(embeddings.skipped).map(([name, entry]) =>
    note("skipped", `${name} (skipped)`, entry.reason || ""));
  const items = [...embeddingItems, ...skipped];
  $("embedding-list").replaceChildren(...(items.length ? items
    : [note("empty", "none (serve with --embeddings-dir FOLDER to list a folder's)")]));
  markAddons();
}

function addonButton(label, spansIn, syntax) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.setAttribute("aria-pressed", "false");
  const toggle = {button, spansIn, syntax, label};
  button.addEventListener("click", () => toggleAddon(toggle));
  toggles.push(toggle);
  return button;
}

function note(className, text, title = "") {
  const item = document.createElement("span");
  item.className = className;
  item.textContent = text;
  item.title = title;
  return item;
}

function actionButton(className, label, title, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = label;
  button.title = title;
  button.addEventListener("click", onClick);
  return button;
}

function loraTags(text) {
  // Every <lora:...> and <lyco:...> (A1111's alias) with its span; the name is the first argument without "=".
  return [...text.matchAll(TAG)].filter((match) => match[1] === "lora" || match[1] === "lyco").map((match) => ({
    start: match.index, end: match.index + match[0].length,
    name: match[2].split(":").find((argument) => !argument.includes("=")) ?? "",
  }));
}

function loraNamed(name) {
  // As the server looks a name up: the exact file stem, else an alias that no other file has.
  const byAlias = loras.filter((lora) => lora.alias === name);
  return loras.find((lora) => lora.name === name) ?? (byAlias.length === 1 ? byAlias[0] : undefined);
}

function loraWeight() {
  const weight = $("lora-weight").valueAsNumber;
  // Four decimals and no trailing zeros: 0.7 rather than 0.70 or 0.7000000000000001.
  return Number.isFinite(weight) ? String(Number(weight.toFixed(4))) : null;
}

function loraSyntax(name) {
  const weight = loraWeight();
  return weight === null ? null : `<lora:${name}:${weight}>`;
}

function wordSpans(text, word) {
  // Where the tokenizer reads the name as its own words (case-blind; a tag is not read as words at all).
  const outsideTags = text.replace(TAG, (tag) => " ".repeat(tag.length));
  const pattern = new RegExp(word.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"), "giu");
  return [...outsideTags.matchAll(pattern)]
    .map((match) => ({start: match.index, end: match.index + match[0].length}))
    .filter(({start, end}) => !joins(text[start - 1], text[start]) && !joins(text[end - 1], text[end]))
    .map(({start, end}) => withEmphasis(text, start, end));
}

function joins(left, right) {
  // CLIP's tokenizer keeps a run of letters, or of punctuation, as one word; each digit stands alone.
  if (left === undefined || right === undefined) return false;
  const letter = /\p{L}/u, punctuation = /[^\s\p{L}\p{N}]/u;
  return (letter.test(left) && letter.test(right)) || (punctuation.test(left) && punctuation.test(right));
}

function withEmphasis(text, start, end) {
  // "(shiny)", "((shiny))", "[shiny]" and "(shiny:1.2)" go whole, or empty brackets would stay behind.
  for (;;) {
    const close = /^(:[-+]?[\d.]+)?([)\]])/.exec(text.slice(end));
    const open = text[start - 1];
    if (!close || !(open === "(" ? close[2] === ")" : open === "[" && close[0] === "]")) return {start, end};
    [start, end] = [start - 1, end + close[0].length];
  }
}

function toggleAddon(toggle) {
  // As A1111's extra-networks cards: an add-on already in the box is taken out, any other is put in.
  const box = $(promptBox);
  const spans = toggle.spansIn(box.value);
  if (spans.length) {
    removeSpans(box, spans);
  } else {
    const syntax = toggle.syntax();
    if (syntax === null) { setStatus("the LoRA weight must be a number", true); return; }
    insertIntoPrompt(syntax);
  }
  markAddons();
}

function removeSpans(box, spans) {
  // From the last, so the earlier spans stay where they were found.
  for (const span of [...spans].reverse()) {
    const text = box.value;
    let [start, end] = [span.start, span.end];
    const before = /[ \t]*$/.exec(text.slice(0, start))[0].length;
    const after = /^[ \t]*/.exec(text.slice(end))[0].length;
    const lineStart = start - before === 0 || text[start - before - 1] === "\n";
    // One side's spaces go with it, so the words around neither double their spacing nor join.
    if (after > 0 && (before > 0 || lineStart)) end += after;
    else if (before > 0 && after === 0) start -= before;
    box.setRangeText("", start, end, "start");
  }
  box.focus();
}

function markAddons() {
  // Pressed: the add-on is in the box a click would change (the prompt box last focused).
  const box = $(promptBox);
  const where = BOX_NAMES[promptBox];
  $("addon-target").textContent = where;
  for (const {button, spansIn, syntax, label} of toggles) {
    const present = spansIn(box.value).length > 0;
    button.setAttribute("aria-pressed", String(present));
    button.title = present ? `in the ${where}: click to take ${label} out`
      : `click to insert ${syntax() ?? "it"} into the ${where}`;
  }
}

function insertIntoPrompt(text) {
  const box = $(promptBox);
  // A box never focused has its caret at the start; the end is where one would type next.
  const [start, end] = box.dataset.focused
    ? [box.selectionStart, box.selectionEnd] : [box.value.length, box.value.length];
  const before = start > 0 && !/\s/.test(box.value[start - 1]) ? " " : "";
  const after = end < box.value.length && !/\s/.test(box.value[end]) ? " " : "";
  box.setRangeText(before + text + after, start, end, "end");
  box.focus();
}

async function refreshAddons() {
  $("refresh-addons").disabled = true;
  try {
    await postJSON("/sdapi/v1/refresh-loras", {});
    await loadAddons();
    setStatus("add-ons looked for again");
  } catch (error) { setStatus(error.message, true); }
  $("refresh-addons").disabled = false;
}

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function requestBody() {
  const body = {
    kind, prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    steps: numberOrNull("steps"), cfg_scale: numberOrNull("cfg_scale"), sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value,
    seed: numberOrNull("seed") ?? -1, batch_size: numberOrNull("batch_size") ?? 1,
  };
  for (const side of ["width", "height"]) if (numberOrNull(side) !== null) body[side] = numberOrNull(side);
  if (!$("refiner_checkpoint").parentElement.hidden && $("refiner_checkpoint").value) {
    body.refiner_checkpoint = $("refiner_checkpoint").value;
    body.refiner_switch_at = numberOrNull("refiner_switch_at");
  }
  if (kind === "img2img") {
    if (!$("init-canvas").dataset.loaded) throw new Error("choose an image first");
    body.init_images = [$("init-canvas").toDataURL("image/png")];
    body.denoising_strength = numberOrNull("denoising_strength");
    if (maskPainted) body.mask = maskDataURL();
  }
  return body;
}

async function generate(event) {
  if (event) event.preventDefault();
  let body;
  try { body = requestBody(); } catch (error) { setStatus(error.message, true); return; }
  $("generate").disabled = true;
  setStatus("submitting...");
  try {
    const {id} = await postJSON("/diffuse/v1/jobs", body);
    follow(id);
  } catch (error) {
    setStatus(error.message, true);
    $("generate").disabled = false;
  }
}

function follow(id) {
  const events = new EventSource(`/diffuse/v1/jobs/${id}/events`);
  const finish = () => { events.close(); $("generate").disabled = false; $("interrupt").disabled = true; };
  events.addEventListener("queued", (e) => setStatus(`queued (${JSON.parse(e.data).ahead} ahead)`));
  events.addEventListener("progress", (e) => {
    const data = JSON.parse(e.data);
    $("interrupt").disabled = false;
    $("progress").hidden = false;
    $("progress").value = data.total ? data.step / data.total : 0;
    setStatus(`step ${data.step} of ${data.total}, ${data.eta.toFixed(1)} s left`);
    if (data.preview) {
      $("preview").src = data.preview;
      $("preview").hidden = false;
      $("preview").dataset.updates = String(Number($("preview").dataset.updates || 0) + 1);
    }
  });
  events.addEventListener("done", (e) => {
    const data = JSON.parse(e.data);
    finish();
    $("progress").value = 1;
    setStatus(data.interrupted ? "interrupted: the image as it was" : "done");
    showResult(data.images);
    loadGallery();
  });
  events.addEventListener("failed", (e) => { finish(); setStatus(JSON.parse(e.data).detail, true); });
  events.onerror = () => { if (events.readyState === EventSource.CLOSED) finish(); };
}

function figure(image, canRemake = false) {
  const item = document.createElement("figure");
  const link = document.createElement("a");
  link.href = image.url;
  link.download = image.url.split("/").pop();
  link.title = "download the PNG (it carries its parameters)";
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = image.parameters || "";
  link.append(img);
  const caption = document.createElement("figcaption");
  caption.textContent = image.parameters || "";
  item.append(link, caption);
  if (image.fields && !image.fields.refiner_hash) {  // a report draws the model alone, not a hand-off
    item.append(actionButton("how-made", "How it was made",
      "draw this image again with every part recorded, and show the figures of that run",
      () => howItWasMade(image.fields)));
  }
  if (canRemake && image.fields) {
    item.append(actionButton("remake", "Make again",
      "fill the form with this image's parameters and generate it again", () => makeAgain(image.fields)));
  }
  return item;
}

async function makeAgain(fields) {
  // The gallery's fields are the image's own parameters, parsed by the server.
  if ($("generate").disabled) { setStatus("wait for the running job to end", true); return; }
  const model = [...$("model").options].find((option) => option.value.endsWith(`[${fields.model_hash}]`));
  if (fields.model_hash && !model) {
    setStatus(`the model that made this image (hash ${fields.model_hash}) is not on this server`, true);
    return;
  }
  const refiner = [...$("refiner_checkpoint").options].find((option) =>
    fields.refiner_hash && option.value.endsWith(`[${fields.refiner_hash}]`));
  if (fields.refiner_hash && !refiner) {
    setStatus(`the refiner that made this image (hash ${fields.refiner_hash}) is not on this server`, true);
    return;
  }
  if (![...$("sampler_name").options].some((option) => option.value === fields.sampler_name)) {
    setStatus(`this server has no sampler ${fields.sampler_name}`, true);
    return;
  }
  if ((fields.quantize ?? null) !== serverQuantize) {
    // Another arithmetic draws another image: say so rather than make a different one.
    const made = fields.quantize ? `with --quantize ${fields.quantize}` : "without --quantize";
    const runs = serverQuantize ? `with --quantize ${serverQuantize}` : "without --quantize";
    setStatus(`this image was made ${made}; this server runs ${runs}, so it would not come out the same`, true);
    return;
  }
  selectTab(document.querySelector('.tab[data-kind="txt2img"]'));
  $("prompt").value = fields.prompt;
  $("negative_prompt").value = fields.negative_prompt;
  markAddons();
  for (const id of ["steps", "cfg_scale", "seed", "width", "height"]) $(id).value = String(fields[id]);
  $("sampler_name").value = fields.sampler_name;
  $("scheduler").value = fields.scheduler;
  $("batch_size").value = "1";
  $("refiner_checkpoint").value = refiner ? refiner.value : "";
  if (refiner) $("refiner_switch_at").value = String(fields.refiner_switch_at);
  if (model && $("model").value !== model.value) {
    $("model").value = model.value;
    if (!(await switchModel())) return;
  }
  await generate();
}

function showResult(images) {
  $("result").replaceChildren(...images.map((image) => figure(image)));
  $("result").dataset.count = String(images.length);
}

// "How it was made": the server draws the result again with its parts recorded (diffuse illustrate)
// and the report's figures are shown here, in the order and with the headings the report gives them.
const REPORT_FIELDS = ["prompt", "negative_prompt", "seed", "steps", "sampler_name", "scheduler", "cfg_scale",
  "width", "height", "model_hash"];
const REPORT_POLL_MS = 500;
let reportTurn = 0;  // a newer request makes the answers to an older one stale

function setReportStatus(text, isError = false) {
  $("how-made-status").textContent = text;
  $("how-made-status").className = isError ? "error" : "";
}

async function howItWasMade(fields) {
  const turn = ++reportTurn;
  $("how-made-title").textContent = `How it was made: ${fields.prompt}`;
  $("how-made-figures").replaceChildren();
  $("how-made-figures").dataset.count = "0";
  $("how-made-link").hidden = true;
  setReportStatus("asking the server to draw it again, recording every part...");
  if (!$("how-made").open) $("how-made").showModal();
  const body = Object.fromEntries(REPORT_FIELDS.filter((key) => fields[key] !== undefined && fields[key] !== null)
    .map((key) => [key, fields[key]]));
  try {
    const {id} = await postJSON("/diffuse/v1/illustrate", body);
    const state = await reportMade(id, turn);
    if (state === null) return;
    const report = await getJSON(state.files + "report.json");
    if (turn === reportTurn) showReport(report, state.files, state.titles);
  } catch (error) {
    if (turn === reportTurn) setReportStatus(error.message, true);
  }
}

async function reportMade(id, turn) {
  // The report's state, asked for until it is made (null once a newer request took over).
  for (;;) {
    if (turn !== reportTurn) return null;
    const state = await getJSON(`/diffuse/v1/illustrate/${encodeURIComponent(id)}`);
    if (state.state === "done") return state;
    if (state.state !== "queued" && state.state !== "running") {
      throw new Error(state.detail || `the report was ${state.state}`);
    }
    if (turn === reportTurn) {
      setReportStatus(state.state === "queued" ? `queued (${state.ahead} ahead)`
        : "drawing it again and the figures of the run...");
    }
    await new Promise((resolve) => setTimeout(resolve, REPORT_POLL_MS));
  }
}

function showReport(report, base, titles) {
  // Captions and prompts are text: never markup. A figure that could not be drawn says why.
  const items = report.figures.map((entry) => {
    const item = document.createElement("figure");
    item.className = "report-figure";
    item.dataset.kind = entry.kind;
    const heading = document.createElement("h3");
    heading.textContent = titles[entry.kind] || entry.kind;
    const caption = document.createElement("figcaption");
    if (entry.error) {
      item.classList.add("failed");
      caption.textContent = `This figure could not be drawn: ${entry.error}`;
      item.append(heading, caption);
      return item;
    }
    const img = document.createElement("img");
    img.src = base + encodeURIComponent(entry.file);
    img.alt = entry.caption;
    caption.textContent = entry.caption;
    item.append(heading, img, caption);
    return item;
  });
  $("how-made-figures").replaceChildren(...items);
  $("how-made-figures").dataset.count = String(items.length);
  $("how-made-link").href = base + "index.html";
  $("how-made-link").hidden = false;
  const drawn = report.figures.filter((entry) => !entry.error).length;
  setReportStatus(
    `${drawn} of ${items.length} figures drawn from a live run: seed ${report.seed}, model ${report.model}`);
}

async function loadGallery() {
  try {
    const images = await getJSON("/diffuse/v1/gallery");
    $("gallery").replaceChildren(...images.map((image) => figure(image, true)));
  } catch (error) { /* the gallery is a convenience; the result above stands */ }
}

function selectTab(button) {
  kind = button.dataset.kind;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab === button);
  $("img2img-inputs").hidden = kind !== "img2img";
}

function loadInitImage(file) {
  const image = new Image();
  image.onload = () => {
    for (const canvas of [$("init-canvas"), $("mask-canvas")]) {
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
    }
    $("init-canvas").getContext("2d").drawImage(image, 0, 0);
    $("init-canvas").dataset.loaded = "1";
    clearMask();
    $("mask-area").hidden = false;
  };
  image.src = URL.createObjectURL(file);
}

function clearMask() {
  $("mask-canvas").getContext("2d").clearRect(0, 0, $("mask-canvas").width, $("mask-canvas").height);
  maskPainted = false;
}

function maskDataURL() {
  // White where painted, black elsewhere: A1111's mask convention.
  const out = document.createElement("canvas");
  out.width = $("mask-canvas").width;
  out.height = $("mask-canvas").height;
  const context = out.getContext("2d");
  context.fillStyle = "black";
  context.fillRect(0, 0, out.width, out.height);
  context.drawImage($("mask-canvas"), 0, 0);
  return out.toDataURL("image/png");
}

function paint(event) {
  if (!(event.buttons & 1)) return;
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width;
  const y = (event.clientY - box.top) * canvas.height / box.height;
  const context = canvas.getContext("2d");
  context.fillStyle = "white";
  context.beginPath();
  context.arc(x, y, Number($("brush").value) * canvas.width / box.width / 2, 0, 2 * Math.PI);
  context.fill();
  maskPainted = true;
}

async function switchModel() {
  $("generate").disabled = true;
  setStatus("loading the model...");
  let loaded = true;
  try {
    await postJSON("/sdapi/v1/options", {sd_model_checkpoint: $("model").value});
    setStatus("model loaded");
  } catch (error) {
    loaded = false;
    setStatus(error.message, true);  // the server kept the model it had
    $("model").value = (await getJSON("/sdapi/v1/options")).sd_model_checkpoint;
  }
  $("model-line").textContent = $("model").value;
  await loadModel().catch(() => {});
  $("generate").disabled = false;
  loadAddons().catch(() => {});  // which embeddings fit depends on the model
  return loaded;
}

$("settings").addEventListener("submit", generate);
$("model").addEventListener("change", switchModel);
$("interrupt").addEventListener("click", () => postJSON("/sdapi/v1/interrupt", {}).catch(() => {}));
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => selectTab(tab));
$("init-image").addEventListener("change", (e) => { if (e.target.files[0]) loadInitImage(e.target.files[0]); });
$("mask-canvas").addEventListener("pointerdown", paint);
$("mask-canvas").addEventListener("pointermove", paint);
$("clear-mask").addEventListener("click", clearMask);
$("refresh-addons").addEventListener("click", refreshAddons);
$("how-made-close").addEventListener("click", () => { reportTurn++; $("how-made").close(); });
$("how-made").addEventListener("close", () => { reportTurn++; });
for (const id of ["prompt", "negative_prompt"]) {
  $(id).addEventListener("focus", () => { promptBox = id; $(id).dataset.focused = "1"; markAddons(); });
  $(id).addEventListener("input", markAddons);
}
$("lora-weight").addEventListener("input", markAddons);
loadChoices().catch((error) => setStatus(error.message, true));
loadAddons().catch((error) => setStatus(error.message, true));
loadGallery();
