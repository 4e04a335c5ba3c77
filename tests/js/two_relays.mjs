#!/usr/bin/env node
// Scale-out interop: the unmodified `@automerge/automerge-repo` 2.5.6 client writes a visit note
// through relay 1 and a second, fresh client reads it back through relay 2 (another relay
// process on the same PostgreSQL database); then a live edit through relay 1 reaches the reader
// on relay 2 without it asking. `tests/tests/scale_out.rs` runs it and checks the result against
// a Rust device on relay 2.
//
// Usage (tokens from the environment, never argv):
//   FIELDCHART_WRITER_TOKEN=... FIELDCHART_READER_TOKEN=... node two_relays.mjs \
//     --relay1 ws://127.0.0.1:P1/v1/sync --relay2 ws://127.0.0.1:P2/v1/sync \
//     --agency A --patient P --created-by U [--timeout-ms 30000]
//
// stdout: one JSON object per line with an "event" key: `stored` (relay 1 confirmed the writer's
// heads), `read` (the reader on relay 2 holds the same heads), `live` (the reader received the
// writer's later edit), then `done` (exit 0) or `error` (exit 1). Every wait is bounded by
// --timeout-ms; stderr carries a short trace of each client's frames.

import { parseArgs } from "node:util"
import { Repo, ImmutableString, cbor } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n")
}

let exiting = false
function fail(message, extra = {}) {
  if (exiting) return
  exiting = true
  emit("error", { message, ...extra })
  process.stderr.write(`two_relays.mjs: ${message}\n`)
  process.exit(1)
}
process.on("uncaughtException", err => fail(`uncaught exception: ${err?.stack ?? err}`))
process.on("unhandledRejection", err => fail(`unhandled rejection: ${err?.stack ?? err}`))

const startedAt = Date.now()
let args
try {
  args = parseArgs({
    options: {
      relay1: { type: "string" },
      relay2: { type: "string" },
      agency: { type: "string" },
      patient: { type: "string" },
      "created-by": { type: "string" },
      "timeout-ms": { type: "string", default: "30000" },
    },
  }).values
} catch (err) {
  fail(err.message)
}
for (const name of ["relay1", "relay2", "agency", "patient", "created-by"]) {
  if (!args[name]) fail(`--${name} is required`)
}
const timeoutMs = Number(args["timeout-ms"])
if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) fail("--timeout-ms must be a positive integer")
const deadline = startedAt + timeoutMs

// Resolves once `check()` is truthy, re-checked on every `events` of `emitter` and every frame;
// fails the run when the deadline passes.
function waitUntil(what, check, subscribe, last = () => ({})) {
  return new Promise(resolve => {
    let unsubscribe = () => {}
    const timer = setTimeout(
      () => {
        unsubscribe()
        fail(`timed out after ${timeoutMs} ms waiting for ${what}`, last())
      },
      Math.max(0, deadline - Date.now())
    )
    const poke = () => {
      const result = check()
      if (result) {
        clearTimeout(timer)
        unsubscribe()
        resolve(result)
      }
    }
    unsubscribe = subscribe(poke)
    poke()
  })
}

// A JSON-safe copy of an automerge value (ImmutableString → string).
function plain(value) {
  if (value instanceof ImmutableString) return value.val
  if (Array.isArray(value)) return value.map(plain)
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]))
  }
  return value
}

function sameHeads(a, b) {
  if (!a || !b || a.length !== b.length) return false
  const set = new Set(a)
  return b.every(h => set.has(h))
}

// One stock client: a Repo with the stock WebSocket adapter on `url`, its frames traced. The
// relay's error frames end the run with the relay's message.
function client(name, url, token, storage) {
  const withToken = new URL(url)
  withToken.searchParams.set("token", token)
  const adapter = new WebSocketClientAdapter(withToken.toString())
  const frameListeners = new Set()
  const receive = adapter.receiveMessage.bind(adapter)
  adapter.receiveMessage = bytes => {
    const message = cbor.decode(new Uint8Array(bytes))
    process.stderr.write(
      JSON.stringify({ client: name, dir: "in", type: message?.type, doc: message?.documentId }) +
        "\n"
    )
    if (message?.type === "error") fail(`relay sent ${name} an error frame: ${message.message}`)
    receive(bytes)
    for (const listener of frameListeners) listener(message)
  }
  const repo = new Repo({
    network: [adapter],
    storage,
    peerId: `fieldchart-js-${name}-${Math.random().toString(36).slice(2, 10)}`,
  })
  const peer = new Promise(resolve => {
    repo.networkSubsystem.on("peer", ({ peerId, peerMetadata }) =>
      resolve({ peerId, metadata: peerMetadata ?? {} })
    )
  })
  return { name, repo, peer, frameListeners }
}

