//! Authentication. `outbound`: how the gateway proves itself to backends (keys, Entra tokens).
pub mod outbound;
