// Fieldchart console: reload this page when the records it shows change (Server-Sent Events
// from /console/events), unless the user is filling in a form.
"use strict";
const source = new EventSource("/console/events");
source.addEventListener("changed", () => {
  const active = document.activeElement;
  if (active && active.closest("form") && active.tagName !== "BUTTON") return;
  window.location.reload();
});
