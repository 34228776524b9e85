/**
 * A real Session Manager for the tests: `session-manager serve` with the
 * simulated engine on a loopback port and a temporary database.
 *
 * The binary is `$SESSION_MANAGER_BIN`, else the repository's `.venv`.
 */

import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";

const REPOSITORY = resolve(__dirname, "../../../..");
const BINARY = process.env["SESSION_MANAGER_BIN"] ?? join(REPOSITORY, ".venv/bin/session-manager");
const READY = /^session-manager listening on port (\d+)$/;
const START_TIMEOUT_MS = 30_000;

export interface ServeOptions {
  /** The SQLite file; a new temporary one by default. */
  database?: string;
  /** The port; 0 (any free one) by default. */
  port?: number;
  /** More `serve` flags. */
  flags?: string[];
  /** More environment variables (tokens). */
  env?: Record<string, string>;
}

/** A temporary folder, removed by `removeTemporary`. */
export function temporaryFolder(): string {
  return mkdtempSync(join(tmpdir(), "sessionmanager-node-"));
}

export function removeTemporary(folder: string): void {
  rmSync(folder, { recursive: true, force: true });
}

export class Server {
  private constructor(
    readonly process: ChildProcess,
    readonly port: number,
    readonly database: string,
    private readonly folder: string | undefined,
  ) {}

  /** Starts a server and waits for its "listening" line. */
  static async start(options: ServeOptions = {}): Promise<Server> {
    const folder = options.database === undefined ? temporaryFolder() : undefined;
    const database = options.database ?? join(folder as string, "sessions.db");
    const args = [
      "serve",
      "--engine",
      "simulated",
      "--address",
      `127.0.0.1:${options.port ?? 0}`,
      "--database",
      database,
      // gRPC only: the HTTP API's default port would be shared by every test server.
      "--http-address",
      "",
      ...(options.flags ?? []),
    ];
    const child = spawn(BINARY, args, {
      env: { ...process.env, ...options.env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let errors = "";
    child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
      errors += chunk;
    });
    const port = await new Promise<number>((found, failed) => {
      const lines = createInterface({ input: child.stdout as NodeJS.ReadableStream });
      const timer = setTimeout(() => failed(new Error(`no "listening" line within ${START_TIMEOUT_MS} ms`)), START_TIMEOUT_MS);
      lines.once("line", (line) => {
        clearTimeout(timer);
        const match = READY.exec(line);
        if (match) {
          found(Number(match[1]));
        } else {
          failed(new Error(`unexpected first line: ${line}`));
        }
      });
      child.once("exit", (code) => {
        clearTimeout(timer);
        failed(new Error(`session-manager exited with ${code}: ${errors.trim()}`));
      });
    });
    return new Server(child, port, database, folder);
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** A new server on the same database and the same port (a restart). */
  restart(options: Omit<ServeOptions, "database" | "port"> = {}): Promise<Server> {
    return Server.start({ ...options, database: this.database, port: this.port });
  }

  /** Ends the process with `signal` (SIGKILL: a crash) and waits for it to exit. */
  async kill(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    if (this.process.exitCode === null && this.process.signalCode === null) {
      const exited = once(this.process, "exit");
      this.process.kill(signal);
      await exited;
    }
  }

  /** Stops the server and removes its temporary database. */
  async stop(): Promise<void> {
    this.process.kill("SIGCONT");
    await this.kill("SIGTERM");
    if (this.folder !== undefined) {
      removeTemporary(this.folder);
    }
  }
}

/** A port on which nothing listens. */
export async function closedPort(): Promise<number> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address();
  server.close();
  await once(server, "close");
  if (address === null || typeof address === "string") {
    throw new Error("no port");
  }
  return address.port;
}

/** A CA, and a server and a client certificate it signed (for 127.0.0.1 and localhost). */
export function makeCertificates(folder: string): void {
  const openssl = (...args: string[]) => execFileSync("openssl", args, { cwd: folder, stdio: "ignore" });
  openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA", "-keyout", "ca.key", "-out", "ca.pem");
  writeFileSync(join(folder, "san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n");
  for (const name of ["server", "client"]) {
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", `/CN=${name}`, "-keyout", `${name}.key`, "-out", `${name}.csr`);
    openssl("x509", "-req", "-in", `${name}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", `${name}.pem`);
  }
}
