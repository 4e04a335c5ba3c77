// A nurse's day through the generated Kotlin bindings (JVM + JNA), against a real relay.
// Run by tests/tests/bindings.rs; the same scenario as python/test_scenario.py. Prints one line
// per check and `N passed, M failed`; exits 1 if any check failed. Prints `REVOKE <device>`
// and reads `revoked` from stdin to have the relay revoke a device.

import java.io.File
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit
import kotlin.system.exitProcess
import kotlinx.coroutines.runBlocking
import org.fieldchart.*

val env: Map<String, String> = System.getenv()
val relay = env.getValue("FC_RELAY_URL")
val work = env.getValue("FC_WORK_DIR")
var passed = 0
var failed = 0

fun check(name: String, ok: Boolean, detail: String = "") {
    if (ok) { passed++; println("ok   $name") } else { failed++; println("FAIL $name $detail") }
}

inline fun <reified E : FieldchartException> raises(name: String, f: () -> Unit) {
    try {
        f()
        check(name, false, "nothing raised")
    } catch (e: FieldchartException) {
        check(name, e is E, "raised ${e::class.simpleName}: ${e.message}")
    }
}

fun key(b: Int) = ByteArray(32) { b.toByte() }
fun now() = System.currentTimeMillis()

fun openStore(name: String, key: ByteArray, user: String, device: String, role: Role): Store =
    Store.open(StoreOptions("$work/$name.db", key, user, device, role))

fun enrollDevice(name: String, key: ByteArray, user: String, code: String, role: Role): Pair<Enrollment, Store> {
    val fresh = openStore(name, key, user, "unenrolled", role)
    val public = fresh.devicePublicKey()
    fresh.closeStore()
    fresh.close()
    val enrolled = runBlocking { enroll(relay, code, name, public, null) }
    return enrolled to openStore(name, key, user, enrolled.deviceId, role)
}

class Progress : SyncListener {
    val progress = CopyOnWriteArrayList<SyncProgress>()
    val states = CopyOnWriteArrayList<SyncState>()
    override fun onProgress(progress: SyncProgress) { this.progress.add(progress) }
    override fun onState(state: SyncState) { states.add(state) }
}

class Changes : ChangeListener {
    val ids = CopyOnWriteArrayList<String>()
    val heard = CountDownLatch(1)
    override fun onDocumentChanged(documentId: String) { ids.add(documentId); heard.countDown() }
}

fun fds() = File("/proc/self/fd").list()!!.size
fun rssKb() = File("/proc/self/status").readLines().first { it.startsWith("VmRSS:") }
    .split(Regex("\\s+"))[1].toLong()

