//! Helpers for the scaler's unit tests: a clock moved by hand and a catalog built the way the
//! binary builds one (from `--observe` flags), so tests keep compiling when specs gain fields.

use std::{sync::Mutex, time::Duration};

use clap::Parser;

use crate::{
    catalog::Catalog,
    clock::Clock,
    config::{Args, Settings},
};

/// A clock the test moves by hand.
#[derive(Debug, Default)]
pub struct Manual(Mutex<Duration>);

impl Manual {
    pub fn at(now: Duration) -> Self {
        Self(Mutex::new(now))
    }

    pub fn set(&self, now: Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }
}

impl Clock for Manual {
    fn now(&self) -> Duration {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A catalog of `NAME=ENDPOINT` services, as `--observe` declares them.
pub fn catalog(observe: &[&str]) -> Catalog {
    let mut argv = vec!["surge-scaler".to_string()];
    for o in observe {
        argv.push("--observe".into());
        argv.push(o.to_string());
    }
    let settings = Settings::resolve(&Args::parse_from(argv), None).expect("valid test services");
    Catalog::new(settings.services)
}
