//! Makes the kernel match the model: loads and attaches the programs, pins
//! them, and writes the maps safely. The only module that touches BPF.
pub mod address_events;
pub mod batch;
pub mod capabilities;
pub mod codec;
pub mod conntrack;
pub mod failpoint;
pub mod interfaces;
pub mod loader;
pub mod maps;
pub mod names;
pub mod netns;
pub mod pins;
pub mod ports;
pub mod sock_diag;
pub mod state;
pub mod upgrade;
