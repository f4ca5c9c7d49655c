//! HTTP/1.1 as the gateway speaks it on its fast paths, one side a file:
//! - `common`: what both sides share (header lines passed on as bytes, header names,
//!   `content-length` values, the limit on headers per head);
//! - [`server`]: the client listener's fast path for plain requests, which hands anything
//!   unusual to hyper;
//! - [`client`]: the connections to backends, with their pool and response body.

mod common;
pub use common::*;

pub mod client;
pub mod server;
