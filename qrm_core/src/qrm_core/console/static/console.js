// qrm console: confirmations, the phone menu, and live updates from the
// event stream (server-sent events from /live). Regions marked data-live are
// re-read from the server when events arrive; nothing else of the page moves.
(function () {
  "use strict";

  // Destructive actions ask first.
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      ev.preventDefault();
    }
  });

  // The menu on small screens.
  var toggle = document.querySelector(".menu-toggle");
  var nav = document.getElementById("nav");
  if (toggle && nav) {
    toggle.addEventListener("click", function () {
      var open = nav.classList.toggle("open");
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
    });
  }

  // Escape closes an open pull-down menu and gives the focus back to it.
  document.addEventListener("keydown", function (ev) {
    if (ev.key !== "Escape") return;
    document.querySelectorAll("details.menu[open]").forEach(function (menu) {
      menu.removeAttribute("open");
      var summary = menu.querySelector("summary");
      if (summary) summary.focus();
    });
  });
  // A click elsewhere closes it too.
  document.addEventListener("click", function (ev) {
    document.querySelectorAll("details.menu[open]").forEach(function (menu) {
      if (!menu.contains(ev.target)) menu.removeAttribute("open");
    });
  });

  var streamUrl = document.body.getAttribute("data-live-stream");
  var regions = document.querySelectorAll("[data-live][id]");
  var indicator = document.getElementById("live-state");
  if (!streamUrl || !window.EventSource) return;

  var MIN_GAP = 300; // ms between two refreshes of a page
  var busy = false, again = false, skipped = false, last = 0, timer = null;

  function busyRegion(region) {
    // Leave a region alone while someone works in it (an open menu, a focused field).
    if (region.querySelector("details[open]")) return true;
    var active = document.activeElement;
    return active && region.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }

  function refresh() {
    if (busy) { again = true; return; }
    var wait = MIN_GAP - (Date.now() - last);
    if (wait > 0) {
      if (!timer) timer = setTimeout(function () { timer = null; refresh(); }, wait);
      return;
    }
    busy = true; again = false; last = Date.now();
    fetch(window.location.href, { headers: { "X-Qrm-Live": "1" }, credentials: "same-origin" })
      .then(function (response) {
        if (response.redirected || !response.ok) throw new Error("status " + response.status);
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        regions.forEach(function (region) {
          var next = fresh.getElementById(region.id);
          if (!next) return;
          if (next.hasAttribute("data-poll")) region.setAttribute("data-poll", next.getAttribute("data-poll"));
          else region.removeAttribute("data-poll");
          if (next.innerHTML === region.innerHTML) return;
          if (busyRegion(region)) { skipped = true; return; }
          var before = {};
          region.querySelectorAll("tr[data-id]").forEach(function (row) { before[row.getAttribute("data-id")] = true; });
          region.innerHTML = next.innerHTML;
          region.querySelectorAll("tr[data-id]").forEach(function (row) {
            if (!before[row.getAttribute("data-id")] && Object.keys(before).length) row.classList.add("fresh");
          });
        });
        document.dispatchEvent(new CustomEvent("qrm:refreshed"));
      })
      .catch(function () { /* the next event tries again */ })
      .then(function () {
        busy = false;
        if (again) refresh();
        poll();
      });
  }

  // A region left alone while in use catches up once the menu closes or the field is left.
  function catchUp() { if (skipped) { skipped = false; setTimeout(refresh, 0); } }
  document.addEventListener("toggle", catchUp, true);
  document.addEventListener("focusout", catchUp);

  // A long operation (a capture) reports its progress without events: a region
  // that shows one asks again every data-poll milliseconds while it runs.
  function pollPeriod() {
    var least = 0;
    document.querySelectorAll("[data-live][data-poll]").forEach(function (region) {
      var ms = parseInt(region.getAttribute("data-poll"), 10);
      if (ms >= 500 && (!least || ms < least)) least = ms;
    });
    return least;
  }
  var pollTimer = null;
  function poll() {
    var ms = pollPeriod();
    if (!ms || pollTimer) return;
    pollTimer = setTimeout(function () { pollTimer = null; refresh(); }, ms);
  }
  poll();

  var source = new EventSource(streamUrl);
  source.onopen = function () { if (indicator) { indicator.classList.add("on"); indicator.title = "live updates: on"; } };
  source.onerror = function () { if (indicator) { indicator.classList.remove("on"); indicator.title = "live updates: reconnecting"; } };
  source.onmessage = function (ev) {
    var event;
    try { event = JSON.parse(ev.data); } catch (e) { return; }
    document.dispatchEvent(new CustomEvent("qrm:event", { detail: event }));
    if (regions.length) refresh();
  };
  window.qrmLive = { source: source, refresh: refresh };
})();
