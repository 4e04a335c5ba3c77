#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fieldchart_fuzz::store_open(data);
});
