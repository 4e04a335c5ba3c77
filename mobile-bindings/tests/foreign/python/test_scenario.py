"""A nurse's day through the generated Python bindings, against a real relay.

Run by tests/tests/bindings.rs, which starts the relay, provisions the agency and passes
everything in FC_* environment variables. Prints one line per check and ends with
`N passed, M failed`; exits non-zero if any check failed. The relay revokes a device when this
program prints `REVOKE <device id>` and answers `revoked` on stdin.
"""

import asyncio
import gc
import os
import sys
import threading
import time
import traceback

sys.path.insert(0, os.environ["FC_BINDINGS_DIR"])
import fieldchart_mobile as fc  # noqa: E402

ENV = os.environ
RELAY = ENV["FC_RELAY_URL"]
WORK = ENV["FC_WORK_DIR"]
PASSED = 0
FAILED = 0


def check(name, condition, detail=""):
    global PASSED, FAILED
    if condition:
        PASSED += 1
        print(f"ok   {name}", flush=True)
    else:
        FAILED += 1
        print(f"FAIL {name} {detail}", flush=True)


def raises(name, kind, f):
    """`f()` must raise FieldchartError.<kind>."""
    try:
        f()
    except fc.FieldchartError as e:
        check(name, type(e).__name__ == kind, f"raised {type(e).__name__}: {e}")
        return
    except Exception as e:  # noqa: BLE001
        check(name, False, f"raised {type(e).__name__}: {e}")
        return
    check(name, False, "nothing raised")


def run(coro):
    return asyncio.run(coro)


def key(byte):
    return bytes([byte]) * 32


def open_store(name, key_bytes, user, device, role):
    return fc.Store.open(fc.StoreOptions(path=os.path.join(WORK, name + ".db"), key=key_bytes,
                                         user_id=user, device_id=device, role=role))


def enroll(name, key_bytes, user, code, role):
    """What the app does: make the key pair in a fresh store, redeem the code, reopen."""
    store = open_store(name, key_bytes, user, "unenrolled", role)
    public = store.device_public_key()
    store.close_store()
    enrolled = run(fc.enroll(RELAY, code, name, public, None))
    return enrolled, open_store(name, key_bytes, user, enrolled.device_id, role)


class Progress(fc.SyncListener):
    def __init__(self):
        self.progress = []
        self.states = []

    def on_progress(self, progress):
        self.progress.append(progress)

    def on_state(self, state):
        self.states.append(state)


class Changes(fc.ChangeListener):
    def __init__(self):
        self.ids = []
        self.event = threading.Event()

    def on_document_changed(self, document_id):
        self.ids.append(document_id)
        self.event.set()