// In-memory storage: with one the Repo joins as a non-ephemeral peer with a storage id, as a
// browser app on IndexedDB does.
class MemoryStorage {
  #data = new Map()
  #key = key => key.join("\u0000")
  async load(key) {
    return this.#data.get(this.#key(key))
  }
  async save(key, data) {
    this.#data.set(this.#key(key), data)
  }
  async remove(key) {
    this.#data.delete(this.#key(key))
  }
  async loadRange(prefix) {
    const p = this.#key(prefix)
    return [...this.#data.entries()]
      .filter(([k]) => k === p || k.startsWith(p + "\u0000"))
      .map(([k, data]) => ({ key: k.split("\u0000"), data }))
  }
  async removeRange(prefix) {
    for (const { key } of await this.loadRange(prefix)) this.#data.delete(this.#key(key))
  }
}

async function connected(c) {
  const timer = setTimeout(
    () => fail(`timed out waiting for the ${c.name} relay's peer message`),
    Math.max(0, deadline - Date.now())
  )
  const relay = await c.peer
  clearTimeout(timer)
  if (!relay.metadata.storageId) fail(`the ${c.name} relay advertised no storageId`)
  return relay
}

// Until the relay confirms (per its storage id) that it holds the handle's current heads.
function relayHolds(c, handle, relay) {
  return waitUntil(
    `${c.name}'s relay to confirm heads of ${handle.documentId}`,
    () => {
      const info = handle.getSyncInfo(relay.metadata.storageId)
      return info && sameHeads(info.lastHeads, handle.heads()) ? info : undefined
    },
    poke => {
      handle.on("remote-heads", poke)
      handle.on("heads-changed", poke)
      c.frameListeners.add(poke)
      return () => {
        handle.off("remote-heads", poke)
        handle.off("heads-changed", poke)
        c.frameListeners.delete(poke)
      }
    },
    () => ({ heads: handle.heads(), relayHeads: handle.getSyncInfo(relay.metadata.storageId) })
  )
}

// Until the handle's heads are `heads`.
function headsReach(c, handle, heads) {
  return waitUntil(
    `${c.name} to hold heads ${JSON.stringify(heads)} of ${handle.documentId}`,
    () => sameHeads(handle.heads(), heads),
    poke => {
      handle.on("heads-changed", poke)
      handle.on("change", poke)
      return () => {
        handle.off("heads-changed", poke)
        handle.off("change", poke)
      }
    },
    () => ({ heads: handle.heads() })
  )
}

async function main() {
  const writer = client("writer", args.relay1, process.env.FIELDCHART_WRITER_TOKEN ?? "", new MemoryStorage())
  const one = await connected(writer)
  // A visit note as a stock JS app would write it: the schema's scalar root strings, an integer
  // timestamp, a Text narrative, and a list of vitals; then a second change that types into the
  // narrative and adds a reading.
  const handle = writer.repo.create({
    schema: new ImmutableString("fieldchart/visit-note@1"),
    kind: new ImmutableString("visit-note"),
    patientId: new ImmutableString(args.patient),
    agencyId: new ImmutableString(args.agency),
    createdBy: new ImmutableString(args["created-by"]),
    createdAt: Date.now(),
    assessment: "Patient alert and oriented.",
    observations: [{ vital: new ImmutableString("pulse"), value: new ImmutableString("72"), unit: new ImmutableString("bpm") }],
  })
  handle.change(doc => {
    doc.assessment = "Patient alert and oriented. Lungs clear."
    doc.observations.push({
      vital: new ImmutableString("bloodPressure"),
      value: new ImmutableString("128/82"),
      unit: new ImmutableString("mmHg"),
    })
  })
  await relayHolds(writer, handle, one)
  emit("stored", { documentId: handle.documentId, heads: handle.heads(), relayStorageId: one.metadata.storageId, doc: plain(handle.doc()) })

  // A fresh client (no storage, nothing cached) on relay 2.
  const reader = client("reader", args.relay2, process.env.FIELDCHART_READER_TOKEN ?? "", undefined)
  const two = await connected(reader)
  const found = await Promise.race([
    reader.repo.find(handle.documentId, { allowableStates: ["ready", "unavailable"] }),
    new Promise(resolve => setTimeout(resolve, Math.max(0, deadline - Date.now()))),
  ])
  if (!found) fail(`timed out finding ${handle.documentId} through relay 2`)
  if (found.state !== "ready") fail(`relay 2 answered ${found.state} for ${handle.documentId}`)
  await headsReach(reader, found, handle.heads())
  emit("read", { documentId: found.documentId, heads: found.heads(), relayStorageId: two.metadata.storageId, doc: plain(found.doc()) })

  // Live: the writer edits again through relay 1; the reader, connected to relay 2 and asking
  // nothing, receives it.
  handle.change(doc => {
    doc.plan = "Continue wound care; recheck Friday."
  })
  await relayHolds(writer, handle, one)
  await headsReach(reader, found, handle.heads())
  emit("live", { heads: found.heads(), writerHeads: handle.heads(), doc: plain(found.doc()) })

  await Promise.race([
    Promise.all([writer.repo.shutdown(), reader.repo.shutdown()]).catch(() => {}),
    new Promise(resolve => setTimeout(resolve, 1000)),
  ])
}

main().then(
  () => {
    emit("done", { elapsedMs: Date.now() - startedAt })
    process.exit(0)
  },
  err => fail(err?.stack ?? String(err))
)
