//! The dataplane agent: `source -> model -> dataplane -> kernel`.
pub mod dataplane;
pub mod model;
