// The gateway's demo page. It speaks only the gateway's OpenAI-compatible API
// (/v1/models, /v1/chat/completions with SSE streaming, /health), so it works against any
// deployment of it; nothing is loaded from anywhere else.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  image: null,        // data URL of the conversation's image or clip (it belongs to the first question)
  kind: "image",      // or "video": a short clip, for a video model (LLaVA-NeXT-Video)
  messages: [],       // the conversation so far, OpenAI-shaped
  model: null,
  controller: null,   // aborts the answer being streamed
  camera: null,       // the MediaStream while the camera is on
};
// How many text deltas the last answer arrived in, and answers so far: on #conversation as
// data-deltas / data-answers (the browser tests read them; the page's CSP forbids eval).
function count(name, value) { $("conversation").dataset[name] = String(value); }

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// An HTTP error answer, as a person reads it. The gateway's body is OpenAI-shaped.
function explain(status, body) {
  const message = (body && body.error && body.error.message) || "";
  if (status === 401) return "The gateway needs an API key: enter it at the top right.";
  if (status === 413) return "The image or request is too large for this gateway. " + message;
  if (status === 429) return "The model is busy with other requests; try again in a moment.";
  if (status === 503) return "The model server is not reachable from the gateway. " + message;
  if (status === 504) return "The model server took too long to answer. " + message;
  if (status >= 500) return "The server failed: " + (message || status);
  return message || ("The request was refused (HTTP " + status + ").");
}

async function checkHealth() {
  const pill = $("health");
  try {
    const r = await fetch("health", { headers: headers(false), cache: "no-store" });
    const ok = r.ok && (await r.json()).ready;
    pill.textContent = ok ? "model server ready" : "model server down";
    pill.className = "pill " + (ok ? "up" : "down");
  } catch (e) {
    pill.textContent = "gateway unreachable";
    pill.className = "pill down";
  }
}

async function loadModel() {
  try {
    const r = await fetch("v1/models", { headers: headers(false) });
    if (!r.ok) return;
    state.model = (await r.json()).data[0].id;
    $("model").textContent = state.model;
  } catch (e) { /* the health pill says so */ }
}

function setImage(dataUrl, kind = "image") {
  state.image = dataUrl;
  state.kind = kind;
  const clip = kind === "video";
  $("preview").src = dataUrl && !clip ? dataUrl : "";
  $("preview").hidden = !dataUrl || clip;
  $("clip").src = dataUrl && clip ? dataUrl : "";
  $("clip").hidden = !dataUrl || !clip;
  $("no-image").hidden = !!dataUrl;
  $("image-clear").hidden = !dataUrl;
  newConversation();  // one image per conversation: a new image starts a new one
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result, file.type.startsWith("video/") ? "video" : "image");
  reader.onerror = () => showError("Could not read that file.");
  reader.readAsDataURL(file);
}

async function startCamera() {
  showError("");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("This browser gives no camera access here (it needs https or localhost).");
    return;
  }
  try {
    state.camera = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (e) {
    showError("No camera: " + e.message);
    return;
  }
  const video = $("camera");
  delete video.dataset.ready;
  video.onloadeddata = () => { video.dataset.ready = "1"; };
  video.srcObject = state.camera;
  video.hidden = false;
  $("preview").hidden = true;
  $("no-image").hidden = true;
  $("camera-take").hidden = false;
}

function stopCamera() {
  if (state.camera) state.camera.getTracks().forEach((t) => t.stop());
  state.camera = null;
  $("camera").hidden = true;
  $("camera-take").hidden = true;
}

function takeFrame() {
  const video = $("camera");
  if (!video.videoWidth) {
    showError("The camera has not delivered a frame yet.");
    return;
  }
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  stopCamera();
  setImage(canvas.toDataURL("image/jpeg", 0.9));
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("conversation").replaceChildren();
  $("timing").textContent = "";
  showError("");
}

