#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fieldchart_fuzz::session_messages(data);
});
