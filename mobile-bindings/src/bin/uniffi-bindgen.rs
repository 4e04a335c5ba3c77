//! `uniffi-bindgen`: generates the Kotlin, Swift and Python bindings from the built library
//! (library mode). Used by `scripts/generate.sh`; built with `--features bindgen`.

fn main() {
    uniffi::uniffi_bindgen_main()
}
