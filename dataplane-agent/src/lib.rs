//! The dataplane agent: `source -> model -> dataplane -> kernel`.
pub mod model;
