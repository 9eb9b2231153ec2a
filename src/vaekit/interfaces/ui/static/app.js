// vaekit workbench: plain JavaScript over the server's own API (same origin; the token, if any, is a cookie).
"use strict";

const $ = (id) => document.getElementById(id);
let library = [];

function options() {
  return new URLSearchParams({ vae: $("vae").value, precision: $("precision").value, tiling: $("tiling").value });
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// A progress bar: determinate (fraction) or busy (indeterminate, with elapsed seconds).
function progress(id) {
  const el = $(id);
  const bar = el.querySelector(".bar");
  const label = el.querySelector(".label");
  let timer = null;
  return {
    set(fraction, text) {
      el.classList.add("on");
      el.classList.remove("busy");
      clearInterval(timer);
      bar.style.width = `${Math.round(fraction * 100)}%`;
      label.textContent = text;
    },
    busy(text) {
      el.classList.add("on", "busy");
      const start = performance.now();
      clearInterval(timer);
      const tick = () => { label.textContent = `${text} ${((performance.now() - start) / 1000).toFixed(1)} s`; };
      tick();
      timer = setInterval(tick, 100);
    },
    done(text) { this.set(1, text); },
    fail() { clearInterval(timer); el.classList.remove("on", "busy"); },
  };
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error || JSON.stringify(body)}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

// POST a form with upload progress (XMLHttpRequest reports it; fetch does not), then wait for the answer.
function postForm(url, form, bar, what) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) bar.set(0.3 * e.loaded / e.total, `uploading ${Math.round(100 * e.loaded / e.total)}%`);
    };
    xhr.upload.onload = () => bar.busy(`${what} on the server…`);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(xhr.response);
      else reject(new Error(`${xhr.status}: ${(xhr.response && xhr.response.error) || xhr.statusText}`));
    };
    xhr.onerror = () => reject(new Error("the server cannot be reached"));
    xhr.send(form);
  });
}

function fileForm(fields) {
  const form = new FormData();
  for (const [name, input] of Object.entries(fields)) form.append(name, input.files[0]);
  return form;
}

// --- the VAE dropdown --------------------------------------------------------------------------------------------
async function loadLibrary() {
  const response = await fetch("/vaes");
  if (!response.ok) { showError(await errorText(response)); return; }
  const data = await response.json();
  library = data.vaes;
  const select = $("vae");
  select.innerHTML = "";
  for (const v of library) {
    const option = new Option(`${v.id} (${v.family}, ${v.short_hash})`, v.id);
    select.add(option);
  }
  if (data.selected) select.value = data.selected;
  describeVae();
  const checks = $("cmp-vaes");
  checks.innerHTML = "";
  for (const v of library) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    Object.assign(box, { type: "checkbox", value: v.id, checked: true });
    label.append(box, ` ${v.id}`);
    checks.append(label);
  }
  if (!library.length) showError("The VAE library is empty: put VAE files in the library folder and reload.");
}

function describeVae() {
  const v = library.find((x) => x.id === $("vae").value);
  $("vae-info").textContent = v ? `${v.kind}, ${v.latent_channels} latent channels, sha256 ${v.short_hash}` : "";
}

async function selectVae() {
  describeVae();
  const response = await fetch("/vaes/select", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ vae: $("vae").value }),
  });
  showError(response.ok ? "" : await errorText(response));
}

// --- round trip --------------------------------------------------------------------------------------------------
const fmt = (v, digits) => (v == null ? "–" : v.toFixed(digits));

function metricRows(tbody, rows) {
  tbody.innerHTML = "";
  for (const [name, value] of rows) {
    const tr = tbody.insertRow();
    tr.insertCell().textContent = name;
    tr.insertCell().textContent = value;
  }
}

async function runRoundtrip() {
  const bar = progress("rt-progress");
  const file = $("rt-file").files[0];
  showError("");
  $("rt-run").disabled = true;
  $("rt-original").src = URL.createObjectURL(file);
  try {
    const data = await postForm(`/roundtrip?${options()}&format=json`, fileForm({ file: $("rt-file") }), bar, "encoding and decoding");
    $("rt-recon").src = data.images.reconstruction;
    $("rt-diff").src = data.images.difference;
    const m = data.metrics;
    metricRows($("rt-metrics").tBodies[0], [
      ["VAE", `${data.vae} (${data.family}, ${data.dtype})`],
      ["PSNR", `${m.psnr.toFixed(2)} dB`],
      ["SSIM", m.ssim.toFixed(4)],
      ["MS-SSIM", fmt(m.ms_ssim, 4)],
      ["saturation ratio", fmt(m.saturation_ratio, 3)],
      ["colourfulness change", m.colourfulness_change == null ? "–" : `${m.colourfulness_change.toFixed(1)} %`],
      ["colour shift (ΔE00)", fmt(m.delta_e, 2)],
      ["mean abs. error", m.mae.toFixed(4)],
      ["image", `${data.image_size[0]}×${data.image_size[1]}`],
      ["latent", data.latent_shape.join("×")],
      ["time", `${data.seconds.toFixed(2)} s`],
      ...(m.flags.length ? [["warning", m.flags.join("; ")]] : []),
      ...(data.notes.length ? [["notes", data.notes.join("; ")]] : []),
    ]);
    $("rt-metrics").hidden = false;
    bar.done(`done in ${data.seconds.toFixed(2)} s`);
  } catch (e) {
    bar.fail();
    showError(e.message);
  } finally {
    $("rt-run").disabled = false;
  }
}

