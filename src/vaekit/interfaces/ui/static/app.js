// vaekit workbench: plain JavaScript over the server's own API (same origin; the token, if any, is a cookie).
"use strict";

const $ = (id) => document.getElementById(id);
let library = [];
let limits = { max_interpolation_steps: 32 };

function options() {
  return new URLSearchParams({ vae: $("vae").value, precision: $("precision").value, tiling: $("tiling").value });
}

// --- errors: each view has its own box, right under its controls, scrolled into view ------------------------------
function showError(message, box = "error") {
  const el = $(box);
  el.textContent = message || "";
  el.hidden = !message;
  if (message) el.scrollIntoView({ block: "nearest" });
}

// An error answer in plain words: the server's own message for what the user can change, never library internals.
function explain(status, message) {
  if (status === 0) return "The server cannot be reached: is `vaekit serve` still running?";
  if (status >= 500 && status !== 503 && status !== 504) {
    return "The server failed on this request (an internal error); its log has the details.";
  }
  const text = (message || "").replace(/^\d{3}: /, "");
  if (status === 503) return `The server is busy: ${text || "try again in a moment"}.`;
  if (status === 504) return `The server took too long: ${text || "the request timed out"}.`;
  if (status === 413) return `Too large for this server: ${text}`;
  if (status === 415) return `Not a supported file: ${text}`;
  if (status === 401) return "This server needs its API token: open the page as /?token=YOUR_TOKEN.";
  if (status === 403) return `Refused by the server: ${text}`;
  return text || `The request failed (HTTP ${status}).`;
}

class RequestError extends Error {
  constructor(status, message) {
    super(explain(status, message));
    this.status = status;
  }
}

// A progress bar: determinate (fraction) or busy (indeterminate, with elapsed seconds); a progressbar for readers.
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
      el.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
      el.setAttribute("aria-valuetext", text);
    },
    busy(text) {
      el.classList.add("on", "busy");
      el.removeAttribute("aria-valuenow");
      el.setAttribute("aria-valuetext", text);
      const start = performance.now();
      clearInterval(timer);
      const tick = () => { label.textContent = `${text} ${((performance.now() - start) / 1000).toFixed(1)} s`; };
      tick();
      timer = setInterval(tick, 100);
    },
    done(text) { this.set(1, text); },
    fail() {
      clearInterval(timer);
      el.classList.remove("on", "busy");
      el.removeAttribute("aria-valuenow");
      el.removeAttribute("aria-valuetext");
    },
  };
}

async function errorFrom(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    message = body.error || JSON.stringify(body);
  } catch (e) { /* not JSON: the status says enough */ }
  return new RequestError(response.status, message);
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
      else reject(new RequestError(xhr.status, (xhr.response && xhr.response.error) || xhr.statusText));
    };
    xhr.onerror = () => reject(new RequestError(0, ""));
    xhr.send(form);
  });
}

function fileForm(fields) {
  const form = new FormData();
  for (const [name, input] of Object.entries(fields)) form.append(name, input.files[0]);
  return form;
}

function setImage(img, src, alt) {
  img.src = src;
  img.alt = alt;
}

function clearImage(img) {
  img.removeAttribute("src");
  img.alt = "";
}

// --- the VAE dropdown --------------------------------------------------------------------------------------------
async function loadLibrary() {
  const response = await fetch("/vaes");
  if (!response.ok) { showError((await errorFrom(response)).message); return; }
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
  checks.querySelectorAll("label").forEach((l) => l.remove());
  for (const v of library) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    Object.assign(box, { type: "checkbox", value: v.id, checked: true });
    label.append(box, ` ${v.id}`);
    checks.append(label);
  }
  if (!library.length) showError("The VAE library is empty: put VAE files in the library folder and reload.");
}

async function loadLimits() {
  try {
    const response = await fetch("/health");
    if (!response.ok) return;
    const data = await response.json();
    if (data.limits) limits = data.limits;
    $("ip-steps").max = String(limits.max_interpolation_steps);
  } catch (e) { /* the defaults stand */ }
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
  showError(response.ok ? "" : (await errorFrom(response)).message);
}

// --- round trip --------------------------------------------------------------------------------------------------
const fmt = (v, digits) => (v == null ? "–" : v.toFixed(digits));

function metricRows(tbody, rows) {
  tbody.innerHTML = "";
  for (const [name, value] of rows) {
    const tr = tbody.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = name;
    tr.append(th);
    tr.insertCell().textContent = value;
  }
}

function clearRoundtrip() {
  $("rt-images").hidden = true;
  $("rt-metrics").hidden = true;
  $("rt-metrics").tBodies[0].innerHTML = "";
  for (const id of ["rt-original", "rt-recon", "rt-diff"]) clearImage($(id));
}

