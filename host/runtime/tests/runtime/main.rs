//! The runtime's tests, one binary (wasmtime links slowly): the sandbox's limits, and
//! signed packages with the installed-handler registry; the esp32-app handler end to end.

mod esp32;
mod packages;
mod sandbox;
mod support;
