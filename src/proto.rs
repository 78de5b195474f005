//! Generated protobuf and gRPC bindings for every file under `proto/`.
#![allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]

include!(concat!(env!("OUT_DIR"), "/protos.rs"));