fun scenario() {
    val nurse = env.getValue("FC_NURSE_ID"); val office = env.getValue("FC_OFFICE_ID")
    val patient = env.getValue("FC_PATIENT_ID"); val chart = env.getValue("FC_CHART_ID")
    val agency = env.getValue("FC_AGENCY_ID")
    val clin = Role.CLINICIAN

    val qr = parseEnrollmentQr(env.getValue("FC_QR_NURSE_A"))
    check("qr payload carries the code", qr.code == env.getValue("FC_CODE_NURSE_A"))
    raises<FieldchartException.InvalidInput>("another QR code is invalid input") {
        parseEnrollmentQr("https://example.com/menu")
    }
    var (aEnrolled, a) = enrollDevice("nurse-a", key(1), nurse, qr.code, clin)
    check("enrollment names the nurse", aEnrolled.userId == nurse && aEnrolled.deviceId.isNotEmpty())
    raises<FieldchartException.Refused>("a used code is refused") {
        runBlocking { enroll(relay, qr.code, "again", a.devicePublicKey(), null) }
    }

    raises<FieldchartException.StoreInUse>("a second open of the same store") {
        openStore("nurse-a", key(1), nurse, aEnrolled.deviceId, clin)
    }
    a.closeStore()
    raises<FieldchartException.WrongKey>("a wrong key") {
        openStore("nurse-a", key(9), nurse, aEnrolled.deviceId, clin)
    }
    raises<FieldchartException.InvalidInput>("a key of the wrong length") {
        openStore("nurse-a", ByteArray(5), nurse, aEnrolled.deviceId, clin)
    }
    a = openStore("nurse-a", key(1), nurse, aEnrolled.deviceId, clin)
    val clientA = SyncClient(a, relay, aEnrolled.token, null)
    val listener = Progress()
    val syncSub = clientA.subscribeSync(listener)

    var report = runBlocking { clientA.sync(25_000uL) }
    check("first sync completes", report.status == SyncStatus.Complete, "$report")
    check("first sync fetched the chart", report.docsFetched >= 1uL, "$report")
    runBlocking { clientA.fetchKeys() }
    check("the patient is listed", a.patients().any { it.patientId == patient })
    check("the chart reads", a.patientChart(chart).patientId == patient)

    val note = a.startVisit(VisitStart(agency, patient, "skilled-nursing", "2026-11-30", "home", now(), 1))
    a.recordVital(note, VitalReading("", VitalType.BLOOD_PRESSURE, "128/82", "mmHg", now(), "", null))
    a.spliceText(note, NoteText.ASSESSMENT, 0u, 0u, "Patient stable ")
    a.spliceText(note, NoteText.ASSESSMENT, 15u, 0u, "\uD83E\uDE7A") // U+1FA7A, two UTF-16 units
    a.spliceText(note, NoteText.ASSESSMENT, 17u, 0u, " BP ok")
    raises<FieldchartException.InvalidInput>("a splice inside a surrogate pair") {
        a.spliceText(note, NoteText.ASSESSMENT, 16u, 0u, "x")
    }
    a.updateText(note, NoteText.PLAN, "Continue plan \uD83D\uDC4D")
    a.addNoteEntry(note, NoteList.INTERVENTIONS, ListEntry("", "wound care", "clean, dry"))
    a.finishVisit(note, now(), 2)
    val read = a.visitNote(note)
    check("the narrative holds the non-BMP text at UTF-16 positions",
        read.assessment == "Patient stable \uD83E\uDE7A BP ok", read.assessment)
    check("the vital is recorded", read.currentVitals.map { it.value } == listOf("128/82"))
    check("EVV start and end", read.evv.startedAtMs != null && read.evv.endedAtMs != null)
    check("the note is a draft", a.drafts().any { it.documentId == note })
    check("today's visits list it", a.notesOn("2026-11-30").any { it.documentId == note })
    check("the note is unsynced", a.unsyncedNotes().any { it.documentId == note })
    val signature = a.sign(note)
    check("signed by the nurse", signature.signedBy == nurse)
    raises<FieldchartException.SignedNote>("a signed note refuses edits") {
        a.spliceText(note, NoteText.ASSESSMENT, 0u, 0u, "x")
    }
    a.addAddendum(note, "Called the physician \uD83D\uDCDE")
    check("the signed rendering holds the narrative", a.renderSigned(note).contains("BP ok"))

    listener.progress.clear()
    report = runBlocking { clientA.sync(25_000uL) }
    check("sync after signing completes", report.status == SyncStatus.Complete, "$report")
    check("progress events arrived", listener.progress.isNotEmpty())
    check("progress ends at the total",
        listener.progress.lastOrNull()?.let { it.docsDone == it.docsTotal } ?: false)
    check("state events bracket the pass",
        listener.states.any { it is SyncState.Started } && listener.states.any { it is SyncState.Finished })
    val receipt = a.receipt(note)
    check("the relay's receipt covers the note", receipt?.coversCurrent == true, "$receipt")
    check("nothing unsynced", a.unsyncedNotes().isEmpty())
    syncSub.cancel()

    val (bEnrolled, b) = enrollDevice("nurse-b", key(2), nurse, env.getValue("FC_CODE_NURSE_B"), clin)
    val clientB = SyncClient(b, relay, bEnrolled.token, null)
    report = runBlocking { clientB.sync(25_000uL) }
    check("the second device syncs", report.status == SyncStatus.Complete, "$report")
    runBlocking { clientB.fetchKeys() }
    val verified = b.verifySignature(note)
    check("the signature verifies on the second device",
        verified is SignatureCheck.Valid && verified.rendering.contains("\uD83E\uDE7A"), "$verified")
    check("the second device reads it signed", b.visitNote(note).status == NoteStatus.SIGNED)

    val heard = Changes(); val cancelled = Changes(); val dropped = Changes()
    val keep = clientA.subscribeChanges(heard)
    val subCancelled = clientA.subscribeChanges(cancelled)
    val subDropped = clientA.subscribeChanges(dropped)
    subCancelled.cancel()
    subDropped.close() // frees the handle: the Rust side unsubscribes on drop
    clientA.startLive(500uL)
    raises<FieldchartException.InvalidInput>("live mode twice") { clientA.startLive(500uL) }
    val (oEnrolled, o) = enrollDevice("office", key(3), office, env.getValue("FC_CODE_OFFICE"), Role.OFFICE)
    val clientO = SyncClient(o, relay, oEnrolled.token, null)
    runBlocking { clientO.sync(25_000uL) }
    o.addCarePlanItem(chart, listOf(), "Fall risk", "active")
    report = runBlocking { clientO.sync(25_000uL) }
    check("the office's edit is synced", report.status == SyncStatus.Complete, "$report")
    check("the nurse's change listener fires for the chart",
        heard.heard.await(30, TimeUnit.SECONDS) && heard.ids.contains(chart), "${heard.ids}")
    runBlocking { clientA.stopLive() }
    check("the cancelled listener heard nothing", cancelled.ids.isEmpty(), "${cancelled.ids}")
    check("the dropped listener heard nothing", dropped.ids.isEmpty(), "${dropped.ids}")
    check("the care plan reached the nurse",
        a.patientChart(chart).carePlan.any { it.description == "Fall risk" })
    keep.close()

    val n2 = a.startVisit(VisitStart(agency, patient, "skilled-nursing", "2026-12-01", "home", now(), 3))
    runBlocking { clientA.sync(25_000uL); clientB.sync(25_000uL) }
    a.setNextVisit(n2, "2026-12-02")
    b.setNextVisit(n2, "2026-12-03")
    runBlocking { clientB.sync(25_000uL); clientA.sync(25_000uL) }
    val conflicts = a.conflicts(n2)
    check("the conflict is listed", conflicts.size == 1 && conflicts[0].values.size == 2, "$conflicts")
    check("and in the store-wide list", a.openConflicts().any { it.documentId == n2 })
    raises<FieldchartException.ConflictOpen>("signing with an open conflict") { a.sign(n2) }
    if (conflicts.isNotEmpty()) {
        val theirs = conflicts[0].values.filter { it.author?.deviceId == bEnrolled.deviceId }
        check("each value names its device", theirs.size == 1, "${conflicts[0].values}")
        if (theirs.isNotEmpty()) a.resolveConflict(n2, conflicts[0], theirs[0].id)
    }
    check("resolved", a.conflicts(n2).isEmpty())
    check("the chosen value holds", a.visitNote(n2).nextVisit == "2026-12-03")

    println("REVOKE ${bEnrolled.deviceId}")
    System.out.flush()
    val answer = readLine()?.trim()
    check("the relay revoked the device", answer == "revoked", "$answer")
    raises<FieldchartException.Revoked>("a revoked device's sync") {
        runBlocking { clientB.sync(25_000uL) }
    }

    a.closeStore()
    raises<FieldchartException.Closed>("calls after close") { a.drafts() }
    b.closeStore(); o.closeStore()
    listOf(clientA, clientB, clientO).forEach { it.close() }

    val cycles = (env["FC_CYCLES"] ?: "1000").toInt()
    fun cycle() { openStore("cycles", key(4), nurse, "cycle", clin).use { it.closeStore() } }
    repeat(10) { cycle() }
    System.gc()
    val fdBefore = fds(); val rssBefore = rssKb()
    val started = System.nanoTime()
    repeat(cycles) { cycle() }
    System.gc()
    val fdAfter = fds(); val rssAfter = rssKb()
    println("MEASURE kotlin cycles=$cycles fds_before=$fdBefore fds_after=$fdAfter " +
        "rss_before_kb=$rssBefore rss_after_kb=$rssAfter " +
        "seconds=${"%.1f".format((System.nanoTime() - started) / 1e9)}")
    check("open/close cycles keep no file handles", fdAfter <= fdBefore) // the JVM may close its own
    // The JVM's own heap and JIT move RSS by megabytes in the first round; a second round on
    // the warm JVM shows what the library keeps.
    check("open/close cycles keep no memory (< 32 MiB growth)", rssAfter - rssBefore < 32 * 1024,
        "${rssAfter - rssBefore} KiB")
    repeat(cycles) { cycle() }
    System.gc()
    val fdAgain = fds(); val rssAgain = rssKb()
    println("MEASURE kotlin second-round cycles=$cycles fds_after=$fdAgain rss_after_kb=$rssAgain")
    check("a second round keeps no file handles", fdAgain <= fdBefore)
    check("a second round on the warm JVM keeps no memory (< 8 MiB growth)",
        rssAgain - rssAfter < 8 * 1024, "${rssAgain - rssAfter} KiB")
}

fun main() {
    try {
        scenario()
    } catch (e: Throwable) {
        failed++
        println("FAIL the scenario stopped: $e")
        e.printStackTrace(System.out)
    }
    println("$passed passed, $failed failed")
    System.out.flush()
    exitProcess(if (failed == 0) 0 else 1)
}
