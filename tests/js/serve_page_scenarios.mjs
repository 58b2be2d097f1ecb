// The page megactor-rt serve answers GET / with, run in jsdom against a live server as serve_page_check.mjs runs it,
// through what a browser meets besides a plain run (SCENARIO):
//   outage: the server does not answer three questions about the job (a network error, a proxy's 502, a network
//     error again: a server restarting on its --jobs-dir); the page asks again and shows the result
//   name: the portrait's file name is not ASCII; the link saves the result under its UTF-8 name
//   too_big: the files are over the server's --max-upload-mb; the page says so and sends nothing
//   down: the server does not answer the page's first question (its model); the page says so and sends nothing
//   no_sound: a sound file chosen (1 GiB, as the page sees it: over --max-upload-mb with the others), then "no
//     sound" ticked; the form goes without the file, not refused for its size, and the run is made
//   cancel: the whole driver asked for, and Cancel clicked as soon as it shows; the page says the run was cancelled
//   refused: a start time that is not one; the page shows the server's 400
// Prints one JSON line: {"status", "status_class", "result", "seen": the status lines, "posts": the forms sent,
// "download": the save link's file name (none: null), "stop_hidden": whether Cancel is hidden at the end}.
// Usage: node serve_page_scenarios.mjs URL PORTRAIT DRIVER SCENARIO
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.MEGACTOR_JSDOM, "node_modules"));
const { JSDOM } = require("jsdom");
const [base, portrait, driver, scenario] = process.argv.slice(2);
const chosen = { portrait, driver, ...(scenario === "no_sound" ? { audio: driver } : {}) }; // field -> its file
const html = await (await fetch(base + "/")).text();
const dom = new JSDOM(html, { url: base + "/", runScripts: "outside-only", pretendToBeVisual: true });
const w = dom.window;
let posts = 0, polls = 0;
w.fetch = (url, init) => {
  const target = new URL(url, base + "/").href;
  if (init && init.body instanceof w.FormData) {
    posts += 1;
    const fd = new FormData();
    for (const [k, v] of init.body.entries()) {
      if (chosen[k] && typeof v !== "string") {
        fd.append(k, new Blob([fs.readFileSync(chosen[k])]), path.basename(chosen[k]));
      } else {
        fd.append(k, typeof v === "string" ? v : "");
      }
    }
    init = { ...init, body: fd };
  }
  if (scenario === "down" && target.endsWith("/health")) return Promise.reject(new TypeError("fetch failed"));
  if (scenario === "outage" && /\/jobs\/[0-9a-f]+$/.test(target) && !(init && init.method)) {
    polls += 1; // (the first three questions about the job: no answer, a proxy's 502, no answer)
    if (polls === 1 || polls === 3) return Promise.reject(new TypeError("fetch failed"));
    if (polls === 2) return Promise.resolve(new Response("", { status: 502, statusText: "Bad Gateway" }));
  }
  return fetch(target, init);
};
w.URL.createObjectURL = () => "blob:x";
w.URL.revokeObjectURL = () => {};
w.eval(html.match(/<script>([\s\S]*)<\/script>/)[1]);
await new Promise((r) => setTimeout(r, 500));
const doc = w.document;
for (const [name, file] of Object.entries(chosen)) { // (the files as a browser's inputs hold them: name and size)
  const size = scenario === "too_big" || (scenario === "no_sound" && name === "audio") ? 1 << 30
    : fs.statSync(file).size;
  Object.defineProperty(doc.querySelector(`input[name=${name}][type=file]`), "files",
    { value: [{ name: path.basename(file), size }] });
}
const before = doc.getElementById("status").textContent; // (what the page shows before a form is sent)
if (scenario === "down") {
  console.log(JSON.stringify({ status: before, status_class: doc.getElementById("status").className, posts }));
  process.exit(0);
}
if (scenario === "no_sound") {
  const box = doc.querySelector("input[type=checkbox][name=audio]");
  box.checked = true;
  box.dispatchEvent(new w.Event("change"));
}
doc.querySelector("select[name=format]").value = "gif";
doc.querySelector("input[name=duration]").value = scenario === "cancel" ? "" : "0.2";
if (scenario === "refused") doc.querySelector("input[name=start]").value = "soon";
doc.getElementById("form").dispatchEvent(new w.Event("submit", { cancelable: true }));
const seen = [];
for (let i = 0; i === 0 || (i < 1200 && doc.getElementById("go").disabled); i++) {
  const now = doc.getElementById("status").textContent;
  if (seen[seen.length - 1] !== now) seen.push(now);
  const stop = doc.getElementById("stop");
  if (scenario === "cancel" && !stop.hidden && !stop.dataset.clicked) {
    stop.dataset.clicked = "yes";
    stop.dispatchEvent(new w.Event("click"));
  }
  await new Promise((r) => setTimeout(r, 100));
}
await new Promise((r) => setTimeout(r, 500));
const link = doc.querySelector("#result a");
console.log(JSON.stringify({
  status: doc.getElementById("status").textContent, status_class: doc.getElementById("status").className,
  result: doc.getElementById("result").innerHTML, seen, posts, download: link ? link.download : null,
  stop_hidden: doc.getElementById("stop").hidden,
}));
