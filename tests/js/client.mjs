#!/usr/bin/env node
// Fieldchart interop client: the unmodified `@automerge/automerge-repo` 2.5.6 and
// `@automerge/automerge-repo-network-websocket` 2.5.6 packages, driven from the command line, so
// the Rust test `tests/tests/js_interop.rs` can check that a stock JS client syncs with the relay
// (DESIGN §4: "any JS automerge-repo client can sync with the relay").
//
// Output protocol: one JSON object per line on stdout, each with an "event" key. The last line is
// either {"event":"done"} (exit 0) or {"event":"error","message":...} (exit 1). Every wait is
// bounded by --timeout-ms; running out prints what was being waited for and exits 1.
// Diagnostics (every WebSocket frame in and out, summarised) go to stderr as JSON lines.
//
// The token is read from the FIELDCHART_TOKEN environment variable, not from argv, so it does
// not show in process listings; it is sent as `?token=` because the JS WebSocket client (like a
// browser) cannot set an Authorization header.
//
// Usage:
//   node client.mjs create --relay ws://127.0.0.1:PORT/v1/sync --agency A --patient P \
//        --created-by U [--kind visit-note] [--assessment TEXT] [--root-strings scalar|text] \
//        [--create-style initial|later] [--then-field F (--then-value V | --then-contains V)]
//        [--expect-refused]
//   node client.mjs watch --relay URL --document ID [--field F (--value V | --contains V)]
//   node client.mjs find-expect-unavailable --relay URL --document ID|random
// Common options: --storage memory|none (default memory), --timeout-ms N (default 20000).

import { parseArgs } from "node:util"
import {
  Repo,
  ImmutableString,
  cbor,
  generateAutomergeUrl,
  interpretAsDocumentId,
  parseAutomergeUrl,
} from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import * as Automerge from "@automerge/automerge"

// --- output -----------------------------------------------------------------------------------

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n")
}

function trace(fields) {
  process.stderr.write(JSON.stringify({ trace: true, at: Date.now() - startedAt, ...fields }) + "\n")
}

let exiting = false
function fail(message, extra = {}) {
  if (exiting) return
  exiting = true
  emit("error", { message, ...extra })
  process.stderr.write(`client.mjs: ${message}\n`)
  process.exit(1)
}

const startedAt = Date.now()

// An uncaught exception is how the websocket adapter reports a refused upgrade (for example
// "Unexpected server response: 401": WebSocketClientAdapter.onError rethrows every error except
// ECONNREFUSED); report it as a normal failure line.
process.on("uncaughtException", err => fail(`uncaught exception: ${err?.stack ?? err}`))
process.on("unhandledRejection", err => fail(`unhandled rejection: ${err?.stack ?? err}`))

// --- arguments --------------------------------------------------------------------------------

const USAGE =
  "usage: client.mjs create|watch|find-expect-unavailable --relay ws://HOST:PORT/v1/sync [options]"

let parsed
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      relay: { type: "string" },
      storage: { type: "string", default: "memory" },
      "timeout-ms": { type: "string", default: "20000" },
      // create
      agency: { type: "string" },
      patient: { type: "string" },
      "created-by": { type: "string" },
      kind: { type: "string", default: "visit-note" },
      assessment: { type: "string", default: "Patient alert and oriented." },
      "root-strings": { type: "string", default: "scalar" },
      "create-style": { type: "string", default: "initial" },
      "then-field": { type: "string" },
      "then-value": { type: "string" },
      "then-contains": { type: "string" },
      "expect-refused": { type: "boolean", default: false },
      // watch, find-expect-unavailable
      document: { type: "string" },
      field: { type: "string" },
      value: { type: "string" },
      contains: { type: "string" },
    },
  })
} catch (err) {
  fail(`${err.message}\n${USAGE}`)
}
const args = parsed.values
const mode = parsed.positionals[0]

function required(name) {
  const value = args[name]
  if (value === undefined || value === "") fail(`--${name} is required for ${mode}\n${USAGE}`)
  return value
}

