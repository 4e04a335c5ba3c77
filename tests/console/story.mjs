// The agency console in a real browser: Debian's headless Chromium driven by playwright-core
// (pointed at the system browser; nothing is downloaded), each page checked with axe-core.
//
// Run by tests/tests/console_e2e.rs, which starts the relay and plays the nurse's phone.
// Protocol: one JSON object per line on stdout ({"step": ...}); the Rust side answers on stdin
// with one JSON line when the phone has synced. Every wait is bounded (--timeout-ms).
//
// Env: BASE (relay URL), ADMIN_LINK, MANAGER_LINK (set-password links), MANAGER_ID, PASSWORD,
// ARTIFACTS (screenshot directory), CHROMIUM (browser executable), TIMEOUT_MS.

import { createRequire } from "node:module";
import { mkdirSync } from "node:fs";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const AXE = require.resolve("axe-core/axe.min.js");

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`missing env ${name}`);
  return v;
};
const BASE = env("BASE");
const PASSWORD = env("PASSWORD");
const ARTIFACTS = env("ARTIFACTS");
const TIMEOUT_MS = Number(process.env.TIMEOUT_MS ?? "30000");
mkdirSync(ARTIFACTS, { recursive: true });

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function nextLine() {
  const timer = new Promise((_, reject) =>
    setTimeout(() => reject(new Error("no answer from the test on stdin")), TIMEOUT_MS * 4),
  );
  const { value, done } = await Promise.race([lines.next(), timer]);
  if (done) throw new Error("stdin closed");
  return JSON.parse(value);
}

const violations = [];
let shot = 0;
// Screenshot and accessibility check of the current page. axe-core is injected into a
// context that bypasses the console's CSP (which otherwise refuses every script: the check
// needs one, the console never does).
async function check(page, name) {
  shot += 1;
  const file = `${ARTIFACTS}/${String(shot).padStart(2, "0")}-${name}.png`;
  await page.screenshot({ path: file, fullPage: true });
  await page.addScriptTag({ path: AXE });
  const result = await page.evaluate(async () =>
    // eslint-disable-next-line no-undef
    await axe.run(document, { resultTypes: ["violations"] }),
  );
  const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  for (const v of bad) {
    violations.push({ page: name, id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.length });
  }
  emit({ step: "checked", page: name, screenshot: file, serious: bad.length });
}

async function expectText(page, text) {
  const body = await page.textContent("body");
  if (!body.includes(text)) throw new Error(`page ${page.url()} lacks ${JSON.stringify(text)}`);
}

async function setPassword(page, link) {
  await page.goto(link);
  await check(page, "set-password");
  await page.fill("#password", PASSWORD);
  await page.fill("#confirm", PASSWORD);
  await page.click("button[type=submit]");
  await expectText(page, "Your password is set");
}

async function signIn(page, login) {
  await page.goto(`${BASE}/console/sign-in`);
  await page.fill("#login", login);
  await page.fill("#password", PASSWORD);
  await page.click("button[type=submit]");
  await page.waitForURL(`${BASE}/console/`);
}

