// pneumo upload page: POST the file to v1/predict (relative, so a route prefix works) and show the answer.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("upload");
  const status = $("status");

  $("file").addEventListener("change", () => {
    const f = $("file").files[0];
    if (f && /^image\/(jpeg|png)$/.test(f.type)) {
      $("preview").src = URL.createObjectURL(f);
    } else {
      $("preview").removeAttribute("src");
    }
  });

  const percent = (v) => (typeof v === "number" ? (100 * v).toFixed(1) + "%" : "?");

  // The model's val sensitivity and specificity, its red flags and the drift state, next to the answer.
  async function showModel(headers) {
    const resp = await fetch("v1/model", { headers });
    if (!resp.ok) { $("drift").textContent = "unknown (model info: " + resp.status + ")"; return; }
    const info = await resp.json();
    const val = (info.metrics || {}).val || {};
    $("val-sensitivity").textContent = percent(val.sensitivity);
    $("val-specificity").textContent = percent(val.specificity);
    const flags = info.red_flags || [];
    const list = $("red-flag-list");
    list.replaceChildren(...flags.map((f) => { const li = document.createElement("li"); li.textContent = f; return li; }));
    $("red-flags").hidden = flags.length === 0;
    $("drift").textContent = info.drift ? info.drift.line : "not monitored (the bundle has no drift reference)";
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = $("file").files[0];
    if (!f) { status.textContent = "Choose an image first."; return; }
    const body = new FormData();
    body.append("file", f);
    const headers = {};
    const key = $("apikey").value.trim();
    if (key) headers["Authorization"] = "Bearer " + key;
    const url = "v1/predict" + ($("explain").checked ? "?explain=true" : "");
    status.className = "";
    status.textContent = "Scoring...";
    $("submit").disabled = true;
    try {
      const resp = await fetch(url, { method: "POST", body, headers });
      const data = await resp.json();
      if (!resp.ok) {
        const e = data.error || {};
        status.className = "error";
        status.textContent = "Error " + resp.status + ": " + (e.message || resp.statusText);
        $("result").hidden = true;
        return;
      }
      status.textContent = "Done.";
      const label = $("label");
      label.textContent = data.label;
      label.className = "label " + data.label;
      $("probability").textContent = (100 * data.probability).toFixed(1) + "%";
      $("threshold").textContent = (100 * data.threshold).toFixed(1) + "%";
      $("model").textContent = data.model.name + " " + data.model.version;
      $("latency").textContent = data.latency_ms.toFixed(0);
      const exp = data.explanation;
      if (exp && exp.overlay_png_base64) {
        $("overlay").src = "data:image/png;base64," + exp.overlay_png_base64;
        $("overlay-figure").hidden = false;
      } else {
        $("overlay-figure").hidden = true;
      }
      $("result").hidden = false;
      await showModel(headers);
    } catch (err) {
      status.className = "error";
      status.textContent = "Request failed: " + err;
    } finally {
      $("submit").disabled = false;
    }
  });
})();
