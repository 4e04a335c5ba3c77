// The reference JavaScript sync relay, built as automerge-repo-sync-server builds it: one Repo
// with the Node WebSocket server adapter, file storage (NodeFSStorageAdapter) and
// `sharePolicy: false` (it announces nothing; peers sync and fetch documents by id).
//
//   node server.mjs <data-dir> [port]
//
// Listens on 127.0.0.1 (port 0: any free port) and prints one JSON line,
// {"listening":"127.0.0.1:PORT","pid":PID}, once it accepts connections.
import http from "node:http"
import os from "node:os"
import { WebSocketServer } from "ws"
import { Repo } from "@automerge/automerge-repo"
import { NodeWSServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const dir = process.argv[2]
if (!dir) {
  console.error("usage: node server.mjs <data-dir> [port]")
  process.exit(2)
}
const port = Number(process.argv[3] ?? 0)

const server = http.createServer((_req, res) => {
  res.writeHead(200, { "content-type": "text/plain" })
  res.end("automerge-repo sync server (fieldchart bench)\n")
})
const wss = new WebSocketServer({ noServer: true })
server.on("upgrade", (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, (ws) => wss.emit("connection", ws, request))
})

new Repo({
  network: [new NodeWSServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dir),
  peerId: `storage-server-${os.hostname()}`,
  sharePolicy: async () => false,
})

server.listen(port, "127.0.0.1", () => {
  const address = server.address()
  console.log(JSON.stringify({ listening: `127.0.0.1:${address.port}`, pid: process.pid }))
})
