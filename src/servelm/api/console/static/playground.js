// servelm playground. Chats go to /v1/chat/completions like any API call, authenticated
// by the session cookie plus the x-csrf-token header (no key in the page). Everything a
// model or a user writes is shown with textContent: never parsed as HTML.
// Original work, Apache-2.0.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const history = [];
  let controller = null;
  let lastBody = null;

  function model() { return $("model").selectedOptions[0]; }

  function syncModel() {
    const opt = model();
    const vision = opt && opt.dataset.vision === "yes";
    $("attach-label").classList.toggle("hidden", !vision);
    if (!vision) $("image").value = "";
    if (opt) $("prompt").placeholder = "Message " + opt.value + "…";
  }
  $("model").addEventListener("change", syncModel);
  syncModel();
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = $("temperature").value;
  });

  function addMessage(role, text) {
    $("empty").classList.add("hidden");
    const box = document.createElement("div");
    box.className = "msg " + role;
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    const meta = document.createElement("div");
    meta.className = "meta";
    box.append(label, body, meta);
    $("conversation").append(box);
    $("conversation").scrollTop = $("conversation").scrollHeight;
    return { box, body, meta };
  }

  function readImage(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function requestBody() {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);
    const body = {
      model: model().value,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number($("temperature").value),
    };
    const max = parseInt($("max_tokens").value, 10);
    if (max > 0) body.max_tokens = max;
    return body;
  }

  function errorText(data, status) {
    if (data && data.error) return typeof data.error === "string" ? data.error : data.error.message;
    return "HTTP " + status;
  }

  function busy(on) {
    $("send").disabled = on;
    $("stop").disabled = !on;
    $("status").textContent = on ? "Generating…" : "";
  }

  async function refreshBalance() {
    const r = await fetch("/account/balance.json", { credentials: "same-origin" });
    if (r.ok) $("remaining").textContent = (await r.json()).credits;
  }

  async function send(event) {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    const file = $("image").files[0];
    let content = text;
    if (file) {
      content = [{ type: "text", text }, { type: "image_url", image_url: { url: await readImage(file) } }];
    }
    history.push({ role: "user", content });
    addMessage("user", text + (file ? "  [image: " + file.name + "]" : ""));
    $("prompt").value = "";
    $("image").value = "";
    const reply = addMessage("assistant", "");
    reply.box.dataset.chunks = "0";
    const body = requestBody();
    lastBody = body;
    controller = new AbortController();
    busy(true);
    let received = "";
    let chunks = 0;
    let finished = false;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json", "x-csrf-token": csrf },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      const remaining = response.headers.get("x-remaining-credits");
      if (remaining) $("remaining").textContent = remaining;
      if (!response.ok) {
        let data = null;
        try { data = await response.json(); } catch (err) { data = null; }
        throw new Error(errorText(data, response.status));
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") { finished = true; continue; }
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(errorText(chunk, 500));
            const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
            if (delta && delta.content) {
              received += delta.content;
              chunks += 1;
              reply.body.textContent = received;
              reply.box.dataset.chunks = String(chunks);
              $("conversation").scrollTop = $("conversation").scrollHeight;
            }
            if (chunk.usage && chunk.usage.cost !== undefined) {
              // JSON numbers of credits, shown with the six decimals of x-cost.
              const cost = Number(chunk.usage.cost).toFixed(6);
              $("cost").textContent = cost;
              $("remaining").textContent = Number(chunk.usage.remaining_credits).toFixed(6);
              reply.meta.textContent = chunk.usage.prompt_tokens + " prompt + " +
                chunk.usage.completion_tokens + " output tokens · " + cost + " credits";
              $("usage-line").textContent = reply.meta.textContent;
            }
          }
        }
      }
      history.push({ role: "assistant", content: received });
      reply.box.dataset.state = finished ? "done" : "cut";
    } catch (err) {
      if (err.name === "AbortError") {
        // The server sees the hang-up, stops generating and charges what it sent.
        reply.box.dataset.state = "stopped";
        reply.meta.textContent = "Stopped after " + chunks + " chunks; charged for what was sent.";
        $("cost").textContent = "–";
        if (received) history.push({ role: "assistant", content: received });
        setTimeout(refreshBalance, 300);
      } else {
        reply.box.classList.add("error");
        reply.box.dataset.state = "error";
        reply.body.textContent = err.message;
        history.pop();
      }
    } finally {
      controller = null;
      busy(false);
    }
  }

  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("send").click(); }
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("clear").addEventListener("click", () => {
    history.length = 0;
    $("conversation").querySelectorAll(".msg").forEach((m) => m.remove());
    $("empty").classList.remove("hidden");
  });
  $("copy-code").addEventListener("click", async () => {
    const body = lastBody || requestBody();
    const key = $("placeholder-key").content.textContent;
    const code = "curl -X POST " + location.origin + "/v1/chat/completions \\\n" +
      '  -H "Authorization: Bearer ' + key + '" \\\n' +
      '  -H "content-type: application/json" \\\n' +
      "  -d '" + JSON.stringify(body).replace(/'/g, "'\\''") + "'";
    $("code-out").textContent = code;
    $("code-out").classList.remove("hidden");
    try { await navigator.clipboard.writeText(code); } catch (err) { /* shown on the page */ }
  });
})();
