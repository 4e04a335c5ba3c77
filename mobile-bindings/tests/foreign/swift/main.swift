// A nurse's day through the generated Swift bindings (Linux, Swift 5 mode), against a real
// relay. Run by tests/tests/bindings.rs inside a Debian trixie chroot; the same scenario as
// python/test_scenario.py. Prints one line per check and `N passed, M failed`; exits 1 if any
// check failed. Prints `REVOKE <device>` and reads `revoked` from stdin to have the relay
// revoke a device. Compiled in one module with the generated Fieldchart.swift (hence no import).

import Foundation

let env = ProcessInfo.processInfo.environment
let relay = env["FC_RELAY_URL"]!
let work = env["FC_WORK_DIR"]!
var passed = 0
var failed = 0

func check(_ name: String, _ ok: Bool, _ detail: String = "") {
    if ok { passed += 1; print("ok   \(name)") } else { failed += 1; print("FAIL \(name) \(detail)") }
    fflush(stdout)
}

/// `f` must throw FieldchartError of the kind `matches` accepts.
func raises(_ name: String, _ matches: (FieldchartError) -> Bool, _ f: () async throws -> Void) async {
    do {
        try await f()
        check(name, false, "nothing thrown")
    } catch let e as FieldchartError {
        check(name, matches(e), "threw \(e)")
    } catch {
        check(name, false, "threw \(error)")
    }
}

func key(_ b: UInt8) -> Data { Data(repeating: b, count: 32) }
func now() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }

func openStore(_ name: String, _ key: Data, _ user: String, _ device: String, _ role: Role) throws -> Store {
    try Store.open(options: StoreOptions(path: "\(work)/\(name).db", key: key, userId: user, deviceId: device, role: role))
}

func enrollDevice(_ name: String, _ key: Data, _ user: String, _ code: String, _ role: Role) async throws -> (Enrollment, Store) {
    let fresh = try openStore(name, key, user, "unenrolled", role)
    let publicKey = try fresh.devicePublicKey()
    try fresh.closeStore()
    let enrolled = try await enroll(relayUrl: relay, code: code, deviceName: name, publicKey: publicKey, pinnedCaPem: nil)
    return (enrolled, try openStore(name, key, user, enrolled.deviceId, role))
}

final class Progress: SyncListener, @unchecked Sendable {
    private let lock = NSLock()
    private var _progress: [SyncProgress] = []
    private var _states: [SyncState] = []
    var progress: [SyncProgress] { lock.lock(); defer { lock.unlock() }; return _progress }
    var states: [SyncState] { lock.lock(); defer { lock.unlock() }; return _states }
    func clear() { lock.lock(); _progress = []; lock.unlock() }
    func onProgress(progress: SyncProgress) { lock.lock(); _progress.append(progress); lock.unlock() }
    func onState(state: SyncState) { lock.lock(); _states.append(state); lock.unlock() }
}

final class Changes: ChangeListener, @unchecked Sendable {
    private let lock = NSLock()
    private var _ids: [String] = []
    var ids: [String] { lock.lock(); defer { lock.unlock() }; return _ids }
    func onDocumentChanged(documentId: String) { lock.lock(); _ids.append(documentId); lock.unlock() }
}

/// Poll `condition` until it holds or `seconds` pass.
func waitUntil(_ seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        Thread.sleep(forTimeInterval: 0.05)
    }
    return condition()
}

func fds() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1 }
func rssKb() -> Int {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return -1 }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? -1
    }
    return -1
}

func isComplete(_ r: SyncReport) -> Bool { if case .complete = r.status { return true }; return false }

