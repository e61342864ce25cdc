// curate review: the keyboard, the queue and the decisions outbox. Plain JS, no library.
//
// Every decision is POSTed at once, in order; one the server could not save yet (the run
// folder locked by another curate process, or no answer) stays queued and is sent again, so
// none is lost while the page is open. Server HTML (the sample view, the panel) is rendered
// and escaped by the server's templates; text made here goes through textContent only.
(function () {
  "use strict";

  const $ = (sel) => document.querySelector(sel);
  let csrf = document.querySelector('meta[name="curate-csrf"]').content;
  const state = JSON.parse($("#queue-data").textContent);
  const filters = new URLSearchParams(state.filters);
  const note = $("#note");
  const saveState = $("#save-state");
  const message = $("#message");
  const confirmBox = $("#confirm");
  const viewer = $("#viewer");
  const SVG = "http://www.w3.org/2000/svg";
  const TILE_PX = 448;
  const RETRY_MS = 1000;

  let items = state.items;
  let pos = state.index;
  const undoStack = []; // decisions that can be undone, newest last
  const outbox = []; // actions not yet saved, oldest first
  let sending = false;
  let confirming = null; // "keep" | "reject" while a per-rule decision waits for a second key

  const current = () => items[pos];
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function query(extra) {
    const p = new URLSearchParams(filters);
    for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
    return p.toString();
  }

  function say(text, kind) {
    message.textContent = text || "";
    message.className = kind || "";
  }

  function setSave(name, text) {
    saveState.dataset.state = name;
    saveState.textContent = text;
  }

  function remaining() {
    return items.filter((it) => !it.reviewed).length;
  }

  function updatePosition() {
    const it = current();
    const where = $("#position");
    if (!it) {
      where.textContent = "nothing in this queue: change the filters";
      return;
    }
    const state = it.reviewed ? `reviewed (${it.status})` : "awaiting review";
    where.textContent =
      `${pos + 1} of ${items.length} · rule ${it.rule} · dataset ${it.dataset} · ` +
      `${state} · ${remaining()} remaining`;
  }

  async function show(index) {
    if (!items.length) {
      updatePosition();
      return;
    }
    pos = Math.max(0, Math.min(items.length - 1, index));
    const it = current();
    updatePosition();
    cancelConfirm();
    history.replaceState(null, "", "?" + query({ sample: it.id }));
    try {
      const r = await fetch("/sample/" + encodeURIComponent(it.id), { credentials: "same-origin" });
      const html = await r.text();
      if (current() !== it) return; // moved on meanwhile
      if (!r.ok) {
        say(`could not load sample ${it.id}: ${html}`, "error");
        return;
      }
      $("#sample").innerHTML = html; // server-rendered, escaped by its templates
    } catch (e) {
      say(`could not load sample ${it.id}: ${e}`, "error");
    }
  }

  function nextRemaining(from) {
    for (let k = from + 1; k < items.length; k++) if (!items[k].reviewed) return k;
    for (let k = 0; k < from; k++) if (!items[k].reviewed) return k;
    return -1;
  }

  function advance() {
    const k = nextRemaining(pos);
    if (k >= 0) {
      show(k);
    } else {
      updatePosition();
      say("every sample of this queue is reviewed", "ok");
    }
  }

  // -- decisions ----------------------------------------------------------------------------
  function decide(decision) {
    const it = current();
    if (!it) return;
    const action = {
      kind: "decide",
      body: { sample_id: it.id, decision: decision, note: note.value },
      item: it,
      before: { status: it.status, reviewed: it.reviewed },
    };
    it.reviewed = true;
    it.status = decision;
    note.value = "";
    undoStack.push(action);
    send(action);
    say(`${decision}: ${it.id}`, "ok");
    advance();
  }

  function askRule(decision) {
    const it = current();
    if (!it) return;
    if (confirming === decision) {
      confirmRule();
      return;
    }
    confirming = decision;
    const left = items.filter((x) => !x.reviewed && x.rule === it.rule && x.dataset === it.dataset);
    confirmBox.textContent =
      `${decision} the rest of rule ${it.rule} in dataset ${it.dataset} ` +
      `(${left.length} awaiting review here; samples decided one by one keep their decision)? ` +
      `Press ${decision === "keep" ? "K" : "X"} again or Enter to confirm, Esc to cancel.`;
    confirmBox.hidden = false;
  }

  function cancelConfirm() {
    confirming = null;
    confirmBox.hidden = true;
  }

  function confirmRule() {
    const it = current();
    const decision = confirming;
    cancelConfirm();
    if (!it || !decision) return;
    const action = {
      kind: "decide",
      body: { dataset: it.dataset, rule: it.rule, decision: decision, note: note.value },
      reload: true,
    };
    note.value = "";
    undoStack.push(action);
    send(action);
    say(`${decision}: the rest of rule ${it.rule} in dataset ${it.dataset}`, "ok");
  }

  function undo() {
    const action = undoStack.pop();
    if (!action) {
      say("nothing to undo");
      return;
    }
    if (action.item) {
      action.item.reviewed = action.before.reviewed;
      action.item.status = action.before.status;
      const k = items.indexOf(action.item);
      if (k >= 0) show(k);
    }
    send({ kind: "undo", target: action, reload: action.reload });
    say("undone: " + (action.body.sample_id || `rule ${action.body.rule} in ${action.body.dataset}`), "ok");
  }

  function keyOf(action) {
    const b = action.body;
    return b.sample_id ? { sample_id: b.sample_id } : { dataset: b.dataset, rule: b.rule };
  }

  function send(action) {
    outbox.push(action);
    pump();
  }

  async function post(url, body) {
    try {
      const r = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-Curate-CSRF": csrf },
        body: JSON.stringify(body),
      });
      let data;
      try {
        data = await r.json();
      } catch (e) {
        data = { error: `answer ${r.status} was not JSON`, retry: r.status >= 500 };
      }
      return { ok: r.ok, data: data };
    } catch (e) {
      return { ok: false, data: { error: `the review server did not answer (${e})`, retry: true } };
    }
  }

  async function pump() {
    if (sending) return;
    sending = true;
    try {
      while (outbox.length) {
        const a = outbox[0];
        if (a.kind === "undo" && a.target.failed) {
          outbox.shift(); // its decision was never saved: nothing to withdraw
          continue;
        }
        setSave("saving", `saving ${outbox.length}…`);
        const r =
          a.kind === "undo"
            ? await post("/api/undo", { ...keyOf(a.target), decided_at: a.target.result.decided_at })
            : await post("/api/decide", a.body);
        if (r.ok) {
          outbox.shift();
          if (a.kind === "decide") a.result = r.data;
          const item = a.item || (a.target && a.target.item);
          if (item && r.data.status) item.status = r.data.status;
          if (a.reload) await reloadQueue();
          refreshPanel();
          updatePosition();
          if (item && item === current()) show(pos); // its view shows the saved state
          continue;
        }
        if (r.data.retry) {
          setSave("waiting", "not saved yet, will retry: " + r.data.error);
          await sleep(RETRY_MS);
          continue;
        }
        if (r.data.stale_token && !a.renewed) {
          // The server restarted since this page loaded: take its token and send again.
          a.renewed = true;
          const t = await fetch("/api/token", { credentials: "same-origin" });
          if (t.ok) csrf = (await t.json()).csrf;
          continue;
        }
        outbox.shift(); // refused for good: say so, and put the sample back
        if (a.kind === "decide") {
          a.failed = true;
          const k = undoStack.indexOf(a);
          if (k >= 0) undoStack.splice(k, 1);
          if (a.item) {
            a.item.reviewed = a.before.reviewed;
            a.item.status = a.before.status;
          }
        }
        say("not saved: " + r.data.error, "error");
        updatePosition();
      }
      setSave("saved", "all decisions saved");
    } finally {
      sending = false;
    }
  }

  async function reloadQueue() {
    const id = current() && current().id;
    const r = await fetch("/api/queue?" + query(), { credentials: "same-origin" });
    if (!r.ok) return;
    const data = await r.json();
    const mine = new Map(items.map((it) => [it.id, it]));
    // Keep the item objects the undo stack holds: update them in place.
    items = data.items.map((it) => Object.assign(mine.get(it.id) || {}, it));
    const k = items.findIndex((it) => it.id === id);
    pos = k >= 0 ? k : Math.min(pos, items.length - 1);
    updatePosition();
  }

  async function refreshPanel() {
    // Server-rendered fragments, escaped by its templates.
    const [panel, lessons] = await Promise.all([
      fetch("/panel?" + query(), { credentials: "same-origin" }),
      fetch("/lessons", { credentials: "same-origin" }),
    ]);
    if (panel.ok) $("#panel").innerHTML = await panel.text();
    if (lessons.ok) $("#lessons").innerHTML = await lessons.text();
  }

  // -- the full-size viewer with InternVL's tile grid ---------------------------------------
  function openViewer(link) {
    const cols = parseInt(link.dataset.cols, 10) || 0;
    const rows = parseInt(link.dataset.rows, 10) || 0;
    const img = $("#viewer-img");
    const grid = $("#viewer-grid");
    img.src = link.dataset.full;
    while (grid.firstChild) grid.removeChild(grid.firstChild);
    if (cols > 0 && rows > 0) {
      grid.setAttribute("viewBox", `0 0 ${cols} ${rows}`);
      const line = (x1, y1, x2, y2) => {
        const l = document.createElementNS(SVG, "line");
        l.setAttribute("x1", x1);
        l.setAttribute("y1", y1);
        l.setAttribute("x2", x2);
        l.setAttribute("y2", y2);
        l.setAttribute("vector-effect", "non-scaling-stroke");
        grid.appendChild(l);
      };
      for (let x = 1; x < cols; x++) line(x, 0, x, rows);
      for (let y = 1; y < rows; y++) line(0, y, cols, y);
    }
    const caption = link.dataset.caption || "no tile grid (no budget for this sample)";
    $("#viewer-caption").textContent =
      cols > 0
        ? `${caption}: the model sees it resized to ${cols * TILE_PX}×${rows * TILE_PX} px, ` +
          `cut along these lines (Esc or f closes)`
        : caption;
    viewer.hidden = false;
  }

  function closeViewer() {
    viewer.hidden = true;
    $("#viewer-img").removeAttribute("src");
  }

  function firstImage() {
    return document.querySelector("#sample .card.current a.full");
  }

  // -- keys ---------------------------------------------------------------------------------
  const actions = {
    k: () => decide("keep"),
    x: () => decide("reject"),
    s: () => {
      const k = nextRemaining(pos);
      show(k >= 0 ? k : pos + 1);
    },
    n: () => show(pos + 1),
    ArrowRight: () => show(pos + 1),
    p: () => show(pos - 1),
    ArrowLeft: () => show(pos - 1),
    u: undo,
    K: () => askRule("keep"),
    X: () => askRule("reject"),
    Enter: () => confirming && confirmRule(),
    Escape: cancelConfirm,
    c: () => note.focus(),
    "/": () => note.focus(),
    f: () => {
      const link = firstImage();
      if (link) openViewer(link);
    },
    "?": () => {
      $("#keys").hidden = !$("#keys").hidden;
    },
  };

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) {
      if (e.key === "Escape" || (t === note && e.key === "Enter")) {
        t.blur();
        e.preventDefault();
      }
      return;
    }
    if (!viewer.hidden) {
      if (e.key === "Escape" || e.key === "f") closeViewer();
      e.preventDefault();
      return;
    }
    const act = actions[e.key];
    if (!act) return;
    e.preventDefault();
    if (confirming && !["K", "X", "Enter", "Escape"].includes(e.key)) cancelConfirm();
    act();
  });

  document.addEventListener("click", (e) => {
    const button = e.target.closest("button[data-key]");
    if (button) {
      const act = actions[button.dataset.key];
      if (act) act();
      button.blur();
      return;
    }
    const link = e.target.closest("#sample a.full");
    if (link) {
      e.preventDefault();
      openViewer(link);
      return;
    }
    if (!viewer.hidden && e.target.closest("#viewer")) closeViewer();
  });

  window.addEventListener("beforeunload", (e) => {
    if (outbox.length) e.preventDefault(); // decisions not saved yet: ask before leaving
  });

  updatePosition();
  if (items.length) history.replaceState(null, "", "?" + query({ sample: current().id }));
})();
