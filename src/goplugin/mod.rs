//! The go-plugin transport, as HashiCorp's `go-plugin` host expects it from a plugin process:
//! magic-cookie check, protocol negotiation, a Unix socket, the stdout handshake line, the
//! housekeeping gRPC services (health, controller, stdio, broker) and hclog JSON logs on stderr.
//!
//! This module knows nothing about Nomad: the application hands in its handshake settings and
//! its own gRPC routes.

pub mod handshake;
pub mod hclog;
pub mod server;
pub mod services;
pub mod socket;

pub use handshake::{CookieError, HandshakeConfig};
pub use server::{ServeError, serve};
