//! The integration tests: one binary, real programs on loopback.
//!
//! `support/` holds the harnesses (moto's EC2 server, a fault-injecting
//! proxy); each other module tests one area against them.

mod ec2;
mod support;