function oneOf(name, allowed) {
  const value = args[name]
  if (!allowed.includes(value)) fail(`--${name} must be one of ${allowed.join(", ")}, got ${value}`)
  return value
}

if (!["create", "watch", "find-expect-unavailable"].includes(mode)) fail(USAGE)

const timeoutMs = Number(args["timeout-ms"])
if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) fail("--timeout-ms must be a positive integer")
const deadline = startedAt + timeoutMs

const token = process.env.FIELDCHART_TOKEN
if (!token) fail("FIELDCHART_TOKEN is not set")
const relayUrl = new URL(required("relay"))
relayUrl.searchParams.set("token", token)
const storageKind = oneOf("storage", ["memory", "none"])

// --- bounded waiting --------------------------------------------------------------------------

// Resolves when `check()` returns a truthy value, re-checking whenever `subscribe` calls back;
// fails the process with `what` once the overall deadline passes.
function waitUntil(what, check, subscribe, describeLast = () => ({})) {
  return new Promise(resolve => {
    let unsubscribe = () => {}
    const timer = setTimeout(
      () => {
        unsubscribe()
        fail(`timed out after ${timeoutMs} ms waiting for ${what}`, describeLast())
      },
      Math.max(0, deadline - Date.now())
    )
    const poke = () => {
      let result
      try {
        result = check()
      } catch (err) {
        clearTimeout(timer)
        unsubscribe()
        fail(`while waiting for ${what}: ${err?.stack ?? err}`)
        return
      }
      if (result) {
        clearTimeout(timer)
        unsubscribe()
        resolve(result)
      }
    }
    unsubscribe = subscribe(poke) ?? (() => {})
    poke()
  })
}

function withDeadline(what, promise) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => fail(`timed out after ${timeoutMs} ms waiting for ${what}`),
      Math.max(0, deadline - Date.now())
    )
    promise.then(
      value => {
        clearTimeout(timer)
        resolve(value)
      },
      err => {
        clearTimeout(timer)
        reject(err)
      }
    )
  })
}

// --- storage ----------------------------------------------------------------------------------

// In-memory StorageAdapterInterface. With a storage adapter the Repo advertises a storageId and
// isEphemeral=false in its join (Repo.ts: `isEphemeral = storage === undefined`), which is what a
// browser client on IndexedDB sends; without one it sends storageId=undefined (CBOR 0xf7).
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

// --- repo and frame trace ---------------------------------------------------------------------

const adapter = new WebSocketClientAdapter(relayUrl.toString())

// Every frame in and out, summarised on stderr; `error` frames from the relay end the run with
// the relay's message (the adapter itself only logs them, and would retry forever).
const framesIn = []
// Callbacks run after each inbound frame (after automerge-repo has handled it).
const frameListeners = new Set()
function summarise(message) {
  const data = message?.data
  return {
    type: message?.type,
    senderId: message?.senderId,
    targetId: message?.targetId,
    documentId: message?.documentId,
    dataLen: data?.byteLength,
    dataHead: data?.byteLength ? Buffer.from(data.subarray(0, 1)).toString("hex") : undefined,
    peerMetadata: message?.peerMetadata,
    selectedProtocolVersion: message?.selectedProtocolVersion,
    message: message?.type === "error" ? message.message : undefined,
  }
}
const receiveMessage = adapter.receiveMessage.bind(adapter)
adapter.receiveMessage = bytes => {
  let message
  try {
    message = cbor.decode(new Uint8Array(bytes))
  } catch (err) {
    trace({ dir: "in", undecodable: true, len: bytes.byteLength, error: String(err) })
    fail(`relay sent a frame the JS client cannot decode (${bytes.byteLength} bytes): ${err}`)
    return
  }
  framesIn.push(message)
  trace({ dir: "in", ...summarise(message) })
  if (message?.type === "error") {
    fail(`relay sent an error frame: ${message.message}`, { relayError: message.message })
    return
  }
  receiveMessage(bytes)
  for (const listener of frameListeners) listener(message)
}
const send = adapter.send.bind(adapter)
adapter.send = message => {
  trace({ dir: "out", ...summarise(message) })
  send(message)
}

