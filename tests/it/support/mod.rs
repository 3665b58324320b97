//! Harnesses shared by the integration tests.

pub mod gce_fake;
