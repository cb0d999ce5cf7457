// Drives the dev demo page in two headless Chromium tabs: alice and bob chat, with
// read ticks, presence, typing and last seen. A manual check of the demo page, not part of
// the test command (it needs Chromium and playwright-core):
//   apt-get install -y chromium && npm install --prefix /tmp/pw playwright-core@1
//   cargo run -p gateway -- --data-dir /tmp/demo &
//   NODE_PATH=/tmp/pw/node_modules node infra/demo-check.mjs http://127.0.0.1:8080/

import { chromium } from "playwright-core";
const base = process.argv[2];
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"] });
const ctx = await browser.newContext({ viewport: { width: 900, height: 600 } });
const alice = await ctx.newPage(), bob = await ctx.newPage();
for (const [page, user] of [[alice, "alice"], [bob, "bob"]]) {
  await page.goto(base);
  await page.fill("#user", user); await page.click("#loginform button");
  await page.waitForSelector("#conn:text('online')");
}
await alice.fill("#dmuser", "bob"); await alice.click("#dmform button");
await alice.fill("#text", "hi bob, it's alice"); await alice.press("#text", "Enter");
// Bob sees it live in the conversation list, opens it; alice's message gets read ticks.
await bob.waitForSelector("#convs li:has-text('alice')");
await bob.click("#convs li:has-text('alice')");
await bob.waitForSelector(".msg:has-text(\"hi bob, it's alice\")");
await alice.waitForSelector(".msg.mine .tick[data-status='read']", { timeout: 10000 });
await alice.waitForSelector("#peerstatus:text('online')");
// Typing indicator and a reply.
await bob.type("#text", "hey alice");
await alice.waitForSelector("#typing:text('bob is typing')");
await bob.press("#text", "Enter");
await alice.waitForSelector(".msg:not(.mine):has-text('hey alice')");
// A group: alice creates it with bob and writes; bob sees it and answers in it.
await alice.fill("#gname", "weekend"); await alice.fill("#gmembers", "bob"); await alice.click("#groupform button");
await alice.waitForSelector("#title:text('weekend')");
await alice.fill("#text", "who is in for sunday?"); await alice.press("#text", "Enter");
await bob.waitForSelector("#convs li:has-text('who is in for sunday?')");
await bob.click("#convs li:has-text('who is in for sunday?')");
await bob.waitForSelector(".msg:has-text('alice: who is in for sunday?')");
await bob.fill("#text", "me!"); await bob.press("#text", "Enter");
await alice.waitForSelector(".msg:not(.mine):has-text('bob: me!')");
await alice.click("#convs li:has-text('bob')");
// Bob leaves: alice sees last seen.
await bob.close();
await alice.waitForSelector("#peerstatus:text('last seen')", { timeout: 10000 });
await alice.waitForFunction(() => document.getElementById("typing").textContent === "");
await alice.screenshot({ path: process.env.SCREENSHOT || "/tmp/alice.png" });
console.log("two tabs chatted: message, read receipt, presence, typing, reply, group, last seen");
await browser.close();