const peerId = `fieldchart-js-${mode}-${Math.random().toString(36).slice(2, 10)}`
const repo = new Repo({
  network: [adapter],
  storage: storageKind === "memory" ? new MemoryStorage() : undefined,
  peerId,
})

// The relay is this client's only peer.
let relay
const relayPeer = new Promise(resolve => {
  repo.networkSubsystem.on("peer", ({ peerId: relayPeerId, peerMetadata }) => {
    relay = { peerId: relayPeerId, metadata: peerMetadata ?? {} }
    resolve(relay)
  })
})
repo.networkSubsystem.on("peer-disconnected", ({ peerId: gone }) => {
  trace({ event: "peer-disconnected", peerId: gone })
})

async function connected() {
  const r = await withDeadline(`the relay's peer message on ${redacted(relayUrl)}`, relayPeer)
  emit("connected", {
    peerId,
    relayPeerId: r.peerId,
    relayStorageId: r.metadata.storageId ?? null,
    relayIsEphemeral: r.metadata.isEphemeral ?? null,
    ownStorage: storageKind,
  })
  return r
}

function redacted(url) {
  const copy = new URL(url)
  if (copy.searchParams.has("token")) copy.searchParams.set("token", "REDACTED")
  return copy.toString()
}

// --- document helpers -------------------------------------------------------------------------

// A JSON-safe copy of an automerge value: ImmutableString → string, bytes → hex, Date → ISO.
function plain(value) {
  if (value instanceof ImmutableString) return value.val
  if (value instanceof Date) return value.toISOString()
  if (value instanceof Uint8Array) return Buffer.from(value).toString("hex")
  if (Array.isArray(value)) return value.map(plain)
  if (value && typeof value === "object") {
    if (typeof value.value === "number" && value.constructor?.name === "Counter") return value.value
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]))
  }
  return value
}

function fieldAt(doc, path) {
  let value = doc
  for (const part of path.split(".")) {
    if (value === undefined || value === null) return undefined
    value = value[part]
  }
  return plain(value)
}

function sameHeads(a, b) {
  if (!a || !b || a.length !== b.length) return false
  const set = new Set(a)
  return b.every(h => set.has(h))
}

function relayRefused(documentId, r) {
  return framesIn.some(
    m => m?.type === "doc-unavailable" && m.documentId === documentId && m.senderId === r.peerId
  )
}

// Waits until the relay's confirmed heads for this document (what automerge-repo records per
// remote storageId from the relay's sync messages, Repo.ts "sync-state" handler) equal the
// document's current heads: the relay has every local change. Resolves to {refused: true} if
// the relay answers doc-unavailable instead (it refuses documents of patients the user may not
// touch).
async function relayHolds(handle, r) {
  const storageId = r.metadata.storageId
  if (!storageId) {
    fail(
      "the relay's peer message carries no peerMetadata.storageId (DESIGN §4 requires a stable " +
        "storageId with isEphemeral:false), so the client cannot learn which heads the relay holds",
      { relayPeerMetadata: r.metadata }
    )
  }
  return waitUntil(
    `the relay to confirm heads ${JSON.stringify(handle.heads())} of ${handle.documentId}`,
    () => {
      if (relayRefused(handle.documentId, r)) return { refused: true }
      const info = handle.getSyncInfo(storageId)
      return info && sameHeads(info.lastHeads, handle.heads()) ? info : undefined
    },
    poke => {
      handle.on("remote-heads", poke)
      handle.on("heads-changed", poke)
      frameListeners.add(poke)
      return () => {
        handle.off("remote-heads", poke)
        handle.off("heads-changed", poke)
        frameListeners.delete(poke)
      }
    },
    () => ({
      localHeads: handle.heads(),
      relayHeads: handle.getSyncInfo(storageId)?.lastHeads ?? null,
    })
  )
}

