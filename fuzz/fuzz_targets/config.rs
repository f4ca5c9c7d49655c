//! Config text: valid or an error naming a field, never a panic. `${VAR}` names resolve to
//! themselves, so expansion is exercised too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = switchyard::config::Config::parse(text, &|name| Some(name.to_string()));
});
