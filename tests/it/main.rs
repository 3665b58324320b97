//! Integration tests: absconda against real programs or, for GCE, a faithful fake.

mod gce;
mod support;