function addTurn(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("conversation").appendChild(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

// The request's messages: the image goes with the first question of the conversation.
function requestMessages(question) {
  const turns = state.messages.concat([{ role: "user", content: question }]);
  if (!state.image) return turns;
  const first = turns[0];
  const part = state.kind === "video" ? { type: "video_url", video_url: { url: state.image } }
                                     : { type: "image_url", image_url: { url: state.image } };
  return [{ role: "user", content: [{ type: "text", text: first.content }, part] }]
    .concat(turns.slice(1));
}

// Yields each SSE event's parsed data from a fetch response body.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function timingLine(stats, ttftMs, tokens) {
  const parts = [];
  if (stats && stats.frames) parts.push(`${stats.frames} frames, decoded in ${stats.video_decode_ms.toFixed(0)} ms`);
  if (stats && stats.image_cached) parts.push("image cached");
  else if (stats && stats.image_encode_ms) parts.push(`image encode ${stats.image_encode_ms.toFixed(0)} ms`);
  if (stats && stats.cached_tokens) parts.push(`${stats.cached_tokens} prompt tokens cached`);
  parts.push(`first text ${ttftMs.toFixed(0)} ms`);
  if (stats && stats.decode_tokens_per_s) parts.push(`${stats.decode_tokens_per_s.toFixed(1)} tok/s`);
  parts.push(`${tokens} tokens`);
  if (stats && stats.finish_reason) parts.push(`finish: ${stats.finish_reason}`);
  return parts.join(" · ");
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  showError("");
  $("send").disabled = true;
  $("stop").hidden = false;
  addTurn("user", question);
  const answer = addTurn("assistant", "");
  $("timing").textContent = "waiting for the first text…";
  let deltas = 0;
  count("deltas", 0);
  state.controller = new AbortController();
  if (!state.model) await loadModel();
  const started = performance.now();
  let firstAt = null, stats = null, tokens = 0;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(true), signal: state.controller.signal,
      body: JSON.stringify({ model: state.model || "edgevlm", messages: requestMessages(question), stream: true,
                             max_tokens: Number($("max-tokens").value) || 128,
                             stream_options: { include_usage: true } }),
    });
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (e) { /* not JSON */ }
      throw new Error(explain(response.status, body));
    }
    for await (const data of events(response)) {
      if (data.error) throw new Error(explain(500, data));
      if (data.edgevlm) stats = data.edgevlm;
      if (data.usage) tokens = data.usage.completion_tokens;
      const delta = data.choices && data.choices[0] && data.choices[0].delta;
      if (delta && delta.content) {
        if (firstAt === null) firstAt = performance.now();
        answer.textContent += delta.content;
        count("deltas", ++deltas);
      }
    }
    state.messages.push({ role: "user", content: question }, { role: "assistant", content: answer.textContent });
    $("question").value = "";
    count("answers", Number($("conversation").dataset.answers || 0) + 1);
    $("timing").textContent = timingLine(stats, (firstAt || performance.now()) - started, tokens);
  } catch (e) {
    answer.remove();
    $("conversation").lastChild && $("conversation").lastChild.remove();  // the unanswered question
    $("timing").textContent = "";
    if (e.name === "AbortError") return;
    showError(e instanceof TypeError ? "Cannot reach the gateway: is `make gateway` running?" : e.message);
  } finally {
    $("send").disabled = false;
    $("stop").hidden = true;
    state.controller = null;
  }
}

$("image-file").addEventListener("change", (e) => e.target.files[0] && readFile(e.target.files[0]));
$("camera-start").addEventListener("click", startCamera);
$("camera-take").addEventListener("click", takeFrame);
$("image-clear").addEventListener("click", () => setImage(null));
$("ask").addEventListener("submit", ask);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", newConversation);
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("api-key").addEventListener("change", () => { checkHealth(); loadModel(); });
checkHealth();
loadModel();
setInterval(checkHealth, 5000);
