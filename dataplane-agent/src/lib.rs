//! The dataplane agent: `source -> model -> dataplane -> kernel`.
pub mod config;
pub mod conntrack_sweeper;
pub mod dataplane;
pub mod dump;
pub mod health;
pub mod kube_proxy_config;
pub mod kube_proxy_rules;
pub mod metrics;
pub mod model;
pub mod run;
pub mod service_health;
pub mod socket_reaper;
pub mod source;

#[cfg(test)]
mod properties;