function fieldMatches(actual, expected) {
  if (expected.value !== undefined) return actual === expected.value
  if (expected.contains !== undefined)
    return typeof actual === "string" && actual.includes(expected.contains)
  return actual !== undefined
}

async function fieldSeen(handle, field, expected) {
  const want =
    expected.value !== undefined
      ? `== ${JSON.stringify(expected.value)}`
      : expected.contains !== undefined
        ? `containing ${JSON.stringify(expected.contains)}`
        : "present"
  await waitUntil(
    `field ${field} of ${handle.documentId} to be ${want}`,
    () => fieldMatches(fieldAt(handle.doc(), field), expected),
    poke => {
      handle.on("change", poke)
      return () => handle.off("change", poke)
    },
    () => ({ lastValue: fieldAt(handle.doc(), field) ?? null })
  )
  emit("seen", {
    documentId: handle.documentId,
    field,
    value: fieldAt(handle.doc(), field),
    heads: handle.heads(),
    doc: plain(handle.doc()),
  })
}

function expectation(valueName, containsName) {
  const value = args[valueName]
  const contains = args[containsName]
  if (value !== undefined && contains !== undefined)
    fail(`give --${valueName} or --${containsName}, not both`)
  return { value, contains }
}

// --- modes ------------------------------------------------------------------------------------

async function create() {
  const stringOf = oneOf("root-strings", ["scalar", "text"]) === "scalar"
    ? s => new ImmutableString(s)
    : s => s
  const style = oneOf("create-style", ["initial", "later"])
  // The root fields of every Fieldchart document (DESIGN §2): scalar strings by the schema; a
  // stock JS app that writes plain strings produces Text instead, which the relay also reads.
  const root = {
    schema: stringOf(`fieldchart/${args.kind}@1`),
    kind: stringOf(args.kind),
    patientId: stringOf(required("patient")),
    agencyId: stringOf(required("agency")),
    createdBy: stringOf(required("created-by")),
    // Milliseconds since the epoch; an integral JS number is an automerge int scalar, which is
    // what core's model reads (core/src/model.rs, "Root fields").
    createdAt: Date.now(),
    // Free text a person types: automerge Text (a plain JS string in automerge 3).
    assessment: args.assessment,
  }
  const thenField = args["then-field"]
  const thenExpect = expectation("then-value", "then-contains")

  const r = await connected()
  let handle
  if (style === "initial") {
    handle = repo.create(root)
  } else {
    // What a typical app does: create the document (announced to the relay at once, still
    // empty), then fill it in with a second change.
    handle = repo.create()
    // The scenario is "the relay saw the document while it was still empty": wait for the
    // relay's answer to that announcement (any frame from the relay about this document),
    // not for a fixed time, so the fill-in below always arrives as a second change.
    await waitUntil(
      `the relay's answer to the empty announcement of ${handle.documentId}`,
      () => framesIn.some(m => m?.documentId === handle.documentId && m.senderId === r.peerId),
      poke => {
        frameListeners.add(poke)
        return () => frameListeners.delete(poke)
      }
    )
    if (Object.keys(handle.doc() ?? {}).length !== 0)
      fail("the document had fields before the relay answered its announcement")
    handle.change(doc => Object.assign(doc, root))
  }
  emit("created", { documentId: handle.documentId, url: handle.url, heads: handle.heads() })

  const info = await relayHolds(handle, r)
  if (info.refused) {
    if (!args["expect-refused"]) {
      fail(`the relay answered doc-unavailable to document ${handle.documentId}: it refused it`)
    }
    emit("refused", { documentId: handle.documentId, url: handle.url, heads: handle.heads() })
    return
  }
  if (args["expect-refused"]) {
    fail(`the relay stored document ${handle.documentId}, expected it to refuse it`, {
      relayHeads: info.lastHeads,
    })
  }
  emit("stored", {
    documentId: handle.documentId,
    url: handle.url,
    heads: handle.heads(),
    relayHeads: info.lastHeads,
    doc: plain(handle.doc()),
  })

  if (thenField) await fieldSeen(handle, thenField, thenExpect)
}