// --- latent channels ---------------------------------------------------------------------------------------------
async function runChannels() {
  const bar = progress("ch-progress");
  showError("");
  $("ch-run").disabled = true;
  try {
    const data = await postForm(`/latents/channels?${options()}`, fileForm({ file: $("ch-file") }), bar, "encoding");
    $("ch-shape").textContent = `latent ${data.shape.join("×")} from ${data.vae} (${data.family}); each channel normalised to its own range`;
    const grid = $("ch-grid");
    grid.innerHTML = "";
    for (const c of data.channels) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = c.image;
      const cap = document.createElement("figcaption");
      cap.textContent = `channel ${c.channel}: mean ${c.mean.toFixed(3)}, std ${c.std.toFixed(3)}, ` +
        `min ${c.min.toFixed(2)}, max ${c.max.toFixed(2)}`;
      fig.append(img, cap);
      grid.append(fig);
    }
    bar.done(`${data.channels.length} channels`);
  } catch (e) {
    bar.fail();
    showError(e.message);
  } finally {
    $("ch-run").disabled = false;
  }
}

// --- interpolation: frames stream in as NDJSON events, each one moves the progress bar ---------------------------
async function runInterpolate() {
  const bar = progress("ip-progress");
  showError("");
  $("ip-run").disabled = true;
  const strip = $("ip-strip");
  strip.innerHTML = "";
  const frames = [];
  const params = options();
  params.set("steps", $("ip-steps").value);
  params.set("method", $("ip-method").value);
  params.set("resize", $("ip-resize").checked);
  bar.busy("uploading and encoding both images…");
  try {
    const response = await fetch(`/interpolate?${params}`, { method: "POST", body: fileForm({ a: $("ip-a"), b: $("ip-b") }) });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
        if (event.event === "start") {
          for (let i = 0; i < event.total; i++) strip.append(document.createElement("img"));
          bar.set(0, `decoding 0 / ${event.total} frames`);
        } else if (event.event === "frame") {
          frames[event.index] = event.image;
          strip.children[event.index].src = event.image;
          bar.set(event.done / event.total, `decoding ${event.done} / ${event.total} frames`);
        } else if (event.event === "done") {
          bar.done(`${frames.length} frames in ${event.seconds.toFixed(2)} s`);
        } else if (event.event === "error") {
          throw new Error(event.error);
        }
      }
    }
    const slider = $("ip-slider");
    slider.max = frames.length - 1;
    slider.value = 0;
    slider.oninput = () => { $("ip-view").src = frames[slider.value]; };
    $("ip-view").src = frames[0];
    document.querySelector(".scrub").hidden = false;
  } catch (e) {
    bar.fail();
    showError(e.message);
  } finally {
    $("ip-run").disabled = false;
  }
}

// --- compare -----------------------------------------------------------------------------------------------------
async function runCompare() {
  const bar = progress("cmp-progress");
  showError("");
  const chosen = [...document.querySelectorAll("#cmp-vaes input:checked")].map((c) => c.value);
  if (!chosen.length) { showError("tick at least one VAE"); return; }
  $("cmp-run").disabled = true;
  const params = options();
  params.delete("vae");
  params.set("vaes", chosen.join(","));
  try {
    const data = await postForm(`/compare?${params}`, fileForm({ file: $("cmp-file") }), bar, `round trips through ${chosen.length} VAEs`);
    const tbody = $("cmp-table").tBodies[0];
    tbody.innerHTML = "";
    for (const r of data.results) {
      const tr = tbody.insertRow();
      if (r.vae === data.best) tr.className = "best";
      const cells = [r.vae, r.family, r.psnr.toFixed(2), r.ssim.toFixed(4), fmt(r.ms_ssim, 4),
        fmt(r.saturation_ratio, 3), fmt(r.delta_e, 2), r.seconds.toFixed(2), r.flags.join("; ") || "–"];
      for (const v of cells) {
        tr.insertCell().textContent = v;
      }
    }
    $("cmp-table").hidden = false;
    bar.done(`best: ${data.best}`);
  } catch (e) {
    bar.fail();
    showError(e.message);
  } finally {
    $("cmp-run").disabled = false;
  }
}

// --- wiring ------------------------------------------------------------------------------------------------------
function enableWhenChosen(button, inputs) {
  const update = () => { $(button).disabled = !inputs.every((id) => $(id).files.length); };
  for (const id of inputs) $(id).addEventListener("change", update);
  update();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll("nav .tab")) {
    tab.addEventListener("click", () => {
      document.querySelectorAll("nav .tab, .panel").forEach((el) => el.classList.remove("active"));
      tab.classList.add("active");
      $(tab.dataset.tab).classList.add("active");
    });
  }
  $("vae").addEventListener("change", selectVae);
  enableWhenChosen("rt-run", ["rt-file"]);
  enableWhenChosen("ch-run", ["ch-file"]);
  enableWhenChosen("ip-run", ["ip-a", "ip-b"]);
  enableWhenChosen("cmp-run", ["cmp-file"]);
  $("rt-run").addEventListener("click", runRoundtrip);
  $("ch-run").addEventListener("click", runChannels);
  $("ip-run").addEventListener("click", runInterpolate);
  $("cmp-run").addEventListener("click", runCompare);
  loadLibrary();
});
