// provision web UI: the live link. Loaded on every page after htmx.
//
// One EventSource per page on /ui/stream. The browser's own reconnect sends Last-Event-ID,
// so the server replays what was missed; if the browser gives up (the daemon answered an
// error, e.g. while restarting) we open a new one with ?after=<last id> ourselves, which is
// why this is not htmx's SSE extension (its new EventSource would start from now).
//
// Events never carry HTML: this script only tells the page *that* something changed, and
// the parts of the page marked with hx-trigger fetch themselves again from the server, which
// renders (and escapes) them. Bursts are coalesced: at most one refresh per topic every
// 400 ms, and the last change of a burst always gets its refresh.
(function () {
  "use strict";
  var lastId = null;
  var source = null;
  var retry = 1000;
  var pending = {};
  var timers = {};
  var GAP = 400;

  function banner(text) {
    var b = document.getElementById("live");
    if (!b) return;
    if (text) {
      b.textContent = text;
      b.hidden = false;
    } else {
      b.hidden = true;
    }
    document.body.dataset.live = text ? "down" : "up";
  }

  function fire(topic) {
    if (timers[topic]) {
      pending[topic] = true;
      return;
    }
    document.body.dispatchEvent(new CustomEvent(topic, { bubbles: false }));
    timers[topic] = setTimeout(function () {
      timers[topic] = null;
      if (pending[topic]) {
        pending[topic] = false;
        fire(topic);
      }
    }, GAP);
  }

  function onEvent(e) {
    lastId = e.lastEventId || lastId;
    var ev;
    try {
      ev = JSON.parse(e.data);
    } catch (_) {
      return;
    }
    fire("pv-changed");
    if (ev.mac) fire("pv-m-" + ev.mac.replace(/:/g, ""));
  }

  function open() {
    var url = document.body.dataset.stream;
    if (!url) return;
    if (lastId) url += (url.indexOf("?") < 0 ? "?" : "&") + "after=" + encodeURIComponent(lastId);
    source = new EventSource(url);
    source.addEventListener("event", onEvent);
    source.addEventListener("open", function () {
      retry = 1000;
      banner(null);
    });
    source.addEventListener("error", function () {
      if (source.readyState === EventSource.CLOSED) {
        banner("Live updates lost: reconnecting in " + Math.round(retry / 1000) + " s…");
        setTimeout(open, retry);
        retry = Math.min(retry * 2, 30000);
      } else {
        banner("Live updates lost: reconnecting…");
      }
    });
  }

  // A live part that holds a ticked checkbox is not replaced under the operator's hand; it
  // refreshes with the next change after the selection is gone.
  document.addEventListener("htmx:beforeRequest", function (e) {
    var elt = e.detail && e.detail.elt;
    if (elt && elt.hasAttribute("data-live") && elt.querySelector("input[type=checkbox]:checked")) {
      e.preventDefault();
    }
  });

  // "Select all" boxes: data-select-all="name" ticks every box of that name.
  document.addEventListener("change", function (e) {
    var t = e.target;
    if (t && t.dataset && t.dataset.selectAll) {
      var boxes = document.querySelectorAll("input[type=checkbox][name='" + t.dataset.selectAll + "']");
      for (var i = 0; i < boxes.length; i++) boxes[i].checked = t.checked;
    }
  });

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", open);
  } else {
    open();
  }
  window.addEventListener("pagehide", function () {
    if (source) source.close();
  });
})();