const browser = await chromium.launch({
  executablePath: env("CHROMIUM"),
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
  timeout: TIMEOUT_MS,
});
try {
  const newPage = async () => {
    const context = await browser.newContext({ bypassCSP: true, viewport: { width: 1200, height: 900 } });
    context.setDefaultTimeout(TIMEOUT_MS);
    return context.newPage();
  };

  // 1. The administrator sets her password, signs in, creates a patient and a nurse, assigns
  //    her, and enrolls the nurse's phone from the QR page.
  const admin = await newPage();
  await setPassword(admin, env("ADMIN_LINK"));
  await admin.goto(`${BASE}/console/sign-in`);
  await check(admin, "sign-in");
  await signIn(admin, "ada");
  await admin.goto(`${BASE}/console/admin/users`);
  await admin.fill("#patient-name", "Grace Hopper");
  await admin.click("form[action='/console/admin/patients'] button");
  await admin.waitForURL(/\/console\/patients\/pat_/);
  const patientId = admin.url().split("/").pop();
  await admin.goto(`${BASE}/console/admin/users`);
  await admin.fill("#name", "Ana Ruiz");
  await admin.selectOption("#role", "clinician");
  await admin.click("form[action='/console/admin/users'] button");
  await expectText(admin, "Added Ana Ruiz");
  await admin.selectOption("#assign-user", { label: "Ana Ruiz" });
  await admin.selectOption("#assign-patient", patientId);
  await admin.click("form[action='/console/admin/assign'] button");
  await expectText(admin, "Assigned Ana Ruiz");
  await check(admin, "users");
  // Schedule Ana's visit to Grace today (the board's default date, UTC).
  const today = new Date().toISOString().slice(0, 10);
  await admin.goto(`${BASE}/console/board`);
  await admin.selectOption("#s-patient", patientId);
  await admin.selectOption("#s-clinician", { label: "Ana Ruiz" });
  await admin.fill("#s-date", today);
  await admin.fill("#s-start", "00:00");
  await admin.fill("#s-end", "23:59");
  await admin.click("form[action='/console/schedule'] button");
  await admin.waitForURL(/\/console\/board/);
  await expectText(admin, "scheduled");
  await admin.goto(`${BASE}/console/admin/users`);
  await admin.click("table a:has-text('Ana Ruiz')");
  await admin.fill("#device", "Ana's phone");
  await admin.click("form[action$='/enroll'] button");
  const code = (await admin.textContent("#enrollment-code")).trim();
  const qr = await admin.$("figure.qr svg");
  if (!qr) throw new Error("no QR code on the enrollment page");
  await check(admin, "enroll-qr");
  const nurseId = admin.url().match(/users\/(usr_[0-9a-f]+)/)?.[1];

  // 2. The case manager signs in and watches the Today board: the visit is scheduled.
  const manager = await newPage();
  await setPassword(manager, env("MANAGER_LINK"));
  await signIn(manager, "carl");
  await check(manager, "patients");
  await manager.goto(`${BASE}/console/board`);
  await expectText(manager, "scheduled");
  emit({ step: "enroll", code, patientId, nurseId, date: today });

  // 3. The phone enrolls, charts, signs and syncs (the Rust side); it answers with the note.
  const { noteId } = await nextLine();

  // 4. The board updates by itself (Server-Sent Events), then the case manager opens the chart
  //    (vitals chart) and the note (signature Valid).
  await manager.waitForFunction(
    () => document.body.textContent.includes("signed, received"),
    null,
    { timeout: TIMEOUT_MS },
  );
  await check(manager, "board");
  await manager.goto(`${BASE}/console/`);
  await manager.click("main a:has-text('Grace Hopper')");
  await manager.waitForSelector("svg.vitals-panel");
  await expectText(manager, "Blood pressure");
  await check(manager, "chart");
  await manager.click(`a[href='/console/notes/${noteId}']`);
  await expectText(manager, "Valid");
  await expectText(manager, "Ana Ruiz");
  await manager.waitForSelector("svg.vitals-panel");
  await check(manager, "note");

  // 5. The case manager adds a problem and a goal to the care plan; the phone fetches the
  //    chart and sets the goal's status offline while she sets it "on hold" in the browser.
  await manager.goto(`${BASE}/console/patients/${patientId}`);
  await manager.fill("#add-root", "Impaired mobility");
  await manager.click("form.add:has(#add-root) button");
  await manager.waitForURL(/#care-plan$/);
  await expectText(manager, "Impaired mobility");
  const goalInput = manager.locator("form.add input[id^='add-']:not(#add-root)").first();
  await goalInput.fill("Walks 50 m with a frame");
  await manager.locator("form.add:has(input[id^='add-']:not(#add-root)) button").first().click();
  await manager.waitForURL(/#care-plan$/);
  await expectText(manager, "Walks 50 m with a frame");
  await check(manager, "care-plan");
  emit({ step: "plan", patientId });
  const { goal } = await nextLine();
  const key = goal.replaceAll("/", "-");
  await manager.selectOption(`#status-${key}`, "on hold");
  await manager.click(`form:has(#status-${key}) button`);
  await manager.waitForURL(/#care-plan$/);
  emit({ step: "edited" });

  // 6. The phone synced its offline edit: the conflict is in the review queue, every value with
  //    its author; she keeps the nurse's value.
  await nextLine();
  await manager.goto(`${BASE}/console/review`);
  await expectText(manager, "Conflicting values of");
  await expectText(manager, "on hold");
  await check(manager, "review-conflict");
  await manager.click(`button[aria-label^='Keep met for carePlan/']`);
  await manager.waitForURL(`${BASE}/console/review`);
  if ((await manager.locator("text=Keep this value").count()) !== 0) {
    throw new Error("the conflict is still listed after it was resolved");
  }
  await check(manager, "review-resolved");
  emit({ step: "resolved", kept: "met" });

  // 6b. The chart's other records, edited in the browser: she records Grace's phone number
  //     and a penicillin allergy; the phone, offline, makes the reaction severe while she makes
  //     it mild; both values are shown side by side and she keeps the nurse's.
  await manager.goto(`${BASE}/console/patients/${patientId}`);
  await manager.fill("#demo-phone", "555-0100");
  await manager.click("form:has(#demo-phone) button");
  await manager.waitForURL(/#demographics$/);
  await expectText(manager, "555-0100");
  await manager.fill("#allergy-substance-new", "Penicillin");
  await manager.fill("#allergy-reaction-new", "Rash");
  await manager.selectOption("#allergy-severity-new", "moderate");
  await manager.click("form:has(#allergy-substance-new) button");
  await manager.waitForURL(/#allergies$/);
  await expectText(manager, "Allergy: Penicillin");
  await check(manager, "chart-edit");
  emit({ step: "allergy" });
  const { allergyId } = await nextLine();
  await manager.selectOption(`#allergy-severity-${allergyId}`, "mild");
  await manager.click(`form:has(#allergy-severity-${allergyId}) button`);
  await manager.waitForURL(/#allergies$/);
  emit({ step: "allergy-edited" });
  await nextLine();
  await manager.goto(`${BASE}/console/patients/${patientId}`);
  await expectText(manager, "Conflicting values");
  await expectText(manager, `allergies/${allergyId}/severity`);
  await check(manager, "allergy-conflict");
  await manager.click(`button[aria-label='Keep severe for allergies/${allergyId}/severity']`);
  await manager.waitForURL(/#conflicts$/);
  if ((await manager.locator("text=Keep this value").count()) !== 0) {
    throw new Error("the allergy conflict is still listed after it was resolved");
  }
  await check(manager, "allergy-resolved");
  emit({ step: "allergy-resolved", kept: "severe" });

  // 7. The administrator's audit search lists the case manager's views.
  await admin.goto(`${BASE}/console/admin/audit?user=${env("MANAGER_ID")}&action=read`);
  const rows = await admin.$$eval("table.audit tbody tr", (trs) => trs.length);
  if (rows < 2) throw new Error(`audit search shows ${rows} rows of the case manager's views`);
  await check(admin, "audit");
  const csv = await admin.evaluate(async (url) => (await fetch(url)).text(),
    `${BASE}/console/admin/audit?user=${env("MANAGER_ID")}&action=read&format=csv`);
  emit({ step: "done", auditRows: rows, csvLines: csv.trim().split("\n").length, violations });
} finally {
  await browser.close();
}
// stdin's reader would keep the process alive.
process.exit(0);
