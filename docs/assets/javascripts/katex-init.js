// Renders the math that pymdownx.arithmatex (generic: true) leaves in the page:
//   inline  <span class="arithmatex">\( ... \)</span>
//   display <div class="arithmatex">\[ ... \]</div>
// with the KaTeX bundled under assets/katex/ (no network access needed).
(function () {
  "use strict";

  function strip(text) {
    var t = text.trim();
    var pairs = [["\\(", "\\)", false], ["\\[", "\\]", true], ["$$", "$$", true], ["$", "$", false]];
    for (var i = 0; i < pairs.length; i++) {
      var open = pairs[i][0], close = pairs[i][1];
      if (t.length >= open.length + close.length && t.slice(0, open.length) === open &&
          t.slice(t.length - close.length) === close) {
        return { tex: t.slice(open.length, t.length - close.length), display: pairs[i][2] };
      }
    }
    return { tex: t, display: false };
  }

  function render(root) {
    if (typeof katex === "undefined") return;
    var nodes = (root || document).querySelectorAll(".arithmatex");
    for (var i = 0; i < nodes.length; i++) {
      var el = nodes[i];
      if (el.getAttribute("data-katex") === "done") continue;
      var math = strip(el.textContent);
      var display = math.display || el.tagName === "DIV";
      katex.render(math.tex, el, { displayMode: display, throwOnError: false, output: "htmlAndMathml" });
      el.setAttribute("data-katex", "done");
    }
  }

  // Material for MkDocs publishes every page load (including instant navigation) on document$.
  if (typeof document$ !== "undefined" && document$.subscribe) {
    document$.subscribe(function () { render(document); });
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { render(document); });
  } else {
    render(document);
  }
})();
