//! Surge's policy core (see the crate description).
