// The browser check of the demo page (the test command's "browser" stage, infra/browser.sh):
// headless Chromium drives the page at <base URL> as several users, each in a browser
// profile of its own (the page keeps its login in the profile's storage), and checks what a
// user sees: chat, ticks, typing, presence, groups, the inbox after a reload, and each case
// that once broke the page (numbered as in the issue that fixed them).
//   PLAYWRIGHT_DIR=.cache/pw node infra/demo-check.mjs http://127.0.0.1:8080/
// (PLAYWRIGHT_DIR: where `npm install playwright-core` was run; default: the working directory)

import { createRequire } from "node:module";
import { resolve } from "node:path";

const { chromium } = createRequire(resolve(process.env.PLAYWRIGHT_DIR || ".") + "/")("playwright-core");

const base = process.argv[2];
if (!base) {
  console.error("usage: node infra/demo-check.mjs <base URL of a dev-mode gateway>");
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const problems = [];
// Nothing may hang: the whole check has a deadline.
const deadline = setTimeout(() => { console.error("browser check: over 240 s"); process.exit(1); }, 240_000);

async function profile(viewport = { width: 900, height: 700 }) {
  return browser.newContext({ viewport });
}
async function open(ctx, name) {
  const page = await ctx.newPage();
  page.setDefaultTimeout(15_000);
  page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
  pages.set(name, page);
  await page.goto(base);
  return page;
}
async function login(name, viewport) {
  const ctx = await profile(viewport);
  const page = await open(ctx, name);
  await page.fill("#user", name);
  await page.click("#loginform button");
  await page.waitForSelector("#conn:text('online')");
  return { ctx, page };
}
const pages = new Map();
async function check(what, run) {
  const started = Date.now();
  try {
    await run();
  } catch (e) {
    // What each open page showed, to see why.
    for (const [name, page] of pages) {
      if (page.isClosed()) continue;
      const shown = await page.evaluate(() => `inbox: ${document.getElementById("convs").innerText.replace(/\n+/g, " | ")}`
        + `\nconversation: ${document.getElementById("messages").innerText.slice(-600).replace(/\n+/g, " | ")}`
        + `\nerror: ${document.getElementById("err").innerText}`).catch(() => "?");
      console.error(`--- ${name}\n${shown}`);
    }
    console.error(`FAILED  ${what}`);
    throw e;
  }
  console.log(`ok  ${what} (${Date.now() - started} ms)`);
}
const connects = (page) => page.evaluate(() => window.chat.S.connects);
const statuses = (page) => page.$$eval(".msg.mine .tick", (ticks) => ticks.map((t) => t.dataset.status));
const conversationOf = (page, name) => page.$eval(`#convs li:has-text('${name}')`, (li) => li.dataset.conversation);

// Alice sends a picture with a caption, bob a PDF: each sees the other's file, byte for byte.
async function exchangeFiles(alice, bob) {
  // A 2×2 PNG: what bob's page shows must be these bytes, decoded as an image.
  const png = Buffer.from("iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAEElEQVR4nGP4z8AARAwQCgAf7gP9i18U1AAAAABJRU5ErkJggg==", "base64");
  await alice.page.click("#convs li:has-text('bob')");
  await alice.page.fill("#text", "our cat");
  await alice.page.setInputFiles("#file", { name: "cat.png", mimeType: "image/png", buffer: png });
  await alice.page.waitForSelector(".msg.mine:has(img.media) .tick[data-status='delivered'], .msg.mine:has(img.media) .tick[data-status='read']");
  await bob.page.click("#convs li[data-conversation='dm:alice:bob']");
  const img = await bob.page.waitForSelector(".msg img.media");
  await bob.page.waitForFunction((i) => i.complete && i.naturalWidth === 2, img);
  const src = await img.getAttribute("src");
  const fetched = await bob.page.evaluate(async (url) => [...new Uint8Array(await (await fetch(url)).arrayBuffer())], src);
  if (Buffer.compare(Buffer.from(fetched), png) !== 0) throw new Error("bob's picture is not alice's bytes");
  await bob.page.waitForSelector(".msg:has-text('our cat')");
  const doc = Buffer.from("%PDF-1.4 not really a pdf\n");
  await bob.page.setInputFiles("#file", { name: "notes.pdf", mimeType: "application/pdf", buffer: doc });
  const link = await alice.page.waitForSelector(".msg a.media:has-text('notes.pdf')");
  const got = await alice.page.evaluate(async (url) => [...new Uint8Array(await (await fetch(url)).arrayBuffer())], await link.getAttribute("href"));
  if (Buffer.compare(Buffer.from(got), doc) !== 0) throw new Error("alice's download is not bob's file");
}

// Ends the check: fails it if any page reported an error on the way.
async function finish(passed) {
  await browser.close();
  clearTimeout(deadline);
  if (problems.length) {
    console.error(problems.join("\n"));
    process.exit(1);
  }
  console.log(passed);
  process.exit(0);
}

const alice = await login("alice");
const bob = await login("bob");

// `ONLY=media`: the file exchange alone (the check against a cluster, whose media are on S3).
if (process.env.ONLY === "media") {
  await alice.page.fill("#dmuser", "bob");
  await alice.page.click("#dmform button");
  await check("two users exchange a picture, and a file to download (cluster)", () => exchangeFiles(alice, bob));
  await finish("browser check (media): passed");
}

await check("two users chat: message, read ticks, presence, typing, reply", async () => {
  await alice.page.fill("#dmuser", "bob");
  await alice.page.click("#dmform button");
  await alice.page.fill("#text", "hi bob, it's alice");
  await alice.page.press("#text", "Enter");
  await bob.page.click("#convs li:has-text('alice')");
  await bob.page.waitForSelector(".msg:has-text(\"hi bob, it's alice\")");
  await alice.page.waitForSelector(".msg.mine .tick[data-status='read']");
  await alice.page.waitForSelector("#peerstatus:text('online')");
  await bob.page.type("#text", "hey alice");
  await alice.page.waitForSelector("#typing:text('bob is typing')");
  await bob.page.press("#text", "Enter");
  await alice.page.waitForSelector(".msg:not(.mine):has-text('hey alice')");
  // Alice has it open: she read it, and bob's ticks say so.
  await bob.page.waitForSelector(".msg.mine:has-text('hey alice') .tick[data-status='read']");
  await alice.page.waitForSelector(".day:text('Today')");
});

await check("1. a 140,000-character paste is refused in the page; a frame the server closes on is never resent by itself", async () => {
  const before = await connects(alice.page);
  const mine = (await statuses(alice.page)).length;
  await alice.page.fill("#text", "x".repeat(140_000));
  await alice.page.press("#text", "Enter");
  await alice.page.waitForSelector("#err.shown:has-text('too long')");
  if ((await statuses(alice.page)).length !== mine) throw new Error("the long paste became a message");
  // Past the page's own check (as an older page would send it): the server closes with
  // 1009, the page marks that message failed and reconnects once, without resending it.
  await alice.page.evaluate(() => window.chat.sendBody("y".repeat(140_000), true));
  await alice.page.waitForSelector(".msg.mine.failed");
  await alice.page.waitForSelector("#conn:text('online')");
  await alice.page.waitForTimeout(4_000); // a resend loop would reconnect every few hundred ms
  const extra = (await connects(alice.page)) - before;
  if (extra > 2) throw new Error(`${extra} reconnects after one refused frame`);
  await alice.page.click("#err button");
});

await check("2. one 300-character word wraps: the conversation stays on screen for both", async () => {
  await alice.page.fill("#text", "w".repeat(300));
  await alice.page.press("#text", "Enter");
  await bob.page.waitForSelector(`.msg:has-text('${"w".repeat(300)}')`);
  for (const page of [alice.page, bob.page]) {
    const fits = await page.evaluate(() => {
      const box = document.getElementById("messages");
      const main = document.querySelector("main").getBoundingClientRect();
      return box.scrollWidth <= box.clientWidth && main.right <= window.innerWidth + 1;
    });
    if (!fits) throw new Error("the conversation pane is wider than the window");
  }
});

await check("3. a burst past the rate limit is retried until every message is sent; a refused send shows as failed with a retry", async () => {
  await alice.page.evaluate(() => { for (let i = 0; i < 60; i++) window.chat.sendBody(`burst ${i}`); });
  await alice.page.waitForFunction(
    () => [...document.querySelectorAll(".msg.mine .tick")].every((t) => ["sent", "delivered", "read", "failed"].includes(t.dataset.status)),
    null, { timeout: 40_000 });
  const stuck = (await alice.page.$$eval(".msg.mine", (all) => all.filter((m) => m.textContent.startsWith("burst") && m.classList.contains("failed")).length));
  if (stuck) throw new Error(`${stuck} burst messages failed instead of being retried`);
  await bob.page.waitForSelector(".msg:has-text('burst 59')");
  // A group bob was removed from: his send is refused (forbidden) and shown as failed.
  await alice.page.fill("#gname", "temp");
  await alice.page.fill("#gmembers", "bob");
  await alice.page.click("#groupform button");
  await alice.page.waitForSelector("#title:text('temp')");
  await bob.page.waitForSelector("#convs li:has-text('temp')");
  const temp = await conversationOf(bob.page, "temp");
  await alice.page.evaluate((g) => window.chat.S.ws.send(JSON.stringify({ type: "remove_members", ref: "rm", conversation: g, members: ["bob"] })), temp);
  await bob.page.waitForFunction((g) => window.chat.S.convs.get(g).left === true, temp);
  await bob.page.click("#convs li:has-text('temp')");
  await bob.page.fill("#text", "am I still in?");
  await bob.page.press("#text", "Enter");
  await bob.page.waitForSelector(".msg.mine.failed:has-text('am I still in?') button.retry");
});

await check("4. a reload keeps the login and brings the inbox back, with unread counts, by activity", async () => {
  await alice.page.close();
  await bob.page.click("#convs li:has-text('alice')");
  for (const text of ["while you were away", "and again"]) {
    await bob.page.fill("#text", text);
    await bob.page.press("#text", "Enter");
  }
  await bob.page.waitForFunction(() => document.querySelectorAll(".msg.mine .tick[data-status='sent']").length >= 2);
  alice.page = await open(alice.ctx, "alice");
  await alice.page.waitForSelector("#conn:text('online')");
  await alice.page.waitForSelector("#me:text('alice')");
  const first = alice.page.locator("#convs li").first();
  await first.locator(".name:text('bob')").waitFor();
  await first.locator(".unread:text('2')").waitFor();
  await alice.page.waitForSelector("#convs li .name:text('temp')");
  await first.click();
  await alice.page.waitForSelector(".msg:has-text('and again')");
  await alice.page.waitForSelector(`.msg.mine .tick[data-status='read']`);
  // A token the server no longer takes: back to the login form, with a reason.
  const stale = await profile();
  await stale.addInitScript(() => localStorage.setItem("chat.session", JSON.stringify({
    user: "alice", token: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.bm90IHNpZ25lZA" })));
  const page = await open(stale, "stale");
  await page.waitForSelector("#login:visible");
  await page.waitForSelector("#loginmsg:has-text('log in again')");
  await stale.close();
});

await check("5. group ticks turn blue only when every member has read", async () => {
  await alice.page.fill("#gname", "trio");
  await alice.page.fill("#gmembers", "bob, carol");
  await alice.page.click("#groupform button");
  await alice.page.waitForSelector("#title:text('trio')");
  await alice.page.fill("#text", "hello trio");
  await alice.page.press("#text", "Enter");
  await bob.page.click("#convs li:has-text('trio')");
  await bob.page.waitForSelector(".msg:has-text('hello trio')");
  const trio = await conversationOf(alice.page, "trio");
  await alice.page.waitForFunction((g) => (window.chat.S.convs.get(g).markers.get("bob") || {}).read, trio);
  const tick = ".msg.mine:has-text('hello trio') .tick";
  if ((await alice.page.$eval(tick, (t) => t.dataset.status)) === "read") {
    throw new Error("blue ticks while carol has not even received it");
  }
  const carol = await login("carol");
  await carol.page.click("#convs li:has-text('trio')");
  await carol.page.waitForSelector(".msg:has-text('hello trio')");
  await alice.page.waitForSelector(`${tick}[data-status='read']`);
  await carol.ctx.close();
  // dave, added later, never sees "hello trio": its ticks stay blue.
  await alice.page.evaluate((g) => window.chat.S.ws.send(JSON.stringify({ type: "add_members", ref: "add", conversation: g, members: ["dave"] })), trio);
  await alice.page.waitForFunction((g) => (window.chat.S.convs.get(g).joined || {}).dave, trio);
  await alice.page.waitForFunction((g) => window.chat.S.convs.get(g).members.includes("dave"), trio);
  const after = await alice.page.$eval(tick, (t) => t.dataset.status);
  if (after !== "read") throw new Error(`adding dave turned the ticks of an earlier message to ${after}`);
});

await check("6. an empty or blank message is not sent", async () => {
  const mine = (await statuses(alice.page)).length;
  await alice.page.fill("#text", "   \n  ");
  await alice.page.press("#text", "Enter");
  await alice.page.waitForTimeout(300);
  if ((await statuses(alice.page)).length !== mine) throw new Error("a blank message was sent");
});

await check("7. errors are readable until dismissed; the page works 390 px wide", async () => {
  await alice.page.fill("#dmuser", "not a user!");
  await alice.page.click("#dmform button");
  await alice.page.waitForSelector("#err.shown");
  await alice.page.waitForTimeout(6_000);
  const text = await alice.page.$eval("#err.shown span", (e) => e.textContent);
  if (!text.includes("not a user id") || text.includes("`users`")) throw new Error(`error text: ${text}`);
  await alice.page.click("#err button");
  await alice.page.waitForSelector("#err", { state: "hidden" });
  const phone = await login("dave", { width: 390, height: 800 });
  await phone.page.fill("#dmuser", "alice");
  await phone.page.click("#dmform button");
  await phone.page.waitForSelector("#back:visible");
  await phone.page.fill("#text", "from a phone");
  await phone.page.press("#text", "Enter");
  await phone.page.waitForSelector(".msg.mine .tick[data-status='delivered'], .msg.mine .tick[data-status='read']");
  const fits = await phone.page.evaluate(() => document.documentElement.scrollWidth <= 390
    && document.querySelector("main").getBoundingClientRect().width <= 390);
  if (!fits) throw new Error("wider than a 390 px screen");
  await phone.page.click("#back");
  await phone.page.waitForSelector("#convs li:has-text('alice')");
  await phone.ctx.close();
});

await check("two users exchange a picture, and a file to download", () => exchangeFiles(alice, bob));

await check("last seen once the other user leaves", async () => {
  await alice.page.click("#convs li:has-text('bob')");
  await bob.ctx.close();
  await alice.page.waitForSelector("#peerstatus:text('last seen')", { timeout: 10_000 });
});

if (process.env.SCREENSHOT) await alice.page.screenshot({ path: process.env.SCREENSHOT });
await finish("browser check: every case passed");
