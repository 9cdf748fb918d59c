// Copies the demo page's browser libraries out of node_modules (installed by `npm ci` at the
// versions package-lock.json pins) into web/dist, which the API serves at /vendor: nothing is
// fetched from a CDN at run time. Run by `make web`:
//
//   node web/build.mjs --face-model PATH/face_detection_short_range.tflite
//
// The face detector model is mediapipe's BlazeFace (short range), taken from the mediapipe
// Python wheel the workers already use, so no model file is downloaded either.
import { copyFileSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const MODULES = join(HERE, "node_modules");
const DIST = join(HERE, "dist");
const FACE_MODEL = "face_detection_short_range.tflite";

// [package, file inside the package, folder inside dist]
const FILES = [
  // The wasm-only build (CPU); it loads the two files next to it via env.wasm.wasmPaths.
  ["onnxruntime-web", "dist/ort.wasm.min.mjs", "ort"],
  ["onnxruntime-web", "dist/ort-wasm-simd-threaded.mjs", "ort"],
  ["onnxruntime-web", "dist/ort-wasm-simd-threaded.wasm", "ort"],
  ["@mediapipe/tasks-vision", "vision_bundle.mjs", "tasks-vision"],
  ["@mediapipe/tasks-vision", "wasm/vision_wasm_internal.js", "tasks-vision/wasm"],
  ["@mediapipe/tasks-vision", "wasm/vision_wasm_internal.wasm", "tasks-vision/wasm"],
  ["@mediapipe/tasks-vision", "wasm/vision_wasm_nosimd_internal.js", "tasks-vision/wasm"],
  ["@mediapipe/tasks-vision", "wasm/vision_wasm_nosimd_internal.wasm", "tasks-vision/wasm"],
];

function fail(message) {
  console.error(`web/build.mjs: ${message}`);
  process.exit(1);
}

function faceModelArg(argv) {
  const at = argv.indexOf("--face-model");
  if (at < 0 || !argv[at + 1]) fail("usage: node web/build.mjs --face-model PATH");
  return argv[at + 1];
}

function version(pkg) {
  const manifest = join(MODULES, pkg, "package.json");
  try {
    return JSON.parse(readFileSync(manifest, "utf8")).version;
  } catch {
    return fail(`${pkg} is not installed in web/node_modules: run \`npm ci --prefix web\` first`);
  }
}

const faceModel = faceModelArg(process.argv.slice(2));
try {
  statSync(faceModel);
} catch {
  fail(`face detector model not found: ${faceModel}`);
}
const versions = {};
for (const [pkg] of FILES) versions[pkg] = version(pkg);

rmSync(DIST, { recursive: true, force: true });
let bytes = 0;
for (const [pkg, file, folder] of FILES) {
  const to = join(DIST, folder);
  mkdirSync(to, { recursive: true });
  const target = join(to, file.split("/").pop());
  copyFileSync(join(MODULES, pkg, file), target);
  bytes += statSync(target).size;
}
mkdirSync(join(DIST, "models"), { recursive: true });
copyFileSync(faceModel, join(DIST, "models", FACE_MODEL));
bytes += statSync(faceModel).size;
// The page reads this first: it says the vendor files are there, and which versions.
const manifest = {
  versions,
  ort: "/vendor/ort/ort.wasm.min.mjs",
  ort_wasm: "/vendor/ort/",
  tasks_vision: "/vendor/tasks-vision/vision_bundle.mjs",
  tasks_vision_wasm: "/vendor/tasks-vision/wasm",
  face_model: `/vendor/models/${FACE_MODEL}`,
};
writeFileSync(join(DIST, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n");
const mib = (bytes / 2 ** 20).toFixed(1);
console.log(`web/dist: ${FILES.length + 1} files, ${mib} MiB (${JSON.stringify(versions)})`);
