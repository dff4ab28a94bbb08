// The search page of `retrieval serve`: plain DOM, no framework, no build step.
//
// Everything the server sends (queries, file names, index names, error messages) is
// shown through textContent / setAttribute / URL objects, never innerHTML, so a query
// such as <script>alert(1)</script> is displayed as text.
"use strict";

(() => {
  const TOKEN_KEY = "retrieval.token";
  const THUMB = 256; // thumbnail side asked from the server, pixels
  const DRAG_MIN = 6; // pixels a press must move to draw a region instead of clicking

  const $ = (id) => document.getElementById(id);
  const ui = {
    index: $("index"),
    indexInfo: $("index-info"),
    warning: $("random-warning"),
    tokenForm: $("token-form"),
    token: $("token"),
    form: $("search-form"),
    query: $("query"),
    top: $("top"),
    where: $("where"),
    dropZone: $("drop-zone"),
    file: $("file"),
    heatmap: $("heatmap"),
    status: $("status"),
    error: $("error"),
    results: $("results"),
  };

  const state = {
    indexes: [],
    seq: 0, // the latest search; answers to older ones are dropped
    heatText: null, // text the heatmaps are drawn for (null: the last search had none)
    shownIndex: null, // the index the results shown come from
    tokenWaiting: null, // a promise while the token form is open
    answered: 0, // searches answered (results or error) so far
    drawn: null, // {image_id, box} of the region the shown results were searched with
  };

  // ---------------------------------------------------------------- small helpers

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (_) {
      return "";
    }
  }

  function count(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") : "?";
  }

  function recallText(recall) {
    if (!recall || recall.value === null || recall.value === undefined) return "exact search";
    if (typeof recall.method === "string" && recall.method.startsWith("exact")) {
      return "exact search";
    }
    const value = Number(recall.value);
    const shown = Number.isFinite(value) ? value.toFixed(3) : String(recall.value);
    return recall.k ? `recall@${recall.k} ${shown}` : `recall ${shown}`;
  }

  function setStatus(text) {
    ui.status.textContent = text;
  }

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = !message;
  }

  // A same-origin URL with query parameters set safely (and the token for <img> tags,
  // which cannot send an Authorization header).
  function url(path, params, withToken) {
    const u = new URL(path, window.location.href);
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== null && value !== undefined && value !== "") {
        u.searchParams.set(key, String(value));
      }
    }
    const t = withToken ? token() : "";
    if (t) u.searchParams.set("token", t);
    return u.pathname + u.search;
  }

  // ---------------------------------------------------------------- the API

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function errorMessage(response, body) {
    const detail = body && typeof body === "object" ? body.detail : null;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail)) {
      // FastAPI's validation errors: [{loc: ["query", "top"], msg: "..."}, ...]
      return detail
        .map((d) => {
          const where = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body").join(".") : "";
          return where ? `${where}: ${d.msg}` : String(d.msg);
        })
        .join("; ");
    }
    if (typeof body === "string" && body.trim()) return `${response.status}: ${body.trim()}`;
    return `the server answered ${response.status} ${response.statusText}`.trim();
  }

  async function readBody(response) {
    const type = response.headers.get("content-type") || "";
    try {
      return type.includes("json") ? await response.json() : await response.text();
    } catch (_) {
      return null;
    }
  }

  // Asks for the token once: the form stays open until one is given; every request
  // that met a 401 meanwhile waits for the same answer.
  function askToken(refused) {
    if (!state.tokenWaiting) {
      state.tokenWaiting = new Promise((resolve) => {
        ui.tokenForm.hidden = false;
        ui.token.value = "";
        ui.token.placeholder = refused ? "that token was refused" : "token";
        ui.token.focus();
        setStatus(refused ? "the token was refused: enter another" : "enter the access token");
        ui.tokenForm.onsubmit = (event) => {
          event.preventDefault();
          const given = ui.token.value.trim();
          if (!given) return;
          try {
            sessionStorage.setItem(TOKEN_KEY, given);
          } catch (_) {
            /* storage off: the token lasts until the page is closed */
          }
          ui.tokenForm.hidden = true;
          state.tokenWaiting = null;
          setStatus("");
          resolve();
        };
      });
    }
    return state.tokenWaiting;
  }

  // fetch() with the token; the JSON body, or the response itself when `raw`.
  async function api(path, options = {}, raw = false) {
    for (;;) {
      const sent = token();
      const headers = new Headers(options.headers || {});
      if (sent) headers.set("Authorization", `Bearer ${sent}`);
      let response;
      try {
        response = await fetch(path, { ...options, headers });
      } catch (err) {
        throw new ApiError(0, `the server cannot be reached (${err.message})`);
      }
      if (response.status === 401) {
        if (sent && token() === sent) {
          try {
            sessionStorage.removeItem(TOKEN_KEY);
          } catch (_) {
            /* nothing stored */
          }
        }
        await askToken(Boolean(sent));
        continue;
      }
      if (raw && response.ok) return response;
      const body = await readBody(response);
      if (!response.ok) throw new ApiError(response.status, errorMessage(response, body));
      return body;
    }
  }

  // ---------------------------------------------------------------- indexes

  function currentIndex() {
    return state.indexes.find((ix) => ix.name === ui.index.value) || null;
  }

  function filterColumns(ix) {
    return ((ix && ix.metadata_columns) || []).filter((c) => c !== "image_id");
  }

  function indexLabel(ix) {
    const generation = ix.generation === undefined || ix.generation === null ? "?" : ix.generation;
    return `${ix.name} — ${count(ix.images)} images, ${recallText(ix.recall)}, generation ${generation}`;
  }

  // "faiss (exact)" for an index whose backend answers exactly (a flat faiss index).
  function backendLabel(ix) {
    const exact = recallText(ix.recall) === "exact search";
    return exact && ix.backend !== "exact" ? `${ix.backend} (exact)` : String(ix.backend);
  }

  function showIndex() {
    const ix = currentIndex();
    if (!ix) {
      ui.indexInfo.textContent = "no index";
      ui.warning.hidden = true;
      ui.where.hidden = true;
      return;
    }
    const retriever = (ix.retriever && ix.retriever.name) || "?";
    ui.indexInfo.textContent =
      `${retriever} · ${backendLabel(ix)} · ${count(ix.representatives)} representatives · ` +
      `${ix.embed_dim}-d`;
    ui.indexInfo.title = JSON.stringify(ix.retriever || {});
    ui.warning.hidden = !ix.random_weights;
    const columns = filterColumns(ix);
    ui.where.hidden = columns.length === 0;
    if (columns.length) {
      ui.where.placeholder = `filter, e.g. ${columns[0]} = ...  (columns: ${columns.join(", ")})`;
    } else {
      ui.where.value = "";
    }
  }

  async function loadIndexes(wanted) {
    const body = await api("/api/indexes");
    state.indexes = (body && body.indexes) || [];
    ui.index.replaceChildren(
      ...state.indexes.map((ix) => {
        const option = el("option", null, indexLabel(ix));
        option.value = ix.name;
        return option;
      }),
    );
    if (wanted && state.indexes.some((ix) => ix.name === wanted)) ui.index.value = wanted;
    showIndex();
    if (!state.indexes.length) setStatus("the server has no index");
  }

  // ---------------------------------------------------------------- queries

  // "a stroller -a bicycle" -> {positive: ["a stroller"], negative: ["a bicycle"]}.
  // A phrase starts at a word beginning with + or - (or a lone + / -); a hyphen inside
  // a word ("t-shirt") is part of the word.
  function parseQuery(text) {
    const positive = [];
    const negative = [];
    let sign = "+";
    let words = [];
    let marked = false;
    const flush = () => {
      if (words.length) (sign === "-" ? negative : positive).push(words.join(" "));
      words = [];
    };
    for (const word of text.trim().split(/\s+/).filter(Boolean)) {
      if (word === "+" || word === "-") {
        flush();
        sign = word;
        marked = true;
      } else if (word[0] === "+" || word[0] === "-") {
        flush();
        sign = word[0];
        marked = true;
        words.push(word.slice(1));
      } else {
        words.push(word);
      }
    }
    flush();
    const compound = marked && (negative.length > 0 || positive.length > 1);
    return { compound, positive, negative };
  }

  function topValue() {
    const n = Math.round(Number(ui.top.value));
    return Number.isFinite(n) && n >= 1 ? n : 50;
  }

  function whereValue() {
    return ui.where.hidden ? "" : ui.where.value.trim();
  }

  function quoted(text) {
    return `“${text}”`;
  }

  // Counts a search answered (results or an error) in <body data-answered>, for scripts.
  function answered() {
    state.answered += 1;
    document.body.dataset.answered = String(state.answered);
  }

  // A search refused before it reaches the server.
  function refuse(message) {
    state.seq += 1; // an answer still on its way to an earlier search is dropped
    document.body.classList.remove("busy");
    setStatus("");
    showError(message);
    answered();
  }

  async function runSearch(request, describe, heatText, drawn = null) {
    const seq = ++state.seq;
    showError("");
    setStatus("searching…");
    document.body.classList.add("busy");
    try {
      const body = await request();
      if (seq !== state.seq) return;
      state.heatText = heatText;
      state.shownIndex = body.index;
      state.drawn = drawn;
      render(body);
      const hits = body.hits || [];
      const parts = [`${describe(body)}: ${hits.length} ${hits.length === 1 ? "result" : "results"}`];
      parts.push(`in ${body.index}`);
      if (typeof body.took_ms === "number") parts.push(`${body.took_ms.toFixed(1)} ms`);
      if (body.recall) parts.push(recallText(body.recall));
      setStatus(parts.join(" · "));
    } catch (err) {
      if (seq !== state.seq) return;
      setStatus("");
      showError(err.message || String(err));
    } finally {
      if (seq === state.seq) {
        document.body.classList.remove("busy");
        answered();
      }
    }
  }

  function searchText() {
    const text = ui.query.value.trim();
    if (!text) {
      ui.query.focus();
      return;
    }
    const index = ui.index.value;
    const top = topValue();
    const where = whereValue();
    remember({ q: text, index, top, where });
    const parsed = parseQuery(text);
    if (parsed.compound && !parsed.positive.length) {
      refuse("a compound query needs a phrase to find, e.g. a stroller -a bicycle");
      return;
    }
    if (parsed.compound) {
      const describe = () => {
        const plus = parsed.positive.map(quoted).join(" + ");
        const minus = parsed.negative.map((p) => ` − ${quoted(p)}`).join("");
        return `compound query ${plus}${minus}`;
      };
      const payload = { index, top, positive: parsed.positive, negative: parsed.negative };
      if (where) payload.where = where;
      return runSearch(() => postJson(payload), describe, parsed.positive[0] || null);
    }
    const phrase = parsed.positive[0] || text;
    return runSearch(
      () => api(url("/api/search", { q: phrase, top, index, where })),
      () => quoted(phrase),
      phrase,
    );
  }

  function postJson(payload) {
    return api("/api/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
    });
  }

  // More like this: the whole image (all its regions, MaxSim) or, with region, one of them.
  function searchByExample(hit, region) {
    const index = state.shownIndex || ui.index.value; // the hit's index, even if another is picked
    const payload = { index, top: topValue(), image_id: hit.image_id };
    if (region) payload.rep_index = hit.rep_index;
    const where = whereValue();
    if (where) payload.where = where;
    const name = hit.file_name ? ` (${shownName(hit)})` : "";
    const what = region ? `region ${hit.rep_index} of image` : "image";
    ui.query.value = ""; // the results are no longer the text's
    return runSearch(
      () => postJson(payload),
      () => `search by example: ${what} ${hit.image_id}${name}`,
      null,
    );
  }

  // A region drawn on a result: the image's cells under the box are the query.
  function searchRegion(hit, box) {
    const index = state.shownIndex || ui.index.value;
    const payload = { index, top: topValue(), image_id: hit.image_id, box };
    const where = whereValue();
    if (where) payload.where = where;
    ui.query.value = "";
    return runSearch(
      () => postJson(payload),
      () => `search by drawn region on ${shownName(hit)}`,
      null,
      { image_id: hit.image_id, box },
    );
  }

  function searchByPicture(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      refuse(`${file.name} is not an image (${file.type})`);
      return;
    }
    ui.query.value = "";
    const index = ui.index.value;
    const top = topValue();
    const where = whereValue();
    const form = new FormData();
    form.append("image", file, file.name || "image");
    form.append("index", index);
    form.append("top", String(top));
    if (where) form.append("where", where);
    return runSearch(
      () => api("/api/search", { method: "POST", body: form }),
      () => `search by picture: ${file.name || "pasted image"}`,
      null,
    );
  }

  // Keeps the last text search in the address so it can be reloaded or shared.
  function remember(params) {
    const u = new URL(window.location.href);
    u.search = "";
    for (const [key, value] of Object.entries(params)) {
      if (value !== "" && value !== null && value !== undefined) u.searchParams.set(key, value);
    }
    window.history.replaceState(null, "", u.pathname + u.search);
  }

  // ---------------------------------------------------------------- results

  function imageSrc(hit) {
    return url(hit.image_url, { size: THUMB }, true);
  }

  function heatmapSrc(hit) {
    return url(`${hit.image_url}/heatmap`, { q: state.heatText, size: THUMB }, true);
  }

  // The file name with its folder ("2023/IMG_0042.jpg"), whole; the full path is in the
  // link's title.
  function shownName(hit) {
    if (typeof hit.path === "string" && hit.path) {
      return hit.path.split(/[\\/]/).filter(Boolean).slice(-2).join("/");
    }
    return hit.file_name || `image ${hit.image_id}`;
  }

  // a "folder/name" that wraps after the "/" before it wraps inside a name
  function breakAfterFolders(node, text) {
    const parts = text.split("/");
    parts.forEach((part, i) => {
      if (i < parts.length - 1) node.append(`${part}/`, document.createElement("wbr"));
      else node.append(part);
    });
    return node;
  }

  function clamp01(v) {
    const n = Number(v);
    return Number.isFinite(n) ? Math.min(Math.max(n, 0), 1) : 0;
  }

  function boxOverlay(hit) {
    const [x0, y0, x1, y1] = hit.box.map(clamp01);
    const box = el("button", "box");
    box.type = "button";
    box.title = `region ${hit.rep_index}: click to find images with regions like it`;
    box.setAttribute("aria-label", `search by example: region ${hit.rep_index} of image ${hit.image_id}`);
    box.style.left = `${100 * x0}%`;
    box.style.top = `${100 * y0}%`;
    box.style.width = `${100 * Math.max(x1 - x0, 0)}%`;
    box.style.height = `${100 * Math.max(y1 - y0, 0)}%`;
    box.addEventListener("click", (event) => {
      event.preventDefault();
      event.stopPropagation();
      searchByExample(hit, true);
    });
    return box;
  }

  function placeBox(node, box) {
    const [x0, y0, x1, y1] = box.map(clamp01);
    node.style.left = `${100 * x0}%`;
    node.style.top = `${100 * y0}%`;
    node.style.width = `${100 * Math.max(x1 - x0, 0)}%`;
    node.style.height = `${100 * Math.max(y1 - y0, 0)}%`;
  }

  // Drag on a picture to draw a region; on release it is searched (searchRegion). A
  // press that barely moves stays a click (on a matched box: search by example).
  function wireDrawing(thumb, img, hit) {
    let dragged = false;
    thumb.addEventListener(
      "click",
      (event) => {
        if (!dragged) return;
        dragged = false; // the click that ends a drag is not a click on the box under it
        event.preventDefault();
        event.stopPropagation();
      },
      true,
    );
    thumb.addEventListener("pointerdown", (event) => {
      if (event.button !== 0) return;
      const rect = img.getBoundingClientRect();
      if (!rect.width || !rect.height) return;
      const start = { x: event.clientX, y: event.clientY };
      const at = (e) => {
        const xs = [start.x, e.clientX].map((x) => clamp01((x - rect.left) / rect.width));
        const ys = [start.y, e.clientY].map((y) => clamp01((y - rect.top) / rect.height));
        return [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)];
      };
      let band = null;
      const move = (e) => {
        if (!band && Math.hypot(e.clientX - start.x, e.clientY - start.y) < DRAG_MIN) return;
        if (!band) {
          // captured only once it is a drag: a plain click still reaches the box under it
          thumb.setPointerCapture(e.pointerId);
          band = el("div", "drawing");
          thumb.append(band);
        }
        placeBox(band, at(e));
      };
      const up = (e) => {
        thumb.removeEventListener("pointermove", move);
        thumb.removeEventListener("pointerup", up);
        thumb.removeEventListener("pointercancel", up);
        if (!band) return;
        band.remove();
        dragged = true;
        const box = at(e);
        if ((box[2] - box[0]) * rect.width < 3 || (box[3] - box[1]) * rect.height < 3) return;
        searchRegion(hit, box);
      };
      thumb.addEventListener("pointermove", move);
      thumb.addEventListener("pointerup", up);
      thumb.addEventListener("pointercancel", up);
    });
  }

  function setThumb(img, hit, heat) {
    const card = img.closest(".card");
    card.classList.remove("no-heatmap", "missing");
    card.removeAttribute("title");
    delete img.dataset.retried;
    img.dataset.mode = heat ? "heatmap" : "image";
    img.src = heat ? heatmapSrc(hit) : imageSrc(hit);
  }

  // A thumbnail that did not load: asked again with fetch() to learn why. Loaded then
  // (a passing failure), it is shown; else the message goes into the card's tooltip and
  // a heatmap falls back to the plain picture.
  async function pictureFailed(img, fig, hit) {
    const failed = img.getAttribute("src");
    const heat = img.dataset.mode === "heatmap";
    let why = null;
    try {
      await api(failed, {}, true);
    } catch (err) {
      why = err.message;
    }
    if (img.getAttribute("src") !== failed) return; // the thumbnail has moved on
    if (why === null && !img.dataset.retried) {
      img.dataset.retried = "true";
      img.src = failed;
      return;
    }
    fig.title = why || "the picture could not be shown";
    if (heat) {
      setThumb(img, hit, false);
      fig.classList.add("no-heatmap");
    } else {
      fig.classList.add("missing");
    }
  }

  function card(hit) {
    const fig = el("figure", "card");
    fig.dataset.imageId = String(hit.image_id);
    fig.dataset.rank = String(hit.rank);
    fig.dataset.rep = String(hit.rep_index);

    const thumb = el("div", "thumb");
    const img = el("img");
    img.alt = `rank ${hit.rank}: image ${hit.image_id}`;
    img.decoding = "async";
    img.draggable = false; // a drag draws a region, not a dragged picture
    img.addEventListener("error", () => pictureFailed(img, fig, hit));
    thumb.append(img);
    if (Array.isArray(hit.box) && hit.box.length === 4) thumb.append(boxOverlay(hit));
    const drawn = state.drawn;
    if (drawn && drawn.image_id === hit.image_id) {
      const mark = el("div", "drawn");
      mark.title = "the region this search was drawn with";
      placeBox(mark, drawn.box);
      thumb.append(mark);
    }
    wireDrawing(thumb, img, hit);
    fig.append(thumb);
    setThumb(img, hit, false); // render() swaps in heatmaps when the toggle is on

    const caption = el("figcaption");
    const score = Number(hit.score);
    const more = el("button", "more", "similar");
    more.type = "button";
    more.title = "find images like this one (all its regions)";
    more.addEventListener("click", () => searchByExample(hit, false));
    const head = el("div", "line");
    head.append(
      el("span", "rank", `#${hit.rank}`),
      el("span", "score", `score ${Number.isFinite(score) ? score.toFixed(4) : hit.score}`),
    );
    const name = breakAfterFolders(el("a", "file"), shownName(hit));
    name.href = url(hit.image_url, { size: 1024 }, true);
    name.target = "_blank";
    name.rel = "noopener";
    name.title = `${hit.file_name || ""} ${hit.path ? `(${hit.path}) ` : ""}image ${hit.image_id}`.trim();
    const foot = el("div", "line");
    foot.append(name, more);
    caption.append(head, foot);
    fig.append(caption);
    fig.hit = hit;
    return fig;
  }

  function render(body) {
    const hits = (body && body.hits) || [];
    ui.heatmap.disabled = state.heatText === null;
    ui.heatmap.parentElement.title =
      state.heatText === null
        ? "heatmaps need a text query"
        : `show each result's heatmap of ${quoted(state.heatText)}`;
    ui.results.replaceChildren(...hits.map(card));
    if (!hits.length) ui.results.append(el("p", "muted", "no images match"));
    if (ui.heatmap.checked) showHeatmaps();
  }

  // Swaps every thumbnail for its heatmap (or back). The first result's heatmap is asked
  // for first: when the server has none (a retriever without a cell grid: 404), its
  // message is shown and the toggle goes off, instead of one failure per picture.
  async function showHeatmaps() {
    const seq = state.seq;
    const figs = [...ui.results.querySelectorAll(".card")];
    let heat = ui.heatmap.checked && state.heatText !== null;
    if (heat && figs.length) {
      try {
        await api(heatmapSrc(figs[0].hit), {}, true);
      } catch (err) {
        if (seq !== state.seq || !ui.heatmap.checked) return;
        ui.heatmap.checked = false;
        showError(`no heatmaps: ${err.message}`);
        heat = false;
      }
      if (seq !== state.seq || ui.heatmap.checked !== heat) return; // a newer click decides
    }
    for (const fig of figs) setThumb(fig.querySelector("img"), fig.hit, heat);
  }

  // ---------------------------------------------------------------- wiring

  function firstImage(list) {
    for (const item of list || []) {
      const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
      if (file && (!file.type || file.type.startsWith("image/"))) return file;
    }
    return null;
  }

  function wire() {
    ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      searchText();
    });
    ui.index.addEventListener("change", () => {
      showIndex();
      if (ui.query.value.trim()) searchText();
    });
    ui.heatmap.addEventListener("change", showHeatmaps);
    ui.file.addEventListener("change", () => {
      const file = ui.file.files && ui.file.files[0];
      ui.file.value = ""; // the same file can be chosen again
      searchByPicture(file);
    });
    for (const name of ["dragenter", "dragover"]) {
      ui.dropZone.addEventListener(name, (event) => {
        event.preventDefault();
        ui.dropZone.classList.add("over");
      });
    }
    ui.dropZone.addEventListener("dragleave", () => ui.dropZone.classList.remove("over"));
    ui.dropZone.addEventListener("drop", (event) => {
      event.preventDefault();
      ui.dropZone.classList.remove("over");
      const file = firstImage(event.dataTransfer && event.dataTransfer.files);
      if (file) searchByPicture(file);
      else refuse("drop an image file");
    });
    ui.dropZone.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        ui.file.click();
      }
    });
    document.addEventListener("paste", (event) => {
      const file = firstImage(event.clipboardData && event.clipboardData.items);
      if (file) {
        event.preventDefault();
        searchByPicture(file);
      }
    });
  }

  async function start() {
    wire();
    const params = new URLSearchParams(window.location.search);
    if (params.get("top")) ui.top.value = params.get("top");
    try {
      await loadIndexes(params.get("index"));
    } catch (err) {
      showError(`cannot list the indexes: ${err.message}`);
      document.body.dataset.ready = "error";
      return;
    }
    if (params.get("where") && !ui.where.hidden) ui.where.value = params.get("where");
    if (params.get("q")) {
      ui.query.value = params.get("q");
      searchText();
    }
    document.body.dataset.ready = "true";
  }

  start();
})();