async function runRoundtrip() {
  const bar = progress("rt-progress");
  const file = $("rt-file").files[0];
  showError("", "rt-error");
  clearRoundtrip();  // nothing of an earlier run stays beside the new image
  $("rt-run").disabled = true;
  try {
    const data = await postForm(`/roundtrip?${options()}&format=json`, fileForm({ file: $("rt-file") }), bar, "encoding and decoding");
    setImage($("rt-original"), URL.createObjectURL(file), `Original: ${file.name}`);
    setImage($("rt-recon"), data.images.reconstruction, `Reconstruction of ${file.name} by ${data.vae}`);
    setImage($("rt-diff"), data.images.difference, `Difference heat map between the original and the reconstruction by ${data.vae}`);
    const m = data.metrics;
    metricRows($("rt-metrics").tBodies[0], [
      ["VAE", `${data.vae} (${data.family}, ${data.dtype})`],
      ["PSNR", `${m.psnr.toFixed(2)} dB`],
      ["SSIM", m.ssim == null ? "– (image too small)" : m.ssim.toFixed(4)],
      ["MS-SSIM", fmt(m.ms_ssim, 4)],
      ["saturation ratio", fmt(m.saturation_ratio, 3)],
      ["colourfulness change", m.colourfulness_change == null ? "–" : `${m.colourfulness_change.toFixed(1)} %`],
      ["colour shift (ΔE00)", fmt(m.delta_e, 2)],
      ["mean abs. error", m.mae.toFixed(4)],
      ["image", `${data.image_size[0]}×${data.image_size[1]}`],
      ["latent", data.latent_shape.join("×")],
      ["time", `${data.compute_seconds.toFixed(2)} s computing, ${data.seconds.toFixed(2)} s in all`],
      ...(m.flags.length ? [["warning", m.flags.join("; ")]] : []),
      ...(data.notes.length ? [["notes", data.notes.join("; ")]] : []),
    ]);
    $("rt-images").hidden = false;
    $("rt-metrics").hidden = false;
    bar.done(`done in ${data.seconds.toFixed(2)} s`);
  } catch (e) {
    bar.fail();
    showError(`Round trip failed. ${e.message}`, "rt-error");
  } finally {
    $("rt-run").disabled = false;
  }
}

// --- latent channels ---------------------------------------------------------------------------------------------
async function runChannels() {
  const bar = progress("ch-progress");
  showError("", "ch-error");
  $("ch-shape").textContent = "";
  $("ch-grid").innerHTML = "";
  $("ch-run").disabled = true;
  try {
    const data = await postForm(`/latents/channels?${options()}`, fileForm({ file: $("ch-file") }), bar, "encoding");
    $("ch-shape").textContent = `latent ${data.shape.join("×")} from ${data.vae} (${data.family}); each channel normalised to its own range`;
    const grid = $("ch-grid");
    for (const c of data.channels) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      setImage(img, c.image, `Latent channel ${c.channel} as a greyscale image`);
      const cap = document.createElement("figcaption");
      cap.textContent = `channel ${c.channel}: mean ${c.mean.toFixed(3)}, std ${c.std.toFixed(3)}, ` +
        `min ${c.min.toFixed(2)}, max ${c.max.toFixed(2)}`;
      fig.append(img, cap);
      grid.append(fig);
    }
    bar.done(`${data.channels.length} channels`);
  } catch (e) {
    bar.fail();
    showError(`Could not show the latent channels. ${e.message}`, "ch-error");
  } finally {
    $("ch-run").disabled = false;
  }
}

// --- interpolation: frames stream in as NDJSON events, each one moves the progress bar ---------------------------
function clearInterpolation() {
  $("ip-strip").innerHTML = "";
  $("ip-scrub").hidden = true;
  clearImage($("ip-view"));
}

function checkedSteps() {
  const input = $("ip-steps");
  const max = limits.max_interpolation_steps;
  const steps = Number(input.value);
  if (!Number.isInteger(steps) || steps < 2 || steps > max) {
    throw new Error(`The number of frames must be a whole number from 2 to ${max}.`);
  }
  return steps;
}

