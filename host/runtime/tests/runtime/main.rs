//! The runtime's tests, one binary (wasmtime links slowly): the sandbox's limits, and
//! signed packages with the installed-handler registry.

mod packages;
mod sandbox;
mod support;
