//! Exists so the agent can name this crate as a build-dependency; the BPF
//! programs are the binary target (`src/main.rs`).
#![no_std]
