// The model page's try-it box: one POST /v1/chat/completions with the console session
// and its CSRF header, the playground's walk (same route, same money), not streamed.
(function () {
  "use strict";
  const form = document.getElementById("tryit-form");
  if (!form) return;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const send = $("tryit-send");
    send.disabled = true;
    $("tryit-out").classList.remove("hidden");
    $("tryit-reply").textContent = "…";
    $("tryit-cost").textContent = "";
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json", "x-csrf-token": csrf },
        body: JSON.stringify({
          model: form.dataset.model,
          messages: [{ role: "user", content: $("tryit-prompt").value }],
          max_tokens: Number($("tryit-max").value) || 64,
        }),
      });
      let data = null;
      try { data = await response.json(); } catch (err) { data = null; }
      if (!response.ok) {
        const message = data && data.error && (data.error.message || data.error);
        throw new Error(String(message || "HTTP " + response.status));
      }
      // Text only: whatever the model wrote is never parsed as HTML.
      $("tryit-reply").textContent = data.choices[0].message.content || "";
      const u = data.usage;
      $("tryit-cost").textContent = u.prompt_tokens + " prompt + " + u.completion_tokens +
        " output tokens · " + u.cost + " credits · " + u.remaining_credits + " credits left";
    } catch (err) {
      $("tryit-reply").textContent = "Error: " + err.message;
    } finally {
      send.disabled = false;
    }
  });
})();
