// Tollgate's usage dashboard: plain ES2020, no build step, no framework.
//
// It reads the gateway's own API with the credential typed into the sign-in form, which lives in this tab's
// sessionStorage only and goes out only as the Authorization header of same-origin requests. Money arrives as
// exact decimal strings ("0.000816130"); the page sums it as BigInt nano-dollars and shows those strings, using
// floats only to draw the charts. Buckets, times and labels are UTC. A report grouped by tenant is sparse: a bucket
// lists only the tenants with usage in it (none at all when nobody used anything), so a missing tenant means zero.
"use strict";

(() => {
  const CREDENTIAL_KEY = "tollgate.dashboard.credential";
  const NANO_PER_USD = 1000000000n;
  const BUCKET_MS = Object.freeze({ hour: 3600000, day: 86400000 });
  const RANGES = Object.freeze({
    "24h": { granularity: "hour", buckets: 24 },
    "7d": { granularity: "hour", buckets: 7 * 24 },
    "30d": { granularity: "day", buckets: 30 },
    "90d": { granularity: "day", buckets: 90 },
  });
  const MAX_PAGES = 1000; // a report pages through at most this many answers (a guard against a looping cursor)
  const TOP_TENANTS_CHARTED = 10;
  const TOP_SPENDERS_LISTED = 25;
  const PALETTE = ["#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2", "#db2777", "#ca8a04", "#4f46e5",
    "#059669", "#dc2626"];
  const OTHER_COLOR = "#94a3b8";
  const INTEGERS = new Intl.NumberFormat("en-US");

  const state = {
    identity: null,
    loads: 0, // bumped by every load and by sign-out; an answer for an older load is dropped
    reports: {}, // the report each view shows, by view name: what "Download CSV" asks for again
    charts: new Map(), // canvas → Chart
  };

  // -- numbers, money and times --------------------------------------------------------------------------------

  function formatInteger(value) {
    return INTEGERS.format(value);
  }

  /** "12.000816130" → 12000816130n: exact, with no float on the way. */
  function nanoOf(usd) {
    const negative = usd.startsWith("-");
    const [whole, fraction = ""] = usd.replace("-", "").split(".");
    const nano = BigInt(whole) * NANO_PER_USD + BigInt((fraction + "000000000").slice(0, 9));
    return negative ? -nano : nano;
  }

  /** 12000816130n → "12.000816130": the gateway's own format (billing.format_usd). */
  function usdOf(nano) {
    const negative = nano < 0n;
    const magnitude = negative ? -nano : nano;
    const fraction = String(magnitude % NANO_PER_USD).padStart(9, "0");
    return `${negative ? "-" : ""}${magnitude / NANO_PER_USD}.${fraction}`;
  }

  /** "1234.000816130" → "$1,234.000816130": every digit kept, the whole dollars grouped. */
  function formatUsd(usd) {
    const negative = usd.startsWith("-");
    const [whole, fraction] = usd.replace("-", "").split(".");
    const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return `${negative ? "-" : ""}$${grouped}${fraction === undefined ? "" : "." + fraction}`;
  }

  /** An exact amount for a summary card: dollars and cents large, the sub-cent digits small (the text is exact). */
  function moneyValue(usd) {
    const text = formatUsd(usd);
    const cents = text.indexOf(".") + 3;
    const dollars = el("span", { class: "dollars" }, [text.slice(0, cents)]);
    const subCent = el("span", { class: "sub-cent" }, [text.slice(cents)]);
    return el("span", { class: cents > 10 ? "money long" : "money" }, [dollars, subCent]);
  }

  /** Budget use as a percentage with one decimal, by integer arithmetic. */
  function formatShare(spent, cap) {
    if (cap <= 0n) return "—";
    const tenths = (spent * 1000n) / cap;
    return `${tenths / 10n}.${tenths % 10n}%`;
  }

  function isoSeconds(milliseconds) {
    return new Date(milliseconds).toISOString().replace(/\.\d{3}Z$/, "Z");
  }

  /** "2025-11-22T04:00:00Z" → "2025-11-22 04:00" */
  function formatUtc(iso) {
    return iso.slice(0, 16).replace("T", " ");
  }

  function bucketLabel(bucket, granularity) {
    return granularity === "hour" ? formatUtc(bucket.start) : bucket.start.slice(0, 10);
  }

  function chartLabel(bucket, granularity) {
    return granularity === "hour" ? formatUtc(bucket.start).slice(5) : bucket.start.slice(5, 10);
  }

  /** The UTC buckets of a range choice: the current (partial) bucket last, every bucket whole. */
  function rangeOf(choice, now = Date.now()) {
    const { granularity, buckets } = RANGES[choice] || RANGES["24h"];
    const width = BUCKET_MS[granularity];
    const end = Math.floor(now / width) * width + width;
    return { granularity, buckets, from: isoSeconds(end - buckets * width), to: isoSeconds(end) };
  }

  function describeRange(range) {
    const kind = range.granularity === "hour" ? "hourly" : "daily";
    return `${formatUtc(range.from)} to ${formatUtc(range.to)} UTC · ${formatInteger(range.buckets)} ${kind} buckets`;
  }

  // -- counters ------------------------------------------------------------------------------------------------

  function zeroCounters() {
    return { requests: 0, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, errors: 0, cost: 0n };
  }

  /** A report result's (or totals') counters; the cost from its exact string. */
  function countersOf(result) {
    return {
      requests: result.requests,
      prompt_tokens: result.prompt_tokens,
      completion_tokens: result.completion_tokens,
      total_tokens: result.total_tokens,
      errors: result.errors,
      cost: nanoOf(result.cost_usd),
    };
  }

  function addCounters(a, b) {
    return {
      requests: a.requests + b.requests,
      prompt_tokens: a.prompt_tokens + b.prompt_tokens,
      completion_tokens: a.completion_tokens + b.completion_tokens,
      total_tokens: a.total_tokens + b.total_tokens,
      errors: a.errors + b.errors,
      cost: a.cost + b.cost,
    };
  }

  function isUsed(counters) {
    return counters.requests > 0 || counters.total_tokens > 0 || counters.cost !== 0n;
  }

  /** The counters of every result, summed by ``result[key]`` ("model" or "tenant"), in first-seen order. */
  function sumBy(report, key) {
    const sums = new Map();
    for (const bucket of report.data) {
      for (const result of bucket.results) {
        sums.set(result[key], addCounters(sums.get(result[key]) || zeroCounters(), countersOf(result)));
      }
    }
    return sums;
  }

  function byCostThenName([nameA, a], [nameB, b]) {
    if (a.cost !== b.cost) return a.cost > b.cost ? -1 : 1;
    return String(nameA).localeCompare(String(nameB));
  }

  // -- the gateway's API ---------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function storedCredential() {
    return sessionStorage.getItem(CREDENTIAL_KEY);
  }

  function withQuery(path, params) {
    const present = Object.entries(params).filter(([, value]) => value !== null && value !== undefined);
    return present.length ? `${path}?${new URLSearchParams(present)}` : path;
  }

  /** GET ``path`` with the credential; an error answer becomes an ApiError with the envelope's message. */
  async function request(path, params = {}, credential = storedCredential()) {
    let response;
    try {
      response = await fetch(withQuery(path, params), {
        headers: { Authorization: `Bearer ${credential}` },
        credentials: "omit",
        cache: "no-store",
      });
    } catch (error) {
      throw new ApiError(0, `Cannot reach the gateway (${error.message}).`);
    }
    if (!response.ok) throw await apiError(response);
    return response;
  }

  async function apiError(response) {
    let message = `The gateway answered ${response.status} ${response.statusText}.`;
    try {
      const body = await response.json();
      if (body.errors && body.errors.length && body.errors[0].message) message = body.errors[0].message;
    } catch (error) {
      // not the JSON error envelope: the status line above says what happened
    }
    return new ApiError(response.status, message);
  }

  async function resultOf(path, params = {}, credential = undefined) {
    const response = await request(path, params, credential);
    return (await response.json()).result;
  }

  function verify(credential) {
    return resultOf("/client/v4/user/tokens/verify", {}, credential);
  }

  /** Every page of a usage report (following next_page), with its totals summed exactly. */
  async function fetchReport(path, params) {
    const report = { path, params, pages: [], data: [], totals: zeroCounters() };
    let cursor = null;
    do {
      if (report.pages.includes(cursor) || report.pages.length >= MAX_PAGES) {
        throw new ApiError(0, "The usage report did not end: its pages repeat.");
      }
      report.pages.push(cursor);
      const page = await resultOf(path, { ...params, page: cursor });
      report.data.push(...page.data);
      report.totals = addCounters(report.totals, countersOf(page.totals));
      cursor = page.has_more ? page.next_page : null;
    } while (cursor !== null);
    return report;
  }

  // -- the page's elements -------------------------------------------------------------------------------------

  const $ = (selector, root = document) => root.querySelector(selector);
  const part = (root, name) => $(`[data-part="${name}"]`, root);

  /** An element with attributes and children; strings become text, never markup. */
  function el(tag, attributes = {}, children = []) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value !== undefined && value !== null && value !== "") node.setAttribute(name, value);
    }
    node.append(...children);
    return node;
  }

  function sentence(message) {
    return /[.!?]$/.test(message) ? message : `${message}.`;
  }

  function showError(message) {
    const box = $("#error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    const box = $("#error");
    box.textContent = "";
    box.hidden = true;
  }

  // -- cards ---------------------------------------------------------------------------------------------------

  function card(id, label, value, notes = [], extra = []) {
    return el("div", { class: "stat", "data-testid": `card-${id}` }, [
      el("div", { class: "stat-label" }, [label]),
      el("div", { class: "stat-value", "data-testid": `card-${id}-value` }, [value]),
      ...notes.map((note) => el("div", { class: "stat-note" }, [note])),
      ...extra,
    ]);
  }

  function usageCards(totals) {
    const errors = `${formatInteger(totals.errors)} ${totals.errors === 1 ? "error" : "errors"}`;
    return [
      card("requests", "Requests", formatInteger(totals.requests), [errors]),
      card("prompt-tokens", "Prompt tokens", formatInteger(totals.prompt_tokens)),
      card("completion-tokens", "Completion tokens", formatInteger(totals.completion_tokens)),
      card("total-tokens", "Total tokens", formatInteger(totals.total_tokens)),
      card("spend", "Spend (USD)", moneyValue(usdOf(totals.cost)), ["in this range"]),
    ];
  }

  function budgetMeter(spent, cap) {
    const meter = el("meter", { min: "0", max: "1", "aria-label": "Share of the monthly budget spent" });
    meter.value = cap > 0n ? Math.min(1, Number(spent) / Number(cap)) : 1;
    return meter;
  }

  /** The tenant's month: spend against its budget (and the key's own cap, if it has one). */
  function monthCard(budget) {
    const spent = nanoOf(budget.spent_usd);
    const notes = [];
    const extra = [];
    if (budget.monthly_budget_usd === null) {
      notes.push("no budget cap");
    } else {
      const cap = nanoOf(budget.monthly_budget_usd);
      notes.push(`of ${formatUsd(budget.monthly_budget_usd)} budget · ${formatShare(spent, cap)} used`);
      extra.push(budgetMeter(spent, cap));
    }
    if (budget.key && budget.key.monthly_budget_usd !== null) {
      notes.push(`this key: ${formatUsd(budget.key.spent_usd)} of ${formatUsd(budget.key.monthly_budget_usd)}`);
    }
    notes.push(`resets ${budget.resets_at.slice(0, 10)} (UTC)`);
    return card("month", "This month (USD)", moneyValue(budget.spent_usd), notes, extra);
  }

  // -- tables --------------------------------------------------------------------------------------------------

  const COUNTER_COLUMNS = [
    { key: "requests", label: "Requests", numeric: true },
    { key: "prompt_tokens", label: "Prompt tokens", numeric: true },
    { key: "completion_tokens", label: "Completion tokens", numeric: true },
    { key: "total_tokens", label: "Total tokens", numeric: true },
    { key: "cost", label: "Cost (USD)", numeric: true },
    { key: "errors", label: "Errors", numeric: true },
  ];

  function counterCells(counters) {
    return {
      requests: formatInteger(counters.requests),
      prompt_tokens: formatInteger(counters.prompt_tokens),
      completion_tokens: formatInteger(counters.completion_tokens),
      total_tokens: formatInteger(counters.total_tokens),
      cost: formatUsd(usdOf(counters.cost)),
      errors: formatInteger(counters.errors),
    };
  }

  function tableRow(columns, row) {
    return el("tr", row.attributes, columns.map((column) => el(column.rowHeader ? "th" : "td", {
      "data-col": column.key,
      class: column.numeric ? "num" : "",
      scope: column.rowHeader ? "row" : "",
    }, [row.cells[column.key] ?? ""])));
  }

  /** Fill ``table`` with a header, one row per entry of ``rows`` (or a note when there are none), and ``total``. */
  function renderTable(table, columns, rows, total, emptyText) {
    const header = el("tr", {}, columns.map((column) => el("th", {
      scope: "col",
      class: column.numeric ? "num" : "",
    }, [column.label])));
    const body = rows.length
      ? rows.map((row) => tableRow(columns, row))
      : [el("tr", { class: "empty" }, [el("td", { colspan: String(columns.length) }, [emptyText])])];
    const parts = [el("thead", {}, [header]), el("tbody", {}, body)];
    if (total) parts.push(el("tfoot", {}, [tableRow(columns, total)]));
    table.replaceChildren(...parts);
  }

  // -- charts --------------------------------------------------------------------------------------------------

  function configureCharts() {
    if (!window.Chart) return;
    const style = getComputedStyle(document.body);
    window.Chart.defaults.font.family = style.fontFamily;
    window.Chart.defaults.color = style.getPropertyValue("--muted").trim() || "#64748b";
  }

  function drawChart(canvas, config) {
    destroyChart(canvas);
    if (!window.Chart) {
      showError("The chart library did not load; the numbers below are complete.");
      return;
    }
    state.charts.set(canvas, new window.Chart(canvas, config));
  }

  function destroyChart(canvas) {
    const chart = state.charts.get(canvas);
    if (chart) chart.destroy();
    state.charts.delete(canvas);
  }

  function destroyCharts() {
    for (const canvas of [...state.charts.keys()]) destroyChart(canvas);
  }

  function usdTick(value) {
    return `$${Number(value).toLocaleString("en-US", { maximumSignificantDigits: 3 })}`;
  }

  function exactUsdLabel(item) {
    return `${item.dataset.label}: ${formatUsd(item.dataset.exact[item.dataIndex])}`;
  }

  function barChart(labels, datasets, { yTitle, money = false, legend = true }) {
    return {
      type: "bar",
      data: { labels, datasets },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: {
          legend: { display: legend, position: "bottom", labels: { boxWidth: 12, boxHeight: 12 } },
          tooltip: { callbacks: money ? { label: exactUsdLabel } : {} },
        },
        scales: {
          x: { stacked: true, grid: { display: false }, ticks: { maxRotation: 0, autoSkipPadding: 16 } },
          y: {
            stacked: true,
            beginAtZero: true,
            title: { display: true, text: yTitle },
            ticks: money ? { callback: usdTick } : { precision: 0 },
          },
        },
      },
    };
  }

  function dataset(label, color, values, exact = undefined) {
    return { label, data: values, exact, backgroundColor: color, borderWidth: 0, maxBarThickness: 32 };
  }

  /**
   * Spend per bucket for each series named in ``names``, as exact strings and numbers, in one pass over the results:
   * ``seriesOf(result)`` is the index in ``names`` of the series a result counts in (-1: none). A series with no
   * result in a bucket is zero there. ``other``: the series of everything else, drawn in grey, if there is one.
   */
  function spendDatasets(report, names, seriesOf, other = -1) {
    const sums = names.map(() => report.data.map(() => 0n));
    report.data.forEach((bucket, index) => {
      for (const result of bucket.results) {
        const series = seriesOf(result);
        if (series >= 0) sums[series][index] += nanoOf(result.cost_usd);
      }
    });
    return names.map((name, series) => {
      const color = series === other ? OTHER_COLOR : PALETTE[series % PALETTE.length];
      return dataset(name, color, sums[series].map((nano) => Number(nano) / 1e9), sums[series].map(usdOf));
    });
  }

  function perBucket(report, field) {
    return report.data.map((bucket) => bucket.results.reduce((sum, result) => sum + result[field], 0));
  }

  // -- the tenant's view ---------------------------------------------------------------------------------------

  async function fetchTenant(range) {
    const account = encodeURIComponent(state.identity.account_id);
    const params = { granularity: range.granularity, from: range.from, to: range.to, group_by: "model" };
    const [report, budget] = await Promise.all([
      fetchReport(`/client/v4/accounts/${account}/ai/usage`, params),
      resultOf(`/client/v4/accounts/${account}/ai/budget`),
    ]);
    return { report, budget };
  }

  function renderTenant(root, range, { report, budget }) {
    part(root, "account").textContent = state.identity.account_id;
    part(root, "cards").replaceChildren(...usageCards(report.totals), monthCard(budget));
    renderTenantCharts(root, range, report);
    renderUsageTable(part(root, "table"), range, report);
  }

  function renderTenantCharts(root, range, report) {
    const labels = report.data.map((bucket) => chartLabel(bucket, range.granularity));
    const used = [...sumBy(report, "model")].filter(([, counters]) => isUsed(counters)).sort(byCostThenName);
    const models = used.map(([model]) => model);
    const per = range.granularity === "hour" ? "per hour" : "per day";
    part(root, "spend-caption").textContent = `Spend (USD) ${per}, by model`;
    const spend = spendDatasets(report, models, (result) => models.indexOf(result.model));
    drawChart(part(root, "chart-spend"), barChart(labels, spend, { yTitle: "USD", money: true }));
    drawChart(part(root, "chart-tokens"), barChart(labels, [
      dataset("Prompt", PALETTE[0], perBucket(report, "prompt_tokens")),
      dataset("Completion", PALETTE[2], perBucket(report, "completion_tokens")),
    ], { yTitle: "tokens" }));
    drawChart(part(root, "chart-requests"), barChart(labels, [
      dataset("Requests", PALETTE[1], perBucket(report, "requests")),
    ], { yTitle: "requests", legend: false }));
  }

  const USAGE_COLUMNS = [
    { key: "start", label: "Start (UTC)", rowHeader: true },
    { key: "model", label: "Model" },
    ...COUNTER_COLUMNS,
  ];

  function renderUsageTable(table, range, report) {
    const rows = [];
    for (const bucket of [...report.data].reverse()) {
      for (const result of bucket.results.filter((item) => item.requests > 0)) {
        rows.push({
          attributes: { "data-testid": "usage-row", "data-start": bucket.start, "data-model": result.model },
          cells: {
            start: bucketLabel(bucket, range.granularity),
            model: result.model,
            ...counterCells(countersOf(result)),
          },
        });
      }
    }
    const total = {
      attributes: { "data-testid": "usage-total-row" },
      cells: { start: "Total", ...counterCells(report.totals) },
    };
    renderTable(table, USAGE_COLUMNS, rows, total, "No requests in this range.");
  }

  // -- the operator's view -------------------------------------------------------------------------------------

  async function fetchAdmin(range) {
    const params = { granularity: range.granularity, from: range.from, to: range.to, group_by: "tenant" };
    const [report, tenants] = await Promise.all([
      fetchReport("/admin/v1/usage", params),
      resultOf("/admin/v1/tenants"),
    ]);
    return { report, tenants };
  }

  function renderAdmin(root, range, { report, tenants }) {
    part(root, "cards").replaceChildren(...usageCards(report.totals), allTenantsMonthCard(tenants));
    const shown = tenants.length > TOP_SPENDERS_LISTED ? ` The top ${TOP_SPENDERS_LISTED} of ${tenants.length}.` : "";
    part(root, "month-label").textContent = tenants.length
      ? `${tenants[0].month} (UTC), as of now; resets ${formatUtc(tenants[0].resets_at)} UTC.${shown}`
      : "No tenant has a key yet.";
    renderTopSpenders(part(root, "top-spenders"), tenants);
    renderTenantSpendChart(root, range, report);
    renderTenantTable(part(root, "table"), report);
  }

  function allTenantsMonthCard(tenants) {
    const spent = tenants.reduce((sum, tenant) => sum + nanoOf(tenant.spent_usd), 0n);
    const count = `all ${formatInteger(tenants.length)} ${tenants.length === 1 ? "tenant" : "tenants"}`;
    const month = tenants.length ? ` · ${tenants[0].month}` : "";
    return card("month", "This month (USD)", moneyValue(usdOf(spent)), [count + month]);
  }

  const SPENDER_COLUMNS = [
    { key: "rank", label: "#", numeric: true },
    { key: "tenant", label: "Tenant", rowHeader: true },
    { key: "spent", label: "Spent (USD)", numeric: true },
    { key: "budget", label: "Monthly budget (USD)", numeric: true },
    { key: "used", label: "Used", numeric: true },
  ];

  function renderTopSpenders(table, tenants) {
    const ranked = tenants
      .map((tenant) => [tenant.tenant, { cost: nanoOf(tenant.spent_usd), tenant }])
      .sort(byCostThenName)
      .slice(0, TOP_SPENDERS_LISTED);
    const rows = ranked.map(([name, { cost, tenant }], index) => ({
      attributes: { "data-testid": "spender-row", "data-tenant": name },
      cells: {
        rank: String(index + 1),
        tenant: name,
        spent: formatUsd(tenant.spent_usd),
        budget: tenant.monthly_budget_usd === null ? "no cap" : formatUsd(tenant.monthly_budget_usd),
        used: tenant.monthly_budget_usd === null ? "—" : formatShare(cost, nanoOf(tenant.monthly_budget_usd)),
      },
    }));
    renderTable(table, SPENDER_COLUMNS, rows, null, "No tenants yet.");
  }

  /**
   * Spend per bucket stacked by tenant: the top ones by spend in the range, the rest summed as "other". The report
   * is sparse (see the top of this file): a tenant missing from a bucket adds nothing to it, and only tenants that
   * appear somewhere can rank.
   */
  function renderTenantSpendChart(root, range, report) {
    const ranked = [...sumBy(report, "tenant")].filter(([, counters]) => isUsed(counters)).sort(byCostThenName);
    const top = new Map(ranked.slice(0, TOP_TENANTS_CHARTED).map(([tenant], index) => [tenant, index]));
    const other = ranked.length > TOP_TENANTS_CHARTED ? TOP_TENANTS_CHARTED : -1; // the index of "other", if any
    const names = other >= 0 ? [...top.keys(), "other"] : [...top.keys()];
    const labels = report.data.map((bucket) => chartLabel(bucket, range.granularity));
    const per = range.granularity === "hour" ? "per hour" : "per day";
    part(root, "spend-caption").textContent = `Spend (USD) ${per}, by tenant`;
    const spend = spendDatasets(report, names, (result) => top.get(result.tenant) ?? other, other);
    drawChart(part(root, "chart-spend"), barChart(labels, spend, { yTitle: "USD", money: true }));
  }

  const TENANT_COLUMNS = [{ key: "tenant", label: "Tenant", rowHeader: true }, ...COUNTER_COLUMNS];

  function renderTenantTable(table, report) {
    const rows = [...sumBy(report, "tenant")]
      .filter(([, counters]) => isUsed(counters))
      .sort(byCostThenName)
      .map(([tenant, counters]) => ({
        attributes: { "data-testid": "tenant-row", "data-tenant": tenant },
        cells: { tenant, ...counterCells(counters) },
      }));
    const total = {
      attributes: { "data-testid": "tenant-total-row" },
      cells: { tenant: "Total", ...counterCells(report.totals) },
    };
    renderTable(table, TENANT_COLUMNS, rows, total, "No usage in this range.");
  }

  // -- loading a view ------------------------------------------------------------------------------------------

  const VIEWS = Object.freeze({
    tenant: { root: () => $("#tenant-view"), fetch: fetchTenant, render: renderTenant },
    admin: { root: () => $("#admin-view"), fetch: fetchAdmin, render: renderAdmin },
  });

  async function loadView(name) {
    const load = ++state.loads;
    const view = VIEWS[name];
    const root = view.root();
    const range = rangeOf(part(root, "range").value);
    root.dataset.state = "loading";
    root.setAttribute("aria-busy", "true");
    part(root, "csv").disabled = true;
    part(root, "range-label").textContent = describeRange(range);
    Object.assign(root.dataset, { granularity: range.granularity, from: range.from, to: range.to });
    try {
      const data = await view.fetch(range);
      if (load !== state.loads) return; // a newer load (or a sign-out) came meanwhile
      clearError();
      view.render(root, range, data);
      state.reports[name] = data.report;
      part(root, "csv").disabled = false;
      root.dataset.state = "ready";
    } catch (error) {
      if (load !== state.loads) return;
      root.dataset.state = "failed";
      failed(error);
    } finally {
      if (load === state.loads) root.removeAttribute("aria-busy");
    }
  }

  /** An API error, shown in the page; a credential no longer accepted ends the session. */
  function failed(error) {
    if (error instanceof ApiError && error.status === 401) {
      signOut(`Signed out: the gateway no longer accepts this key (${error.message}).`);
      return;
    }
    showError(error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`);
  }

  // -- CSV download --------------------------------------------------------------------------------------------

  function filenameOf(disposition) {
    const match = /filename="([^"]+)"/.exec(disposition || "");
    return match ? match[1] : "tollgate-usage.csv";
  }

  /** The CSV of the report on screen: the same query, page by page, one header row. */
  async function downloadCsv(name, button) {
    const report = state.reports[name];
    if (!report) return;
    button.disabled = true;
    try {
      const parts = [];
      let filename = "tollgate-usage.csv";
      for (const [index, cursor] of report.pages.entries()) {
        const response = await request(report.path, { ...report.params, page: cursor, format: "csv" });
        const text = await response.text();
        if (index === 0) filename = filenameOf(response.headers.get("content-disposition"));
        parts.push(index === 0 ? text : text.slice(text.indexOf("\n") + 1));
      }
      saveBlob(new Blob(parts, { type: "text/csv;charset=utf-8" }), filename);
    } catch (error) {
      failed(error);
    } finally {
      button.disabled = false;
    }
  }

  function saveBlob(blob, filename) {
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: filename });
    link.hidden = true;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  // -- session -------------------------------------------------------------------------------------------------

  function viewsFor(identity) {
    const scopes = identity.scopes || [];
    const names = [];
    if (scopes.includes("usage:read") && identity.account_id) names.push("tenant");
    if (scopes.includes("admin")) names.push("admin");
    return names;
  }

  function describeIdentity(identity) {
    if (identity.account_id === null) return "Operator · admin token";
    const expiry = identity.expires_on ? ` · expires ${formatUtc(identity.expires_on)} UTC` : "";
    return `${identity.account_id} · ${identity.name || "key " + identity.id}${expiry}`;
  }

  function showSignIn() {
    $("#session").hidden = true;
    for (const view of Object.values(VIEWS)) view.root().hidden = true;
    $("#notice").hidden = true;
    $("#signin").hidden = false;
    $("#credential").focus();
  }

  function startSession(identity) {
    state.identity = identity;
    const names = viewsFor(identity);
    $("#signin").hidden = true;
    $("#session").hidden = false;
    $("#identity").textContent = describeIdentity(identity);
    $("#tabs").hidden = names.length < 2;
    if (names.length === 0) {
      const notice = $("#notice");
      notice.textContent = `This key cannot read usage: its scopes are ${identity.scopes.join(", ") || "none"}. ` +
        "The dashboard needs a key with the usage:read scope, or an operator's key or token with admin.";
      notice.hidden = false;
      return;
    }
    showView(names[0]);
  }

  function showView(name) {
    for (const [key, view] of Object.entries(VIEWS)) view.root().hidden = key !== name;
    for (const tab of document.querySelectorAll(".tab")) {
      tab.setAttribute("aria-pressed", String(tab.dataset.view === name));
    }
    loadView(name);
  }

  function clearViews() {
    destroyCharts();
    state.reports = {};
    for (const view of Object.values(VIEWS)) {
      const root = view.root();
      delete root.dataset.state;
      for (const name of ["cards", "table", "top-spenders"]) part(root, name)?.replaceChildren();
    }
  }

  function signOut(message = "") {
    sessionStorage.removeItem(CREDENTIAL_KEY);
    state.identity = null;
    state.loads += 1; // answers still on their way are dropped
    clearViews();
    if (message) showError(message); else clearError();
    showSignIn();
  }

  async function signIn(event) {
    event.preventDefault();
    const input = $("#credential");
    const credential = input.value.trim();
    if (!credential) {
      showError("Enter an API key or the admin token.");
      return;
    }
    if (!/^[\x21-\x7e]+$/.test(credential)) {
      showError("That is not a key: keys and tokens are printable ASCII characters, without spaces.");
      return;
    }
    const button = $("#sign-in");
    button.disabled = true;
    clearError();
    try {
      const identity = await verify(credential);
      sessionStorage.setItem(CREDENTIAL_KEY, credential);
      $("#signin-form").reset();
      startSession(identity);
    } catch (error) {
      const hint = error.status === 401 ? " Check that the key is complete, and not revoked or expired." : "";
      showError(`Sign-in failed: ${sentence(error.message)}${hint}`);
    } finally {
      button.disabled = false;
    }
  }

  /** After a reload: the tab's credential, if it still works. */
  async function restoreSession(credential) {
    try {
      startSession(await verify(credential));
    } catch (error) {
      if (error.status === 401) sessionStorage.removeItem(CREDENTIAL_KEY);
      showError(`Could not resume the session: ${sentence(error.message)}`);
      showSignIn();
    }
  }

  // -- start ---------------------------------------------------------------------------------------------------

  function wire() {
    $("#signin-form").addEventListener("submit", signIn);
    $("#sign-out").addEventListener("click", () => signOut());
    for (const tab of document.querySelectorAll(".tab")) {
      tab.addEventListener("click", () => showView(tab.dataset.view));
    }
    for (const name of Object.keys(VIEWS)) {
      const root = VIEWS[name].root();
      part(root, "range").addEventListener("change", () => loadView(name));
      part(root, "refresh").addEventListener("click", () => loadView(name));
      const csv = part(root, "csv");
      csv.addEventListener("click", () => downloadCsv(name, csv));
    }
  }

  function start() {
    configureCharts();
    wire();
    const credential = storedCredential();
    if (credential) restoreSession(credential); else showSignIn();
  }

  start(); // a deferred script: the document is parsed
})();
