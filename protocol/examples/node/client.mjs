#!/usr/bin/env node
// A stoker client in another language, written from protocol/README.md alone.
//
//   node client.mjs --endpoint ipc:///run/user/1000/stoker/stoker.sock --model gemma-3-270m \
//        --max-tokens 32 --temperature 0 "The capital of France is"
//
// --schema FILE (a JSON schema) asks for structured output: the text is then JSON that fits it
// (`response_format` in protocol/README.md), and the summary line carries it parsed, as "json".
//
// A tcp:// supervisor secured with CurveZMQ also needs --server-key FILE (its public key, a .key
// file) and --client-key FILE (this client's pair, a .key_secret file: `stoker keys` writes
// both), or the environment variables STOKER_SERVER_KEY and STOKER_CLIENT_KEY.
//
// Streams the completion to stdout as tokens arrive, then writes one JSON line to stderr:
// {"reason", "usage", "timings", "tokens", "frames"}. Exit codes as the stoker CLI: 0 done,
// 1 protocol or usage error, 2 no supervisor, 3 the request failed (its error code and message
// on stderr), 4 timeout.
import { Dealer } from "zeromq";
import { encode, decode } from "@msgpack/msgpack";
import os from "node:os";
import fs from "node:fs";

function defaultEndpoint() {
  if (process.env.STOKER_ENDPOINT) return process.env.STOKER_ENDPOINT;
  const runtime = process.env.XDG_RUNTIME_DIR;
  if (runtime) return `ipc://${runtime}/stoker/stoker.sock`;
  return `ipc:///tmp/stoker-${os.userInfo().uid}/stoker.sock`;
}

// A ZeroMQ certificate file (ZPL) holds `public-key = "..."` and, in a .key_secret file,
// `secret-key = "..."`: 40 Z85 characters each.
function readKeys(path) {
  const text = fs.readFileSync(path, "utf8");
  const find = (name) => (text.match(new RegExp(`${name}\\s*=\\s*"([^"]{40})"`)) || [])[1] || null;
  return { public: find("public-key"), secret: find("secret-key") };
}

function curveOptions(serverKeyFile, clientKeyFile) {
  if (!serverKeyFile && !clientKeyFile) return {};
  if (!serverKeyFile || !clientKeyFile) {
    throw new Error("CurveZMQ needs both --server-key (STOKER_SERVER_KEY) and --client-key (STOKER_CLIENT_KEY)");
  }
  const server = readKeys(serverKeyFile), client = readKeys(clientKeyFile);
  if (!server.public || !client.public || !client.secret) {
    throw new Error("a key file is not one that `stoker keys` wrote (--client-key takes the .key_secret file)");
  }
  return { curveServerKey: server.public, curvePublicKey: client.public, curveSecretKey: client.secret };
}

function parseArgs(argv) {
  const opts = {
    endpoint: defaultEndpoint(), timeout: 600, sampling: {},
    serverKey: process.env.STOKER_SERVER_KEY, clientKey: process.env.STOKER_CLIENT_KEY,
  };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => argv[++i];
    if (a === "--endpoint") opts.endpoint = next();
    else if (a === "--model") opts.model = next();
    else if (a === "--timeout") opts.timeout = Number(next());
    else if (a === "--max-tokens") opts.sampling.max_tokens = parseInt(next(), 10);
    else if (a === "--temperature") opts.sampling.temperature = Number(next());
    else if (a === "--seed") opts.sampling.seed = parseInt(next(), 10);
    else if (a === "--chat") opts.chat = true;
    else if (a === "--schema") {
      opts.sampling.response_format = { type: "json_schema", schema: JSON.parse(fs.readFileSync(next(), "utf8")) };
    }
    else if (a === "--server-key") opts.serverKey = next();
    else if (a === "--client-key") opts.clientKey = next();
    else rest.push(a);
  }
  if (rest.length !== 1) {
    process.stderr.write("usage: client.mjs [--endpoint EP] [--model M] [--max-tokens N] [--temperature T] [--seed S] [--chat] [--schema FILE]\n" +
                         "                 [--server-key FILE --client-key FILE] PROMPT\n");
    process.exit(1);
  }
  opts.prompt = rest[0];
  return opts;
}

const EXIT_FOR_CODE = { unknown_model: 3, load_failed: 3, worker_crashed: 3, insufficient_memory: 3, timeout: 4 };

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  if (opts.endpoint.startsWith("ipc://") && !fs.existsSync(opts.endpoint.slice("ipc://".length))) {
    process.stderr.write(`no supervisor at ${opts.endpoint} (no socket file)\n`);
    return 2;
  }
  const sock = new Dealer({ linger: 0, receiveTimeout: opts.timeout * 1000,
                            ...curveOptions(opts.serverKey, opts.clientKey) });
  sock.connect(opts.endpoint);
  const id = `node-${process.pid}`;
  const request = { v: 1, op: "generate", id, ...opts.sampling };
  if (opts.model) request.model = opts.model;
  if (opts.chat) request.messages = [{ role: "user", content: opts.prompt }];
  else request.prompt = opts.prompt;
  await sock.send(encode(request));

  let expectSeq = 0, tokens = 0, frames = 0, text = "";
  try {
    for (;;) {
      let frame;
      try {
        [frame] = await sock.receive();
      } catch (err) {
        if (err.code === "EAGAIN") {
          process.stderr.write(`no reply from the supervisor for ${opts.timeout} s\n`);
          return 4;
        }
        throw err;
      }
      const msg = decode(frame);
      if (msg.id !== id) continue; // not ours (this socket sends one request)
      if (msg.ev === "token") {
        if (msg.seq !== expectSeq) throw new Error(`seq ${msg.seq}, expected ${expectSeq}`);
        expectSeq += msg.n;
        tokens += msg.n;
        frames += 1;
        text += msg.text;
        process.stdout.write(msg.text);
      } else if (msg.ev === "end") {
        process.stdout.write("\n");
        const summary = { reason: msg.reason, usage: msg.usage, timings: msg.timings, tokens, frames };
        // Constrained text that ended by itself parses; one cut short by max_tokens may not.
        if (opts.sampling.response_format && msg.reason === "stop") summary.json = JSON.parse(text);
        process.stderr.write(JSON.stringify(summary) + "\n");
        return msg.usage.completion_tokens === tokens ? 0 : 1;
      } else if (msg.ev === "error") {
        process.stderr.write(JSON.stringify({ code: msg.code, message: msg.message }) + "\n");
        return EXIT_FOR_CODE[msg.code] ?? 1;
      }
      // "info" and events of later versions: nothing to do
    }
  } finally {
    sock.close();
  }
}

main().then((code) => process.exit(code), (err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
