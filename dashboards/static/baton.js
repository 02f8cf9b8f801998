// Live refresh: while something on the page is active, poll a small JSON version and
// reload when it changes. Never reloads under someone typing in a form.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || live.dataset.active !== "yes") { return; }
  var url = live.dataset.poll;
  var version = live.dataset.version;
  var note = document.getElementById("refresh-note");
  var interval = parseInt(live.dataset.interval || "1500", 10);

  // Typed-in values count, not values the browser restored on reload (those fire no input event).
  var dirty = false;
  document.addEventListener("input", function (ev) {
    if (ev.target && ev.target.form) { dirty = true; }
  });

  function busy() {
    var el = document.activeElement;
    return dirty || Boolean(el && el.form && el.tagName !== "BUTTON");
  }

  function tick() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (data && data.version && data.version !== version) {
          if (busy()) {
            if (note) { note.hidden = false; }
          } else {
            window.location.reload();
            return;
          }
        }
        window.setTimeout(tick, interval);
      })
      .catch(function () { window.setTimeout(tick, interval * 2); });
  }
  window.setTimeout(tick, interval);
})();
