// The pose-only live mode's browser half: the face crop of the service's contract
// (GET /v1/models/pose-encoder), the pose encoder run with onnxruntime-web, and the float16
// wire format. Plain browser JavaScript; the libraries come from this service's /vendor
// (`make web`), never from a CDN. The pure parts (float16, geometry, smoothing) also run
// under Node for the unit tests.
"use strict";

(function (root) {
  // --- float16 (IEEE 754 binary16, round half to even, as numpy's astype(float16)) ---------

  const f32 = new Float32Array(1);
  const u32 = new Uint32Array(f32.buffer);

  // The binary16 bits of `x` rounded to float32 first (ORT's output already is float32).
  function halfBits(x) {
    f32[0] = x;
    const bits = u32[0];
    const sign = (bits >>> 16) & 0x8000;
    const exp = (bits >>> 23) & 0xff;
    const mant = bits & 0x7fffff;
    if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // Inf, or a quiet NaN
    if (exp > 142) return sign | 0x7c00; // >= 2^16: past the largest half (65504)
    if (exp >= 113) {
      // a normal half: 10 of the 23 mantissa bits, the rest rounded; a carry may move
      // the value into the next binade, or to Inf (65520 and up), both correctly encoded
      let half = ((exp - 112) << 10) | (mant >>> 13);
      const rest = mant & 0x1fff;
      if (rest > 0x1000 || (rest === 0x1000 && half & 1)) half += 1;
      return sign | half;
    }
    // a subnormal half (or zero): the value in units of 2^-24
    const shift = 126 - exp;
    if (shift > 24) return sign; // below half the smallest subnormal (ties round to 0)
    const significand = mant | 0x800000;
    let half = significand >>> shift;
    const rest = significand & ((1 << shift) - 1);
    const midpoint = 1 << (shift - 1);
    if (rest > midpoint || (rest === midpoint && half & 1)) half += 1;
    return sign | half;
  }

  // The float value of binary16 `bits` (for display and tests).
  function halfToFloat(bits) {
    const sign = bits & 0x8000 ? -1 : 1;
    const exp = (bits >>> 10) & 0x1f;
    const mant = bits & 0x3ff;
    if (exp === 0) return sign * mant * 2 ** -24;
    if (exp === 0x1f) return mant ? NaN : sign * Infinity;
    return sign * (1 + mant / 1024) * 2 ** (exp - 15);
  }

  // One pose descriptor as the wire's bytes: little-endian float16, 2 bytes a value.
  function toFloat16Bytes(values) {
    const buffer = new ArrayBuffer(2 * values.length);
    const view = new DataView(buffer);
    for (let i = 0; i < values.length; i++) view.setUint16(2 * i, halfBits(values[i]), true);
    return buffer;
  }

  // --- the crop box (media.geometry.Box.square, CropTransform.from_box) ---------------------

  // Python's round(): half to even, so the integer window matches the server's to the pixel.
  function roundHalfEven(x) {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  // A square box about the centre of `box` ({x0, y0, x1, y1}), side = scale x its longer side.
  function squareBox(box, scale) {
    const cx = (box.x0 + box.x1) / 2;
    const cy = (box.y0 + box.y1) / 2;
    const side = Math.max(box.x1 - box.x0, box.y1 - box.y0) * scale;
    return { x0: cx - side / 2, y0: cy - side / 2, x1: cx + side / 2, y1: cy + side / 2 };
  }

  // The integer square window {x0, y0, side} of frame pixels that a crop box covers.
  function cropWindow(box) {
    const side = Math.max(1, roundHalfEven(Math.max(box.x1 - box.x0, box.y1 - box.y0)));
    const cx = (box.x0 + box.x1) / 2;
    const cy = (box.y0 + box.y1) / 2;
    return { x0: roundHalfEven(cx - side / 2), y0: roundHalfEven(cy - side / 2), side };
  }

  // --- smoothing (media.smoothing: One Euro filter over (cx, cy, side)) ---------------------

  const SMOOTHING = { minCutoff: 1.0, beta: 1.0, dCutoff: 1.0, cutThreshold: 0.5, cutScale: 1.5 };

  function alpha(cutoff, dt) {
    const tau = 1 / (2 * Math.PI * cutoff);
    return 1 / (1 + tau / dt);
  }

  class OneEuroFilter {
    constructor(config = SMOOTHING) {
      this.config = config;
      this.reset();
    }

    reset() {
      this.x = null;
      this.dx = null;
      this.t = 0;
    }

    // `x`: an array; `t`: seconds; speed is measured in units of `scale` per second.
    filter(x, t, scale = 1) {
      if (this.x === null || t <= this.t) {
        this.x = x.slice();
        this.dx = x.map(() => 0);
        this.t = t;
        return this.x.slice();
      }
      const cfg = this.config;
      const dt = t - this.t;
      const aD = alpha(cfg.dCutoff, dt);
      this.dx = x.map((v, i) => aD * ((v - this.x[i]) / dt) + (1 - aD) * this.dx[i]);
      const speed = Math.hypot(...this.dx) / scale;
      const a = alpha(cfg.minCutoff + cfg.beta * speed, dt);
      this.x = x.map((v, i) => a * v + (1 - a) * this.x[i]);
      this.t = t;
      return this.x.slice();
    }
  }

  // One detection (or null) per frame in, a box out; misses hold the last box, a jump of
  // more than half a side or a 1.5x size change (a cut) restarts the filter.
  class BoxSmoother {
    constructor(config = SMOOTHING) {
      this.config = config;
      this.filter = new OneEuroFilter(config);
      this.last = null; // [cx, cy, side]
    }

    update(box, t) {
      if (box === null) return this.last === null ? null : fromCenter(this.last);
      const state = [
        (box.x0 + box.x1) / 2,
        (box.y0 + box.y1) / 2,
        Math.max(box.x1 - box.x0, box.y1 - box.y0),
      ];
      if (this.last !== null && this.isCut(state)) this.filter.reset();
      this.last = this.filter.filter(state, t, state[2]);
      return fromCenter(this.last);
    }

    isCut(state) {
      const side = this.last[2];
      const jump = Math.hypot(state[0] - this.last[0], state[1] - this.last[1]) / side;
      const ratio = Math.max(state[2], side) / Math.max(Math.min(state[2], side), 1e-6);
      return jump > this.config.cutThreshold || ratio > this.config.cutScale;
    }
  }

  function fromCenter([cx, cy, side]) {
    return { x0: cx - side / 2, y0: cy - side / 2, x1: cx + side / 2, y1: cy + side / 2 };
  }

  // --- the crop's pixels (media.crop.crop_face) ---------------------------------------------

  const BLUR_SIGMA = 0.016; // x crop side
  const FADE_WIDTH = 0.1; // x crop side

  // Index into [0, n) reflected like OpenCV's BORDER_REFLECT_101 (the edge pixel not doubled).
  function reflect101(i, n) {
    if (n === 1) return 0;
    const period = 2 * (n - 1);
    const k = ((i % period) + period) % period;
    return k < n ? k : period - k;
  }

  // Per-channel median of the frame, from a thumbnail (the server takes the whole frame's).
  function medianColour(source, width, height, scratch) {
    const w = Math.min(64, width);
    const h = Math.max(1, Math.round((height * w) / width));
    scratch.width = w;
    scratch.height = h;
    const ctx = scratch.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(source, 0, 0, width, height, 0, 0, w, h);
    const data = ctx.getImageData(0, 0, w, h).data;
    const median = [];
    for (let c = 0; c < 3; c++) {
      const hist = new Uint32Array(256);
      for (let i = c; i < data.length; i += 4) hist[data[i]] += 1;
      let seen = 0;
      let v = 0;
      while (v < 255 && (seen += hist[v]) < (w * h) / 2) v += 1;
      median.push(v);
    }
    return median;
  }

  // A separable Gaussian of the RGB channels, edges reflected (cv2.GaussianBlur's default).
  function gaussianBlur(rgba, size, sigma) {
    const radius = Math.max(1, Math.ceil(3 * sigma));
    const kernel = [];
    for (let i = -radius; i <= radius; i++) kernel.push(Math.exp(-(i * i) / (2 * sigma * sigma)));
    const sum = kernel.reduce((a, b) => a + b, 0);
    const tmp = new Float32Array(size * size * 3);
    const out = new Float32Array(size * size * 3);
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        for (let c = 0; c < 3; c++) {
          let acc = 0;
          for (let k = -radius; k <= radius; k++) {
            acc += kernel[k + radius] * rgba[4 * (y * size + reflect101(x + k, size)) + c];
          }
          tmp[3 * (y * size + x) + c] = acc / sum;
        }
      }
    }
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        for (let c = 0; c < 3; c++) {
          let acc = 0;
          for (let k = -radius; k <= radius; k++) {
            acc += kernel[k + radius] * tmp[3 * (reflect101(y + k, size) * size + x) + c];
          }
          out[3 * (y * size + x) + c] = acc / sum;
        }
      }
    }
    return out;
  }

  // The S x S RGBA crop of `source` (a canvas, video or image of width x height) for the crop
  // box `box`: the integer square window, resized; parts outside the frame are mirrored,
  // blurred and faded to the frame's median colour, at output resolution (the server mirrors
  // at input resolution, then resizes: the same up to a pixel at the frame's edge).
  function cropFace(source, width, height, box, size, canvas, scratch) {
    const win = cropWindow(box);
    const scale = win.side / size; // frame pixels per crop pixel
    const sx0 = Math.max(0, win.x0);
    const sy0 = Math.max(0, win.y0);
    const sx1 = Math.min(width, win.x0 + win.side);
    const sy1 = Math.min(height, win.y0 + win.side);
    if (sx1 - sx0 <= 0 || sy1 - sy0 <= 0) return null; // the window lies outside the frame
    const pads = [sx0 - win.x0, sy0 - win.y0, win.x0 + win.side - sx1, win.y0 + win.side - sy1];
    canvas.width = size;
    canvas.height = size;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    if (!pads.some((p) => p > 0)) {
      ctx.drawImage(source, win.x0, win.y0, win.side, win.side, 0, 0, size, size);
      return { image: ctx.getImageData(0, 0, size, size), window: win };
    }
    // The frame's part, on whole output pixels, then mirrored outwards.
    const [l, t, r, b] = pads.map((p) => Math.min(size - 1, Math.round(p / scale)));
    const inW = Math.max(1, size - l - r);
    const inH = Math.max(1, size - t - b);
    ctx.clearRect(0, 0, size, size);
    ctx.drawImage(source, sx0, sy0, sx1 - sx0, sy1 - sy0, l, t, inW, inH);
    const image = ctx.getImageData(0, 0, size, size);
    const px = image.data;
    const copy = new Uint8ClampedArray(px);
    for (let y = 0; y < size; y++) {
      const sy = t + reflect101(y - t, inH);
      for (let x = 0; x < size; x++) {
        if (x >= l && x < l + inW && y >= t && y < t + inH) continue;
        const sx = l + reflect101(x - l, inW);
        const from = 4 * (sy * size + sx);
        const to = 4 * (y * size + x);
        px[to] = copy[from];
        px[to + 1] = copy[from + 1];
        px[to + 2] = copy[from + 2];
        px[to + 3] = 255;
      }
    }
    const median = medianColour(source, width, height, scratch);
    const blurred = gaussianBlur(px, size, BLUR_SIGMA * size);
    const [left, top, right, bottom] = pads.map((p) => p / scale);
    for (let y = 0; y < size; y++) {
      const cy = y + 0.5;
      const dy = Math.max(top - cy, cy - (size - bottom), 0);
      for (let x = 0; x < size; x++) {
        const cx = x + 0.5;
        const dist = Math.max(Math.max(left - cx, cx - (size - right), 0), dy);
        if (dist <= 0) continue;
        const fade = Math.min(1, dist / (FADE_WIDTH * size));
        const i = y * size + x;
        for (let c = 0; c < 3; c++) {
          px[4 * i + c] = Math.round((1 - fade) * blurred[3 * i + c] + fade * median[c]);
        }
      }
    }
    ctx.putImageData(image, 0, 0);
    return { image, window: win };
  }

  // RGBA pixels (S x S) -> the encoder's FRAMES input: uint8 planar RGB (3, S, S).
  function toPlanarRgb(rgba, size) {
    const plane = size * size;
    const out = new Uint8Array(3 * plane);
    for (let i = 0; i < plane; i++) {
      out[i] = rgba[4 * i];
      out[plane + i] = rgba[4 * i + 1];
      out[2 * plane + i] = rgba[4 * i + 2];
    }
    return out;
  }

  // --- the libraries, from /vendor ----------------------------------------------------------

  let vendor = null; // the promise of /vendor/manifest.json
  let ortModule = null;
  let detectorPromise = null;

  class VendorMissing extends Error {}

  // The manifest `make web` writes; a clear error when the files were never built.
  function loadVendor() {
    vendor =
      vendor ||
      fetch("/vendor/manifest.json").then(async (response) => {
        if (response.ok) return response.json();
        vendor = null;
        let message = `the browser libraries are missing (${response.status})`;
        try {
          const body = await response.json();
          if (body.error) message = `${body.error.code}: ${body.error.message}`;
        } catch (_) {
          // not JSON
        }
        throw new VendorMissing(message);
      });
    return vendor;
  }

  async function loadOrt() {
    if (ortModule) return ortModule;
    const manifest = await loadVendor();
    const ort = await import(manifest.ort);
    // Single-threaded wasm: no SharedArrayBuffer, so no cross-origin isolation headers.
    ort.env.wasm.numThreads = 1;
    ort.env.wasm.proxy = false;
    ort.env.wasm.wasmPaths = manifest.ort_wasm;
    ortModule = ort;
    return ort;
  }

  // A pose encoder over the ONNX `bytes` of the contract (FRAMES uint8 -> POSE float32).
  async function createEncoder(bytes, contract) {
    const ort = await loadOrt();
    const session = await ort.InferenceSession.create(bytes, {
      executionProviders: ["wasm"],
      graphOptimizationLevel: "all",
    });
    const size = contract.image_size;
    const inputName = contract.input.name;
    const outputName = contract.output.name;
    return {
      size,
      dim: contract.pose_dim,
      // One crop (uint8 planar RGB, 3 x S x S) -> {pose: Float32Array(D), ms}.
      async encode(planar) {
        const start = performance.now();
        const feeds = { [inputName]: new ort.Tensor("uint8", planar, [1, 3, size, size]) };
        const result = await session.run(feeds);
        const pose = result[outputName].data;
        return { pose: Float32Array.from(pose), ms: performance.now() - start };
      },
      release() {
        return session.release();
      },
    };
  }

  // mediapipe's BlazeFace (short range) in tasks-vision; boxes in source pixels.
  function loadDetector(minConfidence = 0.5) {
    detectorPromise =
      detectorPromise ||
      (async () => {
        const manifest = await loadVendor();
        const vision = await import(manifest.tasks_vision);
        const files = await vision.FilesetResolver.forVisionTasks(manifest.tasks_vision_wasm);
        const detector = await vision.FaceDetector.createFromOptions(files, {
          baseOptions: { modelAssetPath: manifest.face_model, delegate: "CPU" },
          runningMode: "IMAGE",
          minDetectionConfidence: minConfidence,
        });
        return {
          // All faces in `source`, largest first: [{x0, y0, x1, y1, score}].
          detect(source) {
            const found = detector.detect(source).detections || [];
            return found
              .map((d) => ({
                x0: d.boundingBox.originX,
                y0: d.boundingBox.originY,
                x1: d.boundingBox.originX + d.boundingBox.width,
                y1: d.boundingBox.originY + d.boundingBox.height,
                score: d.categories && d.categories.length ? d.categories[0].score : 0,
              }))
              .sort((a, b) => (b.x1 - b.x0) * (b.y1 - b.y0) - (a.x1 - a.x0) * (a.y1 - a.y0));
          },
        };
      })().catch((exc) => {
        detectorPromise = null;
        throw exc;
      });
    return detectorPromise;
  }

  root.LpdPose = {
    halfBits,
    halfToFloat,
    toFloat16Bytes,
    roundHalfEven,
    squareBox,
    cropWindow,
    OneEuroFilter,
    BoxSmoother,
    reflect101,
    cropFace,
    toPlanarRgb,
    loadVendor,
    loadOrt,
    createEncoder,
    loadDetector,
    VendorMissing,
  };
})(globalThis);
