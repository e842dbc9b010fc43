//! Helpers shared by the property tests (each test binary uses a part of them).
#![allow(dead_code)]

pub(crate) mod random_cluster;