def wait_until(condition, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def fds():
    return len(os.listdir("/proc/self/fd"))


def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def scenario():
    nurse, office = ENV["FC_NURSE_ID"], ENV["FC_OFFICE_ID"]
    patient, chart, agency = ENV["FC_PATIENT_ID"], ENV["FC_CHART_ID"], ENV["FC_AGENCY_ID"]
    clin = fc.Role.CLINICIAN

    # Enrollment: the code from the admin's QR payload.
    qr = fc.parse_enrollment_qr(ENV["FC_QR_NURSE_A"])
    check("qr payload carries the code", qr.code == ENV["FC_CODE_NURSE_A"])
    raises("another QR code is invalid input", "InvalidInput",
           lambda: fc.parse_enrollment_qr("https://example.com/menu"))
    a_enrolled, a = enroll("nurse-a", key(1), nurse, qr.code, clin)
    check("enrollment names the nurse", a_enrolled.user_id == nurse and a_enrolled.device_id != "")
    raises("a used code is refused", "Refused",
           lambda: run(fc.enroll(RELAY, qr.code, "again", a.device_public_key(), None)))

    # One store per file; the wrong key is its own kind and changes nothing.
    raises("a second open of the same store", "StoreInUse",
           lambda: open_store("nurse-a", key(1), nurse, a_enrolled.device_id, clin))
    a.close_store()
    raises("a wrong key", "WrongKey",
           lambda: open_store("nurse-a", key(9), nurse, a_enrolled.device_id, clin))
    raises("a key of the wrong length", "InvalidInput",
           lambda: open_store("nurse-a", b"short", nurse, a_enrolled.device_id, clin))
    a = open_store("nurse-a", key(1), nurse, a_enrolled.device_id, clin)
    client_a = fc.SyncClient(a, RELAY, a_enrolled.token, None)
    listener = Progress()
    sync_sub = client_a.subscribe_sync(listener)

    report = run(client_a.sync(25_000))
    check("first sync completes", report.status.is_complete(), str(report))
    check("first sync fetched the chart", report.docs_fetched >= 1, str(report))
    run(client_a.fetch_keys())
    check("the patient is listed", any(p.patient_id == patient for p in a.patients()))
    check("the chart reads", a.patient_chart(chart).patient_id == patient)
    # The schedule (one document per patient, from the office): nothing is planned for this
    # relay's nurse; the Rust console test plans a visit and reads it back on the phone.
    check("no visit is scheduled", a.visits_scheduled("2026-11-01", "2026-12-31") == [])
    raises("a schedule range that is not dates", "InvalidInput",
           lambda: a.visits_scheduled("30.11.2026", "2026-12-31"))

    # The visit.
    note = a.start_visit(fc.VisitStart(agency_id=agency, patient_id=patient,
                                       service_type="skilled-nursing", date="2026-11-30",
                                       location="home", started_at_ms=int(time.time() * 1000),
                                       start_monotonic_ms=1))
    a.record_vital(note, fc.VitalReading(id="", vital=fc.VitalType.BLOOD_PRESSURE,
                                         value="128/82", unit="mmHg",
                                         taken_at_ms=int(time.time() * 1000), recorded_by="",
                                         supersedes=None))
    a.splice_text(note, fc.NoteText.ASSESSMENT, 0, 0, "Patient stable ")
    a.splice_text(note, fc.NoteText.ASSESSMENT, 15, 0, "\U0001FA7A")  # two UTF-16 units
    a.splice_text(note, fc.NoteText.ASSESSMENT, 17, 0, " BP ok")
    raises("a splice inside a surrogate pair", "InvalidInput",
           lambda: a.splice_text(note, fc.NoteText.ASSESSMENT, 16, 0, "x"))
    a.update_text(note, fc.NoteText.PLAN, "Continue plan \U0001F44D")
    a.add_note_entry(note, fc.NoteList.INTERVENTIONS,
                     fc.ListEntry(id="", item="wound care", note="clean, dry"))
    a.finish_visit(note, int(time.time() * 1000), 2)
    read = a.visit_note(note)
    check("the narrative holds the non-BMP text at UTF-16 positions",
          read.assessment == "Patient stable \U0001FA7A BP ok", repr(read.assessment))
    check("the vital is recorded", [v.value for v in read.current_vitals] == ["128/82"])
    check("EVV start and end", read.evv.started_at_ms is not None and read.evv.ended_at_ms is not None)
    check("the note is a draft", any(n.document_id == note for n in a.drafts()))
    check("today's visits list it", any(n.document_id == note for n in a.notes_on("2026-11-30")))
    check("the note is unsynced", any(n.document_id == note for n in a.unsynced_notes()))
    signature = a.sign(note)
    check("signed by the nurse", signature.signed_by == nurse)
    raises("a signed note refuses edits", "SignedNote",
           lambda: a.splice_text(note, fc.NoteText.ASSESSMENT, 0, 0, "x"))
    a.add_addendum(note, "Called the physician \U0001F4DE")
    check("the signed rendering holds the narrative", "BP ok" in a.render_signed(note))

    listener.progress.clear()
    report = run(client_a.sync(25_000))
    check("sync after signing completes", report.status.is_complete(), str(report))
    check("progress events arrived", len(listener.progress) > 0)
    check("progress ends at the total", listener.progress[-1].docs_done == listener.progress[-1].docs_total
          if listener.progress else False)
    check("state events bracket the pass",
          any(isinstance(s, fc.SyncState.STARTED) for s in listener.states)
          and any(isinstance(s, fc.SyncState.FINISHED) for s in listener.states))
    receipt = a.receipt(note)
    check("the relay's receipt covers the note", receipt is not None and receipt.covers_current,
          str(receipt))
    check("nothing unsynced", a.unsynced_notes() == [])
    sync_sub.cancel()

    # The nurse's second phone sees the signed note verify.
    b_enrolled, b = enroll("nurse-b", key(2), nurse, ENV["FC_CODE_NURSE_B"], clin)
    client_b = fc.SyncClient(b, RELAY, b_enrolled.token, None)
    report = run(client_b.sync(25_000))
    check("the second device syncs", report.status.is_complete(), str(report))
    run(client_b.fetch_keys())
    check_b = b.verify_signature(note)
    check("the signature verifies on the second device",
          isinstance(check_b, fc.SignatureCheck.VALID) and "\U0001FA7A" in check_b.rendering,
          str(check_b))
    check("the second device reads it signed", b.visit_note(note).status == fc.NoteStatus.SIGNED)

    # The office edits the care plan; the nurse's live session hears it.
    heard, cancelled, dropped = Changes(), Changes(), Changes()
    keep = client_a.subscribe_changes(heard)
    sub_cancelled = client_a.subscribe_changes(cancelled)
    sub_dropped = client_a.subscribe_changes(dropped)
    sub_cancelled.cancel()
    del sub_dropped
    gc.collect()
    client_a.start_live(500)
    raises("live mode twice", "InvalidInput", lambda: client_a.start_live(500))
    o_enrolled, o = enroll("office", key(3), office, ENV["FC_CODE_OFFICE"], fc.Role.OFFICE)
    client_o = fc.SyncClient(o, RELAY, o_enrolled.token, None)
    run(client_o.sync(25_000))
    o.add_care_plan_item(chart, [], "Fall risk", "active")
    report = run(client_o.sync(25_000))
    check("the office's edit is synced", report.status.is_complete(), str(report))
    check("the nurse's change listener fires for the chart",
          heard.event.wait(30) and chart in heard.ids, str(heard.ids))
    run(client_a.stop_live())
    check("the cancelled listener heard nothing", cancelled.ids == [], str(cancelled.ids))
    check("the dropped listener heard nothing", dropped.ids == [], str(dropped.ids))
    check("the care plan reached the nurse",
          any(i.description == "Fall risk" for i in a.patient_chart(chart).care_plan))
    del keep

    # A conflict: both phones set the next visit offline.
    n2 = a.start_visit(fc.VisitStart(agency_id=agency, patient_id=patient,
                                     service_type="skilled-nursing", date="2026-12-01",
                                     location="home", started_at_ms=int(time.time() * 1000),
                                     start_monotonic_ms=3))
    run(client_a.sync(25_000))
    run(client_b.sync(25_000))
    a.set_next_visit(n2, "2026-12-02")
    b.set_next_visit(n2, "2026-12-03")
    run(client_b.sync(25_000))
    run(client_a.sync(25_000))
    conflicts = a.conflicts(n2)
    check("the conflict is listed", len(conflicts) == 1 and len(conflicts[0].values) == 2,
          str(conflicts))
    check("and in the store-wide list", any(c.document_id == n2 for c in a.open_conflicts()))
    raises("signing with an open conflict", "ConflictOpen", lambda: a.sign(n2))
    if conflicts:
        theirs = [v for v in conflicts[0].values
                  if v.author is not None and v.author.device_id == b_enrolled.device_id]
        check("each value names its device", len(theirs) == 1, str(conflicts[0].values))
        if theirs:
            a.resolve_conflict(n2, conflicts[0], theirs[0].id)
    check("resolved", a.conflicts(n2) == [])
    check("the chosen value holds", a.visit_note(n2).next_visit == "2026-12-03")

    # Revocation: the relay closes the second phone out.
    print(f"REVOKE {b_enrolled.device_id}", flush=True)
    answer = sys.stdin.readline().strip()
    check("the relay revoked the device", answer == "revoked", answer)
    raises("a revoked device's sync", "Revoked", lambda: run(client_b.sync(25_000)))

    # Closed stores refuse calls.
    a.close_store()
    raises("calls after close", "Closed", lambda: a.drafts())
    for s in (b, o):
        s.close_store()

    # 1,000 open/close cycles: no file handles or memory kept.
    cycles = int(ENV.get("FC_CYCLES", "1000"))
    for _ in range(10):
        open_store("cycles", key(4), nurse, "cycle", clin).close_store()
    gc.collect()
    fd_before, rss_before = fds(), rss_kb()
    started = time.monotonic()
    for _ in range(cycles):
        open_store("cycles", key(4), nurse, "cycle", clin).close_store()
    gc.collect()
    fd_after, rss_after = fds(), rss_kb()
    print(f"MEASURE python cycles={cycles} fds_before={fd_before} fds_after={fd_after} "
          f"rss_before_kb={rss_before} rss_after_kb={rss_after} "
          f"seconds={time.monotonic() - started:.1f}", flush=True)
    check("open/close cycles keep no file handles", fd_after <= fd_before)  # the runtime may close its own
    check("open/close cycles keep no memory (< 8 MiB growth)", rss_after - rss_before < 8 * 1024,
          f"{rss_after - rss_before} KiB")


try:
    scenario()
except Exception:  # noqa: BLE001
    FAILED += 1
    print("FAIL the scenario stopped:", flush=True)
    traceback.print_exc(file=sys.stdout)
print(f"{PASSED} passed, {FAILED} failed", flush=True)
sys.exit(1 if FAILED else 0)
