// The drawing page: plain JS, no build step, no network access beyond this service.
// The canvas is white with black strokes (dark on light, like ink on paper), exported as a
// PNG and POSTed to /predict_image as the multipart field `image`, so a drawing goes
// through exactly the conversion an uploaded photo of a digit does (grayscale, invert
// dark-on-light, crop, fit 20×20, centre by mass).
"use strict";

(function () {
  const PREDICT_URL = "../predict_image";  // relative: works wherever the service is mounted
  const MODEL_URL = "../model";
  const FEEDBACK_URL = "../feedback";
  const QUEUE_URL = "../feedback/queue?n=20";
  const KEY_STORE = "mnist-mlops-api-key";
  const INK = "#000000";
  const PAPER = "#ffffff";

  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const form = $("form");
  const predictBtn = $("predict");
  const clearBtn = $("clear");
  const fileInput = $("file");
  const keyInput = $("api-key");
  const statusEl = $("status");
  const answerEl = $("answer");
  const errorEl = $("error");
  const resultEl = $("result");

  // What Predict sends: the canvas drawing, or the chosen file as it is.
  let drawn = false;
  let chosenFile = null;
  let busy = false;
  let lastPrediction = null;  // {id, digit} of the answer on screen: what feedback labels

  // ---- drawing -----------------------------------------------------------------------
  function lineWidth() { return Math.round(canvas.width / 14); }  // ~2 px once fitted to 20×20

  function resetCanvas() {
    ctx.save();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.globalCompositeOperation = "source-over";
    ctx.fillStyle = PAPER;  // an opaque background: a transparent PNG would read as black
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.restore();
    drawn = false;
  }

  function toCanvasPoint(ev) {
    const r = canvas.getBoundingClientRect();
    return {
      x: (ev.clientX - r.left) * (canvas.width / r.width),
      y: (ev.clientY - r.top) * (canvas.height / r.height),
    };
  }

  let last = null;
  let activePointer = null;

  function startDrawing() {
    if (chosenFile) {  // drawing replaces a chosen file
      chosenFile = null;
      fileInput.value = "";
      resetCanvas();
    }
  }

  function dot(p) {
    ctx.fillStyle = INK;
    ctx.beginPath();
    ctx.arc(p.x, p.y, lineWidth() / 2, 0, Math.PI * 2);
    ctx.fill();
    drawn = true;
  }

  function segment(a, b) {
    ctx.strokeStyle = INK;
    ctx.lineWidth = lineWidth();
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.stroke();
    drawn = true;
  }

  canvas.addEventListener("pointerdown", (ev) => {
    if (ev.button !== undefined && ev.button > 0) return;  // primary button / touch / pen only
    ev.preventDefault();
    startDrawing();
    activePointer = ev.pointerId;
    try { canvas.setPointerCapture(ev.pointerId); } catch (_) { /* synthetic events */ }
    last = toCanvasPoint(ev);
    dot(last);
  });

  canvas.addEventListener("pointermove", (ev) => {
    if (activePointer !== ev.pointerId || last === null) return;
    ev.preventDefault();
    const events = typeof ev.getCoalescedEvents === "function" ? ev.getCoalescedEvents() : [];
    for (const e of (events.length ? events : [ev])) {
      const p = toCanvasPoint(e);
      segment(last, p);
      last = p;
    }
  });

  function stopDrawing(ev) {
    if (activePointer !== ev.pointerId) return;
    activePointer = null;
    last = null;
  }
  canvas.addEventListener("pointerup", stopDrawing);
  canvas.addEventListener("pointercancel", stopDrawing);
  canvas.addEventListener("lostpointercapture", stopDrawing);

  // Keyboard on the canvas: Delete/Backspace/Escape clears, Enter predicts.
  canvas.addEventListener("keydown", (ev) => {
    if (ev.key === "Delete" || ev.key === "Backspace" || ev.key === "Escape") {
      ev.preventDefault();
      clearAll();
    } else if (ev.key === "Enter") {
      ev.preventDefault();
      predict();
    }
  });

  // ---- file picker -------------------------------------------------------------------
  function previewFile(file) {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => {
      resetCanvas();
      const s = Math.min(canvas.width / img.width, canvas.height / img.height);
      const w = img.width * s, h = img.height * s;
      ctx.drawImage(img, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
      URL.revokeObjectURL(url);
    };
    img.onerror = () => URL.revokeObjectURL(url);  // the service will say what is wrong
    img.src = url;
  }

  fileInput.addEventListener("change", () => {
    const file = fileInput.files && fileInput.files[0];
    if (!file) return;
    chosenFile = file;
    previewFile(file);
    setStatus(`Image chosen: ${file.name}. Press Predict.`);
  });

  // ---- talking to the service ------------------------------------------------------
  function headers() {
    const key = keyInput.value.trim();
    return key ? { "X-API-Key": key } : {};
  }

  function setStatus(text) { statusEl.textContent = text; }

  function showError(text) {
    errorEl.textContent = text;
    errorEl.hidden = false;
  }

  function clearError() {
    errorEl.textContent = "";
    errorEl.hidden = true;
  }

  async function errorMessage(resp) {
    let detail = "";
    try {
      const text = await resp.text();
      try {
        const body = JSON.parse(text);
        detail = body.error || body.detail || body.message || text;
        if (typeof detail !== "string") detail = JSON.stringify(detail);
      } catch (_) {
        detail = text;
      }
    } catch (_) { /* no body */ }
    if (resp.status === 401 || resp.status === 403) {
      $("key-box").open = true;
      return `The service needs a valid API key (HTTP ${resp.status}): enter it under "API key". ${detail}`.trim();
    }
    return `The service answered HTTP ${resp.status}${detail ? ": " + detail : ""}`;
  }

  function canvasBlob() {
    return new Promise((resolve, reject) => {
      canvas.toBlob((b) => (b ? resolve(b) : reject(new Error("could not export the drawing"))), "image/png");
    });
  }

  function pct(p) { return `${(p * 100).toFixed(1)}%`; }

  function renderResult(body) {
    const probs = Array.isArray(body.probabilities) ? body.probabilities.map(Number) : [];
    const digit = Number(body.digit);
    $("digit").textContent = String(digit);
    $("confidence").textContent = pct(Number(body.confidence));
    $("model-version").textContent = String(body.model_version);
    const bars = $("bars");
    bars.replaceChildren();
    probs.forEach((p, d) => {
      const li = document.createElement("li");
      li.className = "bar" + (d === digit ? " top" : "");
      li.dataset.digit = String(d);
      li.dataset.probability = String(p);
      li.setAttribute("aria-label", `${d}: ${pct(p)}`);
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = String(d);
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = pct(p);
      li.append(label, track, value);
      bars.appendChild(li);
    });
    lastPrediction = { id: String(body.prediction_id), digit };
    resetFeedback();
    answerEl.hidden = false;
  }

  // ---- feedback: people correct the model; the label is stored for the next training run
  const feedbackButtons = () => [$("right"), ...document.querySelectorAll("#digits button")];

  function resetFeedback() {
    $("feedback-status").textContent = "";
    feedbackButtons().forEach((b) => { b.disabled = false; b.setAttribute("aria-pressed", "false"); });
  }

  async function sendFeedback(label, button) {
    if (!lastPrediction) return;
    clearError();
    const buttons = feedbackButtons();
    buttons.forEach((b) => { b.disabled = true; });
    $("feedback-status").textContent = "Sending…";
    try {
      const resp = await fetch(FEEDBACK_URL, {
        method: "POST",
        headers: { ...headers(), "Content-Type": "application/json" },
        body: JSON.stringify({ prediction_id: lastPrediction.id, label }),
      });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      buttons.forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
      $("feedback-status").textContent = label === lastPrediction.digit
        ? `Thanks: recorded as right (${label}).`
        : `Thanks: recorded as ${label}.`;
    } catch (err) {
      $("feedback-status").textContent = "Not recorded.";
      showError(err && err.message ? err.message : String(err));
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  $("right").addEventListener("click", (ev) => {
    if (lastPrediction) sendFeedback(lastPrediction.digit, ev.currentTarget);
  });
  document.querySelectorAll("#digits button").forEach((b) => {
    b.addEventListener("click", () => sendFeedback(Number(b.dataset.label), b));
  });

  async function predict() {
    if (busy) return;
    clearError();
    if (!chosenFile && !drawn) {
      showError("Draw a digit or choose an image first.");
      return;
    }
    busy = true;
    predictBtn.disabled = true;
    resultEl.setAttribute("aria-busy", "true");
    setStatus("Predicting…");
    try {
      const data = new FormData();
      if (chosenFile) data.append("image", chosenFile, chosenFile.name);
      else data.append("image", await canvasBlob(), "drawing.png");
      const resp = await fetch(PREDICT_URL, { method: "POST", body: data, headers: headers() });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      const body = await resp.json();
      rememberKey();
      if (body.blank === true) {  // no ink: the model's "digit" would be a guess about nothing
        answerEl.hidden = true;
        lastPrediction = null;
        setStatus("No digit found.");
        showError(`${chosenFile ? "The chosen image holds" : "The drawing holds"} no digit: draw a digit first.`);
        return;
      }
      renderResult(body);
      setStatus(`Predicted from ${chosenFile ? "the chosen image" : "the drawing"}.`);
    } catch (err) {
      answerEl.hidden = true;
      setStatus("No prediction.");
      showError(err && err.message ? err.message : String(err));
    } finally {
      busy = false;
      predictBtn.disabled = false;
      resultEl.setAttribute("aria-busy", "false");
    }
  }

  function clearAll() {
    chosenFile = null;
    fileInput.value = "";
    resetCanvas();
    clearError();
    answerEl.hidden = true;
    lastPrediction = null;
    setStatus("Nothing predicted yet.");
  }

  // The key lives only for this browser tab (sessionStorage), never in the page's URL.
  function rememberKey() {
    try {
      const key = keyInput.value.trim();
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (_) { /* storage disabled */ }
  }

  async function loadModelInfo() {
    try {
      const resp = await fetch(MODEL_URL, { headers: headers() });
      if (!resp.ok) return;
      const info = await resp.json();
      const version = info.model_version ?? info.version ?? info.mlflow_version;
      const name = info.model_name ?? info.name ?? info.registered_model ?? "";
      if (version !== undefined && version !== null) {
        $("served-model").textContent = `${name ? name + " " : ""}version ${version}`;
      }
    } catch (_) { /* informational only */ }
  }

  // ---- help label: one queued digit at a time --------------------------------------
  let questions = [];
  const skipped = new Set();
  const helpStatus = $("help-status");

  async function nextQuestion() {
    if (!questions.length) {
      const resp = await fetch(QUEUE_URL, { headers: headers() });
      if (!resp.ok) { helpStatus.textContent = await errorMessage(resp); return; }
      questions = (await resp.json()).items.filter((q) => !skipped.has(q.prediction_id));
    }
    const q = questions[0];
    $("question").hidden = !q;
    if (!q) { helpStatus.textContent = "Nothing to label right now: thank you."; return; }
    $("question-digit").src = q.image;
    $("question-digit").dataset.predictionId = q.prediction_id;
    $("question-answer").textContent = `${q.digit} (confidence ${pct(q.confidence)})`;
  }

  let answering = false;

  async function answer(label) {
    const q = questions[0];
    if (!q || answering) return;
    answering = true;
    try {
      if (label === null) {
        skipped.add(q.prediction_id);
        helpStatus.textContent = "Skipped.";
      } else {
        const resp = await fetch(FEEDBACK_URL, {
          method: "POST", headers: { ...headers(), "Content-Type": "application/json" },
          body: JSON.stringify({ prediction_id: q.prediction_id, label }),
        });
        // Not stored: the digit stays on screen, so the label can be sent again (after typing the key).
        if (!resp.ok) { helpStatus.textContent = `Not recorded: ${await errorMessage(resp)}`; return; }
        helpStatus.textContent = `Thank you: labelled ${label}.`;
      }
      questions.shift();
      await nextQuestion();
    } finally {
      answering = false;
    }
  }

  $("help-start").addEventListener("click", nextQuestion);
  $("question-skip").addEventListener("click", () => answer(null));
  for (const b of document.querySelectorAll("#question-digits [data-label]")) {
    b.addEventListener("click", () => answer(Number(b.dataset.label)));
  }

  form.addEventListener("submit", (ev) => { ev.preventDefault(); predict(); });
  clearBtn.addEventListener("click", clearAll);
  keyInput.addEventListener("change", () => { rememberKey(); loadModelInfo(); });

  try { keyInput.value = sessionStorage.getItem(KEY_STORE) || ""; } catch (_) { /* storage disabled */ }
  resetCanvas();
  loadModelInfo();
})();
