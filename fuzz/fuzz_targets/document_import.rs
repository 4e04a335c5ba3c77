#![no_main]

// automerge 0.12 panics on some malformed chunks (see fuzz/regressions/document_import/);
// `Store::import` contains that panic. libFuzzer's panic hook would abort even on a contained
// panic, so this target reports panics without aborting: a panic that escapes the harness still
// fails the input (libfuzzer-sys aborts when the harness unwinds).
libfuzzer_sys::fuzz_target!(
    init: {
        std::panic::set_hook(Box::new(|info| eprintln!("contained or escaping panic: {info}")));
    },
    |data: &[u8]| {
        fieldchart_fuzz::document_import(data);
    }
);
