// servelm operator console: live figures from /operator/live.json. Original work, Apache-2.0.
"use strict";
(() => {
  let last = null;
  const set = (id, v) => { document.getElementById(id).textContent = v; };
  async function poll() {
    try {
      const r = await fetch("/operator/live.json", { credentials: "same-origin" });
      if (!r.ok) return;
      const now = { t: performance.now(), ...(await r.json()) };
      set("live-busy", String(now.busy));
      set("live-queue", String(now.queue));
      if (last) {
        const dt = (now.t - last.t) / 1000;
        set("live-rps", ((now.requests - last.requests) / dt).toFixed(1));
        set("live-tps", ((now.tokens - last.tokens) / dt).toFixed(1));
      }
      last = now;
    } catch (err) {
      // The next poll tries again.
    }
  }
  poll();
  setInterval(poll, 2000);
})();
