//! Types shared by the kernel programs and the agent: map keys and values (`#[repr(C)]`, no
//! padding left implicit) and the pure classifier that decides where an HTTP message starts.
#![no_std]

pub mod h2;
pub mod http;
pub mod latency;
pub mod maps;
pub mod stream;

pub use maps::*;
