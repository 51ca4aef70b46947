// The API reference: Swagger UI (served by this gateway from the swagger-ui-bundle
// package) over /openapi.json. A file of its own: the console's CSP runs no inline script.
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  if (!root || typeof window.SwaggerUIBundle !== "function") return;
  window.SwaggerUIBundle({
    url: root.getAttribute("data-spec"),
    domNode: root,
    deepLinking: true,
    // No "validator badge": it would ask a public service to check the spec.
    validatorUrl: null,
  });
})();