func scenario() async throws {
    let nurse = env["FC_NURSE_ID"]!, office = env["FC_OFFICE_ID"]!
    let patient = env["FC_PATIENT_ID"]!, chart = env["FC_CHART_ID"]!, agency = env["FC_AGENCY_ID"]!
    let clin = Role.clinician

    let qr = try parseEnrollmentQr(payload: env["FC_QR_NURSE_A"]!)
    check("qr payload carries the code", qr.code == env["FC_CODE_NURSE_A"]!)
    await raises("another QR code is invalid input", { if case .InvalidInput = $0 { return true }; return false }) {
        _ = try parseEnrollmentQr(payload: "https://example.com/menu")
    }
    var (aEnrolled, a) = try await enrollDevice("nurse-a", key(1), nurse, qr.code, clin)
    check("enrollment names the nurse", aEnrolled.userId == nurse && !aEnrolled.deviceId.isEmpty)
    let aKey = try a.devicePublicKey()
    await raises("a used code is refused", { if case .Refused = $0 { return true }; return false }) {
        _ = try await enroll(relayUrl: relay, code: qr.code, deviceName: "again", publicKey: aKey, pinnedCaPem: nil)
    }

    await raises("a second open of the same store", { if case .StoreInUse = $0 { return true }; return false }) {
        _ = try openStore("nurse-a", key(1), nurse, aEnrolled.deviceId, clin)
    }
    try a.closeStore()
    await raises("a wrong key", { if case .WrongKey = $0 { return true }; return false }) {
        _ = try openStore("nurse-a", key(9), nurse, aEnrolled.deviceId, clin)
    }
    await raises("a key of the wrong length", { if case .InvalidInput = $0 { return true }; return false }) {
        _ = try openStore("nurse-a", Data(count: 5), nurse, aEnrolled.deviceId, clin)
    }
    a = try openStore("nurse-a", key(1), nurse, aEnrolled.deviceId, clin)
    let clientA = try SyncClient(store: a, relayUrl: relay, token: aEnrolled.token, pinnedCaPem: nil)
    let listener = Progress()
    let syncSub = clientA.subscribeSync(listener: listener)

    var report = try await clientA.sync(timeBudgetMs: 25_000)
    check("first sync completes", isComplete(report), "\(report)")
    check("first sync fetched the chart", report.docsFetched >= 1, "\(report)")
    try await clientA.fetchKeys()
    check("the patient is listed", try a.patients().contains { $0.patientId == patient })
    check("the chart reads", try a.patientChart(documentId: chart).patientId == patient)

    let note = try a.startVisit(start: VisitStart(agencyId: agency, patientId: patient, serviceType: "skilled-nursing",
                                                  date: "2026-11-30", location: "home", startedAtMs: now(), startMonotonicMs: 1))
    _ = try a.recordVital(documentId: note, reading: VitalReading(id: "", vital: .bloodPressure, value: "128/82", unit: "mmHg",
                                                                  takenAtMs: now(), recordedBy: "", supersedes: nil))
    try a.spliceText(documentId: note, field: .assessment, position: 0, delete: 0, insert: "Patient stable ")
    try a.spliceText(documentId: note, field: .assessment, position: 15, delete: 0, insert: "\u{1FA7A}") // two UTF-16 units
    try a.spliceText(documentId: note, field: .assessment, position: 17, delete: 0, insert: " BP ok")
    await raises("a splice inside a surrogate pair", { if case .InvalidInput = $0 { return true }; return false }) {
        try a.spliceText(documentId: note, field: .assessment, position: 16, delete: 0, insert: "x")
    }
    try a.updateText(documentId: note, field: .plan, text: "Continue plan \u{1F44D}")
    _ = try a.addNoteEntry(documentId: note, list: .interventions, entry: ListEntry(id: "", item: "wound care", note: "clean, dry"))
    try a.finishVisit(documentId: note, endedAtMs: now(), endMonotonicMs: 2)
    let read = try a.visitNote(documentId: note)
    check("the narrative holds the non-BMP text at UTF-16 positions",
          read.assessment == "Patient stable \u{1FA7A} BP ok", read.assessment)
    check("the vital is recorded", read.currentVitals.map { $0.value } == ["128/82"])
    check("EVV start and end", read.evv.startedAtMs != nil && read.evv.endedAtMs != nil)
    check("the note is a draft", try a.drafts().contains { $0.documentId == note })
    check("today's visits list it", try a.notesOn(date: "2026-11-30").contains { $0.documentId == note })
    check("the note is unsynced", try a.unsyncedNotes().contains { $0.documentId == note })
    let signature = try a.sign(documentId: note)
    check("signed by the nurse", signature.signedBy == nurse)
    await raises("a signed note refuses edits", { if case .SignedNote = $0 { return true }; return false }) {
        try a.spliceText(documentId: note, field: .assessment, position: 0, delete: 0, insert: "x")
    }
    _ = try a.addAddendum(documentId: note, text: "Called the physician \u{1F4DE}")
    check("the signed rendering holds the narrative", try a.renderSigned(documentId: note).contains("BP ok"))

    listener.clear()
    report = try await clientA.sync(timeBudgetMs: 25_000)
    check("sync after signing completes", isComplete(report), "\(report)")
    check("progress events arrived", !listener.progress.isEmpty)
    check("progress ends at the total", listener.progress.last.map { $0.docsDone == $0.docsTotal } ?? false)
    check("state events bracket the pass",
          listener.states.contains { if case .started = $0 { return true }; return false }
          && listener.states.contains { if case .finished = $0 { return true }; return false })
    let receipt = try a.receipt(documentId: note)
    check("the relay's receipt covers the note", receipt?.coversCurrent == true, "\(String(describing: receipt))")
    check("nothing unsynced", try a.unsyncedNotes().isEmpty)
    syncSub.cancel()

    let (bEnrolled, b) = try await enrollDevice("nurse-b", key(2), nurse, env["FC_CODE_NURSE_B"]!, clin)
    let clientB = try SyncClient(store: b, relayUrl: relay, token: bEnrolled.token, pinnedCaPem: nil)
    report = try await clientB.sync(timeBudgetMs: 25_000)
    check("the second device syncs", isComplete(report), "\(report)")
    try await clientB.fetchKeys()
    let verified = try b.verifySignature(documentId: note)
    if case let .valid(rendering, _) = verified {
        check("the signature verifies on the second device", rendering.contains("\u{1FA7A}"), rendering)
    } else {
        check("the signature verifies on the second device", false, "\(verified)")
    }
    check("the second device reads it signed", try b.visitNote(documentId: note).status == .signed)

    let heard = Changes(), cancelled = Changes(), dropped = Changes()
    let keep = clientA.subscribeChanges(listener: heard)
    let subCancelled = clientA.subscribeChanges(listener: cancelled)
    var subDropped: Subscription? = clientA.subscribeChanges(listener: dropped)
    subCancelled.cancel()
    subDropped = nil // deinit frees the handle: the Rust side unsubscribes on drop
    _ = subDropped
    try clientA.startLive(feedPollMs: 500)
    await raises("live mode twice", { if case .InvalidInput = $0 { return true }; return false }) {
        try clientA.startLive(feedPollMs: 500)
    }
    let (oEnrolled, o) = try await enrollDevice("office", key(3), office, env["FC_CODE_OFFICE"]!, .office)
    let clientO = try SyncClient(store: o, relayUrl: relay, token: oEnrolled.token, pinnedCaPem: nil)
    _ = try await clientO.sync(timeBudgetMs: 25_000)
    _ = try o.addCarePlanItem(documentId: chart, parent: [], description: "Fall risk", status: "active")
    report = try await clientO.sync(timeBudgetMs: 25_000)
    check("the office's edit is synced", isComplete(report), "\(report)")
    check("the nurse's change listener fires for the chart", waitUntil(30) { heard.ids.contains(chart) }, "\(heard.ids)")
    _ = try await clientA.stopLive()
    check("the cancelled listener heard nothing", cancelled.ids.isEmpty, "\(cancelled.ids)")
    check("the dropped listener heard nothing", dropped.ids.isEmpty, "\(dropped.ids)")
    check("the care plan reached the nurse",
          try a.patientChart(documentId: chart).carePlan.contains { $0.description == "Fall risk" })
    keep.cancel()

    let n2 = try a.startVisit(start: VisitStart(agencyId: agency, patientId: patient, serviceType: "skilled-nursing",
                                                date: "2026-12-01", location: "home", startedAtMs: now(), startMonotonicMs: 3))
    _ = try await clientA.sync(timeBudgetMs: 25_000)
    _ = try await clientB.sync(timeBudgetMs: 25_000)
    try a.setNextVisit(documentId: n2, next: "2026-12-02")
    try b.setNextVisit(documentId: n2, next: "2026-12-03")
    _ = try await clientB.sync(timeBudgetMs: 25_000)
    _ = try await clientA.sync(timeBudgetMs: 25_000)
    let conflicts = try a.conflicts(documentId: n2)
    check("the conflict is listed", conflicts.count == 1 && conflicts[0].values.count == 2, "\(conflicts)")
    check("and in the store-wide list", try a.openConflicts().contains { $0.documentId == n2 })
    await raises("signing with an open conflict", { if case .ConflictOpen = $0 { return true }; return false }) {
        _ = try a.sign(documentId: n2)
    }
    if let conflict = conflicts.first {
        let theirs = conflict.values.filter { $0.author?.deviceId == bEnrolled.deviceId }
        check("each value names its device", theirs.count == 1, "\(conflict.values)")
        if let choice = theirs.first { try a.resolveConflict(documentId: n2, listed: conflict, choice: choice.id) }
    }
    check("resolved", try a.conflicts(documentId: n2).isEmpty)
    check("the chosen value holds", try a.visitNote(documentId: n2).nextVisit == "2026-12-03")

    print("REVOKE \(bEnrolled.deviceId)")
    fflush(stdout)
    let answer = readLine()?.trimmingCharacters(in: .whitespaces)
    check("the relay revoked the device", answer == "revoked", "\(String(describing: answer))")
    await raises("a revoked device's sync", { if case .Revoked = $0 { return true }; return false }) {
        _ = try await clientB.sync(timeBudgetMs: 25_000)
    }

    try a.closeStore()
    await raises("calls after close", { if case .Closed = $0 { return true }; return false }) {
        _ = try a.drafts()
    }
    try b.closeStore()
    try o.closeStore()

    let cycles = Int(env["FC_CYCLES"] ?? "1000") ?? 1000
    func cycle() throws { try openStore("cycles", key(4), nurse, "cycle", clin).closeStore() }
    for _ in 0..<10 { try cycle() }
    let fdBefore = fds(), rssBefore = rssKb()
    let started = Date()
    for _ in 0..<cycles { try cycle() }
    let fdAfter = fds(), rssAfter = rssKb()
    print("MEASURE swift cycles=\(cycles) fds_before=\(fdBefore) fds_after=\(fdAfter) " +
          "rss_before_kb=\(rssBefore) rss_after_kb=\(rssAfter) " +
          "seconds=\(String(format: "%.1f", Date().timeIntervalSince(started)))")
    check("open/close cycles keep no file handles", fdAfter <= fdBefore)  // the runtime may close its own
    check("open/close cycles keep no memory (< 8 MiB growth)", rssAfter - rssBefore < 8 * 1024, "\(rssAfter - rssBefore) KiB")
}

do {
    try await scenario()
} catch {
    failed += 1
    print("FAIL the scenario stopped: \(error)")
}
print("\(passed) passed, \(failed) failed")
fflush(stdout)
exit(failed == 0 ? 0 : 1)
