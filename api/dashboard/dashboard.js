// Darkroom's operators' dashboard: reads /admin/api/ with the token given in the URL fragment
// (#token=...) or typed in, and renders with textContent only: job fields come from clients.
"use strict";

(() => {
  const TOKEN_KEY = "darkroom-admin-token";
  const REFRESH_MS = 5000;
  const $ = (id) => document.getElementById(id);
  const fragment = new URLSearchParams(location.hash.slice(1));
  let token = fragment.get("token") || sessionStorage.getItem(TOKEN_KEY) || "";
  let openJob = fragment.get("job");
  const shown = { jobs: "", detail: "" };
  let timer = null;

  if (fragment.has("token")) {
    // Keep the token out of the address bar and the history once it is read.
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + (openJob ? `#job=${openJob}` : ""));
  }

  async function request(path) {
    const response = await fetch(path, {
      headers: { authorization: `Bearer ${token}` },
      cache: "no-store",
    });
    if (response.status === 401) {
      showLogin("The operator token was refused.");
      throw new Error("unauthorized");
    }
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response;
  }

  const getJson = async (path) => (await request(path)).json();

  function node(tag, className, ...children) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    for (const child of children) {
      element.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
    }
    return element;
  }

  const utc = (iso) => (iso ? new Date(iso).toISOString().slice(0, 19).replace("T", " ") : "");
  const badge = (state) => node("span", `badge ${state}`, state);

  function renderQueue(queue) {
    const cards = $("cards");
    cards.replaceChildren();
    const age = queue.oldest_queued_age_s;
    const items = [
      ...Object.entries(queue.by_state),
      ["expired leases", queue.expired_leases],
      ["oldest queued", age === null ? "–" : `${Math.round(age)} s`],
      ["webhooks pending", queue.webhooks.pending],
      ["webhooks failed", queue.webhooks.failed],
    ];
    for (const [label, value] of items) {
      const card = node("div", `card ${label.replace(/ /g, "-")}`);
      card.append(node("strong", "", String(value)), node("span", "", label));
      cards.append(card);
    }
    const body = $("by-operation").tBodies[0];
    body.replaceChildren(
      ...queue.by_operation.map((row) => {
        const tr = node("tr", "", node("td", "", row.operation));
        for (const state of ["queued", "processing", "success", "failed"]) {
          tr.append(node("td", "num", String(row[state])));
        }
        return tr;
      }),
    );
  }

  // A job's inputs are client-chosen URLs: shown as text, never loaded. An <img> would make
  // the operator's browser request whatever address a client named (and reveal that the
  // dashboard was opened); the page's policy allows images from this origin only.
  function inputLabel(input) {
    if (input.kind !== "url") {
      const size = Math.max(1, Math.round(input.chars / 1024));
      return node("span", "inline", `inline · ${size} kB`);
    }
    const label = node("span", "input-url", shortUrl(input.url));
    label.title = input.url;
    return label;
  }

  function shortUrl(url) {
    return url.length > 48 ? `${url.slice(0, 30)}…${url.slice(-15)}` : url;
  }

  function outputThumb(output) {
    const image = node("img", "thumb output");
    image.alt = `output ${output.filename}`;
    image.title = `${output.width}×${output.height}, seed ${output.seed}`;
    watch(image);
    if (output.deleted) {
      image.dataset.loaded = "deleted";
      return image;
    }
    request(output.url)
      .then((response) => response.blob())
      .then((blob) => {
        image.addEventListener("load", () => URL.revokeObjectURL(image.src), { once: true });
        image.src = URL.createObjectURL(blob);
      })
      .catch(() => {
        image.dataset.loaded = "error";
      });
    return image;
  }

  function watch(image) {
    image.addEventListener("load", () => {
      image.dataset.loaded = "true";
    });
    image.addEventListener("error", () => {
      image.dataset.loaded = "error";
    });
  }

  function renderJobs(jobs) {
    const body = $("job-table").tBodies[0];
    body.replaceChildren(
      ...jobs.map((job) => {
        const open = node("a", "", `#${job.id}`);
        open.href = `#job=${job.id}`;
        const key = job.key ? `${job.key.name} (${job.key.prefix})` : "";
        const hook = job.webhook ? `${job.webhook.state} · ${job.webhook.attempts}` : "–";
        const row = node(
          "tr",
          `job ${job.state}`,
          node("td", "", open),
          node("td", "", badge(job.state)),
          node("td", "", job.operation),
          node("td", "", key),
          node("td", "", utc(job.created_at)),
          node("td", "num", String(job.attempts)),
          node("td", "inputs", ...job.inputs.map(inputLabel)),
          node("td", "thumbs", ...job.outputs.map(outputThumb)),
          node("td", "", hook),
        );
        row.dataset.jobId = job.id;
        if (job.error) row.title = job.error;
        return row;
      }),
    );
  }

  function renderAttempts(attempts, body) {
    body.replaceChildren(
      ...attempts.map((attempt, index) =>
        node(
          "tr",
          attempt.status_code >= 200 && attempt.status_code < 300 ? "ok" : "bad",
          node("td", "num", String(index + 1)),
          node("td", "", utc(attempt.attempted_at)),
          node("td", "", attempt.status_code ? `HTTP ${attempt.status_code}` : "no answer"),
          node("td", "num", `${Math.round(attempt.latency_ms)} ms`),
          node("td", "", attempt.error || attempt.response_excerpt || ""),
        ),
      ),
    );
  }

  function renderDetail(job) {
    $("detail").hidden = false;
    $("detail-title").textContent = `Job #${job.id}`;
    const summary = $("detail-summary");
    summary.replaceChildren(
      badge(job.state),
      ` ${job.operation} via ${job.endpoint} · ${job.attempts} attempt(s)`,
      job.progress !== null && job.state === "processing"
        ? ` · ${Math.round(job.progress * 100)}% done`
        : "",
      job.error ? node("span", "error", ` · ${job.error}`) : "",
    );
    $("timeline").replaceChildren(
      ...job.timeline.map((event) =>
        node(
          "li",
          `event ${event.event}`,
          node("time", "", utc(event.at)),
          node("strong", "", event.event.replace(/_/g, " ")),
          node("span", "", event.detail),
        ),
      ),
    );
    $("params").replaceChildren(
      ...Object.entries(job.params).flatMap(([name, value]) => [
        node("dt", "", name),
        node("dd", "", typeof value === "object" ? JSON.stringify(value) : String(value)),
      ]),
    );
    const hook = job.webhook;
    $("webhook-summary").textContent = hook
      ? `${hook.webhook_id} → ${hook.url} · ${hook.state}`
      : "no webhook";
    renderAttempts(hook ? hook.attempts : [], $("attempts").tBodies[0]);
    renderRequeues(job.requeues);
    $("meta").textContent = JSON.stringify(job.meta, null, 2);
  }

  function renderRequeues(requeues) {
    const box = $("requeues");
    box.replaceChildren();
    for (const requeue of requeues) {
      const hook = requeue.previous_webhook;
      const head = node(
        "h3",
        "",
        `Earlier run, requeued ${utc(requeue.requeued_at)}: was ${requeue.previous_state}`,
      );
      const reason = requeue.reason ? ` · reason: ${requeue.reason}` : "";
      box.append(head, node("p", "", requeue.previous_error || "", reason));
      if (hook) {
        const table = node("table", "grid");
        table.append(node("tbody"));
        renderAttempts(hook.attempts, table.tBodies[0]);
        box.append(node("p", "", `webhook ${hook.webhook_id} · ${hook.state}`), table);
      }
    }
  }

  async function refresh() {
    const state = $("filter-state").value;
    const operation = $("filter-operation").value;
    const query = new URLSearchParams({ limit: "50" });
    if (state) query.set("state", state);
    if (operation) query.set("operation", operation);
    try {
      const [queue, jobs] = await Promise.all([
        getJson("/admin/api/queue"),
        getJson(`/admin/api/jobs?${query}`),
      ]);
      renderQueue(queue);
      const text = JSON.stringify(jobs.jobs);
      if (text !== shown.jobs) {
        shown.jobs = text;
        renderJobs(jobs.jobs);
      }
      if (openJob) {
        const job = await getJson(`/admin/api/jobs/${encodeURIComponent(openJob)}`);
        const detail = JSON.stringify(job);
        if (detail !== shown.detail) {
          shown.detail = detail;
          renderDetail(job);
        }
      }
      $("status").textContent = `updated ${utc(queue.generated_at)} UTC`;
      $("status").className = "";
    } catch (error) {
      $("status").textContent = `refresh failed: ${error.message}`;
      $("status").className = "error";
    }
  }

  function showLogin(message) {
    clearInterval(timer);
    timer = null;
    $("board").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("status").textContent = "operator token needed";
  }

  function start() {
    $("login").hidden = true;
    $("board").hidden = false;
    refresh();
    if (timer === null) timer = setInterval(refresh, REFRESH_MS);
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    start();
  });
  for (const id of ["filter-state", "filter-operation"]) {
    $(id).addEventListener("change", refresh);
  }
  window.addEventListener("hashchange", () => {
    openJob = new URLSearchParams(location.hash.slice(1)).get("job");
    shown.detail = "";
    refresh();
  });

  if (token) start();
  else showLogin("");
})();
