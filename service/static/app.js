// The demo page: avatars, reenactments and the live stream through the public API, with the
// API key from localStorage. Plain browser JavaScript, no build step, nothing from the network
// but this service.
"use strict";

(() => {
  const KEY_STORAGE = "lpd.apiKey";
  const POLL_MS = 1000;
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  const RECORDER_TYPES = [
    "video/webm;codecs=vp8,opus",
    "video/webm;codecs=vp9,opus",
    "video/webm;codecs=vp8",
    "video/webm",
  ];
  // WebSocket close codes of the stream (service/api/routes/stream.py).
  const CLOSE_REASONS = {
    1000: "closed",
    1006: "the connection was refused or lost (a wrong API key is refused at the handshake)",
    1011: "the server failed to process a frame",
    1013: "the inference server is unavailable; try again later",
    4400: "the server did not accept the stream's parameters",
    4401: "invalid API key",
    4404: "no such avatar",
    4408: "closed after being idle",
    4409: "the avatar is not ready yet",
    4412: "the server's pose encoder changed: start again to download the new one",
    4429: "too many live streams for this tenant",
  };

  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // --- errors --------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, details) {
      super(message);
      this.status = status;
      this.code = code;
      this.details = details;
    }
  }

  function describeDetails(details) {
    if (details === null || details === undefined) return "";
    if (Array.isArray(details)) {
      return details
        .map((d) => (d && d.msg ? `${(d.loc || []).join(".")}: ${d.msg}` : JSON.stringify(d)))
        .join("; ");
    }
    return typeof details === "object" ? JSON.stringify(details) : String(details);
  }

  function showError(error, context) {
    const box = $("error");
    let text;
    if (error instanceof ApiError) {
      text = `${error.status ? error.status + " " : ""}${error.code}: ${error.message}`;
      const more = describeDetails(error.details);
      if (more) text += ` (${more})`;
      if (error.status === 401) text += ". Check the API key.";
    } else {
      text = error && error.message ? error.message : String(error);
    }
    box.textContent = context ? `${context}: ${text}` : text;
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  // --- the API -------------------------------------------------------------------------------

  function apiKey() {
    return localStorage.getItem(KEY_STORAGE) || "";
  }

  async function readError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      // not JSON: a proxy's page, say
    }
    const err = body && body.error;
    if (err && err.code) return new ApiError(response.status, err.code, err.message, err.details);
    return new ApiError(response.status, "http_error", response.statusText || "request failed");
  }

  // fetch() with the key; JSON in and out; throws ApiError with the service's {code, message}.
  async function api(path, options = {}) {
    const key = apiKey();
    if (!key) throw new ApiError(0, "no_api_key", "enter an API key first (step 1)");
    const headers = { Authorization: `Bearer ${key}`, ...(options.headers || {}) };
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (exc) {
      throw new ApiError(0, "network_error", `the service did not answer (${exc.message})`);
    }
    if (!response.ok) throw await readError(response);
    if (options.raw) return response;
    return response.status === 204 ? null : response.json();
  }

  // Poll GET /v1/jobs/{id} until the job ends; `onUpdate(job)` after each read. A newer poll of
  // the same `slot` ends this one.
  const polls = {};
  async function pollJob(slot, jobId, onUpdate) {
    const token = {};
    polls[slot] = token;
    for (;;) {
      let job;
      try {
        job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
      } catch (exc) {
        if (polls[slot] !== token) return null;
        if (exc instanceof ApiError && (exc.status === 429 || exc.status >= 500 || !exc.status)) {
          await sleep(5 * POLL_MS); // rate limited or briefly down: keep going, slower
          continue;
        }
        throw exc;
      }
      if (polls[slot] !== token) return null;
      await onUpdate(job);
      if (TERMINAL.has(job.status)) return job;
      await sleep(POLL_MS);
      if (polls[slot] !== token) return null;
    }
  }

  function showJob(prefix, job) {
    $(`${prefix}-job`).hidden = false;
    $(`${prefix}-progress`).value = job.progress;
    const pct = Math.round(100 * job.progress);
    let text = `${job.status}${job.stage ? ` (${job.stage})` : ""}, ${pct}%`;
    if (job.error) text += `: ${job.error.code}: ${job.error.message}`;
    $(`${prefix}-status`).textContent = text;
    $(`${prefix}-job`).dataset.status = job.status;
    $(`${prefix}-job`).dataset.jobId = job.id;
    $(`${prefix}-cancel`).disabled = TERMINAL.has(job.status);
  }

  async function cancelJob(prefix) {
    const jobId = $(`${prefix}-job`).dataset.jobId;
    if (!jobId) return;
    clearError();
    try {
      const path = `/v1/jobs/${encodeURIComponent(jobId)}/cancel`;
      showJob(prefix, await api(path, { method: "POST" }));
    } catch (exc) {
      showError(exc, "Cancel");
    }
  }

  // --- 1. the key ----------------------------------------------------------------------------

  async function checkKey() {
    const status = $("key-status");
    if (!apiKey()) {
      status.textContent = "no key";
      return;
    }
    try {
      const me = await api("/v1/me");
      status.textContent = `tenant ${me.tenant.name}, key ${me.key.name}`;
      status.dataset.ok = "true";
      await refreshAvatars();
    } catch (exc) {
      status.textContent = "not accepted";
      status.dataset.ok = "false";
      showError(exc, "API key");
    }
  }

  // --- 2. avatars ----------------------------------------------------------------------------

  async function createAvatar(event) {
    event.preventDefault();
    clearError();
    const photos = $("photo-input").files;
    if (!photos.length) {
      showError(new Error("choose at least one photo"), "Avatar");
      return;
    }
    const form = new FormData();
    for (const photo of photos) form.append("photos", photo, photo.name);
    form.append("name", $("avatar-name").value.trim() || "avatar");
    form.append("fine_tune", $("fine-tune").value);
    if ($("fine-tune").value !== "none" && $("steps").value) form.append("steps", $("steps").value);
    const button = $("create-avatar");
    button.disabled = true;
    try {
      const created = await api("/v1/avatars", { method: "POST", body: form });
      showJob("avatar", created.job);
      await refreshAvatars(created.avatar.id);
      let stage = created.job.stage;
      const job = await pollJob("avatar", created.job.id, async (j) => {
        showJob("avatar", j);
        // The avatar is usable once preprocessing is done, before a fine-tune ends.
        if (j.stage !== stage || TERMINAL.has(j.status)) {
          stage = j.stage;
          await refreshAvatars(created.avatar.id);
        }
      });
      if (job && job.status === "failed" && job.error) {
        showError(new ApiError(0, job.error.code, job.error.message), "Avatar job failed");
      }
    } catch (exc) {
      showError(exc, "Avatar");
    } finally {
      button.disabled = false;
    }
  }

  let avatars = [];

  async function refreshAvatars(select) {
    const current = select || $("avatar-select").value;
    try {
      const page = await api("/v1/avatars?limit=100");
      avatars = page.items;
    } catch (exc) {
      showError(exc, "Avatars");
      return;
    }
    const menu = $("avatar-select");
    menu.replaceChildren();
    if (!avatars.length) menu.append(new Option("(none yet)", ""));
    for (const a of avatars) {
      const tuned = a.fine_tuned ? ", fine-tuned" : "";
      const option = new Option(`${a.name} (${a.status}${tuned}) ${a.id.slice(0, 8)}`, a.id);
      option.dataset.status = a.status;
      menu.append(option);
    }
    const ready = avatars.find((a) => a.status === "ready");
    if (avatars.some((a) => a.id === current)) menu.value = current;
    else if (ready) menu.value = ready.id;
    showAvatarInfo();
  }

  function selectedAvatar() {
    return avatars.find((a) => a.id === $("avatar-select").value) || null;
  }

  function showAvatarInfo() {
    const avatar = selectedAvatar();
    const info = $("avatar-info");
    info.textContent = avatar ? `${avatar.status}; id ${avatar.id}` : "";
    info.dataset.status = avatar ? avatar.status : "";
  }

  // --- 4. driver video: upload or webcam recording ------------------------------------------

  let recording = null; // {recorder, stream, chunks}
  let recorded = null; // File

  function driverSource() {
    return $("driver-source-webcam").checked ? "webcam" : "file";
  }

  function showDriverSource() {
    const webcam = driverSource() === "webcam";
    $("driver-file-row").hidden = webcam;
    $("driver-webcam-row").hidden = !webcam;
  }

  async function openCamera(audio) {
    const video = { width: { ideal: 640 }, height: { ideal: 480 } };
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("this browser gives no camera access (it needs localhost or HTTPS)");
    }
    try {
      return await navigator.mediaDevices.getUserMedia({ video, audio });
    } catch (exc) {
      if (!audio) throw exc;
      return navigator.mediaDevices.getUserMedia({ video, audio: false }); // no microphone
    }
  }

  async function startRecording() {
    clearError();
    if (typeof MediaRecorder === "undefined") {
      showError(new Error("this browser cannot record video (no MediaRecorder)"), "Webcam");
      return;
    }
    let stream;
    try {
      stream = await openCamera(true);
    } catch (exc) {
      showError(exc, "Webcam");
      return;
    }
    const mimeType = RECORDER_TYPES.find((t) => MediaRecorder.isTypeSupported(t)) || "";
    const recorder = new MediaRecorder(stream, mimeType ? { mimeType } : {});
    const chunks = [];
    recorder.ondataavailable = (e) => e.data.size && chunks.push(e.data);
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      const blob = new Blob(chunks, { type: "video/webm" });
      recorded = new File([blob], "webcam.webm", { type: "video/webm" });
      const preview = $("webcam-preview");
      preview.srcObject = null;
      preview.src = URL.createObjectURL(blob);
      preview.controls = true;
      preview.muted = false;
      $("record-status").textContent = `recorded ${(blob.size / 1024).toFixed(0)} KiB`;
      recording = null;
    };
    const preview = $("webcam-preview");
    preview.controls = false;
    preview.muted = true;
    preview.srcObject = stream;
    preview.play().catch(() => {});
    recorder.start(500);
    recording = { recorder, stream, chunks };
    recorded = null;
    $("record-start").disabled = true;
    $("record-stop").disabled = false;
    $("record-status").textContent = "recording...";
  }

  function stopRecording() {
    if (recording) recording.recorder.stop();
    $("record-start").disabled = false;
    $("record-stop").disabled = true;
  }

  // Colour and image backgrounds apply to mp4 without paste-back (ReenactOptions).
  function syncOptions() {
    const plain = $("output").value === "mp4" && !$("paste-back").checked;
    const background = $("background");
    if (!plain) background.value = "generated";
    background.disabled = !plain;
    $("background-color").disabled = background.value !== "color";
    $("background-image").disabled = background.value !== "image";
    $("steps").disabled = $("fine-tune").value === "none";
  }

  async function submitReenactment(event) {
    event.preventDefault();
    clearError();
    const avatar = selectedAvatar();
    if (!avatar) {
      showError(new Error("create or pick an avatar first (steps 2 and 3)"), "Reenact");
      return;
    }
    const video = driverSource() === "webcam" ? recorded : $("driver-input").files[0];
    if (!video) {
      showError(new Error("choose a driver video, or record one"), "Reenact");
      return;
    }
    const output = $("output").value;
    const form = new FormData();
    form.append("avatar_id", avatar.id);
    form.append("video", video, video.name);
    form.append("output", output);
    form.append("paste_back", String($("paste-back").checked));
    form.append("keep_audio", String($("keep-audio").checked));
    const background = $("background").value;
    form.append("background", background);
    if (background === "color") form.append("background_color", $("background-color").value);
    if (background === "image") {
      const image = $("background-image").files[0];
      if (!image) {
        showError(new Error("choose a background image"), "Reenact");
        return;
      }
      form.append("background_image", image, image.name);
    }
    const button = $("submit-reenactment");
    button.disabled = true;
    try {
      const created = await api("/v1/reenactments", { method: "POST", body: form });
      clearResult();
      showJob("reenact", created);
      const job = await pollJob("reenact", created.id, async (j) => showJob("reenact", j));
      if (job && job.status === "succeeded") await showResult(job, output);
      else if (job && job.status === "failed" && job.error) {
        showError(new ApiError(0, job.error.code, job.error.message), "Reenactment failed");
      }
    } catch (exc) {
      showError(exc, "Reenact");
    } finally {
      button.disabled = false;
    }
  }

  // --- 5. the result -------------------------------------------------------------------------

  let objectUrls = [];

  function clearResult() {
    objectUrls.forEach((u) => URL.revokeObjectURL(u));
    objectUrls = [];
    const player = $("result-video");
    player.removeAttribute("src");
    player.load();
    for (const id of ["download-video", "download-mask"]) {
      $(id).hidden = true;
      $(id).removeAttribute("href");
    }
    $("result-info").textContent = "";
    $("result-section").hidden = true;
  }

  // A playable URL for a result file: the signed link when there is one, else the file
  // fetched with the key (a <video> cannot send an Authorization header).
  async function fileUrl(result, name) {
    if (result[`${name}_url`]) return result[`${name}_url`];
    const response = await api(result[name], { raw: true });
    const url = URL.createObjectURL(await response.blob());
    objectUrls.push(url);
    return url;
  }

  async function showResult(job, output) {
    const result = job.result || {};
    clearResult();
    const section = $("result-section");
    section.hidden = false;
    if (result.expired) {
      $("result-info").textContent = "the result files have expired";
      return;
    }
    const ext = output === "webm" ? "webm" : "mp4";
    const links = [
      ["video", $("download-video"), `reenactment-${job.id}.${ext}`],
      ["mask", $("download-mask"), `reenactment-${job.id}-matte.mp4`],
    ];
    let playable = null;
    for (const [name, link, filename] of links) {
      if (!result[name]) continue;
      const url = await fileUrl(result, name);
      link.href = url;
      link.download = filename;
      link.hidden = false;
      playable = playable || url; // the video, or the matte for output=mask
    }
    const player = $("result-video");
    player.classList.toggle("checker", output === "webm");
    if (playable) {
      player.src = playable;
      player.load();
    }
    const facts = [];
    if (result.frames) facts.push(`${result.frames} frames`);
    if (result.fps) facts.push(`${result.fps} fps`);
    if (result.audio !== null && result.audio !== undefined) {
      facts.push(result.audio ? "with audio" : "no audio");
    }
    if (result.expires_at) {
      facts.push(`links valid until ${new Date(result.expires_at).toLocaleString()}`);
    }
    $("result-info").textContent = facts.join(", ");
    section.scrollIntoView({ behavior: "smooth", block: "start" });
  }

  // --- 6. live -------------------------------------------------------------------------------

  let live = null;

  function setLiveStatus(text) {
    $("live-status").textContent = text;
  }

  async function startLive() {
    clearError();
    const avatar = selectedAvatar();
    if (!avatar) {
      showError(new Error("pick a ready avatar first (step 3)"), "Live");
      return;
    }
    if (!apiKey()) {
      showError(new ApiError(0, "no_api_key", "enter an API key first (step 1)"), "Live");
      return;
    }
    for (const id of ["live-frames", "live-dropped"]) $(id).textContent = "0";
    for (const id of ["live-latency", "live-bytes", "live-encoder", "live-render"]) {
      $(id).textContent = "-";
    }
    const mode = $("live-mode").value;
    let pose = null;
    if (mode === "pose") {
      $("live-start").disabled = true;
      try {
        pose = await preparePose();
      } catch (exc) {
        showError(exc, "Pose mode");
        setLiveStatus("");
        return;
      } finally {
        $("live-start").disabled = false;
      }
    }
    let stream;
    try {
      stream = await openCamera(false);
    } catch (exc) {
      showError(exc, "Webcam");
      return;
    }
    const camera = $("live-camera");
    camera.srcObject = stream;
    await camera.play().catch(() => {});

    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const path = `/v1/avatars/${encodeURIComponent(avatar.id)}/stream`;
    const query = new URLSearchParams({ token: apiKey() }); // browsers cannot set WS headers
    if (pose) {
      query.set("mode", "pose");
      query.set("version", pose.contract.version);
    }
    const ws = new WebSocket(`${scheme}//${location.host}${path}?${query}`);
    ws.binaryType = "blob";
    const state = {
      ws,
      stream,
      pose, // null in frames mode
      seq: 0, // binary messages sent: the server's `seq`
      sentAt: new Map(),
      waiting: false, // a frame is out and its reply has not come
      expectImage: null, // the header whose JPEG is the next binary message
      frames: 0,
      timer: null,
      grab: document.createElement("canvas"),
      encoding: false,
    };
    live = state;
    $("live-start").disabled = true;
    $("live-stop").disabled = false;
    setLiveStatus("connecting...");

    ws.onopen = () => {
      setLiveStatus("streaming");
      // Pose mode has no frame to paste into: the server refuses paste_back there.
      if (!pose) {
        ws.send(JSON.stringify({ type: "config", paste_back: $("live-paste-back").checked }));
      }
      const fps = Number($("live-fps").value);
      if (fps > 0) state.timer = setInterval(() => sendFrame(state), 1000 / fps);
      else sendFrame(state);
    };
    ws.onmessage = (event) => onLiveMessage(state, event.data);
    ws.onclose = (event) => {
      const reason = CLOSE_REASONS[event.code] || event.reason || "closed";
      if (live === state) stopLive(`stream ended: ${reason} (${event.code})`);
      if (event.code === CLOSE_STALE_ENCODER) forgetPoseEncoder();
      if (event.code !== 1000 && event.code !== 1005) {
        showError(new ApiError(event.code, "stream_closed", reason), "Live");
      }
    };
  }

  // Grab the current webcam frame as a JPEG and send it; in "after each reply" mode only when
  // no frame is out (a watchdog resends after 5 s).
  function sendFrame(state) {
    if (state.pose) {
      sendPose(state);
      return;
    }
    if (live !== state || state.ws.readyState !== WebSocket.OPEN || state.encoding) return;
    const paced = Number($("live-fps").value) === 0;
    const camera = $("live-camera");
    if (!camera.videoWidth) {
      setTimeout(() => sendFrame(state), 100); // camera not started yet
      return;
    }
    const scale = Math.min(1, 640 / camera.videoWidth);
    state.grab.width = Math.round(camera.videoWidth * scale);
    state.grab.height = Math.round(camera.videoHeight * scale);
    state.grab.getContext("2d").drawImage(camera, 0, 0, state.grab.width, state.grab.height);
    state.encoding = true;
    state.grab.toBlob(
      (blob) => {
        state.encoding = false;
        if (!blob || live !== state || state.ws.readyState !== WebSocket.OPEN) return;
        const seq = state.seq++;
        state.sentAt.set(seq, performance.now());
        state.ws.send(blob);
        if (paced) {
          state.waiting = true;
          clearTimeout(state.watchdog);
          state.watchdog = setTimeout(() => nextFrame(state), 5000);
        }
      },
      "image/jpeg",
      0.8,
    );
  }

  function nextFrame(state) {
    state.waiting = false;
    clearTimeout(state.watchdog);
    if (Number($("live-fps").value) === 0) requestAnimationFrame(() => sendFrame(state));
  }

  async function onLiveMessage(state, data) {
    if (live !== state) return;
    if (typeof data !== "string") {
      const header = state.expectImage;
      state.expectImage = null;
      await drawFrame(data);
      if (header) nextFrame(state);
      return;
    }
    let message;
    try {
      message = JSON.parse(data);
    } catch (_) {
      return;
    }
    if (message.type === "config") {
      setLiveStatus(`streaming (paste back ${message.paste_back ? "on" : "off"})`);
    } else if (message.type === "frame") {
      const sent = state.sentAt.get(message.seq);
      for (const seq of state.sentAt.keys()) if (seq <= message.seq) state.sentAt.delete(seq);
      const roundTrip = sent === undefined ? null : performance.now() - sent;
      const server = `server ${message.latency_ms.toFixed(0)} ms`;
      $("live-latency").textContent =
        roundTrip === null ? server : `${roundTrip.toFixed(0)} ms (${server})`;
      $("live-dropped").textContent = String(message.dropped);
      if (typeof message.render_ms === "number") {
        if (state.pose) state.pose.stats.renderMs.push(message.render_ms);
        $("live-render").textContent = `${message.render_ms.toFixed(1)} ms`;
      }
      if (state.pose) state.pose.stats.latencyMs.push(message.latency_ms);
      state.frames += 1;
      $("live-frames").textContent = String(state.frames);
      if (state.pose) setLiveStatus(state.pose.status);
      else if (message.face) setLiveStatus("streaming");
      else if (message.image) setLiveStatus("no face in this frame: the last box is reused");
      else setLiveStatus("looking for a face...");
      if (message.image) state.expectImage = message;
      else nextFrame(state);
    } else if (message.type === "error") {
      showError(new ApiError(0, message.code, message.message), "Live");
      if (message.seq !== undefined) nextFrame(state);
    }
  }

  async function drawFrame(blob) {
    const canvas = $("live-canvas");
    let image;
    try {
      image = await createImageBitmap(blob);
    } catch (_) {
      return; // not a decodable JPEG: skip it
    }
    if (canvas.width !== image.width || canvas.height !== image.height) {
      canvas.width = image.width;
      canvas.height = image.height;
    }
    canvas.getContext("2d").drawImage(image, 0, 0);
    image.close();
  }

  function stopLive(text) {
    const state = live;
    live = null;
    if (state) {
      clearInterval(state.timer);
      clearTimeout(state.watchdog);
      if (state.ws.readyState <= WebSocket.OPEN) state.ws.close(1000);
      state.stream.getTracks().forEach((t) => t.stop());
    }
    $("live-camera").srcObject = null;
    clearOverlay();
    $("live-start").disabled = false;
    $("live-stop").disabled = true;
    setLiveStatus(text || "stopped");
  }

  // --- 6b. live, pose mode: the encoder runs here, 2 x D bytes a frame go out ---------------

  const CLOSE_STALE_ENCODER = 4412;
  const GUIDE_SIDE = 0.45; // the guide box's side, x the shorter side of the camera frame
  const STATS_KEPT = 300; // samples per statistic (about 10 s at 30 fps)

  // The contract and the encoders built from it, per precision; dropped when the server's
  // encoder changes (close code 4412) so the next start downloads the new one.
  let poseCache = null; // {contract, encoders: {fp16: Promise, fp32: Promise}}

  function forgetPoseEncoder() {
    const cache = poseCache;
    poseCache = null;
    if (!cache) return;
    for (const pending of Object.values(cache.encoders)) {
      pending.then((encoder) => encoder.release()).catch(() => {});
    }
  }

  async function poseContract() {
    if (poseCache) return poseCache.contract;
    const contract = await api("/v1/models/pose-encoder");
    const wire = contract.wire || {};
    if (wire.dtype !== "float16" || wire.byte_order !== "little") {
      throw new Error(`unsupported wire format ${JSON.stringify(wire)} (this page sends float16)`);
    }
    if (wire.bytes_per_frame !== 2 * contract.pose_dim) {
      const says = `${wire.bytes_per_frame} bytes a frame for D=${contract.pose_dim}`;
      throw new Error(`the contract says ${says}: not float16`);
    }
    poseCache = { contract, encoders: {} };
    return contract;
  }

  // The encoder of `precision`: the ONNX file fetched with the key (the browser's HTTP cache
  // revalidates it by ETag), then an onnxruntime-web session (wasm, one thread).
  async function poseEncoder(precision) {
    const contract = await poseContract();
    const cache = poseCache;
    if (!cache.encoders[precision]) {
      cache.encoders[precision] = (async () => {
        const path = contract.files[precision];
        if (!path) throw new Error(`the server has no ${precision} encoder`);
        const response = await api(path, { raw: true });
        const version = response.headers.get("X-Model-Version");
        if (version && version !== contract.version) {
          forgetPoseEncoder();
          throw new Error("the server's pose encoder changed while loading; start again");
        }
        const bytes = new Uint8Array(await response.arrayBuffer());
        const encoder = await LpdPose.createEncoder(bytes, contract);
        encoder.bytes = bytes.length;
        return encoder;
      })();
      cache.encoders[precision].catch(() => {
        if (poseCache === cache) delete cache.encoders[precision];
      });
    }
    return cache.encoders[precision];
  }

  async function preparePose() {
    setLiveStatus("loading the pose encoder...");
    await LpdPose.loadVendor();
    const precision = $("pose-precision").value;
    const cropMode = $("pose-crop").value;
    const encoder = await poseEncoder(precision);
    const contract = await poseContract();
    const crop = contract.crop || {};
    const smoothing = crop.smoothing || {};
    let detector = null;
    if (cropMode === "detector") {
      setLiveStatus("loading the face detector...");
      detector = await LpdPose.loadDetector(crop.min_confidence || 0.5);
    }
    const size = contract.image_size;
    $("pose-crop-preview").width = size;
    $("pose-crop-preview").height = size;
    const mib = (encoder.bytes / 2 ** 20).toFixed(1);
    $("pose-info").textContent =
      `encoder ${contract.version}, ${precision} (${mib} MiB), S=${size}, D=${contract.pose_dim}`;
    return {
      contract,
      encoder,
      detector,
      cropMode,
      status: "streaming",
      scale: crop.scale || 1.8,
      smoother: new LpdPose.BoxSmoother({
        minCutoff: smoothing.min_cutoff_hz ?? 1.0,
        beta: smoothing.beta ?? 1.0,
        dCutoff: smoothing.d_cutoff_hz ?? 1.0,
        cutThreshold: smoothing.cut_threshold ?? 0.5,
        cutScale: smoothing.cut_scale_ratio ?? 1.5,
      }),
      grab: document.createElement("canvas"),
      cropCanvas: document.createElement("canvas"),
      scratch: document.createElement("canvas"),
      stats: { encoderMs: [], detectMs: [], cropMs: [], latencyMs: [], renderMs: [], bytes: 0 },
    };
  }

  function keep(samples, value) {
    samples.push(value);
    if (samples.length > STATS_KEPT) samples.shift();
  }

  function mean(samples) {
    return samples.reduce((a, b) => a + b, 0) / Math.max(1, samples.length);
  }

  function guideBox(width, height) {
    const side = GUIDE_SIDE * Math.min(width, height);
    const cx = width / 2;
    const cy = height / 2;
    return { x0: cx - side / 2, y0: cy - side / 2, x1: cx + side / 2, y1: cy + side / 2 };
  }

  // The face (or guide) box and the crop window, over the camera preview.
  function drawOverlay(width, height, face, box) {
    const overlay = $("live-overlay");
    if (overlay.width !== width || overlay.height !== height) {
      overlay.width = width;
      overlay.height = height;
    }
    const ctx = overlay.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    ctx.lineWidth = Math.max(2, width / 200);
    if (face) {
      ctx.setLineDash([6, 4]);
      ctx.strokeStyle = "#ffd400";
      ctx.strokeRect(face.x0, face.y0, face.x1 - face.x0, face.y1 - face.y0);
    }
    if (box) {
      ctx.setLineDash([]);
      ctx.strokeStyle = "#2fd35b";
      const win = LpdPose.cropWindow(box);
      ctx.strokeRect(win.x0, win.y0, win.side, win.side);
    }
  }

  function clearOverlay() {
    const overlay = $("live-overlay");
    overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
  }

  // Grab the camera frame, find the face, crop, encode, send 2 x D bytes. In "after each
  // reply" mode only when no descriptor is out (a watchdog resends after 5 s).
  async function sendPose(state) {
    if (live !== state || state.ws.readyState !== WebSocket.OPEN || state.encoding) return;
    const paced = Number($("live-fps").value) === 0;
    const camera = $("live-camera");
    if (!camera.videoWidth) {
      setTimeout(() => sendFrame(state), 100); // camera not started yet
      return;
    }
    const pose = state.pose;
    const stats = pose.stats;
    const scale = Math.min(1, 640 / camera.videoWidth);
    const width = Math.round(camera.videoWidth * scale);
    const height = Math.round(camera.videoHeight * scale);
    state.encoding = true;
    let sent = false;
    try {
      pose.grab.width = width;
      pose.grab.height = height;
      pose.grab.getContext("2d").drawImage(camera, 0, 0, width, height);
      let face = null;
      if (pose.detector) {
        const start = performance.now();
        face = pose.detector.detect(pose.grab)[0] || null; // the largest
        keep(stats.detectMs, performance.now() - start);
      } else {
        face = guideBox(width, height);
      }
      const detected = face ? LpdPose.squareBox(face, pose.scale) : null;
      const box = pose.smoother.update(detected, performance.now() / 1000);
      drawOverlay(width, height, face, box);
      if (!box) {
        setLiveStatus("looking for a face...");
        return;
      }
      const start = performance.now();
      const size = pose.encoder.size;
      const { grab, cropCanvas, scratch } = pose;
      const crop = LpdPose.cropFace(grab, width, height, box, size, cropCanvas, scratch);
      if (!crop) return; // the held box lies outside this frame
      keep(stats.cropMs, performance.now() - start);
      $("pose-crop-preview").getContext("2d").putImageData(crop.image, 0, 0);
      const encoded = await pose.encoder.encode(LpdPose.toPlanarRgb(crop.image.data, size));
      keep(stats.encoderMs, encoded.ms);
      const wire = LpdPose.toFloat16Bytes(encoded.pose);
      if (live !== state || state.ws.readyState !== WebSocket.OPEN) return;
      const seq = state.seq++;
      state.sentAt.set(seq, performance.now());
      state.ws.send(wire);
      sent = true;
      stats.bytes = wire.byteLength;
      $("live-bytes").textContent = `${wire.byteLength} B/frame`;
      $("live-encoder").textContent = `${mean(stats.encoderMs).toFixed(1)} ms`;
      if (!pose.detector) pose.status = "streaming (guide box: keep your face in the square)";
      else pose.status = face ? "streaming" : "no face in this frame: the last box is reused";
      if (paced) {
        state.waiting = true;
        clearTimeout(state.watchdog);
        state.watchdog = setTimeout(() => nextFrame(state), 5000);
      }
    } catch (exc) {
      showError(exc, "Pose mode");
      stopLive("stopped: the pose encoder failed");
    } finally {
      state.encoding = false;
      if (!sent && paced && live === state) setTimeout(() => sendFrame(state), 100);
    }
  }

  function showLiveMode() {
    const pose = $("live-mode").value === "pose";
    $("pose-options").hidden = !pose;
    for (const element of document.querySelectorAll(".pose-stat")) element.hidden = !pose;
    $("live-paste-back").disabled = pose;
    if (pose) $("live-paste-back").checked = false;
  }

  // For tests and the curious (the browser console): the page's own code paths on given input.
  const poseDebug = {
    // Encode one S x S crop (RGB bytes, row-major, HWC) with the page's encoder.
    async encodeCrop(rgb, precision) {
      const encoder = await poseEncoder(precision);
      const size = encoder.size;
      const rgba = new Uint8ClampedArray(4 * size * size);
      for (let i = 0; i < size * size; i++) {
        rgba.set(rgb.slice(3 * i, 3 * i + 3), 4 * i);
        rgba[4 * i + 3] = 255;
      }
      const encoded = await encoder.encode(LpdPose.toPlanarRgb(rgba, size));
      const wire = new Uint8Array(LpdPose.toFloat16Bytes(encoded.pose));
      return { pose: Array.from(encoded.pose), wire: Array.from(wire), ms: encoded.ms };
    },
    // Mean encoder time over `runs` runs on one crop, after one warm-up run.
    async timeEncoder(precision, runs) {
      const encoder = await poseEncoder(precision);
      const planar = new Uint8Array(3 * encoder.size * encoder.size).map((_, i) => (i * 37) % 256);
      await encoder.encode(planar);
      const times = [];
      for (let i = 0; i < runs; i++) times.push((await encoder.encode(planar)).ms);
      return times;
    },
    // Faces in the image at `url` and the page's S x S crop (RGB bytes) of the largest.
    async detectAndCrop(url) {
      const contract = await poseContract();
      const detector = await LpdPose.loadDetector(contract.crop.min_confidence);
      const image = new Image();
      image.src = url;
      await image.decode();
      const canvas = document.createElement("canvas");
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
      canvas.getContext("2d").drawImage(image, 0, 0);
      const faces = detector.detect(canvas);
      if (!faces.length) return { faces, crop: null };
      const box = LpdPose.squareBox(faces[0], contract.crop.scale);
      const size = contract.image_size;
      const crop = LpdPose.cropFace(
        canvas, canvas.width, canvas.height, box, size,
        document.createElement("canvas"), document.createElement("canvas"),
      );
      const rgb = [];
      const pixels = crop.image.data;
      for (let i = 0; i < pixels.length; i += 4) rgb.push(pixels[i], pixels[i + 1], pixels[i + 2]);
      return { faces, window: crop.window, crop: rgb };
    },
    stats() {
      return live && live.pose ? JSON.parse(JSON.stringify(live.pose.stats)) : null;
    },
    // Pretend the cached contract is of another version (as after a server update).
    staleVersion(version) {
      if (poseCache) poseCache.contract = { ...poseCache.contract, version };
    },
  };
  window.lpdPoseDebug = poseDebug;

  // --- wiring --------------------------------------------------------------------------------

  function init() {
    $("api-key").value = apiKey();
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      clearError();
      localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
      checkKey();
    });
    $("forget-key").addEventListener("click", () => {
      localStorage.removeItem(KEY_STORAGE);
      $("api-key").value = "";
      $("key-status").textContent = "forgotten";
    });
    $("avatar-form").addEventListener("submit", createAvatar);
    $("avatar-cancel").addEventListener("click", () => cancelJob("avatar"));
    $("refresh-avatars").addEventListener("click", () => {
      clearError();
      refreshAvatars();
    });
    $("avatar-select").addEventListener("change", showAvatarInfo);
    for (const id of ["driver-source-file", "driver-source-webcam"]) {
      $(id).addEventListener("change", showDriverSource);
    }
    $("record-start").addEventListener("click", startRecording);
    $("record-stop").addEventListener("click", stopRecording);
    for (const id of ["output", "paste-back", "background", "fine-tune"]) {
      $(id).addEventListener("change", syncOptions);
    }
    $("reenact-form").addEventListener("submit", submitReenactment);
    $("reenact-cancel").addEventListener("click", () => cancelJob("reenact"));
    $("live-start").addEventListener("click", startLive);
    $("live-stop").addEventListener("click", () => stopLive());
    $("live-mode").addEventListener("change", showLiveMode);
    syncOptions();
    showDriverSource();
    showLiveMode();
    document.body.dataset.ready = "true";
    if (apiKey()) checkKey();
  }

  init();
})();
