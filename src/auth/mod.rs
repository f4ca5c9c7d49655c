//! Authentication. `inbound`: who is calling the gateway (consumer keys). `outbound`: how the
//! gateway proves itself to backends (keys, Entra tokens).
pub mod inbound;
pub mod jwt;
pub mod outbound;
