// servelm console: snippet tabs and copy buttons. Original work, Apache-2.0.
"use strict";
document.querySelectorAll("[data-tabs]").forEach((group) => {
  group.querySelectorAll(".tab").forEach((tab) => {
    tab.addEventListener("click", () => {
      group.querySelectorAll(".tab").forEach((t) => t.classList.toggle("on", t === tab));
      group.querySelectorAll(".tabpane").forEach((pane) => {
        pane.classList.toggle("hidden", pane.id !== "pane-" + tab.dataset.tab);
      });
    });
  });
});
document.querySelectorAll("button[data-copy]").forEach((button) => {
  button.addEventListener("click", async () => {
    const text = document.getElementById(button.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch (err) {
      button.textContent = "Select and copy";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
});
