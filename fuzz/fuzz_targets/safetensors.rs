#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dfwatch_fuzz::safetensors(data));
