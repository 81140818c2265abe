//! Where cluster state comes from. Only this module reads it.
pub mod kube;
pub mod manifests;