async function runInterpolate() {
  const bar = progress("ip-progress");
  showError("", "ip-error");
  clearInterpolation();
  let steps;
  try {
    steps = checkedSteps();
  } catch (e) {
    showError(e.message, "ip-error");
    $("ip-steps").focus();
    return;
  }
  $("ip-run").disabled = true;
  const strip = $("ip-strip");
  const frames = [];
  const params = options();
  params.set("steps", String(steps));
  params.set("method", $("ip-method").value);
  params.set("resize", $("ip-resize").checked);
  bar.busy("uploading and encoding both images…");
  try {
    let response;
    try {
      response = await fetch(`/interpolate?${params}`, { method: "POST", body: fileForm({ a: $("ip-a"), b: $("ip-b") }) });
    } catch (e) {
      throw new RequestError(0, "");
    }
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let total = steps;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
        if (event.event === "start") {
          total = event.total;
          for (let i = 0; i < total; i++) {
            const img = document.createElement("img");
            img.alt = `Frame ${i + 1} of ${total} (decoding)`;
            strip.append(img);
          }
          bar.set(0, `decoding 0 / ${total} frames`);
        } else if (event.event === "frame") {
          frames[event.index] = event.image;
          setImage(strip.children[event.index], event.image, `Frame ${event.index + 1} of ${total}`);
          bar.set(event.done / event.total, `decoding ${event.done} / ${event.total} frames`);
        } else if (event.event === "done") {
          bar.done(`${frames.length} frames in ${event.seconds.toFixed(2)} s`);
        } else if (event.event === "error") {
          throw new Error(event.error);  // the server's own words: a VAE error, a timeout, or "internal error"
        }
      }
    }
    const slider = $("ip-slider");
    const show = () => {
      const i = Number(slider.value);
      setImage($("ip-view"), frames[i], `Frame ${i + 1} of ${frames.length}`);
      $("ip-frame-label").textContent = `${i + 1} / ${frames.length}`;
      slider.setAttribute("aria-valuetext", `frame ${i + 1} of ${frames.length}`);
    };
    slider.max = String(frames.length - 1);
    slider.value = "0";
    slider.oninput = show;
    show();
    $("ip-scrub").hidden = false;
  } catch (e) {
    bar.fail();
    clearInterpolation();
    showError(`Interpolation failed. ${e.message}`, "ip-error");
  } finally {
    $("ip-run").disabled = false;
  }
}

// --- compare -----------------------------------------------------------------------------------------------------
async function runCompare() {
  const bar = progress("cmp-progress");
  showError("", "cmp-error");
  $("cmp-scroll").hidden = true;
  $("cmp-table").tBodies[0].innerHTML = "";
  const chosen = [...document.querySelectorAll("#cmp-vaes input:checked")].map((c) => c.value);
  if (!chosen.length) { showError("Tick at least one VAE to compare.", "cmp-error"); return; }
  $("cmp-run").disabled = true;
  const params = options();
  params.delete("vae");
  params.set("vaes", chosen.join(","));
  params.set("images", "true");
  try {
    const data = await postForm(`/compare?${params}`, fileForm({ file: $("cmp-file") }), bar, `round trips through ${chosen.length} VAEs`);
    const tbody = $("cmp-table").tBodies[0];
    for (const r of data.results) {
      const tr = tbody.insertRow();
      const name = tr.insertCell();
      name.textContent = r.vae;
      if (r.vae === data.best) {
        tr.className = "best";
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = "best";
        name.append(badge);
      }
      const pic = tr.insertCell();
      if (r.image) {
        const img = document.createElement("img");
        setImage(img, r.image, `Reconstruction by ${r.vae}`);
        pic.append(img);
      }
      const cells = [r.family, r.psnr.toFixed(2), fmt(r.ssim, 4), fmt(r.ms_ssim, 4),
        fmt(r.saturation_ratio, 3), fmt(r.delta_e, 2), r.seconds.toFixed(2), r.flags.join("; ") || "–"];
      for (const v of cells) {
        tr.insertCell().textContent = v;
      }
    }
    $("cmp-scroll").hidden = false;
    if (data.best) bar.done(`best: ${data.best}`);
    else if (data.tied && data.tied.length > 1) bar.done(`a tie: ${data.tied.join(", ")} give the same PSNR`);
    else bar.done("done");
  } catch (e) {
    bar.fail();
    showError(`Comparison failed. ${e.message}`, "cmp-error");
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

function activate(tab) {
  for (const other of document.querySelectorAll("nav .tab")) {
    const on = other === tab;
    other.classList.toggle("active", on);
    other.setAttribute("aria-selected", String(on));
    other.tabIndex = on ? 0 : -1;
    const panel = $(other.dataset.tab);
    panel.classList.toggle("active", on);
    panel.hidden = !on;
  }
  showError("");  // a page-wide message belongs to the view it came from
}

document.addEventListener("DOMContentLoaded", () => {
  const tabs = [...document.querySelectorAll("nav .tab")];
  for (const tab of tabs) {
    tab.addEventListener("click", () => activate(tab));
    tab.addEventListener("keydown", (e) => {  // arrow keys move between tabs, as in any tab list
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!step) return;
      const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
      activate(next);
      next.focus();
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
  loadLimits();
  loadLibrary();
});
