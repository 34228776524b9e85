/** The example of docs/central-hub-node.md is examples/central-hub.ts, and it runs against a server. */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";

import { Server } from "./server.js";

const PACKAGE = resolve(__dirname, "../..");
const PAGE = join(PACKAGE, "../../docs/central-hub-node.md");
const EXAMPLE = join(PACKAGE, "examples/central-hub.ts");
const COMPILED = join(PACKAGE, "dist/examples/central-hub.js");

function documentedExample(): string {
  const page = readFileSync(PAGE, "utf8");
  const blocks = [...page.matchAll(/```ts\n([\s\S]*?)```/g)].map((match) => match[1]);
  assert.equal(blocks.length, 1, "one ```ts block on the page");
  return blocks[0] as string;
}

test("the documented example is examples/central-hub.ts, word for word", () => {
  assert.equal(documentedExample(), readFileSync(EXAMPLE, "utf8"));
});

test("the example runs against a server: connects, sends, and replays on a second run", async () => {
  const server = await Server.start();
  try {
    const run = () =>
      promisify(execFile)(process.execPath, [COMPILED], {
        env: { ...process.env, SESSION_MANAGER_ADDRESS: server.address },
        timeout: 30_000,
      });
    const first = await run();
    assert.match(first.stdout, /^show data:image\/png;base64,\.\.\. until \d{4}-/m);
    assert.match(first.stdout, /: connected -> send$/m);
    const sent = /^sent (\S+) $/m.exec(first.stdout);
    assert.ok(sent, first.stdout);
    const second = await run();
    assert.match(second.stdout, new RegExp(`^sent ${sent[1]} replayed$`, "m"));
    assert.doesNotMatch(second.stdout, /^show /m);
  } finally {
    await server.stop();
  }
});