async function watch() {
  const documentId = interpretAsDocumentId(required("document"))
  await connected()
  const handle = await withDeadline(
    `repo.find(${documentId})`,
    repo.find(documentId, { allowableStates: ["ready", "unavailable"] })
  )
  if (handle.state !== "ready") {
    fail(`document ${documentId} is ${handle.state}, expected ready`, { state: handle.state })
  }
  await fieldSeen(handle, args.field ?? "kind", expectation("value", "contains"))
}

async function findExpectUnavailable() {
  // "random": a document id nobody ever created, to compare absence with denial.
  const documentId =
    required("document") === "random"
      ? parseAutomergeUrl(generateAutomergeUrl()).documentId
      : interpretAsDocumentId(args.document)
  const r = await connected()
  const asked = Date.now()
  const handle = await withDeadline(
    `repo.find(${documentId}) to settle`,
    repo.find(documentId, { allowableStates: ["ready", "unavailable"] })
  )
  const elapsedMs = Date.now() - asked
  if (handle.state === "ready") {
    fail(`the relay shared document ${documentId}, expected it to be unavailable`, {
      state: handle.state,
      fields: Object.keys(handle.doc() ?? {}),
    })
  }
  // The handle also turns unavailable when the relay disconnects (DocSynchronizer.endSync), so
  // insist on the relay's own doc-unavailable answer.
  const answer = framesIn.find(
    m => m?.type === "doc-unavailable" && m.documentId === documentId && m.senderId === r.peerId
  )
  if (!answer) {
    fail(`document ${documentId} is ${handle.state} but the relay sent no doc-unavailable for it`, {
      state: handle.state,
      framesIn: framesIn.map(summarise),
    })
  }
  // Denial must look exactly like absence (DESIGN §5): whatever else the relay sent about this
  // document may not reveal its heads or changes.
  const fromRelay = framesIn.filter(m => m?.documentId === documentId && m.senderId === r.peerId)
  // Apply every sync payload to a scratch document: it must stay empty. (Automerge 3's v2 sync
  // messages carry an empty document chunk even for an empty document, so counting "changes"
  // would not do.)
  let scratch = Automerge.init()
  let scratchSync = Automerge.initSyncState()
  for (const m of fromRelay) {
    if (m.type !== "sync" && m.type !== "request") continue
    const data = new Uint8Array(m.data)
    const advertised = Automerge.decodeSyncMessage(data).heads
    ;[scratch, scratchSync] = Automerge.receiveSyncMessage(scratch, scratchSync, data)
    if (advertised.length > 0 || Automerge.getHeads(scratch).length > 0) {
      fail(`the relay's ${m.type} frame for unavailable document ${documentId} reveals it`, {
        advertisedHeads: advertised,
        receivedHeads: Automerge.getHeads(scratch),
      })
    }
  }
  emit("unavailable", {
    documentId,
    state: handle.state,
    docUnavailableFrom: answer.senderId,
    // The frame types the relay sent about this document, in order: a test compares a denied
    // document's answer with a never-created one's.
    framesFromRelay: fromRelay.map(m => m.type),
    elapsedMs,
  })
}

async function shutdown() {
  // Repo.shutdown disconnects the adapter and flushes storage; bounded, exit regardless.
  await Promise.race([
    repo.shutdown().catch(() => {}),
    new Promise(resolve => setTimeout(resolve, 1000)),
  ])
}

const run = { create, watch, "find-expect-unavailable": findExpectUnavailable }[mode]
run().then(
  async () => {
    await shutdown()
    emit("done", { elapsedMs: Date.now() - startedAt })
    process.exit(0)
  },
  err => fail(err?.stack ?? String(err))
)
