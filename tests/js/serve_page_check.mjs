// The page megactor-rt serve answers GET / with, run in jsdom (a browser's DOM in node) against a live server:
// it shows the model, posts a form with a portrait and a driver, and shows the result and a link to save it.
// Run by tests/test_server.py where MEGACTOR_JSDOM names a folder holding node_modules/jsdom (npm install jsdom@24).
// Prints one JSON line: {"model", "warning_hidden", "status", "status_class", "result", "seen": the status lines,
// and with a TOKEN: "asked": the status and whether the token's field showed before the token was entered}.
// Usage: node serve_page_check.mjs URL PORTRAIT DRIVER [TOKEN]
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.MEGACTOR_JSDOM, "node_modules"));
const { JSDOM } = require("jsdom");
const base = process.argv[2];
const chosen = {}; // field -> the file "chosen" in its input
const html = await (await fetch(base + "/")).text();
const dom = new JSDOM(html, { url: base + "/", runScripts: "outside-only", pretendToBeVisual: true });
const w = dom.window;
// the page's script runs in the window, with node's fetch (URLs resolved against the page); jsdom's FormData gives
// a file input's value as text, so the form is sent again as node's FormData with the chosen files
w.fetch = (url, init) => {
  const target = new URL(url, base + "/").href;
  if (init && init.body instanceof w.FormData) {
    const fd = new FormData();
    for (const [k, v] of init.body.entries()) {
      if (chosen[k]) fd.append(k, new Blob([fs.readFileSync(chosen[k])]), path.basename(chosen[k]));
      else fd.append(k, typeof v === "string" ? v : "");
    }
    init = { ...init, body: fd };
  }
  return fetch(target, init);
};
w.URL.createObjectURL = () => "blob:x";
w.URL.revokeObjectURL = () => {};
const script = html.match(/<script>([\s\S]*)<\/script>/)[1];
w.eval(script);
await new Promise((r) => setTimeout(r, 500));
const doc = w.document;
let asked = null; // a server that asks for a token: what the page shows before it is entered
if (process.argv[5]) {
  asked = { status: doc.getElementById("status").textContent, login_hidden: doc.getElementById("login").hidden };
  doc.getElementById("token").value = process.argv[5];
  doc.getElementById("use-token").dispatchEvent(new w.Event("click"));
  await new Promise((r) => setTimeout(r, 500));
}
chosen.portrait = process.argv[3];
chosen.driver = process.argv[4];
doc.querySelector("select[name=format]").value = "gif";
doc.querySelector("input[name=duration]").value = "0.2";
doc.getElementById("form").dispatchEvent(new w.Event("submit", { cancelable: true }));
const seen = []; // the status lines shown while it runs
for (let i = 0; i === 0 || (i < 1200 && doc.getElementById("go").disabled); i++) {
  const now = doc.getElementById("status").textContent;
  if (seen[seen.length - 1] !== now) seen.push(now);
  await new Promise((r) => setTimeout(r, 100));
}
await new Promise((r) => setTimeout(r, 500));
console.log(JSON.stringify({
  model: doc.getElementById("model").textContent, warning_hidden: doc.getElementById("warning").hidden,
  status: doc.getElementById("status").textContent, status_class: doc.getElementById("status").className,
  result: doc.getElementById("result").innerHTML, seen, asked,
}));
